"""benchmarks/gpu_check.sh: the parts a CPU machine can check (arguments, dry run, folder layout)."""
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def run(*args, out=None):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def only_run_dir(root):
    dirs = list(Path(root).iterdir())
    assert len(dirs) == 1 and dirs[0].name.startswith("gpu_check_"), dirs
    return dirs[0]


def test_dry_run_creates_the_layout_and_runs_nothing(tmp_path):
    res = run("--dry-run", str(tmp_path))
    assert res.returncode == 0, res.stderr
    d = only_run_dir(tmp_path)
    assert sorted(f.name for f in d.iterdir()) == ["summary.txt"], "a dry run must not run any part"
    summary = (d / "summary.txt").read_text()
    for field in ("device:", "date:", "commit:", "dry_run: 1", "failed_parts: 0"):
        assert field in summary, summary
    for name in ("env", "install", "tests_cuda", "tests_triton", "step_time"):
        assert f"{name}: dry-run" in summary
    # what it would run is printed
    assert "pip install --no-build-isolation --no-deps --use-pep517 -e ." in res.stdout
    assert "pytest" in res.stdout and "tests/test_triton.py" in res.stdout
    assert "tests/test_graphs.py" in res.stdout and "tests/test_plan_cache.py" in res.stdout  # CUDA graphs
    assert "step_time.py --device cuda" in res.stdout


def test_folder_name_has_device_and_date(tmp_path):
    run("--dry-run", str(tmp_path))
    name = only_run_dir(tmp_path).name  # gpu_check_<device slug>_<YYYYmmddTHHMMSSZ>
    device, stamp = name[len("gpu_check_"):].rsplit("_", 1)
    assert device and all(c.isalnum() or c == "-" for c in device)
    assert len(stamp) == 16 and stamp[8] == "T" and stamp.endswith("Z") and stamp[:8].isdigit()


def test_output_dir_defaults_to_OUT(tmp_path):
    res = run("--dry-run", out=tmp_path)
    assert res.returncode == 0, res.stderr
    only_run_dir(tmp_path)


@pytest.mark.parametrize("args, message", [
    ((), "give an output directory or set $OUT"),
    (("--bogus", "x"), "unknown option --bogus"),
    (("a", "b"), "one output directory only"),
])
def test_bad_arguments_exit_2_with_a_reason(tmp_path, args, message):
    res = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "OUT"})
    assert res.returncode == 2
    assert message in res.stderr
    assert not (tmp_path / "a").exists(), "nothing is created on bad arguments"


def test_help(tmp_path):
    res = run("--help")
    assert res.returncode == 0 and "--dry-run" in res.stdout and "OUTDIR" in res.stdout
