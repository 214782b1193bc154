"""Optimizer step time on model-shaped parameter sets: Amos backends vs torch.compile, AdamW, Adafactor, apex.

For every size and row: the median step time after warm-up (CUDA events on GPU, perf_counter on
CPU), the bytes per parameter the row must move (bench_common: from its state layout), the
achieved GB/s, that as a percentage of an in-place streaming op (`a += b` over buffers as large
as the parameters) measured in the same run, the ratio to torch's fused and foreach AdamW, and
the bytes of optimizer state. The rows are appended to benchmarks/results/<device>/step_time.jsonl
(bench_common.record; --results DIR elsewhere) and step_time.png is drawn from it (plots.py).
Amos rows call `Amos.step()` as a user does. Rows without "guard=slice" in their label run
guard="step", so they include its non-finite-gradient verdict (one more read of every gradient,
not in the minimum bytes); rows marked "guard=slice" run Amos(guard="slice"), whose kernels guard
each slice themselves (one pass over the gradients, like AdamW's, which checks nothing). The row
"default" is `Amos(params, lr=1e-3)`: every other option at its default, what a user gets.

    python benchmarks/step_time.py --device cpu --quick
    python benchmarks/step_time.py --device cuda --sizes gpt2-124m,llama-1b --backends cuda,triton,adamw
    python benchmarks/step_time.py --device cpu --sizes gpt2-50m --threads 2 --results my_results
"""
import argparse
import contextlib
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import plots  # noqa: E402
from amos_fused import Amos, backends  # noqa: E402
from amos_fused.reference import reference_step  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (label, Amos options). "amos m=0.9" keeps m in fp32, "bf16" in bf16; the closed form stands for
# the family sharing one kernel shape (docs/algorithm.md, "Closed-form schedules" and "Kernel phases").
# Rows without "guard=slice" in their label run guard="step"; the row "default" is
# Amos(params, lr=1e-3), every other option at its default.
FAMILIES = [
    ("amos m=0", dict(schedule="amos", momentum=0.0)),
    ("amos m=0.9", dict(schedule="amos", momentum=0.9, momentum_dtype=torch.float32)),
    ("amos m=0.9 bf16", dict(schedule="amos", momentum=0.9, momentum_dtype=torch.bfloat16)),
    ("inverse_time m=0", dict(schedule="inverse_time", half_life=1000.0, momentum=0.0)),
]
QUICK_COMPILE_FAMILIES = ("amos m=0.9",)  # compiling takes tens of seconds per family on 2 cores
# also timed with guard="slice" (no verdict read)
GUARD_SLICE_FAMILIES = ("amos m=0", "amos m=0.9", "amos m=0.9 bf16")
TRITON_COLB_FAMILIES = ("amos m=0", "amos m=0.9")  # on CUDA: also timed with other max_colb (below)
TRITON_MAX_COLB = (4096,)  # the compiled heuristic has 1024; sm_90 ptxas: 4096 needs fewer registers
KERNEL_ONLY_FAMILIES = ("amos m=0", "amos m=0.9")  # on CUDA: also timed without Amos.step around them

BASELINES = ("default", "compile", "adamw", "adafactor", "apex")
DEFAULT_SIZES = {"cpu": ("gpt2-124m", "gpt2-350m", "many-small"),
                 "cuda": ("gpt2-124m", "gpt2-350m", "gpt2-1.3b", "llama-1b", "many-small")}
QUICK_SIZES = ("gpt2-mini",)


class Row:
    """One line of the table: how to build its step, and the bytes it must move per parameter."""

    def __init__(self, name, group, make, bytes_per_param, bytes_rule, family=None, backend=None):
        self.name, self.group, self.make = name, group, make
        self.bytes_per_param, self.bytes_rule = bytes_per_param, bytes_rule
        self.family, self.backend = family, backend


def amos_bytes_for(options, psize):
    if options["momentum"] > 0:
        msize = torch.tensor([], dtype=options.get("momentum_dtype") or torch.float32).element_size()
        return bc.amos_bytes(psize, msize), f"g {psize} + theta 2x{psize} + m 2x{msize}"
    if options["schedule"] != "amos":
        return bc.amos_bytes(psize, closed_form=True), f"g 2x{psize} (||u|| first) + theta 2x{psize}"
    return bc.amos_bytes(psize), f"g {psize} + theta 2x{psize}"


# ---- torch.compile of the reference step --------------------------------------------------------


def _compiled_reference():
    """The reference step under torch.compile, called once per tensor (what a user without
    custom kernels would do). dynamic=True: one graph per tensor rank, reused across shapes."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    # A fresh cache per row: graphs of another family were seen reused for this one (a graph
    # compiled with momentum > 0 raised KeyError 'm' on a momentum=0 group), so every row
    # compiles its own, and its first call shows the cost.
    torch._dynamo.reset()
    # 2 ranks x recompiles on guards can pass the default limit of 8; past it dynamo silently
    # runs eager, which would time the wrong thing.
    dynamo_config.recompile_limit = 64
    return torch.compile(reference_step, dynamic=True)


@contextlib.contextmanager
def _amos_with(step_fn):
    """Amos.step with its backend replaced by `step_fn` (same checks, state and step counter)."""
    calls = []

    def step(params, grads, states, group, grad_scale, skip=None, guarded=None):
        calls.append(1)
        if skip is None or not bool(skip):  # on CUDA Amos hands over its verdict as a tensor
            step_fn(params, grads, states, group, grad_scale)

    with mock.patch.object(backends, "resolve", lambda name, device: step):
        yield
    if not calls:
        raise RuntimeError("Amos.step no longer calls backends.resolve; update _amos_with in step_time.py")


# ---- rows -------------------------------------------------------------------------------------


def amos_backend_rows(requested, device, psize, notes):
    rows = []
    for name in backends.BACKENDS:
        if name == "auto" or (requested is not None and name not in requested):
            continue
        if name == "triton" and device.type == "cpu":
            notes.append("amos/triton: on CPU Triton runs only in its interpreter, which is not a performance path; not timed")
            continue
        try:
            backends.resolve(name, device)
        except Exception as e:  # the backend's own reason (not built, no GPU, ...)
            notes.append(f"amos/{name}: skipped, {e}")
            continue
        for label, options in FAMILIES:
            nbytes, rule = amos_bytes_for(options, psize)

            def make(params, name=name, options=options):
                opt = Amos(params, backend=name, guard="step", **options)
                return opt.step, opt
            rows.append(Row(f"amos/{name} {label}", "amos", make, nbytes, rule, family=label, backend=name))
            if label in GUARD_SLICE_FAMILIES:
                def make_slice(params, name=name, options=options):
                    opt = Amos(params, backend=name, guard="slice", **options)
                    return opt.step, opt
                rows.append(Row(f"amos/{name} {label} guard=slice", "amos", make_slice, nbytes, rule,
                                family=label, backend=name))
                if name == "cuda":  # the same without the kernels' L2 prefetches: their A/B in one run
                    rows.append(Row(f"amos/{name} {label} guard=slice prefetch=off", "amos",
                                    _without_prefetch(make_slice), nbytes, rule, family=label, backend=name))
                if name == "triton" and device.type == "cuda" and label in TRITON_COLB_FAMILIES:
                    for colb in TRITON_MAX_COLB:  # the heuristic's widest column block, A/B in one run
                        rows.append(Row(f"amos/{name} {label} guard=slice max_colb={colb}", "amos",
                                        _with_max_colb(make_slice, colb), nbytes, rule, family=label, backend=name))
            if device.type == "cuda" and label in KERNEL_ONLY_FAMILIES:
                rows.append(Row(f"amos/{name} {label} kernels only", "amos", _kernels_only(name, options), nbytes,
                                rule, family=label, backend=name))
    return rows


def _inside(make, context):
    """Row `make` with every step run inside `context()` (a context manager)."""
    def make_inside(params):
        step, opt = make(params)

        def step_inside():
            with context():
                return step()
        return step_inside, opt
    return make_inside


@contextlib.contextmanager
def _max_colb(colb):
    """The triton heuristic's max_colb set to `colb` inside the block (the plan cache is keyed by
    the heuristic, so each setting keeps its own plans)."""
    import dataclasses
    from amos_fused import triton_backend
    saved = triton_backend.HEURISTIC
    triton_backend.HEURISTIC = dataclasses.replace(saved, max_colb=colb)
    try:
        yield
    finally:
        triton_backend.HEURISTIC = saved


def _with_max_colb(make, colb):
    return _inside(make, lambda: _max_colb(colb))


def _without_prefetch(make):
    """A row's step with AMOS_FUSED_CUDA_PREFETCH=0 (read by the cuda kernels at every step)."""
    return _inside(make, lambda: bc.cuda_prefetch(False))


def _kernels_only(name, options):
    """The backend's step function alone, without Amos.step around it (its checks, the
    non-finite verdict and the step count): what the step costs beyond the kernels."""
    def make(params):
        opt = Amos(params, backend=name, **options)
        fn = backends.resolve(name, params[0].device)

        def step():
            if "v" not in opt.state[params[0]]:  # the first (untimed) call creates the state
                return opt.step()
            group = opt.param_groups[0]
            ps = [p for p in group["params"] if p.grad is not None]
            fn(ps, [p.grad for p in ps], [opt.state[p] for p in ps], group, None)
        return step, opt
    return make


def compile_rows(psize, quick):
    rows = []
    for label, options in FAMILIES:
        if quick and label not in QUICK_COMPILE_FAMILIES:
            continue
        nbytes, rule = amos_bytes_for(options, psize)

        def make(params, options=options):
            opt = Amos(params, guard="step", **options)
            compiled = _compiled_reference()

            def per_tensor(params, grads, states, group, grad_scale):
                for p, g, s in zip(params, grads, states):
                    compiled([p], [g], [s], group, grad_scale)

            def step():
                with _amos_with(per_tensor):
                    opt.step()
            return step, opt
        rows.append(Row(f"compile/reference {label}", "compile", make, nbytes, rule, family=label,
                        backend="torch.compile(reference_step)"))
    return rows


def default_row(dtype):
    """`Amos(params, lr=1e-3)`: what a user gets. Its bytes follow the options the defaults
    resolve to for `dtype` parameters (read from a one-step optimizer on a tiny tensor)."""
    p = torch.zeros(2, 2, dtype=dtype, requires_grad=True)
    p.grad = torch.ones_like(p)
    probe = Amos([p], lr=1e-3)
    probe.step()
    group, m = probe.param_groups[0], probe.state[p].get("m")
    options = dict(schedule=group["schedule"], momentum=group["momentum"], momentum_dtype=None if m is None else m.dtype)
    nbytes, rule = amos_bytes_for(options, p.element_size())

    def make(params):
        opt = Amos(params, lr=1e-3)
        return opt.step, opt
    label = (f"{group['schedule']} m={group['momentum']:g}" + (f" {str(m.dtype)[6:]}" if m is not None else "")
             + f" guard={probe.guard}")
    return Row("default", "default", make, nbytes, f"{rule} ({label})", family=label, backend="auto")


def adamw_rows(psize):
    rule = f"g {psize} + theta 2x{psize} + exp_avg, exp_avg_sq 2x{psize} each"
    rows = []
    for label, kw in (("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))):
        def make(params, kw=kw):
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **kw)
            return opt.step, opt
        rows.append(Row(f"adamw {label}", "adamw", make, bc.adamw_bytes(psize), rule, backend=label))
    return rows


def adafactor_rows(psize):
    rule = f"g 2x{psize} (row/col means of g^2 first) + theta 2x{psize}"
    rows = []
    for label, foreach in (("for-loop", False), ("foreach", True)):
        def make(params, foreach=foreach):
            opt = torch.optim.Adafactor(params, lr=1e-2, foreach=foreach)
            return opt.step, opt
        rows.append(Row(f"adafactor {label}", "adafactor", make, bc.adafactor_bytes(psize), rule, backend=label))
    return rows


def apex_rows(device, psize, notes):
    try:
        from apex.optimizers import FusedAdam, FusedLAMB
    except Exception as e:  # apex is built from source by its users; absent is the common case
        notes.append(f"apex not importable ({type(e).__name__}: {e})")
        return []
    if device.type != "cuda":
        notes.append("apex: importable, but its fused optimizers need CUDA tensors; not timed")
        return []

    def make_adam(params):
        opt = FusedAdam(params, lr=1e-3, weight_decay=0.1, adam_w_mode=True)
        return opt.step, opt

    def make_lamb(params):
        opt = FusedLAMB(params, lr=1e-3, weight_decay=0.1)
        return opt.step, opt
    return [Row("apex FusedAdam", "apex", make_adam, bc.adamw_bytes(psize), "as AdamW"),
            Row("apex FusedLAMB", "apex", make_lamb, bc.lamb_bytes(psize),
                f"AdamW's + update written and read back 2x{psize} + theta read again {psize}")]


def build_rows(requested, device, dtype, quick, notes):
    psize = torch.tensor([], dtype=dtype).element_size()
    want = (lambda group: not requested or group in requested)
    amos = [r for r in requested if r not in BASELINES] if requested else None  # None: every backend
    rows = [default_row(dtype)] if want("default") else []
    rows += amos_backend_rows(amos, device, psize, notes)
    if want("compile"):
        rows += compile_rows(psize, quick)
    if want("adamw"):
        rows += adamw_rows(psize)
    if want("adafactor"):
        rows += adafactor_rows(psize)
    if want("apex"):
        rows += apex_rows(device, psize, notes)
    return rows


# ---- running ----------------------------------------------------------------------------------


def run_size(size, args, device, dtype, warmup, repeats, notes, progress):
    shapes, description = bc.SIZES[size]
    n = bc.numel(shapes)
    roof_before = bc.stream_bandwidth(n, dtype, device, clock=args.clock)
    params = bc.make_params(shapes, dtype, device)
    initial = [p.detach().clone() for p in params]
    rows = build_rows(args.backends, device, dtype, args.quick, notes)
    results = []
    bar = progress(rows, desc=size, unit="row")
    for row in bar:
        bar.set_postfix_str(row.name)
        with torch.no_grad():
            for p, p0 in zip(params, initial):  # every row starts from the same weights
                p.copy_(p0)
        try:
            step, opt = row.make(params)
            times, first = bc.time_steps(step, device, warmup, repeats, clock=args.clock)
            state = bc.state_bytes(opt)
        except Exception as e:  # one failing row is reported, the others still run
            notes.append(f"{size} {row.name}: failed, {type(e).__name__}: {e}")
            continue
        finally:
            step = opt = None
            bc.free_memory(device)
        results.append(dict(size=size, row=row.name, group=row.group, backend=row.backend, family=row.family,
                            dtype=args.dtype, n_params=n, n_tensors=len(shapes),
                            median_ms=bc.median(times) * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
                            repeats=len(times), first_call_s=first,
                            bytes_per_param=row.bytes_per_param, bytes_rule=row.bytes_rule,
                            state_bytes=state, state_bytes_per_param=state / n))
    del params, initial
    bc.free_memory(device)
    roof_after = bc.stream_bandwidth(n, dtype, device, clock=args.clock)
    # the better of two measurements: load from other processes only ever lowers it
    roofline = max(roof_before, roof_after)
    by_name = {r["row"]: r for r in results}
    for r in results:
        r["gbps"] = r["bytes_per_param"] * n / (r["median_ms"] / 1e3) / 1e9
        r["roofline_gbps"] = roofline
        r["pct_roofline"] = 100.0 * r["gbps"] / roofline
        for ref in ("fused", "foreach"):
            base = by_name.get(f"adamw {ref}")
            r[f"x_adamw_{ref}"] = r["median_ms"] / base["median_ms"] if base else None
    info = dict(n_params=n, n_tensors=len(shapes), description=description,
                roofline_gbps=roofline, roofline_gbps_before=roof_before, roofline_gbps_after=roof_after,
                roofline_op=f"a += b over {n} {args.dtype} elements ({3 * torch.tensor([], dtype=dtype).element_size()} B/element)")
    return results, info


def verdicts(results):
    """Per size and amos family, the one-pass (guard="slice") row of each backend as x fused
    AdamW's speed (above 1: faster), and the fastest backend: the lines a GPU run is read for
    ("auto" tries the fastest backend first)."""
    lines = []
    for size in dict.fromkeys(r["size"] for r in results):
        rows = {r["row"]: r for r in results if r["size"] == size}
        base = rows.get("adamw fused")
        if base is None:
            continue
        for family in GUARD_SLICE_FAMILIES:
            speed = {r["backend"]: base["median_ms"] / r["median_ms"] for name, r in rows.items()
                     if r["group"] == "amos" and name == f"amos/{r['backend']} {family} guard=slice"}
            if speed:
                best = max(speed, key=speed.get)
                lines.append(f"{size} {family} guard=slice, x fused AdamW speed: "
                             + ", ".join(f"{b} {x:.2f}" for b, x in speed.items()) + f"; fastest {best}")
    return lines


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(results, sizes_info):
    lines = []
    for size, info in sizes_info.items():
        lines += [f"\n### {size}: {info['n_params'] / 1e6:.1f}M parameters in {info['n_tensors']} tensors ({info['description']})",
                  f"Roofline: {info['roofline_op']} = {info['roofline_gbps']:.3g} GB/s\n",
                  "| row | step ms (median) | B/param | GB/s | % roofline | x fused AdamW | x foreach AdamW | state MB | first call s (wall) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in results if r["size"] == size):
            lines.append(f"| {r['row']} | {r['median_ms']:.2f} | {r['bytes_per_param']} | {r['gbps']:.3g} | "
                         f"{r['pct_roofline']:.1f} | {_fmt(r['x_adamw_fused'], '.2f')} | "
                         f"{_fmt(r['x_adamw_foreach'], '.2f')} | {r['state_bytes'] / 1e6:.3g} | {r['first_call_s']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--sizes", help=f"comma-separated, from {', '.join(bc.SIZES)}; default per device")
    ap.add_argument("--backends", default="all",
                    help="comma-separated Amos backends (from amos_fused.backends.BACKENDS) and baselines "
                         f"{', '.join(BASELINES)}; 'all' (default) runs every one that can run here")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="parameter and gradient dtype")
    ap.add_argument("--repeats", type=int, help="timed steps per row (default: 5 on CPU, 20 on GPU, 3 with --quick)")
    ap.add_argument("--warmup", type=int, help="untimed steps before, the first included (default 2, 3 on GPU)")
    ap.add_argument("--quick", action="store_true", help="small size, few repeats, one compiled family (< 3 min on 2 cores)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for this run")
    ap.add_argument("--clock", default="wall", choices=sorted(bc.CLOCKS),
                    help="CPU timer: wall (perf_counter, default) or process (CPU time of this process; "
                         "needs --threads 1; steadier on a machine loaded by other processes)")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'measured under load')")
    bc.add_results_option(ap)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    args.backends = [] if args.backends == "all" else [b.strip() for b in args.backends.split(",") if b.strip()]
    known = set(backends.BACKENDS) - {"auto"} | set(BASELINES)
    for b in args.backends:
        if b not in known:
            ap.error(f"--backends: {b!r} is unknown; use 'all' or some of {', '.join(sorted(known))}")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.warmup is not None and args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step creates the state and is never timed)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {args.device}: use cpu or cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("--clock process counts the CPU time of all threads: use it with --device cpu --threads 1")
    dtype = DTYPES[args.dtype]
    sizes = (args.sizes.split(",") if args.sizes else
             QUICK_SIZES if args.quick else DEFAULT_SIZES[device.type])
    bc.check_sizes(sizes)
    gpu = device.type == "cuda"
    repeats = args.repeats or (3 if args.quick else 20 if gpu else 5)
    warmup = args.warmup or (3 if gpu else 1 if args.quick else 2)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    progress = (lambda it, **kw: bc.NoProgress(it)) if args.no_progress or tqdm is None else \
        (lambda it, **kw: tqdm(it, file=sys.stderr, **kw))

    date = bc.now_utc()
    notes, results, sizes_info = [], [], {}
    run = dict(note=args.note, clock="cuda events" if gpu else args.clock, warmup=warmup, repeats=repeats)
    command = bc.command_line(__file__, argv)
    path = None
    for size in sizes:
        res, info = run_size(size, args, device, dtype, warmup, repeats, notes, progress)
        results += res
        sizes_info[size] = info
        # after every size: a run cut short by a time limit keeps what it measured
        path = bc.record("step_time", [dict(r, **run, roofline_op=info["roofline_op"]) for r in res],
                         device=device, date=date, command=command, results_dir=args.results)

    machine = bc.machine_info(device)
    print(f"# Optimizer step time: {machine['gpu'] or machine['cpu']} ({machine['cpu_cores']} cores, "
          f"{machine['torch_threads']} torch threads), torch {torch.__version__}, {args.dtype}, "
          f"{date.isoformat(timespec='seconds')}, timer: {run['clock']}" + (f", {args.note}" if args.note else ""))
    print(markdown(results, sizes_info))
    for line in verdicts(results):
        print(f"verdict: {line}")
    for note in notes:
        print(f"note: {note}")
    if path:
        print(f"appended {len(results)} rows to {path}")
        print(f"drew {plots.plot('step_time', os.path.dirname(path))}")
    return results


if __name__ == "__main__":
    main()
