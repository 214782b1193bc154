"""The main job: does Amos at its defaults train a small language model as well as tuned AdamW?

A byte-level GPT-2-style transformer (lm_model.py) learns Python's own standard library
(lm_data.py: fixed split by path hash). Compared, all but "amos" at its defaults with the same
linear warmup (LambdaLR over the first WARMUP_FRACTION of steps; Amos reads group["lr"] every step):
- "amos": `Amos(model.named_parameters())`, nothing tuned and no scheduler: its own lr schedule
  (a warmup over 200 steps, then an inverse-square-root decay; docs/defaults.md), eta by the rule;
- "inverse_time", "inverse_square": Amos's closed forms, half_life = HALF_LIFE_FRACTION * steps;
  "constant": the closed form without decay;
- "adamw": torch AdamW (betas 0.9/0.95, weight_decay 0.1 on matrices only), linear warmup then
  cosine decay to 0, at the best final validation loss of a small lr sweep (--adamw-lrs).
A name may carry its own lr, `amos@0.3`, which is how the default lr was chosen (docs/benchmarks.md).

Prints a markdown table (validation loss at 25/50/75/100 % of steps, the fraction of AdamW's
steps each run needs to reach AdamW's final validation loss, ms per optimizer step and per whole
training step, optimizer-state bytes), appends one row per training run (curves included) to
benchmarks/results/<device>/convergence.jsonl (bench_common.record; --kind lr_sweep for lr sweeps,
--results DIR elsewhere) and draws convergence.png from it (plots.py).

    python benchmarks/convergence.py                 # default preset, CPU: 7 runs of 400 steps
    python benchmarks/convergence.py --seeds 3       # mean ± spread over seeds
    python benchmarks/convergence.py --quick         # smoke test, seconds
    python benchmarks/convergence.py --optimizers amos@0.03,amos@0.3 --results parts/a  # runs may be split
    python benchmarks/convergence.py --merge parts/a/convergence.jsonl parts/b/convergence.jsonl  # and joined
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

import bench_common as bc
import convergence_report
import lm_data
import plots
from lm_model import ByteLM
from amos_fused import Amos, defaults
from amos_fused.groups import count_matrices

WARMUP_FRACTION = 0.05
HALF_LIFE_FRACTION = 0.25  # closed forms: the step size halves after a quarter of the run
AMOS_FAMILY = ("amos", "inverse_time", "inverse_square", "constant")
OPTIMIZERS = AMOS_FAMILY + ("adamw",)

PRESETS = {
    # a model that trains in minutes on 2 CPU cores, 400 steps
    "default": dict(layers=2, width=128, heads=4, context=64, batch=32, steps=400,
                    corpus_bytes=4_000_000, eval_every=50, eval_batches=8),
    # smoke test: seconds
    "quick": dict(layers=1, width=32, heads=2, context=32, batch=8, steps=24,
                  corpus_bytes=200_000, eval_every=6, eval_batches=2),
    # for a GPU
    "large": dict(layers=6, width=384, heads=6, context=256, batch=64, steps=5000,
                  corpus_bytes=8_000_000, eval_every=250, eval_batches=16),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    for key in ("steps", "layers", "width", "heads", "context", "batch", "eval_every", "eval_batches"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, help="overrides the preset")
    ap.add_argument("--corpus-bytes", type=int, help="overrides the preset")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds (mean ± spread)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help=f"comma-separated subset of {OPTIMIZERS}; NAME@LR fixes the lr")
    ap.add_argument("--adamw-lrs", default="3e-4,1e-3,3e-3", help="AdamW's lr sweep")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--kind", choices=("convergence", "lr_sweep"), default="convergence",
                    help="data file of the runs: convergence (default) or lr_sweep (lr sweeps, kept apart)")
    bc.add_results_option(ap)
    ap.add_argument("--note", default="", help="free text stored with the runs (e.g. 'under load')")
    ap.add_argument("--merge", nargs="+", metavar="JSONL",
                    help="train nothing: report and record the runs, named by --optimizers, of earlier data files")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    cfg = dict(PRESETS[args.preset])
    for key in cfg:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if args.seeds < 1:
        ap.error(f"--seeds={args.seeds}: use 1 or more")
    if cfg["steps"] < 4:
        ap.error(f"--steps={cfg['steps']}: use 4 or more (milestones are quarters of the run)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible; use --device cpu")
    args.cfg = cfg
    args.runs = parse_optimizers(args.optimizers, args.adamw_lrs, ap.error)
    return args


def parse_optimizers(spec, adamw_lrs, error):
    """[(name, lr or None)]: "adamw" without @lr expands to the sweep."""
    runs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, lr = item.partition("@")
        if name not in OPTIMIZERS:
            error(f"--optimizers: unknown {name!r}; use names from {OPTIMIZERS}, optionally NAME@LR")
        try:
            lrs = [float(lr)] if lr else ([float(x) for x in adamw_lrs.split(",")] if name == "adamw" else [None])
        except ValueError:
            error(f"--optimizers/--adamw-lrs: {item!r} or {adamw_lrs!r} holds an lr that is not a number")
        runs += [(name, x) for x in lrs]
    if not runs:
        error("--optimizers: name at least one optimizer")
    return runs


def lr_factor(name, steps):
    """LambdaLR's multiplier: linear warmup for all; AdamW then decays with a cosine to 0."""
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def f(i):  # i = optimizer steps taken so far
        if i < warmup:
            return (i + 1) / warmup
        if name != "adamw":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    return f


def build_optimizer(name, lr, model, steps):
    if name == "adamw":
        matrices = [p for p in model.parameters() if p.ndim >= 2]
        others = [p for p in model.parameters() if p.ndim < 2]
        groups = [dict(params=matrices, weight_decay=0.1), dict(params=others, weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    kwargs = {} if lr is None else dict(lr=lr)
    if name != "amos":
        kwargs["schedule"] = name
    if name in ("inverse_time", "inverse_square"):
        kwargs["half_life"] = max(1, round(HALF_LIFE_FRACTION * steps))
    return Amos(model.named_parameters(), **kwargs)


def eval_grid(steps, every):
    """Steps after which validation loss is measured: 0, every `every`, and each quarter."""
    quarters = {round(steps * k / 4) for k in (1, 2, 3, 4)}
    return sorted({0, *range(every, steps + 1, every), *quarters})


@torch.no_grad()
def evaluate(model, batches):
    model.eval()
    loss = statistics.fmean(model(x, y).item() for x, y in batches)
    model.train()
    return loss


def train_one(name, lr, seed, cfg, data, device, position):
    train, val_batches = data
    torch.manual_seed(seed)
    model = ByteLM(cfg["layers"], cfg["width"], cfg["heads"], cfg["context"]).to(device)
    steps = cfg["steps"]
    opt = build_optimizer(name, lr, model, steps)
    # Amos at its defaults schedules its lr itself (a scheduler would replace that schedule)
    sched = None if bc.schedules_itself(opt) else torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(name, steps))
    gen = torch.Generator().manual_seed(seed)  # same batches for every optimizer of a seed
    grid = eval_grid(steps, cfg["eval_every"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    evals, val, train_curve, t_opt, t_step = [0], [evaluate(model, val_batches)], [None], [], []
    running, diverged = [], False
    label = f"{name}" + ("" if lr is None else f"@{lr:g}")
    bar = tqdm(range(1, steps + 1), desc=f"{label} seed {seed}", leave=False, position=position,
               dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        x, y = (z.to(device) for z in lm_data.train_batch(train, cfg["batch"], cfg["context"], gen))
        sync()
        t0 = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if sched is not None:
            sched.step()
        t_opt.append(t2 - t1)
        t_step.append(time.perf_counter() - t0)
        running.append(loss.item())
        if not math.isfinite(running[-1]):
            diverged = True
            break
        if step in grid:
            evals.append(step)
            val.append(evaluate(model, val_batches))
            train_curve.append(statistics.fmean(running))
            running = []
            bar.set_postfix(val=f"{val[-1]:.3f}")
    bar.close()
    warm = min(5, len(t_opt) - 1)  # the first steps allocate state and warm caches
    return dict(name=name, lr=lr if lr is not None else bc.recorded_lr(opt), lr_given=lr is not None,
                label=label, seed=seed, eval_steps=evals, val_loss=val, train_loss=train_curve,
                final_val=val[-1] if not diverged else math.inf, diverged=diverged,
                ms_opt_step=1e3 * statistics.median(t_opt[warm:]),
                ms_train_step=1e3 * statistics.median(t_step[warm:]),
                state_bytes=bc.state_bytes(opt), params=sum(p.numel() for p in model.parameters()))


def default_lr(name, cfg):
    """The lr Amos gives a group of schedule `name` of this model when none is given (defaults.lr)."""
    with torch.device("meta"):  # shapes only
        model = ByteLM(cfg["layers"], cfg["width"], cfg["heads"], cfg["context"])
    return defaults.lr(name, None, count_matrices([model.parameters()]))  # M as the optimizer counts it


def merge(paths, wanted):
    """Runs from earlier data files (same setup), those named in `wanted` [(name, lr or None)]; of
    several runs of one label and seed, the newest.

    A closed form's run at the lr it gets by default is reported as its default run: it is the same
    computation as `Amos(model.named_parameters(), schedule=...)` without lr (same seed, same
    batches). Not so for "amos": without lr it follows its own lr schedule, with one it keeps that lr.
    """
    rows = [r for p in paths for r in bc.read(p)]
    if not rows:
        raise SystemExit(f"--merge: {paths} hold no runs")
    setup = rows[0]["setup"]
    for r in rows:
        if r["setup"]["config"] != setup["config"] or r["setup"]["corpus"]["sha256"] != setup["corpus"]["sha256"]:
            raise SystemExit(f"--merge: a run of {r['date']} has another model, run length or corpus than the first")
    default = {name: default_lr(name, setup["config"]) for name in AMOS_FAMILY if name != "amos"}

    def rank(r):  # position in --optimizers, None if not wanted
        return next((i for i, (n, lr) in enumerate(wanted) if n == r["name"] and
                     (not r["lr_given"] if lr is None else r["lr_given"] and math.isclose(lr, r["lr"]))), None)

    runs, seen = [], set()
    for row in sorted(rows, key=lambda row: row["date"], reverse=True):  # the newest first
        r = {k: v for k, v in row.items() if k not in bc.RECORD_KEYS and k not in ("setup", "note")}
        r["merged_from"] = row["date"]
        if r["name"] in default and math.isclose(r["lr"], default[r["name"]]):
            r.update(label=r["name"], lr_given=False)
        if (r["label"], r["seed"]) not in seen and rank(r) is not None:
            seen.add((r["label"], r["seed"]))
            r["final_val"] = math.inf if r["diverged"] else r["final_val"]
            runs.append(r)
    if not runs:
        raise SystemExit(f"--merge: no run in {paths} matches --optimizers")
    missing = [n if lr is None else f"{n}@{lr:g}" for i, (n, lr) in enumerate(wanted)
               if all(rank(r) != i for r in runs)]
    if missing:
        print(f"--merge: no run for {', '.join(missing)} in these files; left out", file=sys.stderr)
    runs.sort(key=lambda r: (rank(r), r["seed"]))
    setup = dict(setup, seeds=sorted({r["seed"] for r in runs}))
    return runs, setup


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, device = args.cfg, torch.device(args.device)
    started = bc.now_utc()
    if args.merge:
        runs, setup = merge(args.merge, args.runs)
        cfg = setup["config"]
    else:
        runs, setup = train_all(args, cfg, device)
    summary = convergence_report.summarize(runs, cfg["steps"])
    print(convergence_report.table(summary, cfg["steps"]))
    path = bc.record(args.kind, [dict(r, setup=setup, note=args.note) for r in runs], device=device, date=started,
                     command=bc.command_line(__file__, argv), results_dir=args.results)
    print(f"appended {len(runs)} runs to {path}")
    print(f"drew {plots.plot(args.kind, os.path.dirname(path))}")
    return 0


def train_all(args, cfg, device):
    train, val, corpus = lm_data.load_corpus(cfg["corpus_bytes"])
    data = (train.to(device), lm_data.val_batches(val.to(device), cfg["batch"], cfg["context"], cfg["eval_batches"]))
    seeds = list(range(args.seed, args.seed + args.seeds))
    jobs = [(name, lr, seed) for seed in seeds for name, lr in args.runs]
    runs = []
    with tqdm(jobs, desc="runs", position=0, dynamic_ncols=True) as outer:
        for name, lr, seed in outer:
            runs.append(train_one(name, lr, seed, cfg, data, device, position=1))
    setup = dict(preset=args.preset, config=cfg, seeds=seeds, device=args.device, corpus=corpus,
                 warmup_fraction=WARMUP_FRACTION, half_life_fraction=HALF_LIFE_FRACTION,
                 adamw=dict(betas=(0.9, 0.95), weight_decay=0.1, decay="cosine to 0 after warmup",
                            weight_decay_on="matrices (ndim >= 2)"),
                 init="GPT-2: Linear/Embedding weights N(0, 0.02), biases 0, LayerNorm gains 1",
                 loss="cross-entropy, nats per byte")
    return runs, setup


if __name__ == "__main__":
    sys.exit(main())
