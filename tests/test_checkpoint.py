"""`state_dict` across backends and devices, single process.

A run trains HALF steps on backend/device A, saves `state_dict()` through torch.save/torch.load
(map_location = B's device), loads it into a fresh optimizer on B built from the trained weights
(so its own measured eta is wrong and must come from the checkpoint), and trains HALF more steps.
- A == B: bitwise equal to the uninterrupted run (the round trip loses nothing).
- A != B: within the backend grid's tolerances of the uninterrupted reference run: the same ones
  every fused backend meets step by step (tests/backend_grid.py argues them).
Every pair with the reference on either side, and each backend with itself, for every backend
that runs here ("cpu", "triton" under the interpreter on CPU; "cuda" and CUDA <-> CPU moves
only with a GPU). Saved state keeps its dtypes (fp32 v/b, bf16 m) and shapes.
"""
import io

import pytest
import torch
from backend_grid import TOL, _tol, assert_close

from amos_fused import Amos, backends

HALF = 3
SHAPES = [(5, 7), (6,), (3, 2, 2), ()]
CONFIGS = {
    "amos-row-fp32": (torch.float32, dict(schedule="amos", granularity="row", momentum=0.9)),
    "inverse_time-element-bf16": (torch.bfloat16, dict(schedule="inverse_time", half_life=4, granularity="element",
                                                       momentum=0.9, momentum_dtype=torch.bfloat16)),
    "amos-tensor-tensor_lr": (torch.float32, dict(schedule="amos", granularity="tensor", momentum=0.0,
                                                  lr=torch.tensor(0.05))),
}


def _runs(name, device):
    try:
        backends.resolve(name, torch.device(device))
        return True
    except RuntimeError:
        return False


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
AVAILABLE = [(b, d) for d in DEVICES for b in backends.BACKENDS if b != "auto" and _runs(b, d)]
PAIRS = sorted({(a, b) for a in AVAILABLE for b in AVAILABLE if a == b or "reference" in (a[0], b[0])})


def grads(step, dtype, device):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in SHAPES]


def fresh_params(dtype, device):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).to(device))
            for s in SHAPES]


def options(cfg, device):
    out = dict(cfg)
    if torch.is_tensor(out.get("lr")):
        out["lr"] = out["lr"].clone().to(device)
    return out


def train(params, opt, steps, start):
    for t in range(start, start + steps):
        for p, g in zip(params, grads(t, params[0].dtype, params[0].device)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("src,dst", PAIRS, ids=lambda x: f"{x[0]}@{x[1]}")
def test_state_dict_moves_between_backends(src, dst, config):
    dtype, cfg = CONFIGS[config]
    (a, dev_a), (b, dev_b) = src, dst
    params = fresh_params(dtype, dev_a)
    opt = Amos(params, backend=a, **options(cfg, dev_a))
    train(params, opt, HALF, 0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, map_location=dev_b, weights_only=True)

    moved = [torch.nn.Parameter(p.detach().to(dev_b).clone()) for p in params]
    resumed = Amos(moved, backend=b, **options(cfg, dev_b))
    resumed.load_state_dict(saved)
    for i, (p, q) in enumerate(zip(params, moved)):
        for key, value in opt.state[p].items():
            got = resumed.state[q][key]
            if torch.is_tensor(value):
                assert got.dtype == value.dtype and got.device == q.device, f"tensor {i} state {key}"
                assert torch.equal(got.cpu(), value.cpu()), f"tensor {i} state {key} changed in the round trip"
            else:
                assert got == value, f"tensor {i} state {key}: {got} != {value}"
    train(moved, resumed, HALF, HALF)

    if src == dst:
        want = fresh_params(dtype, dev_b)
        train(want, Amos(want, backend=b, **options(cfg, dev_b)), 2 * HALF, 0)
        for i, (p, w) in enumerate(zip(moved, want)):
            assert torch.equal(p, w), f"tensor {i}: resumed run differs from the uninterrupted {b} run"
    else:
        want = fresh_params(dtype, dev_b)
        train(want, Amos(want, backend="reference", **options(cfg, dev_b)), 2 * HALF, 0)
        tol = TOL[torch.float32] if dtype == torch.float32 else _tol(dtype)
        for i, (p, w) in enumerate(zip(moved, want)):
            assert_close(p.detach(), w.detach(), tol, f"{a}@{dev_a} -> {b}@{dev_b}, tensor {i} {tuple(p.shape)}")
