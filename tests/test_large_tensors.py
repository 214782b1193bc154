"""A parameter of more than 2**31 elements steps correctly on the GPU backends.

GPU only (skipped elsewhere; run by benchmarks/gpu_check.sh). 32-bit element offsets would wrap
past 2**31 and write into the wrong place, so the test checks the tail of the tensor, where a
wrapped offset lands, as well as the head, against the reference step on the same values.
"""
import pytest
import torch

from amos_fused import Amos, backends

N = 2**31 + 4099  # past the int32 range, and not a multiple of any block size
GIB = 2**30


def _runnable(name):
    if not torch.cuda.is_available():
        return False
    try:
        backends.resolve(name, torch.device("cuda"))
    except RuntimeError:
        return False
    # bf16 param + grad + m and the reference's fp32 temporaries on a copy: about 40 GiB
    return torch.cuda.get_device_properties(0).total_memory > 60 * GIB


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("schedule", ["amos", "inverse_time"])
def test_parameter_past_2_31_elements(backend, schedule):
    if not _runnable(backend):
        pytest.skip(f"needs a CUDA device with > 60 GiB and backend {backend!r}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = (torch.randn(N, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    g = (torch.randn(N, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    # check a window at the head and one at the tail (where int32 offsets would wrap)
    windows = [slice(0, 1 << 16), slice(N - (1 << 16), N)]
    opts = dict(schedule=schedule, momentum=0.9, momentum_dtype=torch.bfloat16, granularity="row")
    if schedule == "inverse_time":
        opts["half_life"] = 10
    before = [p[w].clone() for w in windows]
    q = p.clone()  # the reference steps a copy of the same values
    opt = Amos([p], lr=0.1, backend=backend, **opts)
    p.grad = g
    opt.step()
    got = [p[w].clone() for w in windows]
    v_got = opt.state[p]["v"].clone()
    del opt, p  # room for the reference's fp32 temporaries
    ref = Amos([q], lr=0.1, backend="reference", **opts)
    q.grad = g
    ref.step()
    for w, a in zip(windows, got):
        e = q[w]
        flips = int((a != e).sum())
        assert flips <= 0.01 * a.numel() + 2, f"{backend}: {flips} of {a.numel()} values differ in window {w}"
        torch.testing.assert_close(a.float(), e.float(), rtol=2.0**-7, atol=2.0**-17)
    torch.testing.assert_close(v_got, ref.state[q]["v"], rtol=1e-5, atol=0)
    assert not torch.equal(got[1], before[1]), "the tail did not move: offsets past 2**31 were not written"
