"""state_dict() / load_state_dict(): exact round trips, dtypes kept on load,
eta never re-measured, state of another model rejected before anything is loaded.
"""
import functools
import io
import os

import pytest
import torch

import amos_fused

# The contract is tested on the reference path (the oracle) unless AMOS_TEST_BACKEND names another
# backend ("auto" would pick a compiled one when it is built); backends are compared to the
# reference in test_backend_grid.py. An explicit backend= in a call still wins.
BACKEND = os.environ.get("AMOS_TEST_BACKEND", "reference")
Amos = functools.partial(amos_fused.Amos, backend=BACKEND)

SHAPES = {"w": (6, 5), "conv": (4, 3, 3, 3), "bias": (5,), "scalar": ()}


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter((0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype))
            for n, s in SHAPES.items()}


def set_grads(params, t):
    gen = torch.Generator().manual_seed(100 + t)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def train(opt, params, steps, start=1):
    for t in range(start, start + steps):
        set_grads(params, t)
        opt.step()


def save_load(obj, **load_kwargs):
    """Through bytes, like a checkpoint on disk (no tensor shared with the live optimizer)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, **load_kwargs)


def clone_params(params):
    return {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}


def assert_same_state(opt_a, params_a, opt_b, params_b):
    for n in params_a:
        assert torch.equal(params_a[n], params_b[n]), f"param {n}"
        sa, sb = opt_a.state[params_a[n]], opt_b.state[params_b[n]]
        assert sa.keys() == sb.keys(), n
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"state {k!r} of {n}"
            else:
                assert sa[k] == sb[k], f"state {k!r} of {n}"


CONFIGS = {
    "fp32": (torch.float32, dict()),  # m at its default storage ("auto": bf16)
    "fp32_fp32m": (torch.float32, dict(momentum_dtype=torch.float32)),
    "fp32_bf16m": (torch.float32, dict(momentum_dtype=torch.bfloat16)),
    "bf16": (torch.bfloat16, dict()),
    "bf16_bf16m": (torch.bfloat16, dict(momentum_dtype=torch.bfloat16)),
    "fp16_nomomentum_element": (torch.float16, dict(momentum=0.0, granularity="element")),
    "inverse_time_tensor": (torch.float32, dict(schedule="inverse_time", half_life=3, granularity="tensor")),
    "fp64_tensor_lr": (torch.float64, dict(lr=torch.tensor(0.05, dtype=torch.float64))),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_round_trip_continues_bitwise(config):
    dtype, options = CONFIGS[config]
    options = {"lr": 0.1, **options}
    params_a = make_params(dtype)
    opt_a = Amos(list(params_a.items()), **options)
    train(opt_a, params_a, 3)
    saved = save_load(opt_a.state_dict())
    # a resumed run: fresh params (the trained values), a fresh optimizer with DIFFERENT options
    params_b = clone_params(params_a)
    opt_b = Amos(list(params_b.items()), lr=0.7, beta=0.9, momentum=0.5)
    opt_b.load_state_dict(saved)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    m_dtype = options.get("momentum_dtype") or (wide if wide == torch.float64 else torch.bfloat16)
    for n, p in params_b.items():
        st = opt_b.state[p]
        assert st["v"].dtype == wide and st["b"].dtype == wide, f"{n}: v/b cast on load"
        if options.get("momentum", 0.9) > 0:
            assert st["m"].dtype == m_dtype, f"{n}: m cast on load"
        assert st["step"].dtype == torch.float32 and st["step"].item() == 3
    assert_same_state(opt_a, params_a, opt_b, params_b)  # loaded == live, before more steps
    for group in opt_b.param_groups:  # the saved options replaced the constructor's
        assert group["beta"] == 0.999 and group["momentum"] == options.get("momentum", 0.9)
    train(opt_a, params_a, 3, start=4)
    train(opt_b, params_b, 3, start=4)
    assert_same_state(opt_a, params_a, opt_b, params_b)
    assert opt_b.state[params_b["w"]]["step"].item() == 6


def test_bf16_params_keep_fp32_v_b_with_values_intact():
    # torch's default load casts floating state to the param dtype (bf16 here): v and b would
    # lose 16 mantissa bits. The loaded tensors must equal the saved fp32 ones exactly.
    params = make_params(torch.bfloat16)
    opt = Amos(list(params.values()), lr=0.1, momentum_dtype=torch.float32)
    train(opt, params, 2)
    saved = save_load(opt.state_dict())
    fresh = Amos(list(params.values()), lr=0.1, momentum_dtype=torch.float32)
    fresh.load_state_dict(saved)
    for i, p in enumerate(params.values()):
        for k in ("v", "b", "m"):
            assert fresh.state[p][k].dtype == torch.float32
            assert torch.equal(fresh.state[p][k], saved["state"][i][k])
        assert not torch.equal(fresh.state[p]["v"], fresh.state[p]["v"].bfloat16().float()), \
            "v should need more than bf16 precision, else this test cannot see a cast"


def test_map_location_cpu_and_state_follows_param_device():
    params = make_params(torch.float32)
    opt = Amos(list(params.values()), lr=0.1, momentum_dtype=torch.bfloat16)
    train(opt, params, 2)
    saved = save_load(opt.state_dict(), map_location="cpu")
    fresh_params = clone_params(params)
    fresh = Amos(list(fresh_params.values()))
    fresh.load_state_dict(saved)
    for p in fresh_params.values():
        st = fresh.state[p]
        assert all(st[k].device == p.device for k in ("v", "b", "m", "step"))
        assert st["m"].dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_state_loads_onto_cuda_and_continues():
    params = make_params(torch.float32)
    opt = Amos(list(params.values()), lr=0.1, momentum_dtype=torch.bfloat16)
    train(opt, params, 2)
    saved = save_load(opt.state_dict())
    gpu = {n: torch.nn.Parameter(p.detach().cuda()) for n, p in params.items()}
    opt_gpu = Amos(list(gpu.values()))
    opt_gpu.load_state_dict(saved)
    for p in gpu.values():
        st = opt_gpu.state[p]
        assert all(st[k].is_cuda for k in ("v", "b", "m", "step"))
        assert st["v"].dtype == torch.float32 and st["m"].dtype == torch.bfloat16
    train(opt, params, 2, start=3)
    for t in (3, 4):
        set_grads(params, t)  # the CPU run's gradients of step t, then moved
        for n, p in gpu.items():
            p.grad = params[n].grad.cuda()
        opt_gpu.step()
    for n in params:
        # CPU and CUDA reductions sum in different orders: fp32 rounding, amplified a little by
        # r = bc/v; 1e-5 relative is far below a wrong step (>= 1e-3 of the entries here).
        torch.testing.assert_close(gpu[n].detach().cpu(), params[n].detach(), rtol=1e-5, atol=1e-6)


def _cpu_backend_missing():
    from amos_fused import backends
    try:
        backends.resolve("cpu", torch.device("cpu"))
    except (RuntimeError, ImportError) as err:
        return str(err)
    return None


@pytest.mark.skipif(_cpu_backend_missing() is not None, reason="the compiled CPU backend is not built")
def test_state_loads_into_another_backend_and_continues():
    # saved by the reference path, resumed by the compiled CPU kernels (and the reverse)
    for first, second in (("reference", "cpu"), ("cpu", "reference")):
        params = make_params(torch.float32)
        opt = amos_fused.Amos(list(params.values()), lr=0.1, momentum_dtype=torch.bfloat16, backend=first)
        train(opt, params, 2)
        saved = save_load(opt.state_dict())
        resumed_params = clone_params(params)
        resumed = amos_fused.Amos(list(resumed_params.values()), backend=second)
        resumed.load_state_dict(saved)
        train(opt, params, 2, start=3)
        train(resumed, resumed_params, 2, start=3)
        for n, p in params.items():
            # the backends sum S_r in different orders: fp32 rounding (~1e-7 relative) reaches
            # r = bc/v and the bf16 m; 1e-4 relative is far below one wrong step (entries move
            # by lr * eta ~ 5e-2 per step)
            torch.testing.assert_close(resumed_params[n].detach(), p.detach(), rtol=1e-4, atol=1e-5)
            st = resumed.state[resumed_params[n]]
            assert st["m"].dtype == torch.bfloat16 and st["v"].dtype == torch.float32 and st["step"].item() == 4


def test_resumed_optimizer_keeps_saved_eta():
    def rms(name, p):  # the official rule, the initial RMS: an eta that depends on the weights
        return p.detach().double().pow(2).mean().sqrt().item() if p.ndim > 1 else None

    params = make_params(torch.float32)
    opt = Amos(list(params.items()), lr=1.0, eta_fn=rms)  # large lr: the weights' RMS moves far from eta
    eta0 = {n: opt.state[p]["eta"] for n, p in params.items()}
    train(opt, params, 5)
    saved = save_load(opt.state_dict())
    trained = clone_params(params)
    fresh = Amos(list(trained.items()), lr=1.0, eta_fn=rms)
    measured = {n: fresh.state[p]["eta"] for n, p in trained.items()}
    assert abs(measured["w"] / eta0["w"] - 1) > 0.05, "test needs the RMS to have moved"
    fresh.load_state_dict(saved)
    assert {n: fresh.state[p]["eta"] for n, p in trained.items()} == eta0
    train(fresh, trained, 1, start=6)  # and a step does not re-measure it either
    assert {n: fresh.state[p]["eta"] for n, p in trained.items()} == eta0


# ---- state of another model: rejected before anything is loaded ------------------------------------------

def _two_groups(shapes, lr=0.1, steps=0, **options):
    """Amos over params of `shapes`: the first in group 0, the rest in group 1."""
    gen = torch.Generator().manual_seed(len(shapes))
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = Amos([{"params": params[:1]}, {"params": params[1:]}], lr=lr, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _snapshot(opt):
    return ([({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in opt.param_groups],
            [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for g in opt.param_groups for p in g["params"]])


def _assert_unchanged(before, opt):
    groups, states = _snapshot(opt)
    assert groups == before[0], "param groups (lr, options) changed by a rejected load"
    for a, b in zip(states, before[1]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                            for k in a), "state changed by a rejected load"


@pytest.mark.parametrize("shapes,match", [
    ([(5, 3), (3,)], r"\['params'\]\[0\] \(shape \(4, 3\)\): saved state 'v' has shape \(5,\), expected \(4,\)"),
    ([(4, 7), (3,)], r"saved state 'm' has shape \(4, 7\), expected \(4, 3\)"),
    ([(4, 3), (2,)], r"\(shape \(3,\)\): saved state 'm' has shape \(2,\), expected \(3,\)"),
    ([(4, 3), (3,), (2,)], r"param group 1 holds 2 parameters in the state dict and 1 here"),
    ([(4, 3)], r"param group 1 holds 0 parameters in the state dict and 1 here"),
])
def test_state_of_another_model_rejected_before_loading(shapes, match):
    _, other = _two_groups(shapes, lr=0.3, steps=2)
    saved = save_load(other.state_dict())
    (w, bias), opt = _two_groups([(4, 3), (3,)], lr=0.1, steps=1)  # has state: it must survive
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match) as err:
        opt.load_state_dict(saved)
    assert "load it into an Amos built on the same model" in str(err.value)
    _assert_unchanged(before, opt)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.state[w]["step"].item() == 1


def test_same_shapes_other_granularity_loads():
    # the saved granularity comes with the saved groups, so element-wise v of the same shapes fits
    _, other = _two_groups([(4, 3), (3,)], steps=1, granularity="element")
    (w, bias), opt = _two_groups([(4, 3), (3,)])
    opt.load_state_dict(save_load(other.state_dict()))
    assert opt.state[w]["v"].shape == (12,) and opt.param_groups[0]["granularity"] == "element"


def test_wrong_number_of_groups_rejected():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Amos([p], lr=0.1)
    _, other = _two_groups([(3,), (3,)], lr=0.3)
    with pytest.raises(ValueError, match=r"2 param groups, this optimizer 1; load it into an Amos"):
        opt.load_state_dict(save_load(other.state_dict()))
    assert opt.param_groups[0]["lr"] == 0.1


def test_invalid_saved_options_or_missing_eta_rejected_before_loading():
    (w, bias), opt = _two_groups([(4, 3), (3,)], steps=1)
    before = _snapshot(opt)
    saved = save_load(opt.state_dict())
    saved["param_groups"][1]["beta"] = 1.5
    saved["param_groups"][0]["lr"] = 0.9
    with pytest.raises(ValueError, match=r"saved param group 1: beta=1.5 is invalid; use a number in \[0, 1\)"):
        opt.load_state_dict(saved)
    saved = save_load(opt.state_dict())
    del saved["state"][1]["eta"]
    saved["param_groups"][0]["lr"] = 0.9
    with pytest.raises(ValueError, match=r"\(shape \(3,\)\) has no saved 'eta'"):
        opt.load_state_dict(saved)
    _assert_unchanged(before, opt)
