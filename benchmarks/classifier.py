"""Second task: does Amos at its defaults train a small image classifier as well as tuned AdamW?

The language model of convergence.py is one model; this is another kind of problem. A small CNN
classifies scikit-learn's bundled digits (`sklearn.datasets.load_digits`: 1797 8x8 grey images,
10 classes, shipped inside the wheel, no download). Split: stratified 80/20, fixed by
`torch.Generator().manual_seed(SPLIT_SEED)`: within each class, a fixed permutation; the first
20 % (rounded) go to validation. Pixels (0..16) are divided by 16.

Model: conv 1->16 3x3 pad 1, ReLU, maxpool 2 (8x8 -> 4x4); conv 16->32 3x3 pad 1, ReLU, maxpool 2
(-> 2x2); linear 128 -> 10. torch's default init (kaiming-uniform with a=sqrt(5) for weights,
uniform +-1/sqrt(fan_in) for biases). Cross-entropy, minibatches of 64 drawn per seed.

Compared, all but Amos at its defaults with the same linear warmup (convergence.lr_factor: first
5 % of steps):
- "amos": `Amos(model.named_parameters())`, nothing tuned and no scheduler: its own lr schedule
  without a run length (warmup over 200 steps, then an inverse-square-root decay);
- "amos total_steps": `Amos(model.named_parameters(), total_steps=steps)`, nothing tuned: the lr
  follows Amos's own schedule for a run of that length (warmup, peak by the number of matrices, decay);
- "inverse_time": Amos's closed form, half_life = steps / 4, default lr;
- "adamw": torch AdamW, weight_decay 0.01, cosine decay to 0, best final validation loss of
  --adamw-lrs (mean over seeds).
Prints a table, appends one row per training run to benchmarks/results/<device>/classifier.jsonl
(bench_common.record; --results DIR elsewhere) and draws classifier.png from it (plots.py).

    python benchmarks/classifier.py              # 300 steps, 3 seeds, ~1-2 min on 2 CPU cores
    python benchmarks/classifier.py --quick      # smoke test, seconds
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import bench_common as bc
import convergence
import convergence_report
import plots
from amos_fused import Amos

SPLIT_SEED = 1234
VAL_FRACTION = 0.2
BATCH = 64
ADAMW_WEIGHT_DECAY = 0.01
HALF_LIFE_FRACTION = 0.25
TOTAL_STEPS_ROW = "amos total_steps"  # Amos given the run's length: its lr schedule, no LambdaLR
OWN_SCHEDULE = ("amos", TOTAL_STEPS_ROW)  # Amos at its defaults: its own lr schedule, labelled by its peak


def load_digits_split():
    """(x_train, y_train, x_val, y_val): float images (N, 1, 8, 8) in [0, 1], int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("benchmarks/classifier.py needs scikit-learn (requirements.txt): "
                         "pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = round(VAL_FRACTION * len(idx))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    tr, va = torch.cat(train_idx), torch.cat(val_idx)
    return x[tr], y[tr], x[va], y[va]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def build_optimizer(name, lr, model, steps):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    if name == "inverse_time":
        return Amos(model.named_parameters(), schedule="inverse_time",
                    half_life=max(1, round(HALF_LIFE_FRACTION * steps)))
    if name == TOTAL_STEPS_ROW:
        return Amos(model.named_parameters(), total_steps=steps)
    return Amos(model.named_parameters())


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def eval_grid(steps, every):
    return sorted({0, *range(every, steps + 1, every), steps // 2, steps})


def train_one(name, lr, seed, steps, data, every):
    xt, yt, xv, yv = data
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = build_optimizer(name, lr, model, steps)
    # Amos at its defaults schedules its lr itself (a scheduler would replace that schedule)
    factor = convergence.lr_factor(name, steps)
    sched = None if bc.schedules_itself(opt) else torch.optim.lr_scheduler.LambdaLR(opt, factor)
    peak = bc.recorded_lr(opt)
    gen = torch.Generator().manual_seed(seed)  # same minibatches for every optimizer of a seed
    grid = eval_grid(steps, every)
    loss0, acc0 = evaluate(model, xv, yv)
    evals, val_loss, val_acc, t_step = [0], [loss0], [acc0], []
    label = name if lr is None else f"{name}@{lr:g}"
    diverged = False
    for step in tqdm(range(1, steps + 1), desc=f"{label} seed {seed}", leave=False, position=1,
                     dynamic_ncols=True, mininterval=1.0):
        idx = torch.randint(len(xt), (BATCH,), generator=gen)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t_step.append(time.perf_counter() - t0)
        if sched:
            sched.step()
        if not math.isfinite(loss.item()):
            diverged = True
            break
        if step in grid:
            loss_v, acc_v = evaluate(model, xv, yv)
            evals.append(step)
            val_loss.append(loss_v)
            val_acc.append(acc_v)
    warm = min(5, len(t_step) - 1)
    return dict(name=name, lr=lr if lr is not None else peak, label=label,
                seed=seed, eval_steps=evals, val_loss=val_loss, val_acc=val_acc, diverged=diverged,
                final_val=val_loss[-1] if not diverged else math.inf,
                ms_train_step=1e3 * statistics.median(t_step[warm:]),
                state_bytes=bc.state_bytes(opt), params=sum(p.numel() for p in model.parameters()))


def _at(run, key, step):
    return run[key][run["eval_steps"].index(step)] if step in run["eval_steps"] else math.inf


def summarize(runs, steps):
    """One entry per label over seeds, and the AdamW label with the best mean final validation loss."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    by = {lab: [r for r in runs if r["label"] == lab] for lab in labels}
    stats = convergence_report._stats
    adamw = [lab for lab in labels if by[lab][0]["name"] == "adamw"]
    best = min(adamw, key=lambda lab: stats([r["final_val"] for r in by[lab]])["mean"], default=None)
    out = []
    for lab in labels:
        rs = by[lab]
        entry = dict(label=lab, name=rs[0]["name"], lr=rs[0]["lr"], best_adamw=lab == best,
                     seeds=[r["seed"] for r in rs], diverged=sum(r["diverged"] for r in rs),
                     ms_train_step=stats([r["ms_train_step"] for r in rs]),
                     state_bytes=rs[0]["state_bytes"], params=rs[0]["params"])
        for tag, step in (("half", steps // 2), ("final", steps)):
            entry[f"val_loss_{tag}"] = stats([_at(r, "val_loss", step) for r in rs])
            entry[f"val_acc_{tag}"] = stats([_at(r, "val_acc", step) for r in rs])
        out.append(entry)
    return out, best


def table(summary, steps):
    fmt = convergence_report._fmt
    head = (f"| optimizer | lr | val loss @{steps // 2} | val acc @{steps // 2} | val loss @{steps} "
            f"| val acc @{steps} | state bytes | ms/step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in summary:
        name = e["name"] + (" (best of sweep)" if e["best_adamw"] else "")
        lr = f"{e['lr']:.3g}" + ("" if e["name"] == "adamw" else
                                 " (peak, default)" if e["name"] in OWN_SCHEDULE else " (default)")
        lines.append(f"| {name} | {lr} | {fmt(e['val_loss_half'])} | {fmt(e['val_acc_half'])} "
                     f"| {fmt(e['val_loss_final'])} | {fmt(e['val_acc_final'])} | {e['state_bytes']:,} "
                     f"| {fmt(e['ms_train_step'], 2)} |")
    n = len(summary[0]["seeds"]) if summary else 0
    lines += ["", f"Digits validation cross-entropy (nats) and accuracy after {steps // 2} and {steps} steps"
              + (f"; mean ± sample std over {n} seeds." if n > 1 else ", one seed.")
              + " ms/step: median whole training step (forward, backward, optimizer)."]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, help="training steps (default 300; --quick 12)")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (mean ± sample std)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--adamw-lrs", default="3e-3,1e-2,3e-2,1e-1",
                    help="AdamW's lr sweep (first runs: 3e-4 and 1e-3 far behind; best at the top edge of 3e-4..3e-2)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 12 steps, 1 AdamW lr")
    bc.add_results_option(ap)
    ap.add_argument("--note", default="", help="free text stored with the runs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the model is tiny, more threads only contend)")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 12 if args.quick else 300
    if args.steps < 2:
        ap.error(f"--steps={args.steps}: use 2 or more (the table reports the half-way point)")
    if args.seeds < 1:
        ap.error(f"--seeds={args.seeds}: use 1 or more")
    try:
        args.lrs = [float(s) for s in args.adamw_lrs.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--adamw-lrs={args.adamw_lrs!r}: give comma-separated numbers, e.g. 3e-4,1e-3")
    if not args.lrs:
        ap.error("--adamw-lrs: give at least one lr")
    if args.quick:
        args.lrs = args.lrs[1:2] or args.lrs[:1]
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    started = bc.now_utc()
    seeds = list(range(args.seed, args.seed + args.seeds))
    configs = [("amos", None), (TOTAL_STEPS_ROW, None), ("inverse_time", None)] + [("adamw", lr) for lr in args.lrs]
    every = max(1, args.steps // 20)
    runs = [train_one(name, lr, seed, args.steps, data, every)
            for seed, (name, lr) in tqdm([(s, c) for s in seeds for c in configs], desc="runs", position=0,
                                          dynamic_ncols=True)]
    summary, best = summarize(runs, args.steps)
    print(table(summary, args.steps))
    setup = dict(steps=args.steps, seeds=seeds, adamw_lrs=args.lrs,
                 dataset="sklearn.datasets.load_digits (1797 8x8 images, 10 classes)",
                 split=f"stratified {1 - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%}, per-class permutation of "
                       f"torch.Generator seed {SPLIT_SEED}", train_size=len(data[1]), val_size=len(data[3]),
                 model="conv1->16 3x3, ReLU, maxpool2, conv16->32 3x3, ReLU, maxpool2, linear 128->10",
                 init="torch default (kaiming-uniform a=sqrt(5) weights, uniform 1/sqrt(fan_in) biases)",
                 batch=BATCH, warmup_fraction=convergence.WARMUP_FRACTION, half_life_fraction=HALF_LIFE_FRACTION,
                 adamw=dict(betas=(0.9, 0.999), weight_decay=ADAMW_WEIGHT_DECAY, decay="cosine to 0 after warmup",
                            best_lr=next(e["lr"] for e in summary if e["label"] == best)))
    path = bc.record("classifier", [dict(r, setup=setup, note=args.note) for r in runs], device="cpu",
                     date=started, command=bc.command_line(__file__, argv), results_dir=args.results)
    print(f"appended {len(runs)} runs to {path}")
    print(f"drew {plots.plot('classifier', os.path.dirname(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
