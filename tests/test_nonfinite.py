"""Non-finite gradients never reach parameters or state, on every backend that runs here.

Policy of guard="step" (Amos docstring, docs/reliability.md; test_guard.py has the default,
guard="slice"): a step is skipped as a whole (parameters, v, b, m and the step
count unchanged) when a gradient holds NaN or +-Inf, or when some slice's sum of squares
S_r = sum g*g of the unscaled, clipped gradient overflows its compute dtype (1e30**2 in fp32: the
spec's math would then write v = inf and b = NaN); the skip is counted in
`optimizer.skipped_steps` and warned about once. With GradScaler, its found_inf decides.
A skipped step is an exact no-op: training then continues bit-identically to a run that never
saw that step.
"""
import warnings

import pytest
import torch

from amos_fused import Amos
from backend_grid import TOL, assert_close
from test_bad_input import assert_identical, cpu_backends, snapshot

BACKENDS = cpu_backends()
SHAPES = [(4, 3), (5,), (), (2, 3, 2, 2)]
CONFIGS = {
    "amos-row-m0.9": dict(schedule="amos", momentum=0.9),
    "inverse_time-element": dict(schedule="inverse_time", half_life=3, momentum=0.0, granularity="element"),
    "constant-tensor-m0.5-bf16m": dict(schedule="constant", momentum=0.5, granularity="tensor",
                                       momentum_dtype=torch.bfloat16),
}
BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def make(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 0.5).to(dtype).requires_grad_() for s in shapes]


def grads_for(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype) for p in params]


def assert_all_finite(opt, params, where):
    for i, p in enumerate(params):
        assert p.isfinite().all(), f"{where}: param {i} is not finite"
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert value.isfinite().all(), f"{where}: state {key!r} of param {i} is not finite"


def train(backend, config, dtype, bad=None, bad_step=2, steps=4):
    """`steps` steps; with `bad`, an extra step whose gradient has one element set to `bad`."""
    params = make(dtype)
    opt = Amos(params, lr=0.1, guard="step", backend=backend, **config)
    schedule = list(range(steps))
    if bad is not None:
        schedule.insert(bad_step, "bad")
    for k, step in enumerate(schedule):
        if step == "bad":
            grads = grads_for(params, 99)
            grads[3].view(-1)[7] = bad  # one element of one tensor
        else:
            grads = grads_for(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        before = snapshot(opt, params) if step == "bad" else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        if step == "bad":
            assert_identical(snapshot(opt, params), {**before, "skipped": before["skipped"] + 1})
            assert [str(w.message) for w in caught if "skipped" in str(w.message)], "no warning"
        else:
            assert not caught, [str(w.message) for w in caught]
        assert_all_finite(opt, params, f"{backend} step {k} ({step})")
    return opt, params


def _skip_cases():
    """Every (bad value, config, dtype) on the reference; on the other backends each bad value and
    each config once (the skip is decided before any backend runs, and the triton interpreter is
    slow: ~1 s per step under load)."""
    dtypes = [torch.float32, torch.bfloat16]
    out = [("reference", b, c, d) for b in BAD for c in CONFIGS for d in dtypes]
    for backend in BACKENDS:
        if backend != "reference":
            out += [(backend, b, c, dtypes[i % 2]) for i, (b, c) in enumerate(zip(BAD, CONFIGS))]
    return [pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]}-{str(case[3])[6:]}") for case in out]


@pytest.mark.parametrize("backend,bad,config,dtype", _skip_cases())
def test_nonfinite_gradient_skips_the_step_and_training_continues(backend, config, dtype, bad):
    opt, params = train(backend, CONFIGS[config], dtype, bad=BAD[bad])
    assert opt.skipped_steps == 1
    clean_opt, clean = train(backend, CONFIGS[config], dtype)
    assert clean_opt.skipped_steps == 0
    # the skipped step was an exact no-op: the same as never having taken it
    got, want = snapshot(opt, params), snapshot(clean_opt, clean)
    del got["group_params"], want["group_params"]  # tensor ids differ between the two runs
    assert_identical(got, {**want, "skipped": 1})


@pytest.mark.parametrize("backend", BACKENDS)
def test_warning_is_shown_once_and_every_skip_is_counted(backend):
    params = make()
    opt = Amos(params, lr=0.1, guard="step", backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            for p, g in zip(params, grads_for(params, k)):
                p.grad = g
            params[k].grad.view(-1)[0] = float("nan")
            opt.step()
    assert opt.skipped_steps == 3
    assert sum("skipped" in str(w.message) for w in caught) == 1
    assert all(s == {"eta": opt.state[p]["eta"]} for p, s in zip(params, map(opt.state.get, params)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_with_inf(backend):
    params = make()
    opt = Amos(params, lr=0.1, guard="step", backend=backend, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def step(inject):
        opt.zero_grad()
        loss = sum((p.float() * xi).sum() for p, xi in zip(params, x))
        scaler.scale(loss).backward()
        if inject:
            params[0].grad.view(-1)[1] = float("inf")
        scaler.step(opt)
        scaler.update()

    step(False)
    before, scale = snapshot(opt, params), scaler.get_scale()
    step(True)
    after = snapshot(opt, params)
    assert_identical([after[k] for k in ("params", "state")], [before[k] for k in ("params", "state")])
    assert opt.skipped_steps == 1 and scaler.get_scale() == scale / 2
    step(False)
    assert opt.skipped_steps == 1
    assert not torch.equal(snapshot(opt, params)["params"][0], before["params"][0])
    assert_all_finite(opt, params, backend)


# ---- huge but finite gradients: S_r = sum g*g can overflow ------------------------------------
def one_step(backend, grads, params, grad_scale=None, **options):
    opt = Amos(params, lr=0.1, guard="step", backend=backend, momentum=0.0, **options)
    for p, g in zip(params, grads):
        p.grad = g
    if grad_scale is not None:  # GradScaler's fused protocol, as GradScaler.step sets it
        opt.grad_scale, opt.found_inf = torch.tensor(grad_scale), torch.tensor(0.0)
    before = snapshot(opt, params)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt.step()
    return opt, before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradient_whose_square_overflows_skips(backend, dtype):
    params = make(dtype)
    grads = grads_for(params, 0)
    grads[0].view(-1)[5] = 1e30  # finite, but 1e60 is not an fp32 number
    opt, before = one_step(backend, grads, params)
    assert opt.skipped_steps == 1
    assert_identical(snapshot(opt, params), {**before, "skipped": 1})


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_gradient_that_is_clipped_is_stepped(backend):
    """clip_value bounds g before S is summed: nothing overflows, so nothing is skipped."""
    params = make()
    grads = grads_for(params, 0)
    grads[0].view(-1)[5] = 1e30
    opt, _ = one_step(backend, grads, params, clip_value=0.5)
    assert opt.skipped_steps == 0
    assert_all_finite(opt, params, backend)
    ref_params = make()
    ref, _ = one_step("reference", [g.clamp(-0.5, 0.5) for g in grads], ref_params, clip_value=0.5)
    for p, q in zip(params, ref_params):
        assert_close(p.detach(), q.detach(), TOL[torch.float32], f"{backend} clipped huge gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity,skipped", [("row", 0), ("tensor", 1)])
def test_skip_is_decided_per_slice_sum(backend, granularity, skipped):
    """1.5e19**2 = 2.25e38 is finite; four of them summed (9e38) are not: rows step, the tensor skips."""
    params = make(shapes=[(4, 1), (3,)])
    grads = [torch.full((4, 1), 1.5e19), torch.full((3,), 0.1)]
    opt, before = one_step(backend, grads, params, granularity=granularity)
    assert opt.skipped_steps == skipped
    assert_all_finite(opt, params, f"{backend} {granularity}")
    if skipped:
        assert_identical(snapshot(opt, params), {**before, "skipped": 1})
    else:
        assert not torch.equal(params[0].detach(), before["params"][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_gradients_that_unscale_to_finite_sums_are_stepped(backend):
    """GradScaler's scale can push ||g||**2 past fp32 while g / scale is fine: no skip (a skip
    here would repeat forever, since the scaler sees no inf and never lowers its scale)."""
    scale = 2.0**16
    params, ref_params = make(), make()
    grads = grads_for(params, 0)
    grads[0] = torch.full((4, 3), 1e17)  # (1e17 * 2**16)**2 = 4e43 overflows; 12 * 1e34 does not
    opt, _ = one_step(backend, [g * scale for g in grads], params, grad_scale=scale)
    assert opt.skipped_steps == 0
    assert_all_finite(opt, params, backend)
    one_step("reference", grads, ref_params)
    for p, q in zip(params, ref_params):
        assert_close(p.detach(), q.detach(), TOL[torch.float32], f"{backend} scaled huge gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_parameters_square_in_fp64(backend):
    params = make(torch.float64)
    grads = grads_for(params, 0)
    grads[0].view(-1)[5] = 1e30  # 1e60 is an fp64 number: no skip
    opt, _ = one_step(backend, grads, params)
    assert opt.skipped_steps == 0
    assert_all_finite(opt, params, backend)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_large_gradient_path_skips(bad):
    # gradients of >= 65536 elements are checked through aminmax (a bound numel * max|g|**2),
    # smaller ones through the norm: the large path must skip NaN, Inf and overflowing sums too
    import torch
    from amos_fused import Amos
    p = torch.nn.Parameter(torch.randn(300, 300) * 0.1)
    small = torch.nn.Parameter(torch.randn(7))
    opt = Amos([p, small], guard="step", backend="reference")
    p.grad = torch.randn(300, 300) * 0.01
    small.grad = torch.randn(7)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
    p.grad = torch.randn(300, 300) * 0.01
    p.grad[123, 45] = bad
    with pytest.warns(UserWarning):
        opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_gradient_of_an_fp32_parameter_is_judged_in_fp32(backend):
    """The kernels cast it to fp32, where 1e30**2 overflows: skipped, though fp64 holds 1e60."""
    params = make()
    for p in params:
        if hasattr(p, "grad_dtype"):  # torch >= 2.14 refuses a gradient of another dtype by default
            p.grad_dtype = None
    grads = [g.double() for g in grads_for(params, 0)]
    grads[0].view(-1)[5] = 1e30
    opt, before = one_step(backend, grads, params)
    assert opt.skipped_steps == 1
    assert_identical(snapshot(opt, params), {**before, "skipped": 1})
