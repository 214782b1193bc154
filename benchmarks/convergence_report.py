"""Numbers and table of benchmarks/convergence.py (kept apart from the training loop)."""
import math
import statistics

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
