"""Crash and resume: a run killed with SIGKILL and resumed from its last complete checkpoint ends
bit-identical to a run that was never interrupted (model, optimizer state, RNG states).

The training run is tests/resume_worker.py in a subprocess; checkpoints are written every 3 steps by
amos_fused.checkpoint.save (temporary file, fsync, os.replace).
"""
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import resume_worker
from amos_fused import checkpoint

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and atomic rename semantics are POSIX")

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS, EVERY = 20, 3
TIMEOUT = 120  # seconds per worker process; a hung worker is killed and the test fails


def _command(directory, *extra):
    return [sys.executable, str(WORKER), str(directory), "--steps", str(STEPS), "--every", str(EVERY), *extra]


def _run_to_end(directory, *extra):
    """Run the worker in this process (the killed runs are subprocesses; torch imports once here)."""
    out = io.StringIO()
    with torch.random.fork_rng(), contextlib.redirect_stdout(out):
        resume_worker.main([str(directory), "--steps", str(STEPS), "--every", str(EVERY), *extra])
    return out.getvalue().splitlines()


def _kill_when(directory, line, *extra):
    """Start a worker, SIGKILL it as soon as it prints `line`; return what it printed."""
    with open(Path(directory) / "stderr.txt", "w") as err:
        proc = subprocess.Popen(_command(directory, *extra), stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(TIMEOUT, proc.kill)
        watchdog.start()
        seen = []
        try:
            for out in proc.stdout:
                seen.append(out.strip())
                if seen[-1] == line:
                    proc.send_signal(signal.SIGKILL)
                    break
        finally:
            watchdog.cancel()
            proc.kill()
            proc.wait()
    assert seen and seen[-1] == line, (f"worker never printed {line!r}: {seen}\n"
                                       f"{(Path(directory) / 'stderr.txt').read_text()}")
    assert proc.returncode == -signal.SIGKILL
    return seen


def _assert_identical(a, b, where="checkpoint"):
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a!r} vs {b!r}"
        assert torch.equal(a, b), f"{where}: values differ (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            _assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    lines = _run_to_end(directory)
    assert lines[0] == "start 0" and lines[-1] == "done"
    return checkpoint.load(directory / "final.pt")


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(tmp_path, uninterrupted):
    _kill_when(tmp_path, "step 8", "--pause-after", "8")
    assert not (tmp_path / "final.pt").exists()
    latest = checkpoint.latest(tmp_path)
    assert latest == str(tmp_path / "ckpt_00000006.pt"), os.listdir(tmp_path)
    lines = _run_to_end(tmp_path)
    assert lines[0] == "start 6", lines[:3]  # it resumed, it did not start over
    _assert_identical(checkpoint.load(tmp_path / "final.pt"), uninterrupted)


def test_sigkill_during_a_checkpoint_write_keeps_the_last_complete_one(tmp_path, uninterrupted):
    _kill_when(tmp_path, "writing 9", "--hang-in-save-at", "9")
    names = sorted(os.listdir(tmp_path))
    partial = [n for n in names if n.endswith(checkpoint.TMP_SUFFIX)]
    assert partial and all(n.startswith("ckpt_00000009.pt.") for n in partial), names  # the kill hit the write
    assert "ckpt_00000009.pt" not in names
    assert checkpoint.latest(tmp_path) == str(tmp_path / "ckpt_00000006.pt"), names
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 6  # complete and loadable
    lines = _run_to_end(tmp_path)
    assert lines[0] == "start 6", lines[:3]
    _assert_identical(checkpoint.load(tmp_path / "final.pt"), uninterrupted)


def test_resumed_and_uninterrupted_runs_are_not_trivially_equal(uninterrupted, tmp_path):
    """The comparison above can fail: a run resumed without its data-order RNG state differs."""
    _run_to_end(tmp_path, "--pause-after", "-1")
    os.unlink(tmp_path / "final.pt")
    for name in os.listdir(tmp_path):
        if name > "ckpt_00000006.pt":
            os.unlink(tmp_path / name)
    state = checkpoint.load(checkpoint.latest(tmp_path))
    state["generator"] = torch.Generator().manual_seed(999).get_state()  # lose the data order
    checkpoint.save(state, checkpoint.latest(tmp_path))
    assert _run_to_end(tmp_path)[0] == "start 6"
    with pytest.raises(AssertionError, match="values differ"):
        _assert_identical(checkpoint.load(tmp_path / "final.pt"), uninterrupted)


def test_save_failure_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "ckpt_00000001.pt"
    checkpoint.save({"x": torch.arange(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.save({"x": Unpicklable()}, path)
    assert os.listdir(tmp_path) == ["ckpt_00000001.pt"]
    assert torch.equal(checkpoint.load(path)["x"], torch.arange(3))
