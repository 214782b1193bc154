"""Whole optimizer steps on the CPU, interleaved: every row timed once per round, many rounds.

`step_time.py` times its rows one after another, so on a shared machine a row can land in a
slow minute; here every round times every row once, in one process, so all rows see the same
conditions and the ratios are side by side. Rows: `default`, `Amos(params, lr=1e-3)` with every
other option at its default (what a user gets); `Amos.step` of the `cpu` backend with
guard="step" and guard="slice" for the amos families, torch `AdamW(fused=True)`, and the
streaming reference `a += b` over the same number of elements (12 B/element, as Amos m=0), and
the compute reference (bench_common.compute_reference), whose time rises when the CPU itself runs
slow.
Prints median and min per row, the ratio of fused AdamW's median time to each row's (above 1:
faster than fused AdamW), the median over rounds of that ratio within each round (robust to the
machine's slow and fast minutes: both steps of a round see the same ones) and the row's time over
`a += b`'s. Each round starts one row later than the one before (bench_common.rotated), so no
row always follows the same other row. One row per line of the table, with its per-round times,
is appended to benchmarks/results/cpu/interleaved.jsonl (bench_common.record; --results DIR elsewhere).

    python benchmarks/cpu_interleaved.py --size gpt2-50m --rounds 40
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from amos_fused import Amos  # noqa: E402

FAMILIES = [
    ("amos m=0", dict(schedule="amos", momentum=0.0)),
    ("amos m=0.9", dict(schedule="amos", momentum=0.9, momentum_dtype=torch.float32)),
    ("amos m=0.9 bf16", dict(schedule="amos", momentum=0.9, momentum_dtype=torch.bfloat16)),
    ("inverse_time m=0", dict(schedule="inverse_time", half_life=1000.0, momentum=0.0)),
]


def _params(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).requires_grad_()
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def build_rows(shapes):
    rows = {}
    n = bc.numel(shapes)
    a, b = torch.zeros(n), torch.ones(n)
    rows["a += b"] = lambda: a.add_(b)
    rows[bc.COMPUTE_ROW] = bc.compute_reference()
    rows["default"] = Amos(_params(shapes, 98), lr=1e-3).step  # every other option at its default
    for i, (label, options) in enumerate(FAMILIES):
        for guard in ("step", "slice"):
            opt = Amos(_params(shapes, i), lr=1e-3, backend="cpu", guard=guard, **options)
            rows[f"Amos.step {label} guard={guard}"] = opt.step
    adamw = torch.optim.AdamW(_params(shapes, 99), lr=1e-3, fused=True)
    rows["AdamW(fused=True).step"] = adamw.step
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="gpt2-50m", help=f"one of {', '.join(bc.SIZES)}")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    bc.add_results_option(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = bc.SIZES[args.size][0]
    rows = build_rows(shapes)
    for step in rows.values():  # warm-up: state creation, the plan of later steps
        step()
        step()
    times = {name: [] for name in rows}
    date = bc.now_utc()
    for k in range(args.rounds):
        for name, step in bc.rotated(list(rows.items()), k):
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    adamw_ts = times["AdamW(fused=True).step"]
    adamw, stream = med["AdamW(fused=True).step"], med["a += b"]
    n = bc.numel(shapes)
    print(f"# {args.size}: {n / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors, {args.threads} threads, "
          f"{args.rounds} interleaved rounds; {bc.machine_info(torch.device('cpu'))['cpu']}, "
          f"torch {torch.__version__}, commit {bc.git_commit()}")
    print("| row | median ms | min ms | fused AdamW time / row time | the same, median of per-round ratios "
          "| row / `a += b` |")
    print("|---|---:|---:|---:|---:|---:|")
    results = []
    for name, ts in times.items():
        per_round = statistics.median(a / t for a, t in zip(adamw_ts, ts))
        print(f"| {name} | {med[name]:.2f} | {min(ts):.2f} | {adamw / med[name]:.2f} | {per_round:.2f} "
              f"| {med[name] / stream:.2f} |")
        results.append(dict(size=args.size, numel=n, threads=args.threads, rounds=args.rounds, row=name,
                            median_ms=med[name], min_ms=min(ts), x_adamw_fused=adamw / med[name],
                            x_adamw_fused_per_round=per_round, x_stream=med[name] / stream, times_ms=ts))
    path = bc.record("interleaved", results, device="cpu", date=date, command=bc.command_line(__file__, argv),
                     results_dir=args.results)
    print(f"appended {len(results)} rows to {path}")


if __name__ == "__main__":
    main()
