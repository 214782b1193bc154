"""Host (Python) time of one `Amos.step` per step, without the kernels' time.

On CUDA a step does not wait for the GPU, so for small models the host time is the step time.
This measures it on the CPU: the parameter set has a model's tensor COUNT (gpt2-124m: 148
tensors) with tiny shapes, and by default the fused op `torch.ops.amos_fused.amos_step_` is
replaced by a Python no-op, so what is left is the Python around it (checks, state lookups,
list building, the skip verdict's small ops). `--real-op` keeps the op (on tiny tensors).
torch.optim.AdamW(fused=True) on the same tensors is the host overhead to beat. The "16 groups"
rows split the same tensors into 16 param groups (layer-wise learning rates); their cost over the
one-group row is printed as a ratio (target: at most 1.2). The rows are appended to
benchmarks/results/cpu/host_overhead.jsonl (bench_common.record; --results DIR elsewhere).

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --profile 'guard=step m=0.9'
"""
import argparse
import cProfile
import contextlib
import os
import pstats
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import amos_fused  # noqa: E402
from amos_fused import Amos, cpp_backend  # noqa: E402,F401  (cpp_backend loads the op)

# the tensor counts of bench_common's model sizes, with tiny dimensions
TINY_SIZES = {
    "gpt2-124m": bc.gpt2_shapes(8, 12, vocab=64, ctx=16),
    "gpt2-350m": bc.gpt2_shapes(8, 24, vocab=64, ctx=16),
}

FP32_M = torch.float32  # the m=0.9 rows keep m in fp32 (as when they were first recorded)
ROWS = {  # label -> Amos options (None: torch AdamW fused)
    "guard=step m=0": dict(guard="step", momentum=0.0),
    "guard=step m=0.9": dict(guard="step", momentum=0.9, momentum_dtype=FP32_M),
    "guard=slice m=0": dict(guard="slice", momentum=0.0),
    "guard=slice m=0.9": dict(guard="slice", momentum=0.9, momentum_dtype=FP32_M),
    "guard=step m=0.9 capturable": dict(guard="step", momentum=0.9, momentum_dtype=FP32_M, capturable=True),
    "guard=step m=0.9 16 groups": dict(guard="step", momentum=0.9, momentum_dtype=FP32_M, groups=16),
    "guard=slice m=0.9 16 groups": dict(guard="slice", momentum=0.9, momentum_dtype=FP32_M, groups=16),
    "default": dict(),  # Amos(params, backend="cpu"): every other option at its default
    "adamw fused": None,
    "step counters only": "counters",
}


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def op_replaced(real):
    """Replace the fused op by a no-op (attribute of the torch.ops namespace, looked up per call)."""
    if real:
        yield
        return
    ns = torch.ops.amos_fused
    saved = ns.amos_step_
    setattr(ns, "amos_step_", _noop)
    try:
        yield
    finally:
        setattr(ns, "amos_step_", saved)


class StepCounters:
    """Only `torch._foreach_add_` of one 0-d counter per tensor, as both optimizers do at every
    step: on the CPU it adds each counter on its own (one dispatch per tensor), on CUDA it is
    one launch, so this part of the CPU numbers is not host time on CUDA."""

    def __init__(self, n):
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in range(n)]

    def step(self):
        torch._foreach_add_(self.steps, 1.0)


def make_optimizer(shapes, options):
    if options == "counters":
        return StepCounters(len(shapes))
    params = bc.make_params(shapes, torch.float32, torch.device("cpu"))
    if options is None:
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    options = dict(options)
    n = options.pop("groups", 1)
    if n > 1:  # consecutive tensors per group (as layers), each its own lr
        cut = [len(params) * i // n for i in range(n + 1)]
        params = [{"params": params[a:b], "lr": 1e-3 * 0.9**i} for i, (a, b) in enumerate(zip(cut, cut[1:]))]
    return Amos(params, backend="cpu", **options)


def time_rows(shapes, labels, steps, repeats, clock):
    """{label: microseconds of one step in each of `repeats` blocks of `steps` steps}, after a
    warm-up. The rows take turns block by block (the first of a turn rotating), so a shared
    machine's load drifts over all rows alike and ratios can be taken block by block."""
    opts = {label: make_optimizer(shapes, ROWS[label]) for label in labels}
    for opt in opts.values():
        for _ in range(5):
            opt.step()
    now = bc.CLOCKS[clock]
    blocks = {label: [] for label in labels}
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            opt = opts[label]
            t0 = now()
            for _ in range(steps):
                opt.step()
            blocks[label].append((now() - t0) / steps * 1e6)
    return blocks


def profile_row(shapes, options, steps, top):
    opt = make_optimizer(shapes, options)
    for _ in range(5):
        opt.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        opt.step()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="gpt2-124m", choices=sorted(TINY_SIZES))
    ap.add_argument("--steps", type=int, default=200, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="timed blocks per row, the rows taking turns "
                    "(their median and min are reported)")
    ap.add_argument("--clock", default="process", choices=sorted(bc.CLOCKS),
                    help="process (default): this process' CPU time, robust on a shared machine; wall: perf_counter")
    ap.add_argument("--real-op", action="store_true", help="run the fused op (tiny tensors) instead of a no-op")
    ap.add_argument("--rows", default=None, help="comma-separated row labels (default: all)")
    ap.add_argument("--profile", default=None, metavar="ROW", help="cProfile this row instead of timing")
    ap.add_argument("--top", type=int, default=25)
    bc.add_results_option(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes = TINY_SIZES[args.size]
    with op_replaced(args.real_op):
        if args.profile:
            profile_row(shapes, ROWS[args.profile], args.steps, args.top)
            return
        labels = args.rows.split(",") if args.rows else list(ROWS)
        unknown = [label for label in labels if label not in ROWS]
        if unknown:
            ap.error(f"--rows: unknown {unknown}; use some of {', '.join(ROWS)}")
        date, results = bc.now_utc(), []
        print(f"{args.size}: {len(shapes)} tensors, fused op {'run' if args.real_op else 'replaced by a no-op'}, "
              f"{args.clock} clock, amos_fused from {os.path.dirname(amos_fused.__file__)}")
        print(f"{'row':32s} {'us/step':>9s} {'us/tensor':>10s} {'min us/step':>12s}")
        blocks = time_rows(shapes, labels, args.steps, args.repeats, args.clock)
        for label in labels:
            us, low = statistics.median(blocks[label]), min(blocks[label])
            print(f"{label:32s} {us:9.1f} {us / len(shapes):10.2f} {low:12.1f}")
            results.append(dict(size=args.size, n_tensors=len(shapes), row=label, us_per_step=us,
                                us_per_tensor=us / len(shapes), min_us_per_step=low, clock=args.clock,
                                real_op=args.real_op, steps=args.steps, repeats=args.repeats))
        for label in labels:  # "X 16 groups" against "X": the median of the turns' ratios
            one = label.rsplit(" ", 2)[0]
            if label.endswith(" groups") and one in blocks:
                ratio = statistics.median(b / a for a, b in zip(blocks[one], blocks[label]))
                print(f"{label} / {one}: {ratio:.2f} (median of {args.repeats} turns; target <= 1.2)")
    path = bc.record("host_overhead", results, device="cpu", date=date, command=bc.command_line(__file__, argv),
                     results_dir=args.results)
    print(f"appended {len(results)} rows to {path}")


if __name__ == "__main__":
    main()
