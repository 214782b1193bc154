"""Optimizer memory on a model-shaped parameter set: Amos granularities x momentum vs AdamW and Adafactor.

For each row: the optimizer-state bytes (every tensor in `optimizer.state`, measured), and the
peak memory of a training step. "Training step" here is the optimizer step with parameters and
gradients resident; activations do not depend on the optimizer and are left out.

- CUDA: `torch.cuda.max_memory_allocated()` around the step (reset before it); the transient is
  the peak minus what was allocated before the step.
- CPU: torch's CPU allocator is invisible to `tracemalloc` (it only sees Python's allocator), so
  the transient is the rise of the process's peak RSS (`VmHWM`, reset through
  /proc/self/clear_refs) over its RSS before the step. The script re-runs itself with
  MALLOC_MMAP_THRESHOLD_=65536 so glibc returns freed buffers to the OS instead of keeping them
  for reuse, which would hide later allocations. Page granularity makes tiny sizes noisy.
The total is params + grads + state + transient. The first step (which creates the state) and a
steady step are reported apart. The rows are appended to benchmarks/results/<device>/memory.jsonl
(bench_common.record; --results DIR elsewhere).

    python benchmarks/memory.py --device cpu --sizes gpt2-124m
"""
import argparse
import os
import sys

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
if __name__ == "__main__" and sys.platform.startswith("linux") and MMAP_ENV not in os.environ:
    # glibc reads it at start-up only: run again with it set (see above), before importing torch
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **{MMAP_ENV: "65536"}))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from amos_fused import Amos, backends  # noqa: E402

GRANULARITIES = ("row", "tensor", "element")
MOMENTA = (("m=0", dict(momentum=0.0)), ("m=0.9 fp32", dict(momentum=0.9, momentum_dtype=torch.float32)),
           ("m=0.9 bf16", dict(momentum=0.9, momentum_dtype=torch.bfloat16)))


def rows():
    out = [("default", lambda ps: Amos(ps, lr=1e-3))]  # what a user gets: every option at its default
    for gran in GRANULARITIES:
        for label, kw in MOMENTA:
            out.append((f"amos {gran} {label}", lambda ps, gran=gran, kw=kw: Amos(ps, granularity=gran, **kw)))
    out += [("adamw foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
            ("adamw fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
            ("adafactor foreach", lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True))]
    return out


# ---- peak measurement -------------------------------------------------------------------------


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def rss_supported():
    try:
        _reset_peak_rss()
        _status_kib("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


def step_peak(step, device):
    """Bytes the step allocates on top of what was resident before it (its transient peak)."""
    bc.free_memory(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def measure(size, device, dtype, progress, notes):
    shapes, description = bc.SIZES[size]
    n = bc.numel(shapes)
    params = bc.make_params(shapes, dtype, device)
    initial = [p.detach().clone() for p in params]
    resident = sum(p.numel() * p.element_size() * 2 for p in params)  # params + grads
    results = []
    bar = progress(rows(), desc=f"memory {size}", unit="row")
    for name, make in bar:
        bar.set_postfix_str(name)
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        try:
            opt = make(params)
            first = step_peak(opt.step, device)   # creates the state: its bytes count here
            state = bc.state_bytes(opt)
            steady = step_peak(opt.step, device)
        except Exception as e:  # one failing row is reported, the others still run
            notes.append(f"{size} {name}: failed, {type(e).__name__}: {e}")
            continue
        finally:
            opt = None
            bc.free_memory(device)
        backend = None
        if name.startswith("amos") or name == "default":
            backend = "auto -> " + backends.resolve("auto", device).__module__.rsplit(".", 1)[-1]
        results.append(dict(size=size, row=name, backend=backend, n_params=n, dtype=str(dtype).replace("torch.", ""),
                            state_bytes=state, state_bytes_per_param=state / n,
                            first_step_transient_bytes=first, steady_step_transient_bytes=steady,
                            params_grads_bytes=resident,
                            peak_total_bytes=resident + max(first, state + steady)))  # first includes the new state
    adamw = next((r for r in results if r["row"] == "adamw fused"), None)
    for r in results:
        r["state_vs_adamw"] = r["state_bytes"] / adamw["state_bytes"] if adamw else None
    return results, dict(n_params=n, n_tensors=len(shapes), description=description)


def markdown(results, sizes_info, device):
    how = "max_memory_allocated" if device.type == "cuda" else "peak RSS rise"
    lines = []
    for size, info in sizes_info.items():
        lines += [f"\n### {size}: {info['n_params'] / 1e6:.1f}M parameters in {info['n_tensors']} tensors",
                  f"Transients: {how} during the step above what was resident before it.\n",
                  "| row | state MB | state B/param | state / AdamW | first step transient MB | "
                  "steady step transient MB | peak total MB (params+grads+state+transient) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in results if r["size"] == size):
            ratio = "-" if r["state_vs_adamw"] is None else f"{r['state_vs_adamw']:.3f}"
            lines.append(f"| {r['row']} | {r['state_bytes'] / 1e6:.3g} | {r['state_bytes_per_param']:.3g} | {ratio} | "
                         f"{r['first_step_transient_bytes'] / 1e6:.3g} | {r['steady_step_transient_bytes'] / 1e6:.3g} | "
                         f"{r['peak_total_bytes'] / 1e6:.4g} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="gpt2-124m", help=f"comma-separated, from {', '.join(bc.SIZES)}")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--note", default="", help="free text stored with the results")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for this run")
    ap.add_argument("--no-progress", action="store_true")
    bc.add_results_option(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu")
    if device.type == "cpu" and not rss_supported():
        raise SystemExit("--device cpu needs Linux's /proc/self/status and /proc/self/clear_refs to read peak RSS")
    sizes = args.sizes.split(",")
    bc.check_sizes(sizes)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        from tqdm import tqdm
        progress = (lambda it, **kw: tqdm(it, file=sys.stderr, disable=args.no_progress, **kw))
    except ImportError:
        progress = (lambda it, **kw: bc.NoProgress(it))

    notes, results, sizes_info = [], [], {}
    date = bc.now_utc()
    for size in sizes:
        res, info = measure(size, device, dtype, progress, notes)
        results += res
        sizes_info[size] = info
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
              f"peak RSS (VmHWM after clear_refs) rise; {MMAP_ENV}={os.environ.get(MMAP_ENV)}")
    machine = bc.machine_info(device)
    print(f"# Optimizer memory: {machine['gpu'] or machine['cpu']}, torch {torch.__version__}, "
          f"{args.dtype}, {date.isoformat(timespec='seconds')}" + (f", {args.note}" if args.note else ""))
    print(markdown(results, sizes_info, device))
    for note in notes:
        print(f"note: {note}")
    path = bc.record("memory", [dict(r, method=method, note=args.note) for r in results], device=device, date=date,
                     command=bc.command_line(__file__, argv), results_dir=args.results)
    print(f"appended {len(results)} rows to {path}")
    return results


if __name__ == "__main__":
    main()
