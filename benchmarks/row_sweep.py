"""Achieved bandwidth of one fused step by row width: where the kernels lose time, and what the
cuda kernels' L2 prefetch buys (AMOS_FUSED_CUDA_PREFETCH=0 turns it off), side by side in one run.

For every row width C: one [R, C] parameter of about --numel elements (row granularity, so a
slice is a row and C picks the kernel path: warp rows up to 1024, block rows up to 8192, longer
rows in pieces), `Amos(guard="slice").step()` timed (median of --repeats after warm-up; CUDA
events on GPU), its bytes (bench_common's per-parameter minimum) per second, and that as a
percentage of `a += b` over as many elements, measured in the same run. Families: amos m=0 (one
pass), amos m=0.9, inverse_time m=0 (the closed forms' reduce, finalize and apply launches).
The rows are appended to benchmarks/results/<device>/row_sweep.jsonl (bench_common.record;
--results DIR elsewhere) and row_sweep.png is drawn from it (plots.py).

    python benchmarks/row_sweep.py --device cuda --backends cuda,triton
    python benchmarks/row_sweep.py --device cpu --numel 100000 --widths 64,4096
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import plots  # noqa: E402
from amos_fused import Amos  # noqa: E402

WIDTHS = (16, 64, 256, 768, 2048, 3072, 5632, 8192, 32768)
FAMILIES = {
    "amos m=0": dict(schedule="amos", momentum=0.0),
    "amos m=0.9": dict(schedule="amos", momentum=0.9),
    "inverse_time m=0": dict(schedule="inverse_time", half_life=1000.0, momentum=0.0),
}


def bytes_per_param(options, psize):
    if options["momentum"] > 0:
        return bc.amos_bytes(psize, 4)
    return bc.amos_bytes(psize, closed_form=options["schedule"] != "amos")


def time_row(param, options, backend, prefetch, device, warmup, repeats):
    """Median seconds of one Amos step on `param` with the prefetch switch set as asked."""
    opt = Amos([param], backend=backend, guard="slice", **options)
    with bc.cuda_prefetch(prefetch):
        times, _ = bc.time_steps(opt.step, device, warmup, repeats)
    del opt
    return bc.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", help="comma-separated Amos backends (default: cuda on GPU, cpu on CPU)")
    ap.add_argument("--numel", type=int, default=1 << 27, help="elements per parameter (default 2^27)")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="comma-separated row widths C")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    bc.add_results_option(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    names = (args.backends or ("cuda" if device.type == "cuda" else "cpu")).split(",")
    widths = [int(w) for w in args.widths.split(",")]
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or any(w < 1 for w in widths) or args.numel < 1:
        ap.error(f"unknown families {unknown}" if unknown else "widths and --numel must be positive")
    roof = bc.stream_bandwidth(args.numel, torch.float32, device, repeats=args.repeats)
    info = bc.machine_info(device)
    print(f"{info['gpu'] or info['cpu']}; a += b over {args.numel} fp32: {roof:.0f} GB/s")
    print(f"{'C':>6} {'rows':>8} {'backend':8} {'family':18} {'prefetch':8} {'ms':>8} {'GB/s':>8} {'% a+=b':>7}")
    results = []
    date, command, path = bc.now_utc(), bc.command_line(__file__, argv), None
    gen = torch.Generator(device=device).manual_seed(0)
    for C in widths:
        R = max(1, args.numel // C)
        param = torch.empty(R, C, device=device).normal_(0.0, 0.02, generator=gen)
        param.grad = torch.empty_like(param).normal_(0.0, 1e-3, generator=gen)
        start = param.detach().clone()
        for family in families:
            options = FAMILIES[family]
            nbytes = bytes_per_param(options, 4) * param.numel()
            # prefetch on and off only where the switch means something
            for backend, prefetch in [(b, s) for b in names for s in ((True, False) if b == "cuda" else (True,))]:
                with torch.no_grad():
                    param.copy_(start)
                sec = time_row(param, options, backend, prefetch, device, args.warmup, args.repeats)
                gbs = nbytes / sec / 1e9
                label = ("on" if prefetch else "off") if backend == "cuda" else "-"
                print(f"{C:>6} {R:>8} {backend:8} {family:18} {label:8} {sec * 1e3:8.3f} {gbs:8.0f} "
                      f"{100 * gbs / roof:6.0f}%")
                results.append(dict(C=C, R=R, backend=backend, family=family, prefetch=label, ms=sec * 1e3,
                                    gb_s=gbs, pct_stream=100 * gbs / roof))
        del param, start
        bc.free_memory(device)
        # after every width: a run cut short by a time limit keeps what it measured
        path = bc.record("row_sweep", [dict(r, numel=args.numel, stream_gb_s=roof) for r in results if r["C"] == C],
                         device=device, date=date, command=command, results_dir=args.results)
    if "cuda" in names:
        for C in widths:
            for family in families:
                on, off = ([r["ms"] for r in results if r["C"] == C and r["family"] == family and r["prefetch"] == s]
                           for s in ("on", "off"))
                print(f"cuda prefetch off/on time, C={C} {family}: {off[0] / on[0]:.2f}x")
    if path:
        print(f"appended {len(results)} rows to {path}")
        print(f"drew {plots.plot('row_sweep', os.path.dirname(path))}")
    return results


if __name__ == "__main__":
    main()
