"""The second training task (benchmarks/classifier.py) keeps working: --quick prints its table,
records its runs and draws its plot."""
import contextlib
import io
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="benchmarks/classifier.py needs scikit-learn (requirements.txt)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_common  # noqa: E402
import classifier  # noqa: E402


def test_split_is_stratified_and_fixed():
    xt, yt, xv, yv = classifier.load_digits_split()
    assert len(yt) + len(yv) == 1797
    # every class holds 174..183 images; 20 % of each, rounded, is 35 or 36
    counts = [(yv == c).sum().item() for c in range(10)]
    assert all(35 <= n <= 37 for n in counts), counts
    assert 0.0 <= xt.min() and xt.max() <= 1.0
    # the split is fixed: a second call gives the same images in the same order
    xt2, _, xv2, _ = classifier.load_digits_split()
    assert (xv2 == xv).all() and (xt2 == xt).all()


def test_quick_run_prints_table_records_runs_and_draws_plot(tmp_path):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert classifier.main(["--quick", "--seeds", "2", "--results", str(tmp_path)]) == 0
    text = stdout.getvalue()
    assert "| optimizer | lr | val loss @6 |" in text
    assert "| amos | 0.0917 (peak, default) |" in text and "| inverse_time |" in text  # 3 matrices: 0.275 / 3
    assert "| amos total_steps | 0.0917 (peak, default) |" in text  # 3 matrices: 0.275 / 3
    assert "adamw (best of sweep)" in text and " ± " in text  # two seeds: mean ± std
    runs = bench_common.read(tmp_path / "classifier.jsonl")
    assert (tmp_path / "classifier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 4  # header, amos, amos total_steps, inverse_time, one AdamW lr under --quick
    assert runs[0]["versions"]["torch"] and runs[0]["date"] and runs[0]["setup"]["steps"] == 12
    assert {r["seed"] for r in runs} == {0, 1}
    for r in runs:
        assert not r["diverged"], r["label"]
        assert all(math.isfinite(v) for v in r["val_loss"]), r["label"]
        assert r["val_loss"][-1] < r["val_loss"][0], f"{r['label']} did not learn at all"
        assert r["state_bytes"] > 0 and r["ms_train_step"] > 0
    amos = next(r for r in runs if r["label"] == "amos")
    assert amos["state_bytes"] < next(r for r in runs if r["name"] == "adamw")["state_bytes"]
