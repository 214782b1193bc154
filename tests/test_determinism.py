"""Two identical runs give bitwise-identical parameters and state, on every backend that runs here
(CPU tensors; on a GPU machine also CUDA tensors, where floating-point atomics would show).

The tensors include a long 1-D slice and a wide matrix, so split reductions (triton's chunked
slices, the cpu backend's threads) are exercised: their partial sums must be combined in a fixed
order, never by floating-point atomics whose order varies.
"""
import pytest
import torch

from amos_fused import Amos
from test_bad_input import assert_identical, backend_devices

SHAPES = [(40000,), (300, 257), (), (7,), (3, 5, 2, 2), (0, 3), (1, 1)]
# the triton interpreter is slow on large tensors: small ones with tiny blocks take its split paths
# (several programs per slice, chunked reductions, packed tiles) instead
TRITON_SHAPES = [(130,), (3, 50), (2, 41), (), (7,), (4, 3, 3, 3), (0, 3), (1, 1)]
TINY_BLOCKS = dict(tile=64, max_colb=16, long_row=40, chunk=16, block=8, norm_tensors=2, num_warps=4)
CONFIGS = {
    "amos-row-m0.9": dict(schedule="amos", momentum=0.9),
    "amos-tensor-clip": dict(schedule="amos", granularity="tensor", momentum=0.0, clip_value=0.05),
    "inverse_time-row": dict(schedule="inverse_time", half_life=3, momentum=0.0),
    "inverse_square-element-m0.5": dict(schedule="inverse_square", half_life=2, granularity="element", momentum=0.5),
}
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16-fp16grad": (torch.bfloat16, torch.float16)}


def run(backend, config, dtypes, steps=3, device="cpu"):
    pd, gd = dtypes
    gen = torch.Generator().manual_seed(0)
    interpreted = backend == "triton" and device == "cpu"
    params = [(torch.randn(s, generator=gen) * 0.3).to(device, pd) for s in (TRITON_SHAPES if interpreted else SHAPES)]
    for p in params:
        p.grad_dtype = None
    opt = Amos(params, lr=0.1, backend=backend, **config)
    for step in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(device, gd)
        opt.step()
    return dict(params=params, state=[opt.state[p] for p in params])


@pytest.mark.parametrize("backend,device", [("auto", "cpu")] + backend_devices(), ids=lambda x: x)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_two_runs_are_bitwise_identical(backend, device, config, dtypes, monkeypatch):
    if backend == "triton" and device == "cpu":
        from amos_fused import triton_backend
        from amos_fused.kernels import tables
        monkeypatch.setattr(triton_backend, "HEURISTIC", tables.Heuristic(**TINY_BLOCKS))
    first = run(backend, CONFIGS[config], DTYPES[dtypes], device=device)
    second = run(backend, CONFIGS[config], DTYPES[dtypes], device=device)
    assert_identical(first, second, f"{backend} {config} {dtypes}")


def test_the_comparison_can_fail():
    first = run("reference", CONFIGS["amos-row-m0.9"], DTYPES["fp32"])
    second = run("reference", CONFIGS["amos-row-m0.9"], DTYPES["fp32"])
    second["state"][1]["v"][7] = torch.nextafter(second["state"][1]["v"][7], torch.tensor(1.0))  # one ulp
    with pytest.raises(AssertionError, match=r"\['v'\] changed"):
        assert_identical(first, second)
