"""The main job's corpus: Python's own standard library, read as bytes.

Which files: every `.py` file under the running interpreter's stdlib directory
(`sysconfig.get_paths()["stdlib"]`), skipping `site-packages`, `__pycache__` and test folders
(`test`, `tests`, `idle_test`: their many near-duplicate cases would make validation easy).
Order and split, independent of the file system's order and of the seed:
- files are ordered by the SHA-256 of their path relative to the stdlib directory (a fixed,
  well-mixed sample of the whole library rather than its alphabetical start);
- a file belongs to validation when that hash, as an integer, is 0 mod 10 (about 10 % of files),
  else to training; whole files, so no file straddles the split;
- files are taken in that order until each split reaches its cap (`max_bytes` * 0.9 / 0.1).
The corpus therefore depends only on the Python version's stdlib and `max_bytes`; its SHA-256 is
recorded with every result.
"""
import hashlib
import os
import sysconfig

import torch

SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test"}
VAL_EVERY = 10  # one file in ten (by path hash) is validation
VOCAB = 256  # bytes


def stdlib_files(root=None):
    """Relative paths of the corpus's candidate files, ordered by SHA-256 of the path."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for f in files:
            if f.endswith(".py"):
                found.append(os.path.relpath(os.path.join(here, f), root).replace(os.sep, "/"))
    return root, sorted(found, key=_path_hash)


def _path_hash(rel):
    return int.from_bytes(hashlib.sha256(rel.encode()).digest(), "big")


def load_corpus(max_bytes):
    """(train bytes, val bytes, info dict): the split described in the module docstring."""
    root, files = stdlib_files()
    caps = {"train": int(max_bytes * (1 - 1 / VAL_EVERY)), "val": int(max_bytes / VAL_EVERY)}
    parts = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    counts = {"train": 0, "val": 0}
    for rel in files:
        split = "val" if _path_hash(rel) % VAL_EVERY == 0 else "train"
        if sizes[split] >= caps[split]:
            if all(sizes[s] >= caps[s] for s in caps):
                break
            continue
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
        data = data[: caps[split] - sizes[split]]  # the last file of a split may be cut
        parts[split].append(data)
        sizes[split] += len(data)
        counts[split] += 1
    train, val = b"".join(parts["train"]), b"".join(parts["val"])
    info = dict(stdlib=root, train_bytes=len(train), val_bytes=len(val), train_files=counts["train"],
                val_files=counts["val"], sha256=hashlib.sha256(train + b"\0" + val).hexdigest(),
                rule=f"stdlib .py files (no {sorted(SKIP_DIRS)}), ordered by sha256(path); "
                     f"validation = sha256(path) % {VAL_EVERY} == 0; capped at {max_bytes} bytes")
    return _tensor(train), _tensor(val), info


def _tensor(data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def train_batch(data, batch, context, gen):
    """`batch` random windows of `context + 1` bytes: (inputs, next-byte targets)."""
    start = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
    rows = torch.stack([data[s: s + context + 1] for s in start.tolist()])
    return rows[:, :-1], rows[:, 1:]


def val_batches(data, batch, context, n_batches):
    """A fixed validation set: `n_batches` batches of windows spread evenly over `data`."""
    n = batch * n_batches
    starts = torch.linspace(0, data.numel() - context - 2, n).long().tolist()
    rows = torch.stack([data[s: s + context + 1] for s in starts])
    return [(r[:, :-1], r[:, 1:]) for r in rows.split(batch)]
