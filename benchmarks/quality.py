"""Quality suite: does Amos at its defaults train as well as tuned AdamW, across model families?

Four tasks, each 1000 steps or more on 2 CPU cores, every row over several seeds:
- lm_gpt2:  byte-level transformer (lm_model.ByteLM, 2 layers, width 128, context 32, batch 8)
            on the Python stdlib (lm_data.py), GPT-2 initialisation (every matrix N(0, 0.02));
- lm_torch: the same model with torch's own initialisation (nn.Embedding ~ N(0, 1), nn.Linear
            kaiming-uniform): initial scales that are not the scales at the optimum;
- gru_lm:   a one-layer GRU byte LM (lm_model.ByteGRU, width 96, context 32, batch 16), torch's
            initialisation;
- digits:   the small CNN of classifier.py on scikit-learn's bundled 8x8 digits.

Rows (a row is NAME or NAME@LR, NAME from VARIANTS):
- adamw@LR: torch AdamW, betas (0.9, 0.95), weight decay 0.1 on matrices, linear warmup over the
  first 5 % of steps then cosine decay to 0; the task's 4-point lr sweep, the best by mean final
  validation loss is "best AdamW";
- default: `Amos(model.named_parameters())`, nothing else: no lr, no scheduler (its own lr schedule
  without a run length: a warmup over 200 steps, then an inverse-square-root decay);
- amos@LR: `Amos(model.named_parameters(), lr=LR)`, a constant lr (the sweep says how far the
  rule's peak sits from the best constant lr);
- amos total_steps: `Amos(model.named_parameters(), total_steps=<the run's steps>)`: the lr
  schedule the defaults give a run of known length (warmup, the peak, a decay over the last 30 %);
- inverse_time, inverse_square, constant: the closed forms at their default lr, half_life a
  quarter of the run for the decaying two;
- amos fp32-m / amos bf16-m: the defaults with momentum stored in fp32 / bf16, whichever is not
  the default (the decision on the default momentum storage reads this pair).

Every run gets fresh weights and batches from its seed (the same for every row of a seed), is
validated every `eval_every` steps on a small fixed validation set and at the end on the full one
(final validation loss: the number the targets read). Runs go to `--jobs` worker processes with
`--threads` torch threads each; `--cache FILE` keeps finished runs (keyed by task setup, row, seed
and, for Amos rows, a hash of the amos_fused sources) so an interrupted or extended suite reruns
only what is new.

Prints one markdown table per task and the verdicts against the targets (Amos at defaults within
2 % of the best AdamW's mean final validation loss on every task, at or below it on the language
models). Every run is appended to benchmarks/results/cpu/quality.jsonl (bench_common.record, one
row per run: task, row, family, seed, lr, curves, final validation loss; --results DIR elsewhere)
and quality.png is drawn from it (plots.py); runs with --steps-factor F go to quality_xF.jsonl / .png.

    python benchmarks/quality.py                      # the suite: 4 tasks x 3 seeds, ~13 min on 2 cores
    python benchmarks/quality.py --tasks digits --seeds 1
    python benchmarks/quality.py --rows "+amos fp32-m"  # the default rows and more
    python benchmarks/quality.py --steps-factor 3 --rows "adamw-sweep,default,amos total_steps"  # 3000 steps
    python benchmarks/quality.py --quick              # smoke test, seconds
"""
import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import classifier  # noqa: E402
import convergence_report  # noqa: E402
import lm_data  # noqa: E402
import plots  # noqa: E402
from lm_model import ByteGRU, ByteLM  # noqa: E402
from amos_fused import DEFAULT_LR, Amos, defaults  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WARMUP_FRACTION = 0.05  # AdamW's linear warmup
HALF_LIFE_FRACTION = 0.25  # the decaying closed forms halve their step after a quarter of the run
ADAMW = dict(betas=(0.9, 0.95), weight_decay=0.1)
AMOS_LRS = (0.01, 0.03, 0.1, 0.3)
CORPUS_BYTES = 2_000_000
TOLERANCE = 0.02  # target: Amos at defaults within 2 % of the best AdamW (at or below it on LMs)


# ---- tasks --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    title: str
    kind: str  # "lm" or "digits"
    steps: int
    batch: int
    eval_every: int
    adamw_lrs: tuple
    model: tuple = ()  # ("transformer", layers, width, heads, context, init) or ("gru", width, context)
    eval_batches: int = 4  # lm: validation batches of 64 windows during the run ...
    final_batches: int = 16  # ... and at the end

    @property
    def context(self):
        return self.model[4] if self.model[0] == "transformer" else self.model[2]

    def make_model(self):
        m = self.model
        if self.kind == "digits":
            return classifier.SmallCNN()
        if m[0] == "transformer":
            return ByteLM(m[1], m[2], m[3], m[4], init=m[5])
        return ByteGRU(m[1])

    def config(self):
        return dataclasses.asdict(self)


TASKS = {t.name: t for t in (
    Task("lm_gpt2", "byte transformer 2x128, GPT-2 init", "lm", 1000, 8, 50, (3e-4, 1e-3, 3e-3, 1e-2),
         ("transformer", 2, 128, 4, 32, "gpt2")),
    Task("lm_torch", "byte transformer 2x128, torch init", "lm", 1000, 8, 50, (1e-3, 3e-3, 1e-2, 3e-2),
         ("transformer", 2, 128, 4, 32, "torch")),
    Task("gru_lm", "byte GRU 96, torch init", "lm", 1000, 16, 50, (3e-3, 1e-2, 3e-2, 1e-1), ("gru", 96, 32)),
    Task("digits", "CNN on 8x8 digits, torch init", "digits", 1000, 64, 50, (1e-2, 3e-2, 1e-1, 3e-1)),
)}
QUICK_TASKS = {
    "lm_gpt2": dict(steps=12, batch=4, eval_every=4, adamw_lrs=(3e-3,), model=("transformer", 1, 16, 2, 16, "gpt2"),
                    eval_batches=1, final_batches=1),
    "gru_lm": dict(steps=12, batch=4, eval_every=4, adamw_lrs=(3e-3,), model=("gru", 16, 16), eval_batches=1,
                   final_batches=1),
    "digits": dict(steps=12, batch=16, eval_every=4, adamw_lrs=(3e-3,)),
}

_DATA = {}  # per process: loaded once


def _lm_data(task):
    key = ("lm", task.context, task.final_batches, task.eval_batches)
    if key not in _DATA:
        if "corpus" not in _DATA:
            _DATA["corpus"] = lm_data.load_corpus(CORPUS_BYTES)
        train, val, info = _DATA["corpus"]
        final = lm_data.val_batches(val, 64, task.context, task.final_batches)
        _DATA[key] = (train, final[:task.eval_batches], final, info)
    return _DATA[key]


def _digits_data():
    if "digits" not in _DATA:
        _DATA["digits"] = classifier.load_digits_split()
    return _DATA["digits"]


@torch.no_grad()
def _evaluate(task, model, final):
    """(validation loss, extra metrics) on the small (during the run) or full (final) set."""
    model.eval()
    try:
        if task.kind == "digits":
            _, _, xv, yv = _digits_data()
            logits = model(xv)
            return F.cross_entropy(logits, yv).item(), dict(acc=(logits.argmax(1) == yv).float().mean().item())
        _, small, full, _ = _lm_data(task)
        return statistics.fmean(model(x, y).item() for x, y in (full if final else small)), {}
    finally:
        model.train()


def _batches(task, seed):
    """The seed's training batches (x, y), the same for every row."""
    gen = torch.Generator().manual_seed(seed)
    if task.kind == "digits":
        xt, yt, _, _ = _digits_data()
        while True:
            idx = torch.randint(len(xt), (task.batch,), generator=gen)
            yield xt[idx], yt[idx]
    train = _lm_data(task)[0]
    while True:
        yield lm_data.train_batch(train, task.batch, task.context, gen)


def _loss(task, model, x, y):
    return F.cross_entropy(model(x), y) if task.kind == "digits" else model(x, y)


# ---- rows ---------------------------------------------------------------------------------------

def warmup_cosine(steps):
    """LambdaLR factor: linear warmup over WARMUP_FRACTION of the steps, then cosine to 0."""
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def f(i):
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))
    return f


def _adamw(model, lr, steps):
    if lr is None:
        raise ValueError("adamw needs an lr: adamw@LR")
    params = list(model.parameters())
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=ADAMW["weight_decay"]),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAMW["betas"]), warmup_cosine(steps)


def _amos(with_total_steps=False, **options):
    """A row builder: Amos(named_parameters(), **options), lr only when the row names one, and
    total_steps = the run's steps if `with_total_steps`."""
    def build(model, lr, steps):
        kwargs = dict(options, **(dict(total_steps=steps) if with_total_steps else {}))
        if kwargs.get("schedule") in ("inverse_time", "inverse_square"):
            kwargs["half_life"] = max(1, round(HALF_LIFE_FRACTION * steps))
        if lr is not None:
            kwargs["lr"] = lr
        return Amos(model.named_parameters(), **kwargs), None
    return build


# name -> build(model, lr or None, steps) -> (optimizer, LambdaLR factor or None). Experiments add
# their own entries before calling main().
VARIANTS = {
    "adamw": _adamw,
    "default": _amos(),  # Amos(model.named_parameters()), nothing else
    "amos": _amos(),  # with @LR: the lr sweep
    "amos total_steps": _amos(with_total_steps=True),
    "amos fp32-m": _amos(momentum_dtype=torch.float32),
    "amos bf16-m": _amos(momentum_dtype=torch.bfloat16),
    "inverse_time": _amos(schedule="inverse_time"),
    "inverse_square": _amos(schedule="inverse_square"),
    "constant": _amos(schedule="constant"),
}


def default_momentum_dtype():
    """The dtype the defaults store m in for float32 parameters (the suite's models)."""
    option = Amos([torch.zeros(1)]).defaults["momentum_dtype"]
    return defaults.momentum_dtype(option, torch.zeros(1))


def default_rows(task):
    mdt = default_momentum_dtype()
    other_m = "amos fp32-m" if mdt == torch.bfloat16 else "amos bf16-m"
    return ([f"adamw@{lr:g}" for lr in task.adamw_lrs] + ["default"]
            + [f"amos@{lr:g}" for lr in AMOS_LRS] + ["amos total_steps"]
            + ["inverse_time", "inverse_square", "constant", other_m])


def parse_row(row):
    name, _, lr = row.partition("@")
    if name not in VARIANTS:
        raise ValueError(f"row {row!r}: unknown {name!r}; use NAME or NAME@LR with NAME from {sorted(VARIANTS)}")
    try:
        return name, float(lr) if lr else None
    except ValueError:
        raise ValueError(f"row {row!r}: {lr!r} is not a number") from None


def family(row):
    """'adamw', 'amos' (the default row and the Amos lr sweep) or the row's name."""
    name, _ = parse_row(row)
    return "amos" if name == "default" else name if name in ("adamw", "amos") else row


# ---- one run --------------------------------------------------------------------------------------

def train_one(job):
    task, row, seed, threads = job
    torch.set_num_threads(threads)
    name, lr = parse_row(row)
    torch.manual_seed(seed)
    model = task.make_model()
    opt, factor = VARIANTS[name](model, lr, task.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if factor else None
    batches = _batches(task, seed)
    loss0, extra0 = _evaluate(task, model, final=False)
    evals, val, extras, train_curve, running, times = [0], [loss0], [extra0], [None], [], []
    diverged, started = False, time.perf_counter()
    for step in range(1, task.steps + 1):
        x, y = next(batches)
        t0 = time.perf_counter()
        loss = _loss(task, model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if sched:
            sched.step()
        running.append(loss.item())
        if not math.isfinite(running[-1]):
            diverged = True
            break
        if step % task.eval_every == 0 or step == task.steps:
            v, extra = _evaluate(task, model, final=False)
            evals.append(step)
            val.append(v)
            extras.append(extra)
            train_curve.append(statistics.fmean(running))
            running = []
    final, final_extra = _evaluate(task, model, final=True) if not diverged else (math.inf, {})
    if not math.isfinite(final):
        diverged = True
    return dict(task=task.name, row=row, seed=seed, lr=bc.recorded_lr(opt), eval_steps=evals, val_loss=val,
                val_extra=extras, train_loss=train_curve, final_val=final if not diverged else math.inf,
                final_extra=final_extra, diverged=diverged, ms_train_step=1e3 * statistics.median(times[5:] or times),
                seconds=round(time.perf_counter() - started, 1), threads=threads)


# ---- the suite -------------------------------------------------------------------------------------

def code_hash():
    """Hash of what an Amos run depends on besides the benchmark: amos_fused and the kernels' sources."""
    h = hashlib.sha256()
    for folder, exts in (("amos_fused", (".py",)), ("csrc", (".cpp", ".h", ".cu"))):
        for path in sorted((REPO / folder).glob("*")):
            if path.suffix in exts:
                h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def cache_key(task, row, seed, amos_hash):
    """What a run depends on: the task's setup (not its title or AdamW grid), the row, the seed,
    and for Amos rows the sources of amos_fused."""
    setup = {k: v for k, v in task.config().items() if k not in ("title", "adamw_lrs")}
    depends = None if family(row) == "adamw" else amos_hash
    return json.dumps([setup, row, seed, depends], sort_keys=True)


def load_cache(path):
    if not path or not os.path.exists(path):
        return {}
    with open(path) as fh:
        return {entry["key"]: entry["run"] for entry in map(json.loads, filter(str.strip, fh))}


def run_jobs(jobs, args, cache, amos_hash):
    """Every job's run: from the cache, or trained in --jobs worker processes (fork)."""
    runs, todo = {}, []
    for job in jobs:
        key = cache_key(job[0], job[1], job[2], amos_hash)
        if key in cache:
            runs[key] = cache[key]
        else:
            todo.append((key, job))
    todo.sort(key=lambda kj: -kj[1][0].steps * (4 if kj[1][0].kind == "lm" else 1))  # long ones first
    bar = tqdm(total=len(todo), desc=f"runs ({len(jobs) - len(todo)} cached)", dynamic_ncols=True,
               disable=args.no_progress)
    sink = open(args.cache, "a") if args.cache else None
    try:
        if args.jobs > 1 and len(todo) > 1:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(args.jobs) as pool:
                done = pool.imap_unordered(_keyed, todo)
                _collect(done, runs, sink, bar)
        else:
            _collect(map(_keyed, todo), runs, sink, bar)
    finally:
        bar.close()
        if sink:
            sink.close()
    return [runs[cache_key(j[0], j[1], j[2], amos_hash)] for j in jobs]


def _keyed(key_job):
    key, job = key_job
    return key, train_one(job)


def _collect(done, runs, sink, bar):
    for key, run in done:
        runs[key] = run
        if sink:
            sink.write(json.dumps(dict(key=key, run=bc._jsonable(run))) + "\n")
            sink.flush()
        bar.set_postfix_str(f"{run['task']} {run['row']} s{run['seed']}: {run['final_val']:.4f}")
        bar.update()


def _stats(xs):
    return convergence_report._stats([math.inf if x is None else x for x in xs])


def summarize(task, rows, runs):
    """Per row: final validation loss over seeds; the best AdamW and best Amos rows; verdict."""
    by_row = {row: [r for r in runs if r["row"] == row] for row in rows}
    entries = {}
    for row, rs in by_row.items():
        finals = [r["final_val"] for r in rs]
        entries[row] = dict(row=row, family=family(row), lr=rs[0]["lr"], final_val=_stats(finals),
                            per_seed={r["seed"]: r["final_val"] for r in rs},
                            diverged=sum(r["diverged"] for r in rs),
                            ms_train_step=_stats([r["ms_train_step"] for r in rs]))
        if rs[0]["final_extra"].get("acc") is not None:
            entries[row]["final_acc"] = _stats([r["final_extra"].get("acc", math.nan) for r in rs])

    def best(fam):
        cands = [e for e in entries.values() if e["family"] == fam]
        return min(cands, key=lambda e: e["final_val"]["mean"])["row"] if cands else None

    best_adamw, best_amos = best("adamw"), best("amos")
    for e in entries.values():
        if best_adamw:
            ref = entries[best_adamw]["final_val"]["mean"]
            e["vs_best_adamw"] = e["final_val"]["mean"] / ref - 1 if math.isfinite(ref) else None
            e["paired_vs_best_adamw"] = _stats([e["per_seed"][s] / entries[best_adamw]["per_seed"][s] - 1
                                                for s in e["per_seed"] if s in entries[best_adamw]["per_seed"]])
    verdict = None
    if best_adamw and "default" in entries:
        gap = entries["default"]["vs_best_adamw"]
        limit = 0.0 if task.kind == "lm" else TOLERANCE
        verdict = dict(gap=gap, limit=limit, met=gap is not None and gap <= limit + 1e-12)
    return dict(task=task.name, title=task.title, steps=task.steps, best_adamw=best_adamw, best_amos=best_amos,
                rows=list(entries.values()), verdict=verdict)


def table(summary):
    fmt = convergence_report._fmt
    has_acc = any("final_acc" in e for e in summary["rows"])
    head = ("| row | lr | final val loss | vs best AdamW | per seed vs best AdamW"
            + (" | final val acc" if has_acc else "") + " | ms/step |")
    lines = [f"**{summary['task']}**: {summary['title']}, {summary['steps']} steps", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for e in summary["rows"]:
        tags = [t for t, row in (("best AdamW", summary["best_adamw"]), ("best Amos", summary["best_amos"]))
                if row == e["row"]]
        name = e["row"] + (f" ({', '.join(tags)})" if tags else "")
        gap = e.get("vs_best_adamw")
        gap_text = "n/a" if gap is None else f"{100 * gap:+.2f} %"
        paired = e.get("paired_vs_best_adamw")
        paired_text = ("n/a" if paired is None or not math.isfinite(paired["mean"])
                       else f"{100 * paired['min']:+.2f} .. {100 * paired['max']:+.2f} %")
        acc = f" | {fmt(e['final_acc'], 4)}" if has_acc else ""
        lines.append(f"| {name} | {e['lr']:g} | {fmt(e['final_val'], 4)} | {gap_text} | {paired_text}{acc} "
                     f"| {fmt(e['ms_train_step'], 1)} |")
    return "\n".join(lines)


def verdict_lines(summaries):
    out = []
    for s in summaries:
        v = s["verdict"]
        if v is None:
            continue
        want = "at or below" if v["limit"] == 0 else f"within {100 * v['limit']:g} % of"
        gap = "n/a" if v["gap"] is None else f"{100 * v['gap']:+.2f} %"
        out.append(f"{s['task']}: Amos at defaults {gap} vs best AdamW ({s['best_adamw']}); target {want}: "
                   + ("met" if v["met"] else "NOT met"))
    return out


# ---- command line ----------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {list(TASKS)}")
    ap.add_argument("--rows", help="comma-separated rows (NAME or NAME@LR; 'adamw-sweep': the task's AdamW sweep) "
                                   "instead of each task's default rows; '+ROWS' adds them to the defaults")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--steps-factor", type=float, default=1.0, help="every task's steps times this")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--cache", help="JSONL file of finished runs, read and appended to")
    ap.add_argument("--quick", action="store_true", help="smoke test: three tiny tasks, one seed, seconds")
    bc.add_results_option(ap)
    ap.add_argument("--note", default="", help="free text stored with the runs")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        ap.error(f"--tasks: unknown {unknown}; use names from {list(TASKS)}")
    if args.quick:
        names = [t for t in names if t in QUICK_TASKS] or list(QUICK_TASKS)
        args.tasks_ = [dataclasses.replace(TASKS[t], **QUICK_TASKS[t]) for t in names]
        args.seeds, args.jobs = min(args.seeds, 1), 1
    else:
        args.tasks_ = [TASKS[t] for t in names]
    if args.steps_factor <= 0:
        ap.error(f"--steps-factor={args.steps_factor}: use a number > 0")
    if args.steps_factor != 1:
        args.tasks_ = [dataclasses.replace(t, steps=max(4, round(t.steps * args.steps_factor)),
                                           eval_every=max(1, round(t.eval_every * args.steps_factor)))
                       for t in args.tasks_]
    for name in ("seeds", "jobs", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)}: use 1 or more")
    args.rows_of = {}
    for t in args.tasks_:
        if args.rows and not args.rows.startswith("+"):
            rows = [r.strip() for r in args.rows.split(",") if r.strip()]
            at = rows.index("adamw-sweep") if "adamw-sweep" in rows else None
            if at is not None:  # the task's own AdamW sweep
                rows[at:at + 1] = [f"adamw@{lr:g}" for lr in t.adamw_lrs]
        else:
            extra = [r.strip() for r in (args.rows or "+")[1:].split(",") if r.strip()]
            rows = default_rows(t) + [r for r in extra if r not in default_rows(t)]
        if args.quick and not args.rows:
            rows = [r for r in rows if r not in ("inverse_square", "constant")]
        try:
            for r in rows:
                parse_row(r)
        except ValueError as e:
            ap.error(f"--rows: {e}")
        args.rows_of[t.name] = rows
    return args


def main(argv=None, kind="quality", command=None):
    """Run the suite; its runs are recorded as benchmark `kind` with `command` (defaults_study.py:
    its own file and command line)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seed, args.seed + args.seeds))
    jobs = [(t, row, s, args.threads) for t in args.tasks_ for row in args.rows_of[t.name] for s in seeds]
    amos_hash = code_hash()
    started, clock = bc.now_utc(), time.perf_counter()
    runs = run_jobs(jobs, args, load_cache(args.cache), amos_hash)
    summaries = [summarize(t, args.rows_of[t.name], [r for r in runs if r["task"] == t.name]) for t in args.tasks_]
    note = (f"Final validation loss: mean ± sample std over seeds {seeds}; 'vs best AdamW' compares means, "
            "'per seed' the range of per-seed ratios. ms/step: median whole training step (forward, backward, "
            f"step) with {args.threads} thread(s) per run and {args.jobs} runs at a time.")
    print("\n\n".join(table(s) for s in summaries) + "\n\n" + note + "\n\n" + "\n".join(verdict_lines(summaries)))
    setup = dict(seeds=seeds, adamw=dict(ADAMW, schedule=f"linear warmup {WARMUP_FRACTION:.0%} of steps, cosine to 0",
                                          weight_decay_on="matrices (ndim >= 2)"),
                 amos="Amos(model.named_parameters(), [lr=... | total_steps=...]); no LR scheduler",
                 half_life_fraction=HALF_LIFE_FRACTION, corpus_bytes=CORPUS_BYTES,
                 default_lr=dict(DEFAULT_LR, amos=f"min({defaults.LR_SCALE}/M, {defaults.MAX_LR}), M matrices"),
                 momentum_dtype=str(default_momentum_dtype()), amos_fused_sources=amos_hash, jobs=args.jobs,
                 threads_per_run=args.threads, wall_s=round(time.perf_counter() - clock, 1))
    tasks = {t.name: t for t in args.tasks_}
    if args.steps_factor != 1:  # another run length, recorded apart: a file and its plot hold one length per task
        kind = f"{kind}_x{args.steps_factor:g}"
    rows = [dict(r, family=family(r["row"]), task_setup=tasks[r["task"]].config(), setup=setup, note=args.note)
            for r in runs]
    path = bc.record(kind, rows, device="cpu", date=started, command=command or bc.command_line(__file__, argv),
                     results_dir=args.results)
    print(f"appended {len(rows)} runs to {path}")
    print(f"drew {plots.plot(kind, os.path.dirname(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
