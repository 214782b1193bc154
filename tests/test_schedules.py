"""The closed-form schedules as properties (docs/algorithm.md, "The derivation").

With momentum 0 a closed-form step is delta = -K*g - D*theta: its part along the gradient has
norm lr * eps0 * s(t) whatever the gradient's scale, and D = lr**2/(2q) * s(t). The tests
isolate the -K*g part from a real step as delta + D*theta_old. fp64 parameters make the
optimizer compute in fp64, so these identities hold to ~1e-12 relative.
"""
import functools
import math
import os

import pytest
import torch

import amos_fused
from amos_fused.schedules import adamw_lr_lambda, adamw_recipe, decay, decay_rate

# The contract is tested on the reference path (the oracle) unless AMOS_TEST_BACKEND names another
# backend ("auto" would pick a compiled one when it is built); backends are compared to the
# reference in test_backend_grid.py. An explicit backend= in a call still wins.
BACKEND = os.environ.get("AMOS_TEST_BACKEND", "reference")
Amos = functools.partial(amos_fused.Amos, backend=BACKEND)

SHAPES = {"scalar": (), "bias": (6,), "linear": (6, 5), "conv": (4, 3, 3, 3), "one": (1, 1), "odd": (5, 7)}


def s_by_hand(schedule, t, T):
    """docs/algorithm.md, "The derivation", written out again for the test."""
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_time":
        return 1.0 / (1.0 + (t - 1) / T)
    return 1.0 / (1.0 + (math.sqrt(2.0) - 1.0) * (t - 1) / T) ** 2


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(0.3 * torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
            for n, s in SHAPES.items()}


# ---- s(t) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["inverse_time", "inverse_square"])
@pytest.mark.parametrize("T", [1, 7, 250])
def test_s_halves_after_half_life(schedule, T):
    assert decay(schedule, 1, T) == 1.0
    assert decay(schedule, 1 + T, T) == pytest.approx(0.5, rel=1e-15)
    assert decay(schedule, 1 + T, T) < decay(schedule, T, T)  # monotone around the half-life
    for t in (2, 5, 1000):
        assert decay(schedule, t, T) == pytest.approx(s_by_hand(schedule, t, T), rel=1e-15)
    # tensor t (fused backends keep it on the device) gives the same values
    ts = torch.tensor([1.0, 1.0 + T, 3.0], dtype=torch.float64)
    torch.testing.assert_close(decay(schedule, ts, T),
                               torch.tensor([s_by_hand(schedule, t, T) for t in ts.tolist()], dtype=torch.float64))


def test_s_shapes_differ_after_the_half_life():
    # inverse_time keeps 1/3 after two half-lives, inverse_square 1/(2*sqrt(2)-1)**2 ~ 0.3431
    assert decay("inverse_time", 21, 10) == pytest.approx(1 / 3, rel=1e-15)
    assert decay("inverse_square", 21, 10) == pytest.approx(1 / (2 * math.sqrt(2) - 1) ** 2, rel=1e-15)
    assert decay("constant", 10**6) == 1.0


def test_decay_rate_and_bad_arguments():
    assert decay_rate(0.2, "inverse_time", 1 + 50, half_life=50, q=4.0) == pytest.approx(0.04 / 8 * 0.5, rel=1e-15)
    with pytest.raises(ValueError, match="half_life > 0"):
        decay("inverse_time", 3)
    with pytest.raises(ValueError, match="inverse_time"):
        decay("cosine", 3, 10)
    with pytest.raises(ValueError, match="half_life"):
        adamw_lr_lambda("inverse_square")  # checked when the recipe is built, not at step 1


# ---- the optimizer: norm of the step along the gradient ---------------------------------------------

@pytest.mark.parametrize("grad_scale", [1e-6, 1.0, 1e5])
@pytest.mark.parametrize("granularity", ["row", "tensor", "element"])
@pytest.mark.parametrize("schedule", ["constant", "inverse_time", "inverse_square"])
def test_step_along_gradient_has_norm_lr_eps0_s(schedule, granularity, grad_scale):
    T, lr, q = 3, 0.05, 0.7
    params = make_params()
    opt = Amos(list(params.items()), lr=lr, schedule=schedule, half_life=T if schedule != "constant" else None,
               q=q, momentum=0.0, granularity=granularity)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 7):
        s = s_by_hand(schedule, t, T)
        D = lr**2 / (2 * q) * s
        old = {n: p.detach().clone() for n, p in params.items()}
        for p in params.values():  # rows of very different scales: r differs per slice
            rows = torch.logspace(-2, 2, p.shape[0], dtype=torch.float64) if p.ndim else torch.tensor(1.0)
            p.grad = grad_scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) * rows.reshape(
                (-1,) + (1,) * (p.ndim - 1) if p.ndim else ())
        opt.step()
        for n, p in params.items():
            along_g = (p.detach() - old[n]) + D * old[n]  # delta with the decay part removed: -K*g
            eps0 = math.sqrt(p.numel()) * opt.state[p]["eta"] * (math.sqrt(2) if p.ndim >= 2 else 1.0)
            assert along_g.norm().item() == pytest.approx(lr * eps0 * s, rel=1e-9), (n, t)
            # and it points against the gradient (K > 0 per slice)
            assert (along_g * p.grad < 0).all() or p.numel() == 0, (n, t)
            if granularity == "tensor":  # one slice: -K*g is exactly anti-parallel to g
                cos = (along_g * p.grad).sum() / (along_g.norm() * p.grad.norm())  # no eps: |g| may be 1e-8
                assert cos.item() == pytest.approx(-1.0, abs=1e-12)


def test_step_norm_in_fp32_params():
    # fp32 storage: delta = theta_new - theta_old loses ~2**-24 * |theta| per entry to rounding,
    # about 6e-8 * 0.3 against entries of delta ~ lr * eta ~ 1e-2 * 0.3: 1e-5 relative; rtol 1e-4.
    params = make_params(torch.float32)
    lr = 0.01
    opt = Amos(list(params.values()), lr=lr, schedule="inverse_time", half_life=2, momentum=0.0)
    gen = torch.Generator().manual_seed(3)
    for t in range(1, 4):
        old = {n: p.detach().double() for n, p in params.items()}
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        s = 1 / (1 + (t - 1) / 2)
        for n, p in params.items():
            along_g = p.detach().double() - old[n] * (1 - lr**2 / 2 * s)
            eps0 = math.sqrt(p.numel()) * opt.state[p]["eta"] * (math.sqrt(2) if p.ndim >= 2 else 1.0)
            assert along_g.norm().item() == pytest.approx(lr * eps0 * s, rel=1e-4), (n, t)


# ---- decay rate and zero gradients ------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["constant", "inverse_time", "inverse_square"])
def test_zero_gradients_decay_at_rate_lr2_over_2q_s(schedule):
    T, lr, q = 2, 0.3, 0.25
    params = make_params()
    opt = Amos(list(params.values()), lr=lr, schedule=schedule, half_life=T if schedule != "constant" else None,
               q=q, momentum=0.0)
    for t in range(1, 7):
        old = {n: p.detach().clone() for n, p in params.items()}
        for p in params.values():
            p.grad = torch.zeros_like(p)
        opt.step()
        D = lr**2 / (2 * q) * s_by_hand(schedule, t, T)  # 0.18 * s: far from 0, visible in every entry
        for n, p in params.items():
            # no u term: the step is exactly the decay (no NaN from v = 0, r = bc/eps at t = 1)
            torch.testing.assert_close(p.detach(), (1 - D) * old[n], rtol=1e-14, atol=0)
            assert torch.isfinite(opt.state[p]["v"]).all()


def test_amos_zero_gradients_change_nothing():
    params = make_params()
    opt = Amos(list(params.values()), lr=0.3, momentum=0.0)
    start = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(3):
        for p in params.values():
            p.grad = torch.zeros_like(p)
        opt.step()
    for n, p in params.items():
        assert torch.equal(p, start[n]) and (opt.state[p]["b"] == 0).all()


# ---- the plug-and-play recipe for torch AdamW ---------------------------------------------------------

@pytest.mark.parametrize("schedule", ["constant", "inverse_time", "inverse_square"])
def test_adamw_recipe_decoupled_decay_is_lr2_over_2q_s(schedule):
    T, lr, q = 2, 0.3, 0.5
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    opt, sched = adamw_recipe([p], lr=lr, schedule=schedule, half_life=T if schedule != "constant" else None, q=q)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == pytest.approx(lr / (2 * q))
    for t in range(1, 7):
        s = s_by_hand(schedule, t, T)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * s, rel=1e-14)
        old = p.detach().clone()
        p.grad = torch.zeros_like(p)  # Adam's own update is 0: only the decoupled decay acts
        opt.step()
        sched.step()
        rate = lr**2 / (2 * q) * s  # 0.09 * s
        torch.testing.assert_close(p.detach(), (1 - rate) * old, rtol=1e-14, atol=0)
        assert rate == pytest.approx(decay_rate(lr, schedule, t, T if schedule != "constant" else None, q), rel=1e-14)


def test_adamw_recipe_matches_amos_closed_form_decay():
    # the same lr, q and s(t): AdamW's decoupled decay equals the closed-form Amos decay
    lr, q, T = 0.2, 2.0, 3
    a = torch.nn.Parameter(torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    b = torch.nn.Parameter(a.detach().clone())
    start = a.detach().clone()
    adamw, sched = adamw_recipe([a], lr=lr, schedule="inverse_square", half_life=T, q=q)
    amos = Amos([b], lr=lr, schedule="inverse_square", half_life=T, q=q, momentum=0.0)
    for _ in range(5):
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        adamw.step()
        sched.step()
        amos.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-14, atol=0)
    assert (a.detach() != start).all()  # the decay did act


def test_adamw_recipe_rejects_weight_decay_and_bad_q():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="pass q instead"):
        adamw_recipe([p], lr=0.1, half_life=10, weight_decay=0.01)
    with pytest.raises(ValueError, match="q must be > 0"):
        adamw_recipe([p], lr=0.1, half_life=10, q=0.0)
    with pytest.raises(ValueError, match="half_life"):
        adamw_recipe([p], lr=0.1, schedule="inverse_time")
