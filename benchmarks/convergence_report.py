"""Numbers, table, plot and JSON for benchmarks/convergence.py (kept apart from the training loop)."""
import json
import math
import os
import platform
import statistics

import torch

QUARTERS = (1, 2, 3, 4)


def steps_to_reach(eval_steps, val, target):
    """First step at which the validation curve reaches `target`, linearly interpolated between
    evaluations; None if it never does."""
    for i, (s, v) in enumerate(zip(eval_steps, val)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = eval_steps[i - 1], val[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def _stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    finite = all(math.isfinite(x) for x in xs)
    mean = statistics.fmean(xs) if finite else math.inf
    std = statistics.stdev(xs) if len(xs) > 1 and finite else 0.0
    return dict(mean=mean, std=std, min=min(xs), max=max(xs), n=len(xs))


def _at(run, step):
    return run["val_loss"][run["eval_steps"].index(step)] if step in run["eval_steps"] else math.inf


def summarize(runs, steps):
    """One entry per label (optimizer and lr) over seeds; AdamW's best lr by mean final loss."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    by_label = {lab: [r for r in runs if r["label"] == lab] for lab in labels}
    adamw = [lab for lab in labels if by_label[lab][0]["name"] == "adamw"]
    best = min(adamw, key=lambda lab: _stats([r["final_val"] for r in by_label[lab]])["mean"], default=None)
    target = {r["seed"]: r["final_val"] for r in by_label.get(best, [])}  # AdamW's final, per seed
    milestones = [round(steps * k / 4) for k in QUARTERS]
    out = []
    for lab in labels:
        rs = by_label[lab]
        reach = [steps_to_reach(r["eval_steps"], r["val_loss"], target[r["seed"]]) if r["seed"] in target else None
                 for r in rs]
        fractions = [None if s is None else s / steps for s in reach]
        out.append(dict(
            label=lab, name=rs[0]["name"], lr=rs[0]["lr"], lr_given=rs[0]["lr_given"], best_adamw=lab == best,
            seeds=[r["seed"] for r in rs], diverged=sum(r["diverged"] for r in rs),
            milestone_steps=milestones, milestones=[_stats([_at(r, m) for r in rs]) for m in milestones],
            final_val=_stats([r["final_val"] for r in rs]),
            fraction_of_adamw_steps=_stats(fractions) if best else None,
            reached=sum(f is not None for f in fractions) if best else None,
            ms_opt_step=_stats([r["ms_opt_step"] for r in rs]),
            ms_train_step=_stats([r["ms_train_step"] for r in rs]),
            state_bytes=rs[0]["state_bytes"], params=rs[0]["params"]))
    return out


def _fmt(s, digits=3):
    if s is None:
        return "n/a"
    if not math.isfinite(s["mean"]):
        return "diverged"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def table(summary, steps):
    """The markdown table printed on stdout and written to the .md file."""
    head = ("| optimizer | lr | " + " | ".join(f"val @{25 * k}%" for k in QUARTERS)
            + " | steps to AdamW's final (fraction) | ms/opt step | ms/train step | state bytes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in summary:
        name = e["name"] + (" (best of sweep)" if e["best_adamw"] else "")
        lr = f"{e['lr']:g}" + ("" if e["lr_given"] or e["name"] == "adamw" else " (default)")
        n = len(e["seeds"])
        if e["fraction_of_adamw_steps"] is None or e["reached"] == 0:
            frac = "n/a" if e["reached"] is None else "not reached"
        else:
            frac = _fmt(e["fraction_of_adamw_steps"], 2) + ("" if e["reached"] == n else f" ({e['reached']}/{n} seeds)")
        lines.append(f"| {name} | {lr} | " + " | ".join(_fmt(m) for m in e["milestones"])
                     + f" | {frac} | {_fmt(e['ms_opt_step'], 1)} | {_fmt(e['ms_train_step'], 1)}"
                     + f" | {e['state_bytes']:,} |")
    seeds = len(summary[0]["seeds"]) if summary else 0
    lines.append("")
    lines.append(f"Validation cross-entropy in nats per byte after {steps} steps"
                 + (f"; mean ± sample std over {seeds} seeds." if seeds > 1 else ", one seed.")
                 + " ms are medians over steps.")
    return "\n".join(lines)


def load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _clean(x):
    """JSON without NaN/Infinity: non-finite numbers become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def plot(path, runs, summary, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    finals = [e["final_val"]["mean"] for e in summary if math.isfinite(e["final_val"]["mean"])]
    for e in summary:
        rs = [r for r in runs if r["label"] == e["label"]]
        style = dict(lw=2.2 if e["best_adamw"] or (e["name"] == "amos" and not e["lr_given"]) else 1.4,
                     ls="--" if e["name"] == "adamw" and not e["best_adamw"] else "-")
        for ax, key in zip(axes, ("val_loss", "train_loss")):
            steps = min((r["eval_steps"] for r in rs), key=len)[1:]  # train loss has no step-0 point
            curves = [[r[key][r["eval_steps"].index(s)] for s in steps] for r in rs]
            mean = [statistics.fmean(c) for c in zip(*curves)]
            line, = ax.plot(steps, mean, label=e["label"] + (" (best AdamW)" if e["best_adamw"] else ""), **style)
            if len(rs) > 1:
                ax.fill_between(steps, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)],
                                color=line.get_color(), alpha=0.2)
    for ax, what in zip(axes, ("validation", "training (mean over each interval)")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{what} loss, nats/byte")
        if finals:
            ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)
        ax.grid(alpha=0.3)
    finish_figure(fig, axes, title, path)


def finish_figure(fig, axes, title, path):
    """Legend, title, layout, save and close: the end of every plot of the training benchmarks."""
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out, tag, meta, setup, runs, summary, table_text):
    out.mkdir(parents=True, exist_ok=True)
    # not Path.with_suffix: a tag such as "amos_0.03" has a dot of its own
    paths = [out / f"convergence_{tag}.{ext}" for ext in ("json", "md", "png")]
    with open(paths[0], "w") as fh:
        json.dump(_clean(dict(meta=meta, setup=setup, summary=summary, runs=runs)), fh, indent=1)
        fh.write("\n")
    cfg = setup["config"]
    header = (f"# convergence_{tag}\n\n{meta['date']}, {meta['device']} ({meta.get('gpu', meta['cpu'])}, "
              f"{meta['torch_threads']} threads), torch {meta['torch']}, Python {meta['python']}; "
              f"load average at start {meta['load_average_start']}.\n"
              + (f"Note: {meta['note']}\n" if meta["note"] else "")
              + f"\nModel: {cfg['layers']} layers, width {cfg['width']}, {cfg['heads']} heads, context "
              f"{cfg['context']}, batch {cfg['batch']}, {cfg['steps']} steps; corpus "
              f"{setup['corpus']['train_bytes']:,} train / {setup['corpus']['val_bytes']:,} validation bytes "
              f"of the Python {meta['python']} stdlib.\n\n")
    paths[1].write_text(header + table_text + "\n")
    plot(paths[2], runs, summary, f"byte-level LM on the Python stdlib: {cfg['layers']}x{cfg['width']}, "
         f"{cfg['steps']} steps, {meta['device']}, seeds {setup['seeds']}")
    return paths
