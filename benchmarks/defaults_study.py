"""Candidate default rules for Amos's eta and lr, measured on the quality suite (quality.py).

Every candidate is written with the public API only (`eta_fn`, `lr`, options, an LR scheduler),
registered as a row of the suite and trained like its other rows, so a rule is measured before it
becomes a default. Rows: "amos TOKENS[@LR]", e.g. "amos eta=fanin1 beta=0.99@0.1" is
Amos(model.named_parameters(), eta_fn=<fanin1>, beta=0.99, lr=0.1); tokens: build_variant.
RULES (matrices, ndim >= 2; C = the slice length, prod(shape[1:]), the fan-in of nn.Linear and conv
weights and the width of an embedding table; vectors and scalars keep eta = 0.5):
  rms        RMS of the initial weights (the official rule)
  fanin1     sqrt(1/C)
  fanin2     sqrt(2/C), the He scale (the default: amos_fused.defaults.eta)
  cap1       min(RMS, sqrt(1/C))
  cap2       min(RMS, sqrt(2/C))
  fit        RMS clamped into [sqrt(1/C), sqrt(2/C)] (the former default)
  floor1     max(RMS, sqrt(1/C))
The AdamW sweep and the plain default row are always trained too (from --cache when it has them).

    python benchmarks/defaults_study.py --variants "eta=rms;eta=fanin1 beta=0.99" --lrs 0.01,0.03,0.1 --seeds 1
    python benchmarks/defaults_study.py ... --tasks lm_torch,digits --steps-factor 3   # another run length
    python benchmarks/defaults_study.py ... --tasks lm_gpt2 --layers 4   # its 4-block version (lm_gpt2_L4), held out
Any other option goes to quality.py (--seeds, --jobs, --cache, --results, ...). Runs are recorded
in benchmarks/results/<device>/defaults_study.jsonl (the quality suite's rows, kept apart from its
own file), and drawn into defaults_study.png; runs with --layers in defaults_study_layers.jsonl / .png,
runs with --steps-factor F in <that kind>_xF.jsonl / .png.
"""
import argparse
import dataclasses
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import quality  # noqa: E402
from amos_fused import Amos  # noqa: E402


def _rms(p):
    return p.detach().double().pow(2).mean().sqrt().item()


def _fan_in(p):
    return math.prod(p.shape[1:])


RULES = {
    "rms": lambda p: _rms(p),
    "fanin1": lambda p: math.sqrt(1 / _fan_in(p)),
    "fanin2": lambda p: math.sqrt(2 / _fan_in(p)),
    "cap1": lambda p: min(_rms(p), math.sqrt(1 / _fan_in(p))),
    "cap2": lambda p: min(_rms(p), math.sqrt(2 / _fan_in(p))),
    "fit": lambda p: min(max(_rms(p), math.sqrt(1 / _fan_in(p))), math.sqrt(2 / _fan_in(p))),
    "floor1": lambda p: max(_rms(p), math.sqrt(1 / _fan_in(p))),
}


def eta_fn_of(rule, vector=None):
    """Matrices by `rule`; vectors and scalars `vector` (None: the official 0.5)."""
    fn = RULES[rule]

    def eta_fn(name, p):
        if p.ndim < 2:
            return vector
        if _rms(p) == 0:
            return None  # the default rule's sqrt(2/C) for a zero matrix
        return fn(p)
    return eta_fn


OPTION_KEYS = {"beta": ("beta", float), "gran": ("granularity", str), "mom": ("momentum", float),
               "clip": ("clip_value", float), "dcoef": ("d_coef", float), "ccoef": ("c_coef", float),
               "l2": ("extra_l2", float)}


def build_variant(spec):
    """`spec`: space-separated KEY=VALUE tokens after "amos": eta=RULE (matrices), vec=X (vectors'
    and scalars' eta, a number), beta=, gran=, mom=, clip=,
    dcoef=, ccoef=, l2= (extra_l2) (Amos options), mdt=bf16|fp32 (momentum storage), warm=F (linear warmup over a
    fraction F of the steps), decay=cos|lin (lr multiplied by a cosine / linear decay to 0 over the run),
    cool=F (lr multiplied by a linear decay to 0 over the last fraction F of the steps),
    rsqrt=W (no run length: a linear warmup over W steps, then the lr times sqrt(W / step)),
    elem=A/B (parameters whose name holds A or B in a group of granularity "element")."""
    options, schedule, eta, elem = {}, {}, dict(rule="rms", vector=None), []
    for token in spec.split():
        key, _, value = token.partition("=")
        if key == "eta":
            eta["rule"] = value
            options["eta_fn"] = eta_fn_of(**eta)
        elif key == "vec":
            eta["vector"] = float(value)
            options["eta_fn"] = eta_fn_of(**eta)
        elif key == "mdt":
            options["momentum_dtype"] = {"bf16": torch.bfloat16, "fp32": torch.float32}[value]
        elif key in OPTION_KEYS:
            name, cast = OPTION_KEYS[key]
            options[name] = cast(value)
        elif key == "elem":
            elem = value.split("/")  # not ",": --rows splits rows on commas
        elif key in ("warm", "decay", "cool"):
            schedule[key] = value if key == "decay" else float(value)
        elif key == "rsqrt":
            schedule[key] = int(value)
        else:
            raise ValueError(f"variant {spec!r}: unknown token {token!r}")

    def build(model, lr, steps):
        kwargs = dict(options, **({} if lr is None else dict(lr=lr)))
        named = list(model.named_parameters())
        params = named
        if elem:  # parameters whose name holds one of `elem`: a group with granularity="element"
            picked = [(n, p) for n, p in named if any(e in n for e in elem)]
            params = [dict(params=[x for x in named if x not in picked]), dict(params=picked, granularity="element")]
        return Amos(params, **kwargs), lr_factor(steps, **schedule) if schedule else None
    return build


def lr_factor(steps, warm=0.0, decay=None, cool=0.0, rsqrt=0):
    warmup, cooldown = round(warm * steps), round(cool * steps)

    def f(i):
        if rsqrt:  # inverse square root after a fixed warmup: the same at every run length
            return min((i + 1) / rsqrt, math.sqrt(rsqrt / (i + 1)))
        x = (i + 1) / warmup if i < warmup else 1.0
        frac = (i - warmup) / max(1, steps - warmup) if i >= warmup else 0.0
        if decay == "cos":
            x *= 0.5 * (1 + math.cos(math.pi * frac))
        elif decay == "lin":
            x *= 1 - frac
        if cooldown:  # warmup-stable-decay: linear to 0 over the last `cool` of the steps
            x *= min(1.0, (steps - i) / cooldown)
        return x
    return f


def deeper(layers):
    """The suite's transformer tasks with `layers` blocks, under the same names plus "_L<layers>"
    (the others are left as they are); --tasks names them so. Returns the new names."""
    names = []
    for task in [t for t in quality.TASKS.values() if t.model and t.model[0] == "transformer"]:
        kind, _, *rest = task.model
        name = f"{task.name}_L{layers}"
        quality.TASKS[name] = dataclasses.replace(task, name=name, model=(kind, layers, *rest),
                                                  title=task.title.replace(f"{task.model[1]}x", f"{layers}x", 1))
        names.append(name)
    return names


def register(specs):
    for spec in specs:
        quality.VARIANTS[f"amos {spec}"] = build_variant(spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    ap.add_argument("--variants", default="eta=rms;eta=cap2;eta=fanin1",
                    help="';'-separated variants, each space-separated tokens (build_variant)")
    ap.add_argument("--lrs", default="", help="lr sweep per variant; empty: the default lr only")
    ap.add_argument("--with-defaults", action="store_true", help="all the suite's default rows, not only AdamW's "
                                                                   "sweep and the default Amos")
    ap.add_argument("--layers", type=int, default=None, help="the transformer tasks with this many blocks (a model "
                                                              "the rules were not chosen on); recorded apart")
    ap.add_argument("--tasks", default=None, help="as quality.py's; with --layers, the transformer tasks (default: "
                                                  "both) are their deeper versions")
    args, rest = ap.parse_known_args(argv)
    kind = "defaults_study"
    tasks = args.tasks
    if args.layers is not None:
        if args.layers < 1:
            ap.error(f"--layers {args.layers}: use a whole number >= 1")
        names = deeper(args.layers)
        kind = "defaults_study_layers"
        by_base = {name.rsplit("_L", 1)[0]: name for name in names}
        tasks = ",".join(by_base.get(t.strip(), t.strip()) for t in tasks.split(",")) if tasks else ",".join(names)
    if tasks is not None:
        rest += ["--tasks", tasks]
    specs = [v.strip() for v in args.variants.split(";") if v.strip()]
    for spec in specs:
        for token in spec.split():
            if token.startswith("eta=") and token[4:] not in RULES:
                ap.error(f"--variants: unknown eta rule {token!r}; use names from {list(RULES)}")
        build_variant(spec)  # raises for a bad token now
    register(specs)
    lrs = [x for x in args.lrs.split(",") if x]
    rows = [f"amos {spec}" + (f"@{lr}" if lr else "") for spec in specs for lr in (lrs or [""])]
    rows_arg = ("+" if args.with_defaults else "adamw-sweep,default,") + ",".join(rows)
    return quality.main(rest + ["--rows", rows_arg], kind=kind, command=bc.command_line(__file__, argv))


if __name__ == "__main__":
    sys.exit(main())
