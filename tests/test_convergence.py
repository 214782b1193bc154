"""The main job (benchmarks/convergence.py) keeps working: --quick prints its table, records its
runs and draws its plot."""
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest

from amos_fused import defaults

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_common  # noqa: E402
import convergence  # noqa: E402
import convergence_report  # noqa: E402
import lm_data  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run, two seeds (mean ± spread), Amos at its defaults and AdamW.

    Run through the script's main() in this process: a subprocess would pay torch's import again
    (seconds on a quiet machine, minutes on a heavily shared one)."""
    out = tmp_path_factory.mktemp("convergence")
    argv = ["--quick", "--seeds", "2", "--results", str(out), "--optimizers", "amos,adamw", "--adamw-lrs", "1e-2"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert convergence.main(argv) == 0
    return out, stdout.getvalue()


def quick_default_lr():
    """The lr Amos gives the --quick model (1 block: 7 matrices) when none is given."""
    return convergence.default_lr("amos", convergence.PRESETS["quick"])


def test_quick_run_prints_table_records_runs_and_draws_plot(quick_run):
    out, stdout = quick_run
    assert "| optimizer | lr | val @25%" in stdout
    assert quick_default_lr() == pytest.approx(0.275 / 7)
    assert f"| amos | {quick_default_lr():g} (default) |" in stdout
    assert "adamw (best of sweep)" in stdout
    assert " ± " in stdout  # two seeds: mean ± spread
    table = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 2  # header and 2 rows (the rule starts "|---")
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = bench_common.read(out / "convergence.jsonl")
    assert sorted({r["label"] for r in runs}) == ["adamw@0.01", "amos"]
    assert {r["seed"] for r in runs} == {0, 1}
    for r in runs:
        assert all(math.isfinite(v) for v in r["val_loss"]), r["label"]
        assert r["val_loss"][-1] < r["val_loss"][0], f"{r['label']} did not learn at all"
        assert r["state_bytes"] > 0 and r["ms_opt_step"] > 0
    amos = next(r for r in runs if r["label"] == "amos")
    assert amos["lr"] == pytest.approx(quick_default_lr())  # no lr given: the default
    assert runs[0]["versions"]["torch"] and runs[0]["setup"]["corpus"]["sha256"]
    assert runs[0]["command"].startswith("python benchmarks/convergence.py --quick")


def test_merge_selects_runs_without_training(quick_run, tmp_path, capsys):
    out, _ = quick_run
    convergence.main(["--merge", str(out / "convergence.jsonl"), "--results", str(tmp_path),
                      "--optimizers", "adamw@0.01,amos"])
    stdout = capsys.readouterr().out
    rows = [ln for ln in stdout.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| adamw (best of sweep)", "| amos"]  # --optimizers order
    assert "(default)" in rows[1]
    merged = bench_common.read(tmp_path / "convergence.jsonl")
    assert len(merged) == 4 and len({r["date"] for r in merged}) == 1  # 2 x 2 seeds, recorded as one run
    # of two runs of one label and seed, the newest (an older run of "amos" was another default)
    older = bench_common.read(out / "convergence.jsonl")
    newer = [dict(r, date="2999-01-01T00:00:00+00:00", final_val=r["final_val"] + 1.0) for r in older]
    both = tmp_path / "both.jsonl"
    both.write_text("".join(json.dumps(r) + "\n" for r in older + newer))  # file order: oldest first
    merged_runs, _ = convergence.merge([both], [("amos", None)])
    assert [r["merged_from"] for r in merged_runs] == [newer[0]["date"]] * 2
    # "amos" at its rule's lr is another computation (a constant lr) than "amos" without lr (its schedule)
    with pytest.raises(SystemExit, match="no run"):
        convergence.main(["--merge", str(out / "convergence.jsonl"), "--results", str(tmp_path),
                          "--optimizers", f"amos@{quick_default_lr()}"])


@pytest.mark.parametrize("name", convergence.OPTIMIZERS)
def test_each_optimizer_is_built_as_documented(name):
    model = convergence.ByteLM(1, 8, 2, 4)
    opt = convergence.build_optimizer(name, None if name != "adamw" else 1e-2, model, steps=400)
    group = opt.param_groups[0]
    if name == "adamw":
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert all(p.ndim >= 2 for p in group["params"])  # decay on matrices only
    else:
        matrices = sum(p.ndim >= 2 for p in model.parameters())
        assert group["schedule"] == name and group["lr"] == defaults.lr(name, None, matrices)
        assert group["momentum"] == 0.9
        assert group["half_life"] == (100 if name in ("inverse_time", "inverse_square") else None)
    f = convergence.lr_factor(name, 400)  # 20 warmup steps, then flat (Amos) or cosine (AdamW)
    assert f(0) == pytest.approx(1 / 20) and f(19) == 1.0
    assert f(399) == (pytest.approx(0.0, abs=1e-4) if name == "adamw" else 1.0)


def test_steps_to_reach_interpolates_and_reports_never():
    steps, val = [0, 10, 20], [5.0, 3.0, 1.0]
    assert convergence_report.steps_to_reach(steps, val, 2.0) == pytest.approx(15.0)
    assert convergence_report.steps_to_reach(steps, val, 5.0) == 0.0
    assert convergence_report.steps_to_reach(steps, val, 0.5) is None


def test_corpus_split_is_fixed_and_disjoint():
    root, files = lm_data.stdlib_files()
    val = [f for f in files if lm_data._path_hash(f) % lm_data.VAL_EVERY == 0]
    assert 0 < len(val) < len(files) / 5  # about one file in ten
    a_train, a_val, a = lm_data.load_corpus(100_000)
    b_train, b_val, b = lm_data.load_corpus(100_000)
    assert a["sha256"] == b["sha256"] and (a_train == b_train).all() and (a_val == b_val).all()
    assert a["train_bytes"] == 90_000 and a["val_bytes"] == 10_000


def test_optimizer_list_expands_the_adamw_sweep_and_refuses_unknown_names():
    args = convergence.parse_args(["--optimizers", "amos,amos@0.3,adamw", "--adamw-lrs", "1e-3,1e-2"])
    assert args.runs == [("amos", None), ("amos", 0.3), ("adamw", 1e-3), ("adamw", 1e-2)]
    with pytest.raises(SystemExit):
        convergence.parse_args(["--optimizers", "sgd"])
