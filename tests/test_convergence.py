"""The main job (benchmarks/convergence.py) keeps working: --quick produces its table, JSON and PNG."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import convergence  # noqa: E402
import convergence_report  # noqa: E402
import lm_data  # noqa: E402


def test_quick_run_writes_table_json_and_plot(tmp_path):
    # two seeds of two optimizers: exercises the sweep expansion, the AdamW comparison and mean ± spread
    cmd = [sys.executable, str(BENCH / "convergence.py"), "--quick", "--seeds", "2", "--out", str(tmp_path),
           "--optimizers", "amos,inverse_time,adamw", "--adamw-lrs", "3e-3,1e-2", "--tag", "t"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| optimizer | lr | val @25%" in done.stdout
    assert "adamw (best of sweep)" in done.stdout
    assert " ± " in done.stdout  # two seeds: mean ± spread
    report = json.loads((tmp_path / "convergence_t.json").read_text())
    assert (tmp_path / "convergence_t.md").read_text().count("\n| ") >= 4
    assert (tmp_path / "convergence_t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = report["runs"]
    assert sorted({r["label"] for r in runs}) == ["adamw@0.003", "adamw@0.01", "amos", "inverse_time"]
    assert {r["seed"] for r in runs} == {0, 1}
    for r in runs:
        assert all(math.isfinite(v) for v in r["val_loss"]), r["label"]
        assert r["val_loss"][-1] < r["val_loss"][0], f"{r['label']} did not learn at all"
        assert r["state_bytes"] > 0 and r["ms_opt_step"] > 0
    amos = next(r for r in runs if r["label"] == "amos")
    assert amos["lr"] == pytest.approx(convergence.Amos.__init__.__globals__["DEFAULT_LR"]["amos"])
    assert report["meta"]["torch"] and report["setup"]["corpus"]["sha256"]


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


def test_bad_optimizer_name_is_refused():
    with pytest.raises(SystemExit):
        convergence.parse_args(["--optimizers", "sgd"])
