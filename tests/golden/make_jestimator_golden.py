"""Write golden Amos trajectories from the official JAX code (jestimator 0.3.3, `amos.py`).

The package `jestimator` no longer imports on current JAX, but its `amos.py` loads on its own
(it needs only jax, optax and flax), so this script loads that one file and runs it in float64
(`jax_enable_x64`) on a small tree in JAX layout, for several configurations, and writes
`jestimator_golden.json` next to itself. `tests/test_golden.py` replays the same gradients
through `amos_fused.Amos` and needs neither JAX nor this script.

Run it from a separate environment, never the project's .venv:

    python3 -m venv /tmp/jaxenv
    /tmp/jaxenv/bin/pip install jax jaxlib optax flax numpy
    /tmp/jaxenv/bin/python tests/golden/make_jestimator_golden.py [--jestimator PATH]

PATH is `amos.py` itself, a directory holding `jestimator/amos.py` (an unpacked wheel or a
site-packages), or the wheel `jestimator-0.3.3-py3-none-any.whl`. Without it, the script runs
`pip download jestimator==0.3.3 --no-deps` into a temporary directory and reads the wheel.
The file's SHA-256 must equal `AMOS_SHA256` (the 0.3.3 release), unless `--any-version`.

The tree: `dense/kernel` (in, out) = (3, 4), `dense/bias` (4,), `norm/scale` (5,), `scalar` ().
Inputs (initial params, gradients, lr values) are rounded to 6 significant digits before the
run, so the JSON stores them exactly; outputs are stored with 13 significant digits (relative
rounding 5e-14, far below the tests' tolerances). Gradients come from numpy with a fixed seed.
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile

import numpy as np

AMOS_SHA256 = "eef16abd45eac561600335173eabeba23c6d6a0d0c86f2075dae796b732c97b5"  # jestimator 0.3.3
SEED = 20221021
STEPS = 7

# name -> (JAX shape, eta, gradient scale, initial-value generator)
TREE = {
    "dense/kernel": ((3, 4), 0.3, 1.0, lambda rng, s: 0.3 * rng.standard_normal(s)),
    "dense/bias": ((4,), 0.5, 0.1, lambda rng, s: 0.1 * rng.standard_normal(s)),
    "norm/scale": ((5,), 1.0, 0.01, lambda rng, s: 1.0 + 0.1 * rng.standard_normal(s)),
    "scalar": ((), 0.5, 1e-3, lambda rng, s: np.array(0.7)),
}

# Slot shapes (`shape_fn`) per variable: "row" reduces the kernel's fan-in axis 0 (PyTorch's one
# slice per output unit), "tensor" reduces every axis; None is jestimator's element-wise default.
SLOTS = {
    "row": {"dense/kernel": (1, 4), "dense/bias": (1,), "norm/scale": (), "scalar": ()},
    "tensor": {"dense/kernel": (1, 1), "dense/bias": (), "norm/scale": (1,), "scalar": ()},
}

WARMUP = 4


def warmup_lr(peak):
    """A JAX learning-rate schedule of the 1-based step count: linear warmup, then constant."""
    import jax.numpy as jnp
    # count is int32; cast it, or the division gives float32 and xi loses float64 precision
    return lambda count: peak * jnp.minimum(jnp.asarray(count, jnp.float64) / WARMUP, 1.0)


# Every option of `amos.amos` is passed explicitly (its momentum defaults to None, not 0.9).
CONFIGS = [
    dict(name="defaults_row", slots="row", lr=0.25, beta=0.999, momentum=0.0, clip_value=None,
         extra_l2=0.0, d_coef=0.25, c_coef=0.25),
    dict(name="momentum_clip", slots="row", lr=0.25, beta=0.99, momentum=0.9, clip_value=0.8,
         extra_l2=0.0, d_coef=0.25, c_coef=0.25),
    dict(name="element_extra_l2", slots=None, lr=0.25, beta=0.999, momentum=0.0, clip_value=None,
         extra_l2=0.01, d_coef=0.25, c_coef=0.25),
    dict(name="warmup_dc", slots="row", lr={"warmup_peak": 0.4, "warmup_steps": WARMUP}, beta=0.999,
         momentum=0.0, clip_value=None, extra_l2=0.0, d_coef=1.0, c_coef=0.5),
    dict(name="tensor_momentum", slots="tensor", lr=0.2, beta=0.995, momentum=0.5, clip_value=None,
         extra_l2=0.001, d_coef=0.25, c_coef=0.25),
]
EPSILON = 1.0 / (1 << 125)


def read_amos_source(path):
    """The text of jestimator's amos.py from a file, a directory, a wheel, or `pip download`."""
    if path is None:
        tmp = tempfile.mkdtemp(prefix="jestimator-")
        subprocess.run([sys.executable, "-m", "pip", "download", "jestimator==0.3.3", "--no-deps",
                        "--only-binary", ":all:", "-d", tmp], check=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(wheels) != 1:
            sys.exit(f"pip download left {wheels} in {tmp}; pass --jestimator PATH instead")
        path = os.path.join(tmp, wheels[0])
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as whl:
            return whl.read("jestimator/amos.py").decode(), path + "!jestimator/amos.py"
    if os.path.isdir(path):
        for candidate in (os.path.join(path, "jestimator", "amos.py"), os.path.join(path, "amos.py")):
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            sys.exit(f"no jestimator/amos.py under {path}")
    with open(path) as f:
        return f.read(), path


def load_amos(source, origin):
    module = types.ModuleType("jestimator_amos")
    module.__file__ = origin
    exec(compile(source, origin, "exec"), module.__dict__)
    return module


def rounded(x, digits):
    """x (array or scalar) rounded to `digits` significant digits, as float64."""
    return np.vectorize(lambda e: float(f"{e:.{digits}g}"), otypes=[np.float64])(np.asarray(x, np.float64))


def as_json(x):
    """Nested lists (or a float for 0-d) with 13 significant digits."""
    return rounded(np.asarray(x), 13).tolist()


def nest(flat):
    """{"dense/kernel": x, ...} -> {"dense": {"kernel": x}, ...}: the tree amos.py walks."""
    tree = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def unnest(tree):
    from flax.traverse_util import flatten_dict
    return {"/".join(k): v for k, v in flatten_dict(tree).items()}


def find_state(state, field):
    """The first sub-state of an optax (chain) state that has `field`."""
    if hasattr(state, field):
        return state
    if isinstance(state, tuple):
        for sub in state:
            found = find_state(sub, field)
            if found is not None:
                return found
    return None


def make_inputs(rng):
    init = {name: rounded(f(rng, shape), 6) for name, (shape, _, _, f) in TREE.items()}
    step_scale = [1.0, 0.5, 2.0, 1.0, 0.25, 4.0, 1.0]
    grads = []
    for t in range(STEPS):
        g = {name: rounded(scale * step_scale[t] * rng.standard_normal(shape), 6)
             for name, (shape, _, scale, _) in TREE.items()}
        if t == 0:
            g["dense/kernel"][:, 0] = 0.0  # one output unit without gradient: "no update, b unchanged"
        if t == 3:
            g["scalar"] = np.zeros(())  # a zero gradient once the second moment is positive
        grads.append(g)
    return init, grads


def run_config(amos_mod, cfg, init, grads):
    import jax.numpy as jnp
    import optax

    lr = cfg["lr"]
    learning_rate = warmup_lr(lr["warmup_peak"]) if isinstance(lr, dict) else lr
    lr_values = [learning_rate(jnp.asarray(t, jnp.int32)) if callable(learning_rate) else lr
                 for t in range(1, STEPS + 1)]
    assert all(np.asarray(x).dtype == np.float64 for x in lr_values), "lr must stay float64"
    lr_values = [float(x) for x in lr_values]
    eta = {name: spec[1] for name, spec in TREE.items()}
    slots = SLOTS[cfg["slots"]] if cfg["slots"] else None
    shape_fn = (lambda name, shape: slots["/".join(name)]) if slots else None
    tx = amos_mod.amos(learning_rate, lambda name, shape: eta["/".join(name)], shape_fn=shape_fn,
                       beta=cfg["beta"], momentum=cfg["momentum"], clip_value=cfg["clip_value"],
                       extra_l2=cfg["extra_l2"], d_coef=cfg["d_coef"], c_coef=cfg["c_coef"],
                       epsilon=EPSILON)
    params = nest({k: jnp.asarray(v, jnp.float64) for k, v in init.items()})
    state = tx.init(params)
    steps = []
    for t in range(STEPS):
        g = nest({k: jnp.asarray(v, jnp.float64) for k, v in grads[t].items()})
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        amos_state = find_state(state, "b")
        record = {"lr": lr_values[t], "grads": {k: v.tolist() for k, v in grads[t].items()},
                  "params": {k: as_json(v) for k, v in unnest(params).items()},
                  "v": {k: as_json(v) for k, v in unnest(amos_state.v).items()},
                  "b": {k: as_json(v) for k, v in unnest(amos_state.b).items()}}
        ema = find_state(state, "ema")
        if ema is not None:
            record["m"] = {k: as_json(v) for k, v in unnest(ema.ema).items()}
        assert int(amos_state.count) == t + 1
        steps.append(record)
        for name, value in unnest(params).items():
            assert value.dtype == jnp.float64 and np.all(np.isfinite(np.asarray(value))), name
    options = {k: cfg[k] for k in ("lr", "beta", "momentum", "clip_value", "extra_l2", "d_coef", "c_coef")}
    options["epsilon"] = EPSILON
    return {"name": cfg["name"], "options": options,
            "slot_shapes": {k: list(np.shape(v)) for k, v in unnest(find_state(tx.init(params), "b").b).items()},
            "eta": eta, "init": {k: v.tolist() for k, v in init.items()}, "steps": steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jestimator", help="amos.py, a directory holding jestimator/amos.py, or the wheel")
    ap.add_argument("--any-version", action="store_true", help="accept an amos.py other than 0.3.3's")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "jestimator_golden.json"))
    args = ap.parse_args()

    import jax
    jax.config.update("jax_enable_x64", True)

    source, origin = read_amos_source(args.jestimator)
    sha = hashlib.sha256(source.encode()).hexdigest()
    if sha != AMOS_SHA256 and not args.any_version:
        sys.exit(f"{origin} has SHA-256 {sha}, not jestimator 0.3.3's {AMOS_SHA256}; "
                 "pass the 0.3.3 release or --any-version")
    amos_mod = load_amos(source, origin)

    init, grads = make_inputs(np.random.default_rng(SEED))
    golden = {
        "source": {"package": "jestimator==0.3.3", "file": "jestimator/amos.py", "sha256": sha,
                   "generator": "tests/golden/make_jestimator_golden.py", "seed": SEED,
                   "versions": {m: importlib.metadata.version(m) for m in ("jax", "jaxlib", "optax", "flax", "numpy")},
                   "dtype": "float64 (jax_enable_x64)"},
        "layout": "JAX: dense/kernel is (in, out); its slots reduce axis 0 for one slot per output unit",
        "configs": [run_config(amos_mod, cfg, init, grads) for cfg in CONFIGS],
    }
    with open(args.out, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) from {origin}")


if __name__ == "__main__":
    main()
