"""`Amos(backend="reference")` against golden trajectories of the official JAX code.

`golden/jestimator_golden.json` was written by `golden/make_jestimator_golden.py` from
jestimator 0.3.3's `amos.py` in float64 (the script says how to rerun it); this test needs no JAX.
The JSON is in JAX layout: the kernel is (in, out) and its row slots are (1, out), one per output
unit. PyTorch's layout transposes the kernel to (out, in), so those slots become `v` of shape
(out,) with granularity "row"; slots (1, 1) are "tensor"; slots equal to the parameter's shape
(jestimator's default, `shape_fn=None`) are "element", flattened in the memory order of the
transposed kernel. One-slot JAX slots of 1-D and 0-d parameters (`()` or `(1,)`) are R = 1 in
PyTorch, which both "row" and "tensor" give: the test uses each.
"""
import json
import math
import os

import pytest
import torch

from amos_fused import Amos

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden", "jestimator_golden.json")))
CONFIGS = {c["name"]: c for c in GOLDEN["configs"]}
KERNEL = "dense/kernel"  # the one 2-D variable; JAX (in, out), PyTorch (out, in)
ONE_SLICE = {"dense/bias": "row", "norm/scale": "tensor", "scalar": "row"}  # both R = 1 granularities

# Error of an entry: |ours - golden| / max(|golden|, FLOOR * scale), where scale is the largest
# |golden| that tensor (a param, v, b or m of one variable) takes during the run.
# - FLOOR: an entry that passes near zero (a param crossing zero, an m whose old value and new
#   update nearly cancel) carries the absolute rounding error of the terms that produced it, and
#   those are on the tensor's scale, not the entry's: judged by its own size it would fail on
#   rounding alone. So entries under 10% of the tensor's scale are judged against that 10%:
#   in fp32 this admits an absolute error of 1e-6 * scale, about 8-17 ulps at the scale.
#   Exact zeros in the golden data (v and b of a slice whose first gradient is exactly zero)
#   have scale > 0, but are zero here too (docs/algorithm.md: "no decay, no update").
# - float64: 1e-6. Both sides compute in float64; the measured disagreement is
#   ~1e-12 (the JSON keeps 13 significant digits), and a 1% change of any option moves the
#   trajectory by >= 1e-4 (test_golden_detects_wrong_option), so 1e-6 separates them clearly.
# - float32: 1e-5. Params and gradients are rounded to fp32 (6e-8 relative) and each
#   step does about twenty fp32 operations, compounding through v, b and the params over 7 steps;
#   measured maximum 1.2e-6 (params), v and b <= 3e-7, i.e. 8x headroom. Before the reference
#   formed 1 - beta**t in fp64, fp32(0.999)'s error of 1.3e-8 (1.3e-5 of 1 - beta) put b off by
#   2e-5 and params by 4.5e-5 with beta = 0.999: this tolerance caught it.
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}
FLOOR = 0.1
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def to_torch_param(name, value, dtype, device="cpu"):
    """A JAX-layout value (nested lists) as a PyTorch parameter tensor."""
    x = torch.tensor(value, dtype=torch.float64)
    if name == KERNEL:
        x = x.T.contiguous()  # (in, out) -> (out, in)
    return x.to(device, dtype)


def to_torch_slots(name, value):
    """JAX slots (v, b) as our per-slice vector: transpose the kernel's, flatten in memory order."""
    x = torch.tensor(value, dtype=torch.float64)
    if name == KERNEL:
        x = x.T
    return x.reshape(-1)


def granularity(config, name):
    """Our granularity for a variable from its JAX slot shape (see the module docstring)."""
    shapes = {n: list(torch.tensor(v).shape) for n, v in config["init"].items()}
    slots = config["slot_shapes"]
    if all(slots[n] == shapes[n] for n in shapes):  # shape_fn=None: one slot per element
        return "element"
    shape, slot = shapes[name], slots[name]
    if math.prod(slot) == 1:
        return "tensor" if len(shape) >= 2 else ONE_SLICE[name]
    if len(shape) == 2 and slot == [1, shape[1]]:
        return "row"
    raise AssertionError(f"{name}: no granularity maps JAX slots {slot} of a {shape} tensor")


def replay(config, dtype, options=None, lr_of_step=None, device="cpu"):
    """Run our optimizer through a golden configuration; yield (t, what, name, ours, golden).

    `options` overrides options of every group and `lr_of_step(t)` the lr (negative tests).
    """
    o = dict(config["options"])
    names = list(config["init"])
    params = {n: to_torch_param(n, config["init"][n], dtype, device).requires_grad_() for n in names}
    steps = config["steps"]
    groups = [dict(params=[params[n]], eta=config["eta"][n], granularity=granularity(config, n)) for n in names]
    kwargs = dict(lr=steps[0]["lr"], schedule="amos", beta=o["beta"], momentum=o["momentum"],
                  clip_value=o["clip_value"], d_coef=o["d_coef"], c_coef=o["c_coef"],
                  extra_l2=o["extra_l2"], eps=o["epsilon"], backend="reference",
                  momentum_dtype=None)  # m in the compute dtype, as the official code keeps it (default: bf16)
    opt = Amos(groups, **{**kwargs, **(options or {})})
    for t, step in enumerate(steps, start=1):
        for group in opt.param_groups:
            group["lr"] = lr_of_step(t) if lr_of_step else step["lr"]  # lr at 1-based t = schedule(t)
        for n in names:
            params[n].grad = to_torch_param(n, step["grads"][n], dtype, device)
        opt.step()
        for n in names:
            state = opt.state[params[n]]
            yield t, "params", n, params[n].detach().cpu(), to_torch_param(n, step["params"][n], torch.float64)
            yield t, "v", n, state["v"].cpu(), to_torch_slots(n, step["v"][n])
            yield t, "b", n, state["b"].cpu(), to_torch_slots(n, step["b"][n])
            if "m" in step:
                yield t, "m", n, state["m"].cpu(), to_torch_param(n, step["m"][n], torch.float64)


def scale(config, what, name):
    """The largest |golden| entry of `what` ("params", "v", "b", "m") of variable `name` in the run."""
    return max(torch.tensor(step[what][name], dtype=torch.float64).abs().max().item() for step in config["steps"])


def rel_err(ours, gold, scale):
    """Largest |ours - gold| / max(|gold|, FLOOR * scale) over the tensor."""
    assert ours.shape == gold.shape, (ours.shape, gold.shape)
    assert scale > 0
    ours, gold = ours.double(), gold.double()
    return ((ours - gold).abs() / gold.abs().clamp(min=FLOOR * scale)).max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_golden_trajectory(name, dtype, device):
    worst = (0.0, None)
    config = CONFIGS[name]
    for t, what, var, ours, gold in replay(config, dtype, device=device):
        err = rel_err(ours, gold, scale(config, what, var))
        worst = max(worst, (err, f"step {t} {what} of {var}"), key=lambda w: w[0])
    assert worst[0] <= TOL[dtype], f"{name} {dtype} {device}: relative error {worst[0]:.3g} at {worst[1]} > {TOL[dtype]}"


def test_golden_covers_the_issue():
    """Four required configurations (and one more), each >= 5 steps with every option recorded."""
    granularities = {name: {granularity(c, n) for n in c["init"]} for name, c in CONFIGS.items()}
    assert granularities["defaults_row"] >= {"row"} and granularities["element_extra_l2"] == {"element"}
    assert CONFIGS["momentum_clip"]["options"]["momentum"] > 0 and CONFIGS["momentum_clip"]["options"]["clip_value"]
    assert CONFIGS["element_extra_l2"]["options"]["extra_l2"] > 0
    warm = CONFIGS["warmup_dc"]
    assert len({s["lr"] for s in warm["steps"]}) > 1 and (warm["options"]["d_coef"], warm["options"]["c_coef"]) != (0.25, 0.25)
    assert all(len(c["steps"]) >= 5 for c in CONFIGS.values())
    # the clip is active: some golden gradient exceeds clip_value
    clip = CONFIGS["momentum_clip"]["options"]["clip_value"]
    assert any(abs(g) > clip for s in CONFIGS["momentum_clip"]["steps"] for g in torch.tensor(s["grads"][KERNEL]).flatten().tolist())
    # a slice whose first gradient is exactly zero: no update and b stays 0 (checked by replay)
    first = CONFIGS["defaults_row"]["steps"][0]
    assert all(row[0] == 0.0 for row in first["grads"][KERNEL]) and first["b"][KERNEL][0][0] == 0.0


# Each perturbation must move the trajectory well past the float64 tolerance; if one did not,
# the golden data would not pin that option down.
PERTURBED = {
    "d_coef": ("warmup_dc", dict(d_coef=1.01), None),
    "c_coef": ("warmup_dc", dict(c_coef=0.505), None),
    "beta": ("defaults_row", dict(beta=0.9991), None),
    "extra_l2": ("element_extra_l2", dict(extra_l2=0.0101), None),
    "clip_value": ("momentum_clip", dict(clip_value=0.81), None),
    "momentum": ("momentum_clip", dict(momentum=0.89), None),
    "lr_one_step_late": ("warmup_dc", {}, lambda t: CONFIGS["warmup_dc"]["steps"][max(t - 2, 0)]["lr"]),
}


@pytest.mark.parametrize("what", list(PERTURBED))
def test_golden_detects_wrong_option(what):
    name, options, lr_of_step = PERTURBED[what]
    config = CONFIGS[name]
    worst = max(rel_err(ours, gold, scale(config, kind, var)) for _, kind, var, ours, gold in
                replay(config, torch.float64, options=options, lr_of_step=lr_of_step))
    assert worst > 100 * TOL[torch.float64], f"perturbing {what} changed {name} only by {worst:.3g}"
