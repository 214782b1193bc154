"""Shared pieces of the benchmarks: model-shaped parameter sets, timing, machine facts, roofline,
and `record`, which appends a run's rows to the results data files.

Parameter sets are lists of tensor shapes in PyTorch's layout (nn.Linear weight is (out, in)),
so no nn.Module is needed: the optimizers only see tensors and their gradients.
"""
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

import torch

from amos_fused.defaults import SCHEDULE_KEY

# ---- model-shaped parameter sets --------------------------------------------------------------


def gpt2_shapes(d, layers, vocab=50257, ctx=1024):
    """GPT-2 (Radford et al. 2019): learned positions, fused qkv, 4x MLP, biases, tied lm_head."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),                       # ln_1 weight, bias
                   (3 * d, d), (3 * d,),             # attention qkv
                   (d, d), (d,),                     # attention output
                   (d,), (d,),                       # ln_2
                   (4 * d, d), (4 * d,),             # mlp up
                   (d, 4 * d), (d,)]                 # mlp down
    return shapes + [(d,), (d,)]                     # ln_f


def llama_shapes(d, layers, ffn, vocab, kv_dim):
    """Llama-style: RMSNorm gains, grouped-query attention, SwiGLU MLP, no biases, tied embedding."""
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,),                                  # attention norm
                   (d, d), (kv_dim, d), (kv_dim, d), (d, d),  # q, k, v, o
                   (d,),                                  # mlp norm
                   (ffn, d), (ffn, d), (d, ffn)]          # gate, up, down
    return shapes + [(d,)]


def many_small_shapes(count=4096):
    """Thousands of 1-D tensors (norm gains, biases): per-tensor overhead dominates."""
    lengths = (128, 256, 512, 1024, 2048, 4096, 768, 3072)
    return [(lengths[i % len(lengths)],) for i in range(count)]


# name -> (shapes, description). The first five are the published model sizes; "gpt2-50m" is the
# CPU benchmark's set; "gpt2-mini" is the --quick size and "tiny" exists for the tests.
SIZES = {
    "gpt2-124m": (gpt2_shapes(768, 12), "GPT-2 small: d=768, 12 layers, vocab 50257"),
    "gpt2-350m": (gpt2_shapes(1024, 24), "GPT-2 medium: d=1024, 24 layers, vocab 50257"),
    "gpt2-1.3b": (gpt2_shapes(2048, 24, ctx=2048), "GPT-3 XL shape in GPT-2 layout: d=2048, 24 layers, ctx 2048"),
    "llama-1b": (llama_shapes(2048, 16, 8192, 128256, 512),
                 "Llama-3.2-1B shape: d=2048, 16 layers, ffn 8192, kv 512, vocab 128256 (263M-param embedding)"),
    "many-small": (many_small_shapes(), "4096 1-D tensors of 128-4096 elements"),
    "gpt2-50m": (gpt2_shapes(512, 8), "GPT-2 layout, d=512, 8 layers, vocab 50257 (51.5M params)"),
    "gpt2-mini": (gpt2_shapes(256, 4), "GPT-2 layout, d=256, 4 layers, vocab 50257 (the --quick size)"),
    "tiny": (gpt2_shapes(32, 2, vocab=256, ctx=32), "GPT-2 layout, d=32, 2 layers, vocab 256 (tests only)"),
}


def check_sizes(names):
    for name in names:
        if name not in SIZES:
            raise SystemExit(f"--sizes: unknown size {name!r}; use some of {', '.join(SIZES)}")


def numel(shapes):
    return sum(math.prod(s) for s in shapes)


def make_params(shapes, dtype, device, seed=0):
    """Parameters (matrices ~N(0, 0.02), vectors ones) with random gradients attached."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        if len(shape) >= 2:
            p = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
        else:
            p = torch.ones(shape, dtype=dtype, device=device)
        p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
        params.append(p)
    return params


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- timing ---------------------------------------------------------------------------------


PREFETCH_SWITCH = "AMOS_FUSED_CUDA_PREFETCH"  # "0": the cuda kernels skip their L2 prefetches


@contextlib.contextmanager
def cuda_prefetch(on):
    """The cuda kernels' L2 prefetch on or off inside the block (they read the switch every step)."""
    old = os.environ.get(PREFETCH_SWITCH)
    os.environ[PREFETCH_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[PREFETCH_SWITCH]
        else:
            os.environ[PREFETCH_SWITCH] = old


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def time_steps(step, device, warmup, repeats, clock="wall"):
    """(seconds of each timed call, seconds of the first call). CUDA events on GPU, else `clock`.

    The first call is timed apart: it creates optimizer state and, under torch.compile, compiles.
    clock="process" (CPU only) counts the CPU time of this process: with one torch thread it is
    the step's own time, without the time the scheduler gave other processes on a loaded machine.
    """
    now = CLOCKS[clock]
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    synchronize(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = now()
            step()
            times.append(now() - t0)
    return times, first


def median(xs):
    return statistics.median(xs)


def stream_bandwidth(n, dtype, device, repeats=5, clock="wall"):
    """GB/s of `a += b` over n elements: read a, read b, write a (3 x element size per element).

    An in-place op, like an optimizer step; a copy into a fresh buffer would pay write-allocate on
    CPU and understate the bandwidth.
    """
    a = torch.ones(n, dtype=dtype, device=device)
    b = torch.ones(n, dtype=dtype, device=device)
    times, _ = time_steps(lambda: a.add_(b), device, warmup=2, repeats=repeats, clock=clock)
    nbytes = 3 * a.element_size() * n
    del a, b
    free_memory(device)
    return nbytes / median(times) / 1e9


# ---- bytes a step must move, from the state layout (docs/algorithm.md, "Memory traffic") ----


COMPUTE_ROW = "x.sin_() x20 in cache"


def compute_reference():
    """A row that times the CPU's arithmetic, not its memory: `x.sin_()` twenty times over 256K
    floats that stay in cache (about 3.5 ms on 2 cores of the CPU machine when it runs at
    speed). Beside the step rows it shows when the CPU itself ran slow (a shared host), where the
    steps doing more arithmetic per byte (bf16 momentum) lose more than fused AdamW."""
    x = torch.rand(1 << 18)
    return lambda: [x.sin_() for _ in range(20)]


def amos_bytes(param_size, momentum_size=0, closed_form=False, grad_size=None):
    """Minimum bytes per parameter of one Amos step.

    Read g once (the one-pass fused reduce+apply; a closed form reads it twice because ||u||
    over the whole tensor is needed before any slice is applied), read+write theta, and
    read+write m when there is momentum. Per-slice v and b (8 B per row) are left out: rows
    have hundreds to thousands of elements, so they add < 0.1 B per parameter.
    """
    g = param_size if grad_size is None else grad_size
    return g * (2 if closed_form else 1) + 2 * param_size + 2 * momentum_size


def adamw_bytes(param_size):
    """Read g, read+write theta, read+write exp_avg and exp_avg_sq (kept in the parameter's dtype)."""
    return param_size + 2 * param_size + 4 * param_size


def adafactor_bytes(param_size):
    """A pass over g for the row/column means of g^2, then read g, read+write theta.

    The factored second moment (one value per row and per column) is negligible.
    """
    return 2 * param_size + 2 * param_size


def lamb_bytes(param_size):
    """apex FusedLAMB as built: stage 1 reads g, theta, m, v, writes m, v and the update;
    stage 2 reads the update and theta and writes theta."""
    return adamw_bytes(param_size) + param_size + 3 * param_size


def state_bytes(optimizer):
    """Bytes of every tensor an optimizer keeps in its state (the parameters excluded)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


# ---- machine and versions -------------------------------------------------------------------


def schedules_itself(optimizer):
    """Whether Amos schedules the lr of `optimizer`'s first param group itself (its lr rule's
    schedule, with or without total_steps): an LR scheduler attached to it would replace that."""
    return optimizer.param_groups[0].get(SCHEDULE_KEY) is not None


def recorded_lr(optimizer):
    """The lr a training run with `optimizer` is recorded at (its first param group's): the peak of
    Amos's own schedule where the group follows one, else the base lr an LR scheduler scales
    ('initial_lr'), else the group's lr."""
    group = optimizer.param_groups[0]
    entry = group.get(SCHEDULE_KEY)
    return float(entry[0] if entry is not None else group.get("initial_lr", group["lr"]))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def _git(*args):
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit():
    """Short hash of the checkout; "+changes" when tracked files outside benchmarks/results differ
    from it (the numbers then come from code no commit holds); None outside a git checkout."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return head + ("+changes" if changed else "")


def machine_info(device):
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _ram_gib(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }
    return info


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "numpy", "amos_fused", "apex"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "present")
        except Exception:  # an absent or broken optional package is recorded, not fatal
            out[name] = None
    return out


# ---- results data files ---------------------------------------------------------------------

RECORD_KEYS = ("date", "commit", "device", "machine", "versions", "command")


def device_folder(device):
    """The results folder's name for a device: "cpu", or the GPU's name without its vendor
    ("NVIDIA H200" -> "h200", "NVIDIA GeForce RTX 4090" -> "geforce-rtx-4090")."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = re.sub(r"^nvidia\s+", "", torch.cuda.get_device_name(device).lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# options naming files of this machine (where to record, a cache of finished runs): they do not
# change what a run measures, and their paths mean nothing elsewhere
LOCAL_OPTIONS = ("--results", "--cache")


def command_line(script, argv=None):
    """The command line a user types to run `script` (a benchmark's __file__) with `argv`
    (default: this process's arguments), for `record`; without LOCAL_OPTIONS and their values."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LOCAL_OPTIONS:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in LOCAL_OPTIONS)):
            kept.append(a)
    return "python " + shlex.join([os.path.relpath(os.path.abspath(script), REPO), *kept])


def _jsonable(x):
    """Non-finite floats become null (JSON has no NaN or Infinity)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def record(kind, rows, *, device, date=None, command=None, results_dir=None):
    """Append `rows` to the data file of benchmark `kind`, <results_dir>/<kind>.jsonl; return its path.

    kind: the benchmark's name and the file's stem, e.g. "step_time", "convergence", "memory".
    rows: dicts, one per row of the benchmark's table, JSON-serialisable (non-finite floats are
        written as null, other objects through str). They must not use the keys RECORD_KEYS.
    device: the torch.device (or its name, "cpu", "cuda:0") the rows were measured on. It picks the
        default folder, benchmarks/results/<device_folder(device)> (cpu, h200, ...), and the
        machine facts.
    date: when the run started, a timezone-aware datetime (default: now). A run that records in
        several calls (after each size, say, so that a run cut short keeps what it measured)
        passes the same date to each: the rows of one run share their date.
    command: the command line that made the rows, as a user types it (`command_line`; default:
        this process's command line).
    results_dir: the folder of the file instead of the default (created if missing).

    Each line of the file is one JSON object, one row: the metadata first, then the row's keys:
      date      the run's start, ISO 8601 UTC ("2026-11-29T01:07:10+00:00")
      commit    git_commit(): short hash, "+changes" if the tracked code differed, or null
      device    str(device)
      machine   machine_info(device): cpu, cpu_cores, torch_threads, ram_gib, gpu, load_average_1m, platform
      versions  versions(): python, torch, cuda, triton, numpy, amos_fused, apex (null: absent)
      command   the command line
    A run's rows are the lines with its date; `read` and `latest` read them back.

    In a benchmark (its kind then also belongs in benchmarks/results/README.md, and in
    plots.PLOTTERS if it has a plot):
        bc.add_results_option(parser)                       # --results DIR
        started = bc.now_utc()
        ...
        path = bc.record("sharded_step", rows, device=device, date=started,
                         command=bc.command_line(__file__, argv), results_dir=args.results)
    """
    device = torch.device(device)
    rows = [dict(r) for r in rows]
    for r in rows:
        clash = [k for k in RECORD_KEYS if k in r]
        if clash:
            raise ValueError(f"record({kind!r}): row keys {clash} are record's own metadata; rename them in the row")
    date = date or now_utc()
    meta = dict(date=date.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
                device=str(device), machine=machine_info(device), versions=versions(),
                command=command if command is not None else command_line(sys.argv[0]))
    folder = results_dir or os.path.join(RESULTS, device_folder(device))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{kind}.jsonl")
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(_jsonable({**meta, **r}), default=str) + "\n")
    return path


def add_results_option(parser):
    """The --results option every benchmark takes: where `record` writes."""
    parser.add_argument("--results", metavar="DIR",
                        help="folder of the results data file (default: benchmarks/results/<device>/)")


def read(path):
    """Every row of a data file written by `record` (a list of dicts, in file order)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def latest(rows):
    """The rows of the latest run among `rows` (the rows with the latest date)."""
    last = max((r["date"] for r in rows), default=None)
    return [r for r in rows if r["date"] == last]


def rotated(items, k):
    """`items` (a list) started at position k: interleaved benchmarks time their rows in this order in
    round k, so every row follows every other equally often (a row timed right after a heavy one,
    such as foreach AdamW, starts with that one's data in the caches instead of its own)."""
    k %= max(1, len(items))
    return items[k:] + items[:k]


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


class NoProgress:
    """A stand-in for a tqdm bar when progress bars are off."""

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix_str(self, s):
        pass
