"""Atomic training checkpoints: a crash, even SIGKILL during a save, never corrupts the latest one.

A checkpoint is written to a temporary file in the target's directory, flushed to disk (fsync),
then renamed over the target with `os.replace`, which POSIX makes atomic: a reader sees the old
complete file or the new complete file, never a partial one. The directory is fsynced too, so the
rename itself survives a power loss.

    from amos_fused import checkpoint
    checkpoint.save(checkpoint.capture(model, opt, step=step, generator=gen), f"{d}/ckpt_{step:08d}.pt")
    path = checkpoint.latest(d)                 # highest step among complete checkpoints, or None
    if path: step = checkpoint.restore(checkpoint.load(path), model, opt, generator=gen)
"""
import os
import re
import tempfile

import torch

TMP_SUFFIX = ".tmp"  # temporaries left by a killed save end with this; `latest` ignores them


def save(obj, path):
    """`torch.save(obj)` to `path` atomically (see the module docstring)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory):
    if os.name != "posix":  # Windows cannot open a directory; os.replace is still atomic there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path, map_location="cpu"):
    """Load a checkpoint written by `save` (tensors, dicts, numbers, dtypes only: weights_only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def latest(directory, prefix="ckpt_"):
    """The path of `prefix<step>.pt` with the highest step in `directory`, or None.

    Only complete files have that name (a save in progress is a `.tmp` file), so this is the last
    checkpoint that finished.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.pt$")
    found = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := pattern.match(name))]
    return os.path.join(directory, max(found)[1]) if found else None


def capture(model, optimizer, step, generator=None):
    """Everything a bit-identical resume needs: model, optimizer, step, and the RNG states.

    `generator` is the data order's `torch.Generator` if it has its own; the global CPU RNG
    (dropout, `torch.randperm` without a generator) and, when present, the CUDA RNGs are saved too.
    """
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                 skipped_steps=getattr(optimizer, "skipped_steps", 0),
                 cpu_rng=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore(state, model, optimizer, generator=None):
    """Load what `capture` saved back into `model`, `optimizer` (and `generator`); return the step."""
    if generator is not None and "generator" not in state:
        raise ValueError("checkpoint.restore: a generator was passed but the checkpoint holds no generator "
                         "state; pass generator= to capture() as well")
    optimizer.load_state_dict(state["optimizer"])  # Amos checks all of it before loading any
    model.load_state_dict(state["model"])
    if hasattr(optimizer, "skipped_steps"):
        optimizer.skipped_steps = state.get("skipped_steps", 0)
    torch.set_rng_state(state["cpu_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if generator is not None:
        generator.set_state(state["generator"])
    return state["step"]
