"""Plots drawn from the results data files (bench_common.record): <folder>/<kind>.png from the
latest run in <folder>/<kind>.jsonl, for every kind below that has a data file.

    python benchmarks/plots.py                              # every folder under benchmarks/results
    python benchmarks/plots.py benchmarks/results/h200      # one folder

The benchmarks call `plot` themselves after recording, so their plot always shows their own run.
"""
import argparse
import collections
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _machine(r):
    return r["machine"]["gpu"] or r["machine"]["cpu"]


def _save(fig, path, title, bottom=0.0):
    """`bottom`: the fraction of the figure's height kept below the panels (a figure legend)."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


# ---- one function per kind: (rows of one run, path) --------------------------------------------


def step_time(rows, path):
    """Per size: median step time (log scale) and % of the `a += b` bandwidth, one bar per row."""
    plt = _pyplot()
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(len(sizes), 2, figsize=(13, 0.32 * max(len(rows), 8) + 1.5), squeeze=False)
    colors = {"default": "navy", "amos": "tab:blue", "compile": "tab:purple", "adamw": "tab:orange", "adafactor": "tab:green",
              "apex": "tab:red"}
    for (ax_t, ax_r), size in zip(axes, sizes):
        rs = [r for r in rows if r["size"] == size]
        names = [r["row"] for r in rs]
        c = [colors.get(r["group"], "gray") for r in rs]
        ax_t.barh(names, [r["median_ms"] for r in rs], color=c)
        ax_t.set_xscale("log")
        ax_t.set_xlabel("step time, ms (median, log scale)")
        ax_t.invert_yaxis()
        ax_t.set_title(f"{size} ({rs[0]['n_params'] / 1e6:.0f}M params)")
        ax_r.barh(names, [r["pct_roofline"] for r in rs], color=c)
        ax_r.set_xlabel(f"% of a += b bandwidth ({rs[0]['roofline_gbps']:.3g} GB/s)")
        ax_r.invert_yaxis()
        ax_r.set_yticklabels([])
    r = rows[0]
    _save(fig, path, f"Optimizer step, {r['dtype']}, {_machine(r)}, torch {r['versions']['torch']}, {r['date'][:10]}"
          + (f" ({r['note']})" if r.get("note") else ""))


def row_sweep(rows, path):
    """% of the `a += b` bandwidth against the row width, one line per family, backend and prefetch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    lines = dict.fromkeys((r["backend"], r["family"], r["prefetch"]) for r in rows)
    for backend, family, prefetch in lines:
        rs = sorted((r for r in rows if (r["backend"], r["family"], r["prefetch"]) == (backend, family, prefetch)),
                    key=lambda r: r["C"])
        label = f"{backend} {family}" + (f" prefetch {prefetch}" if prefetch != "-" else "")
        ax.plot([r["C"] for r in rs], [r["pct_stream"] for r in rs], marker="o", label=label,
                ls="--" if prefetch == "off" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("row width C (elements)")
    ax.set_ylabel(f"% of a += b bandwidth ({rows[0]['stream_gb_s']:.3g} GB/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    r = rows[0]
    _save(fig, path, f"One Amos step by row width, {r['numel']} fp32 elements, {_machine(r)}, {r['date'][:10]}")


def _best_adamw(runs):
    labels = dict.fromkeys(r["label"] for r in runs if r["name"] == "adamw")
    finals = {lab: statistics.fmean(math.inf if r["final_val"] is None else r["final_val"]
                                    for r in runs if r["label"] == lab) for lab in labels}
    return min(finals, key=finals.get, default=None)


def _curves(axes, keys, runs, emphasise):
    """Mean curve per label (and the band between seeds) of each key on its axis."""
    best = _best_adamw(runs)
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        adamw = rs[0]["name"] == "adamw"
        style = dict(lw=2.2 if label == best or emphasise(rs[0]) else 1.2, ls="--" if adamw and label != best else "-")
        for ax, key in zip(axes, keys):
            shortest = min((r["eval_steps"] for r in rs), key=len)  # a diverged run stops early
            steps = [s for s in shortest if all(r[key][r["eval_steps"].index(s)] is not None for r in rs)]
            curves = [[r[key][r["eval_steps"].index(s)] for s in steps] for r in rs]
            line, = ax.plot(steps, [statistics.fmean(c) for c in zip(*curves)],
                            label=label + (" (best AdamW)" if label == best else ""), **style)
            if len(rs) > 1:
                ax.fill_between(steps, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)],
                                color=line.get_color(), alpha=0.2)
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)


def convergence(rows, path):
    """Validation and training loss curves of the language model, mean over seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _curves(axes, ("val_loss", "train_loss"), rows, lambda r: r["name"] == "amos" and not r["lr_given"])
    finals = [r["final_val"] for r in rows if r["final_val"] is not None]
    for ax, what in zip(axes, ("validation", "training (mean over each interval)")):
        ax.set_ylabel(f"{what} loss, nats/byte")
        if finals:
            ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)
    cfg, r = rows[0]["setup"]["config"], rows[0]
    seeds = sorted({r["seed"] for r in rows})
    _save(fig, path, f"byte-level LM on the Python stdlib: {cfg['layers']}x{cfg['width']}, {cfg['steps']} steps, "
          f"seeds {seeds}, {_machine(r)}, {r['date'][:10]}")


def lr_sweep(rows, path):
    """Final validation loss against lr, one line per optimizer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(r["name"] for r in rows):
        rs = sorted((r for r in rows if r["name"] == name and r["final_val"] is not None), key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in rs], [r["final_val"] for r in rs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("lr")
    ax.set_ylabel("final validation loss, nats/byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    cfg, r = rows[0]["setup"]["config"], rows[0]
    _save(fig, path, f"lr sweep, byte-level LM: {cfg['layers']}x{cfg['width']}, {cfg['steps']} steps, "
          f"{_machine(r)}, {r['date'][:10]}")


def classifier(rows, path):
    """Validation loss and accuracy of the digits CNN, mean over seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _curves(axes, ("val_loss", "val_acc"), rows, lambda r: r["name"] != "adamw")
    axes[0].set_ylabel("validation cross-entropy, nats")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("validation accuracy")
    axes[1].set_ylim(0.5, 1.0)
    r = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    _save(fig, path, f"small CNN on sklearn digits: {r['setup']['steps']} steps, batch {r['setup']['batch']}, "
          f"seeds {seeds}, {_machine(r)}, {r['date'][:10]}")


def _task_grid(plt, n):
    """A figure of `n` task panels, two per line, and its axes in order (spare panels hidden)."""
    cols = min(n, 2)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.4 * nrows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes


def quality(rows, path):
    """The quality suite: per task, validation loss (mean over seeds) of every row but the Amos lr
    sweep's, of which the default and the best lr are drawn; the default and the best AdamW bold.
    Curves average the seeds whose whole curve is recorded (a many-seed row may keep only the final
    point of its extra seeds); the rows' ranking reads every seed's final loss."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = _task_grid(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        runs = [r for r in rows if r["task"] == task]
        by_row = {row: [r for r in runs if r["row"] == row] for row in dict.fromkeys(r["row"] for r in runs)}
        final = {row: statistics.fmean(math.inf if r["final_val"] is None else r["final_val"] for r in rs)
                 for row, rs in by_row.items()}
        best = {fam: min((row for row, rs in by_row.items() if rs[0]["family"] == fam), key=final.get, default=None)
                for fam in ("adamw", "amos")}
        lows, highs, drawn = [], [], set()
        for row, rs in by_row.items():
            if rs[0]["family"] == "amos" and row not in ("default", best["amos"]):
                continue
            rs = [r for r in rs if not r["diverged"]]
            if not rs:
                continue
            # the whole curves only: a record may keep just the final point of a many-seed row's extra seeds
            steps = max((r["eval_steps"] for r in rs), key=len)
            rs = [r for r in rs if r["eval_steps"] == steps]
            drawn.add(len(rs))
            mean = [statistics.fmean(r["val_loss"][r["eval_steps"].index(t)] for r in rs) for t in steps]
            main = row in ("default", best["adamw"])
            label = row + (" (best AdamW)" if row == best["adamw"] else "") + (
                " (best Amos lr)" if row == best["amos"] and row != "default" else "")
            ax.plot(steps, mean, label=label, lw=2.2 if main else 1.1,
                    ls="--" if rs[0]["family"] == "adamw" and not main else "-", alpha=1.0 if main else 0.8)
            lows.append(min(mean))
            highs.append(mean[min(len(mean) - 1, max(1, len(mean) // 5))])
        if lows:
            lo, hi = min(lows), max(highs)
            ax.set_ylim(lo - 0.05 * (hi - lo), hi)
        seeds = "-".join(str(n) for n in sorted({min(drawn), max(drawn)})) if drawn else "no"  # no: all diverged
        ax.set_title(f"{task}: {runs[0]['task_setup']['title']}, {runs[0]['task_setup']['steps']} steps "
                     f"(curves: {seeds} seeds)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    r = rows[0]
    _save(fig, path, f"quality suite: validation loss, mean over seeds; {_machine(r)}, "
          f"torch {r['versions']['torch']}, {r['date'][:10]}")


FEW_RULES = 12


def defaults_study(rows, path):
    """Candidate default rules: per task, the final validation loss (mean over seeds) over the best
    AdamW's, against lr, for every rule run on all the file's tasks (one line each, AdamW's sweep
    dashed); rules screened on fewer tasks are in the data, not the picture, unless the file holds
    at most FEW_RULES rules: then each is drawn on the panels where it ran."""
    plt = _pyplot()
    from matplotlib import ticker
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    rule = lambda row: row.partition("@")[0]  # noqa: E731
    rules = list(dict.fromkeys(rule(r["row"]) for r in rows))
    shown = rules if len(rules) <= FEW_RULES else [
        x for x in rules if all(any(rule(r["row"]) == x and r["task"] == t for r in rows) for t in tasks)]
    fig, axes = _task_grid(plt, len(tasks))
    styles = {x: (plt.get_cmap("tab20")(i % 20), "osD^v"[i // 20 % 5]) for i, x in enumerate(shown)}
    # (rule, task, lr) -> seeds run: the legend gives each rule's range over every panel
    runs = collections.Counter((rule(r["row"]), r["task"], r["lr"]) for r in rows)
    label = {}
    for x in shown:
        counts = sorted({n for (y, _, _), n in runs.items() if y == x})
        seeds = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else str(counts[0])
        label[x] = f"{x} ({seeds} seed{'' if seeds == '1' else 's'})"
    for ax, task in zip(axes, tasks):
        final = {}
        for r in rows:
            if r["task"] == task:
                final.setdefault((rule(r["row"]), r["lr"]), []).append(
                    math.inf if r["final_val"] is None else r["final_val"])
        mean = {k: statistics.fmean(v) for k, v in final.items()}
        adamw = min(v for (x, _), v in mean.items() if x == "adamw")
        for x in shown:
            pts = sorted((lr, v / adamw) for (y, lr), v in mean.items() if y == x and math.isfinite(v))
            if not pts:
                continue
            color, marker = styles[x]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if x == "adamw" else "-", marker=marker,
                    color=color, label=label[x], lw=2.2 if x in ("adamw", "default") else 1.2, ms=4)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.02, color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=6.5)
        ax.set_title(f"{task}: {_title(rows, task)}", fontsize=9)
        ax.set_xlabel("lr (the peak, with a schedule)")
        ax.set_ylabel("final val loss / best AdamW's")
        ax.grid(alpha=0.3, which="both")
    # one legend for all panels, below them: the rules are many, and a legend inside would hide points
    legend = {}  # label -> handle, over every panel: a rule may be drawn on some panels only
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    handles, labels = list(legend.values()), list(legend)
    lines = (len(labels) + 1) // 2
    height = fig.get_figheight()
    fig.set_figheight(height + 0.17 * lines + 0.2)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7.5, frameon=False)
    r = rows[0]
    _save(fig, path, f"candidate default rules: final validation loss (mean over seeds) over the best AdamW's "
          f"(dotted: +2 %); {_machine(r)}, torch {r['versions']['torch']}, {r['date'][:10]}",
          bottom=(0.17 * lines + 0.2) / fig.get_figheight())


def _title(rows, task):
    setup = next(r["task_setup"] for r in rows if r["task"] == task)
    return f"{setup['title']}, {setup['steps']} steps"


PLOTTERS = {"step_time": step_time, "row_sweep": row_sweep, "convergence": convergence, "lr_sweep": lr_sweep,
            "classifier": classifier, "quality": quality, "defaults_study": defaults_study,
            "defaults_study_layers": defaults_study}
RUN_IN_PARTS = ("quality", "defaults_study", "defaults_study_layers")  # each task, row and seed drawn from its latest run


def base_kind(kind):
    """The plotter's kind: "quality_x3" (quality.py --steps-factor 3) is drawn as "quality"."""
    return re.sub(r"_x\d+(\.\d+)?(e[+-]\d+)?$", "", kind)


def plot(kind, folder):
    """Draw <folder>/<kind>.png from the latest run in <folder>/<kind>.jsonl (RUN_IN_PARTS: the
    latest of each task, row and seed; a kind ending "_x<F>" is its base kind at F times the steps);
    return its path."""
    rows = bc.read(os.path.join(folder, f"{kind}.jsonl"))
    base = base_kind(kind)
    if base in RUN_IN_PARTS:  # the suite is run in parts (--rows), each task at its latest setup
        last, setup = {}, {}
        for r in rows:
            last[(r["task"], r["row"], r["seed"])] = r
            setup[r["task"]] = r["task_setup"]
        rows = [r for r in last.values() if r["task_setup"] == setup[r["task"]]]
    else:
        rows = bc.latest(rows)
    path = os.path.join(folder, f"{kind}.png")
    PLOTTERS[base](rows, path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", help="results folders (default: every folder under benchmarks/results)")
    args = ap.parse_args(argv)
    folders = args.folders or sorted(os.path.join(bc.RESULTS, d) for d in os.listdir(bc.RESULTS)
                                     if os.path.isdir(os.path.join(bc.RESULTS, d)))
    for folder in folders:
        if not os.path.isdir(folder):
            ap.error(f"{folder}: no such folder; give a results folder such as benchmarks/results/cpu")
        kinds = [name[:-len(".jsonl")] for name in sorted(os.listdir(folder)) if name.endswith(".jsonl")]
        for kind in kinds:
            if base_kind(kind) in PLOTTERS:
                print(f"drew {plot(kind, folder)}")


if __name__ == "__main__":
    main()
