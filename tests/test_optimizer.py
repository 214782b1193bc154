"""The optimizer contract: the options × dtypes grid, step
properties, param forms, eta, per-group overrides and bad input. Reference backend on CPU tensors.
"""
import functools
import math
import os
import warnings

import pytest
import torch

import amos_fused

# The contract is tested on the reference path (the oracle) unless AMOS_TEST_BACKEND names another
# backend ("auto" would pick a compiled one when it is built); backends are compared to the
# reference in test_backend_grid.py. An explicit backend= in a call still wins.
BACKEND = os.environ.get("AMOS_TEST_BACKEND", "reference")
Amos = functools.partial(amos_fused.Amos, backend=BACKEND)

# A small mixed "model": every shape class the slices of docs/algorithm.md distinguish.
SHAPES = {
    "scalar": (),
    "bias": (6,),
    "linear": (6, 5),
    "conv": (4, 3, 3, 3),
    "empty": (0, 4),
    "one": (1, 1),
    "odd": (5, 7),
}
# Number of slices R per granularity, written out from the spec's table (not computed with
# amos_fused.slices, so a wrong slice rule fails here).
SLICES = {
    "row": {"scalar": 1, "bias": 1, "linear": 6, "conv": 4, "empty": 0, "one": 1, "odd": 5},
    "tensor": {"scalar": 1, "bias": 1, "linear": 1, "conv": 1, "empty": 1, "one": 1, "odd": 1},
    "element": {"scalar": 1, "bias": 6, "linear": 30, "conv": 108, "empty": 0, "one": 1, "odd": 35},
}


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.nn.Parameter((0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype))
            for name, shape in shapes.items()}


def set_grads(params, seed, dtype=None, scale=1.0):
    """Seeded gradients (in `dtype`, default the param's); returns them as fp64 copies."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, p in params.items():
        g = scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        gdt = dtype or p.dtype
        if gdt != p.dtype:
            p.grad_dtype = None  # torch >= 2.10 checks grad dtypes unless this is cleared
        p.grad = g.to(gdt)
        out[name] = g
    return out


def snapshot(opt, params):
    """Deep copy of params and every state entry, for bit-for-bit comparisons."""
    def copy(x):
        return x.detach().clone() if torch.is_tensor(x) else x
    return ({n: p.detach().clone() for n, p in params.items()},
            {n: {k: copy(v) for k, v in opt.state[p].items()} for n, p in params.items()})


def assert_bitwise_equal(a, b):
    pa, sa = a
    pb, sb = b
    for n in pa:
        assert torch.equal(pa[n], pb[n]), f"param {n} changed"
        assert sa[n].keys() == sb[n].keys(), f"state keys of {n}: {sa[n].keys()} vs {sb[n].keys()}"
        for k in sa[n]:
            va, vb = sa[n][k], sb[n][k]
            same = torch.equal(va, vb) and va.dtype == vb.dtype if torch.is_tensor(va) else va == vb
            assert same, f"state {k!r} of {n} changed"


# ---- 1. the grid: granularity × dtypes × schedule × momentum, >= 5 steps -----------------------

DTYPES = {  # (param dtype, grad dtype)
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "fp32_bf16grad": (torch.float32, torch.bfloat16),
    "bf16_fp32grad": (torch.bfloat16, torch.float32),
}
MOMENTA = {"m0": (0.0, None), "m0.9": (0.9, None), "m0.9bf16": (0.9, torch.bfloat16)}
STEPS = 5


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("schedule", ["amos", "constant", "inverse_time", "inverse_square"])
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("granularity", ["row", "tensor", "element"])
def test_grid_finite_and_state_shapes(granularity, dtypes, schedule, momentum):
    pdt, gdt = DTYPES[dtypes]
    mom, mdt = MOMENTA[momentum]
    params = make_params(pdt)
    start = {n: p.detach().clone() for n, p in params.items()}
    half_life = 3 if schedule in ("inverse_time", "inverse_square") else None
    opt = Amos(list(params.items()), lr=0.1, schedule=schedule, half_life=half_life,
               momentum=mom, momentum_dtype=mdt, granularity=granularity)
    for t in range(1, STEPS + 1):
        set_grads(params, t, gdt)
        opt.step()
    for name, p in params.items():
        st = opt.state[p]
        R = SLICES[granularity][name]
        assert p.dtype == pdt
        assert torch.isfinite(p).all(), f"{name}: non-finite param"
        if p.numel():
            # lr 0.1 and eta >= 0.2: every entry moves by far more than one bf16/fp16 ulp
            assert not torch.equal(p, start[name]), f"{name}: params did not move"
        for key in ("v", "b"):
            assert st[key].shape == (R,) and st[key].dtype == torch.float32, (name, key, st[key].shape, st[key].dtype)
            assert torch.isfinite(st[key]).all(), f"{name}: non-finite {key}"
        if p.numel():
            assert (st["v"] > 0).all(), f"{name}: v should be > 0 after non-zero gradients"
            if schedule == "amos":
                assert (st["b"] > 0).all(), f"{name}: b should grow with non-zero gradients"
        if mom > 0:
            assert st["m"].shape == p.shape and st["m"].dtype == (mdt or torch.float32)
            assert torch.isfinite(st["m"]).all()
        else:
            assert "m" not in st
        assert type(st["eta"]) is float and st["eta"] > 0
        assert st["step"].shape == () and st["step"].dtype == torch.float32 and st["step"].item() == STEPS


# ---- 2. properties of a step --------------------------------------------------------------------

def test_amos_zero_gradient_slice_keeps_params_and_b():
    w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    opt = Amos([w], lr=0.1, momentum=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # every row gets non-zero gradients first, so b > 0 and v > 0
        w.grad = torch.randn(4, 3, generator=gen)
        opt.step()
    before, b_before = w.detach().clone(), opt.state[w]["b"].clone()
    assert (b_before > 0).all()
    g = torch.randn(4, 3, generator=gen)
    g[1] = 0.0
    w.grad = g
    opt.step()
    b_after = opt.state[w]["b"]
    assert torch.equal(w[1], before[1]) and b_after[1] == b_before[1]
    others = [0, 2, 3]
    assert (w[others] != before[others]).all() and (b_after[others] > b_before[others]).all()


def test_amos_zero_gradient_element_keeps_that_element():
    w = torch.nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    opt = Amos([w], lr=0.1, momentum=0.0, granularity="element")
    g = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    g[2, 1] = 0.0
    before = w.detach().clone()
    w.grad = g
    opt.step()
    assert w[2, 1] == before[2, 1] and opt.state[w]["b"][7] == 0.0
    assert (opt.state[w]["b"].view(3, 3) != 0).sum() == 8


@pytest.mark.parametrize("granularity", ["row", "element"])
def test_b_never_decreases_and_v_nonnegative(granularity):
    params = make_params(torch.float32, shapes={"w": (5, 4), "bias": (4,), "s": ()})
    opt = Amos(list(params.values()), lr=0.3, momentum=0.9, granularity=granularity)
    prev = {}
    for t in range(1, 16):
        scale = [1.0, 1e-4, 1e3, 0.0][t % 4]  # includes all-zero gradients and large ones
        set_grads(params, t, scale=scale)
        opt.step()
        for n, p in params.items():
            b, v = opt.state[p]["b"], opt.state[p]["v"]
            if n in prev:
                assert (b >= prev[n]).all(), f"{n}: b decreased at step {t}"
            assert (v >= 0).all() and torch.isfinite(v).all() and torch.isfinite(b).all()
            prev[n] = b.clone()
    assert all((opt.state[p]["b"] > 0).all() for p in params.values())


def test_tensor_lr_matches_float_lr():
    runs = []
    for lr in (0.05, torch.tensor(0.05)):
        params = make_params(torch.float32, shapes={"w": (4, 3), "bias": (3,)})
        opt = Amos(list(params.values()), lr=lr)
        for t in range(1, 4):
            set_grads(params, t)
            opt.step()
        runs.append(params)
    for n in runs[0]:
        assert torch.equal(runs[0][n], runs[1][n])


def _amos_two_steps_by_hand(theta0, g1, g2, xi2, eta, beta=0.999):
    """docs/algorithm.md ("Second moment", "The official rule") for a 1-d tensor (one slice), momentum 0, lr 0 at step 1, xi2 at step 2.

    With lr 0 the first step only updates v (gamma = 0, so b stays 0 and d = c = 1).
    """
    C = theta0.numel()
    S1, S2 = (g1 * g1).sum(), (g2 * g2).sum()
    v = beta * (1 - beta) * S1 / C + (1 - beta) * S2 / C
    r = (1 - beta**2) / v
    gamma = xi2**2 * r * S2 / C
    return theta0 - xi2 * eta * r.sqrt() * g2 - gamma / 2 * theta0


@pytest.mark.parametrize("schedule", ["amos", "constant", "inverse_square"])
def test_lambdalr_warmup_sets_the_lr_each_step_uses(schedule):
    half_life = 4 if schedule == "inverse_square" else None
    p = torch.nn.Parameter(torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    opt = Amos([p], lr=0.3, schedule=schedule, half_life=half_life, momentum=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, k / 3))
    gen = torch.Generator().manual_seed(5)
    g1, g2 = (torch.randn(7, dtype=torch.float64, generator=gen) for _ in range(2))
    theta0 = p.detach().clone()
    assert opt.param_groups[0]["lr"] == 0.0
    p.grad = g1
    opt.step()
    assert torch.equal(p, theta0), "lr 0 must leave params unchanged"
    assert opt.state[p]["v"].item() > 0  # the step ran: v took the gradient in
    warmup.step()
    xi = opt.param_groups[0]["lr"]
    assert xi == pytest.approx(0.1, rel=1e-15)
    p.grad = g2
    opt.step()
    if schedule == "amos":
        expect = _amos_two_steps_by_hand(theta0, g1, g2, xi, eta=0.5)
        torch.testing.assert_close(p.detach(), expect, rtol=1e-12, atol=0)  # fp64 throughout
    else:  # closed form at t = 2: ||-K g|| = lr * eps0 * s(2), eps0 = sqrt(7) * 0.5 for a vector
        s = 1.0 if schedule == "constant" else 1 / (1 + (math.sqrt(2) - 1) / 4) ** 2
        D = xi**2 / 2 * s
        step_along_g = p.detach() - (1 - D) * theta0
        assert step_along_g.norm().item() == pytest.approx(xi * math.sqrt(7) * 0.5 * s, rel=1e-12)


def test_step_closure_returns_loss_and_steps():
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    opt = Amos(model.parameters(), lr=0.1)
    w0 = model.weight.detach().clone()
    calls = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(loss.item())
        return loss

    loss = opt.step(closure)
    assert calls and loss.item() == calls[0]
    assert model.weight.grad is not None and not torch.equal(model.weight, w0)
    assert opt.step() is None


def test_params_without_grad_are_skipped():
    params = make_params(torch.float32, shapes={"a": (3, 2), "frozen": (4,)})
    opt = Amos(list(params.values()), lr=0.1)
    frozen0, a0 = params["frozen"].detach().clone(), params["a"].detach().clone()
    for t in range(1, 3):
        params["a"].grad = torch.randn(3, 2)
        opt.step()
    assert torch.equal(params["frozen"], frozen0)
    assert set(opt.state[params["frozen"]]) == {"eta"}  # no v, b, m, step
    assert not torch.equal(params["a"], a0) and opt.state[params["a"]]["step"].item() == 2


# ---- per-group overrides --------------------------------------------------------------------------

# option -> (base options, override); each override must change the trajectory
OVERRIDES = {
    "lr": ({}, {"lr": 0.02}),
    "schedule": ({}, {"schedule": "inverse_time", "half_life": 2}),
    "half_life": ({"schedule": "inverse_time", "half_life": 100}, {"half_life": 1}),
    "q": ({"schedule": "constant"}, {"q": 0.25}),
    "beta": ({}, {"beta": 0.5}),
    "momentum": ({}, {"momentum": 0.0}),
    "momentum_dtype": ({}, {"momentum_dtype": torch.float32}),  # default "auto": bf16
    "clip_value": ({}, {"clip_value": 0.3}),
    "d_coef": ({}, {"d_coef": 2.0}),
    "c_coef": ({}, {"c_coef": 2.0}),
    "extra_l2": ({}, {"extra_l2": 0.1}),
    "eps": ({}, {"eps": 10.0}),
    "eta": ({}, {"eta": 0.05}),
    "granularity": ({}, {"granularity": "tensor"}),
}


@pytest.mark.parametrize("option", OVERRIDES)
def test_per_group_override_takes_effect(option):
    base, override = OVERRIDES[option]
    shapes = {"w": (4, 3), "bias": (3,)}
    grouped = [make_params(torch.float32, shapes=shapes) for _ in range(2)]  # group 0, group 1
    alone = make_params(torch.float32, shapes=shapes)  # override set globally
    opt = Amos([{"params": list(grouped[0].values())}, {"params": list(grouped[1].values()), **override}],
               lr=0.1, **base)
    ref = Amos(list(alone.values()), **{"lr": 0.1, **base, **override})
    for t in range(1, 5):
        for ps in (*grouped, alone):
            set_grads(ps, t, scale=2.0)  # |g| ~ 2 so clip_value 0.3 bites
        opt.step()
        ref.step()
    for n in shapes:
        assert torch.equal(grouped[1][n], alone[n]), f"{option}: group override differs from the global option"
    assert any(not torch.equal(grouped[0][n], grouped[1][n]) for n in shapes), f"{option} had no effect"
    if option == "momentum_dtype":
        assert opt.state[grouped[1]["w"]]["m"].dtype == torch.float32
        assert opt.state[grouped[0]["w"]]["m"].dtype == torch.bfloat16


# ---- params as tensors, named pairs, group dicts -----------------------------------------------------

def _trajectory(build):
    params = make_params(torch.float32, shapes={"w": (4, 3), "bias": (3,)})
    opt = build(params)
    for t in range(1, 4):
        set_grads(params, t)
        opt.step()
    return params, opt


def test_param_forms_agree():
    forms = {
        "tensors": lambda ps: Amos(list(ps.values()), lr=0.1),
        "generator": lambda ps: Amos((p for p in ps.values()), lr=0.1),
        "named": lambda ps: Amos(iter(ps.items()), lr=0.1),
        "group dicts": lambda ps: Amos([{"params": [ps["w"]]}, {"params": (p for p in [ps["bias"]])}], lr=0.1),
        "named group dicts": lambda ps: Amos([{"params": [("w", ps["w"])]}, {"params": [("bias", ps["bias"])]}],
                                             lr=0.1),
    }
    results = {name: _trajectory(build) for name, build in forms.items()}
    ref = results["tensors"][0]
    for name, (params, opt) in results.items():
        assert sum(len(g["params"]) for g in opt.param_groups) == 2, name
        for n in ref:
            assert torch.equal(params[n], ref[n]), f"{name}: {n} differs"
    assert results["named"][1].param_groups[0]["param_names"] == ["w", "bias"]


# ---- eta -------------------------------------------------------------------------------------------

def test_eta_default_rule():
    # the rule itself and its edge cases: test_defaults.py; here what the optimizer stores
    w = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 0.55)
    conv_zero = torch.nn.Parameter(torch.zeros(4, 3, 3, 3))
    lin_zero = torch.nn.Parameter(torch.zeros(2, 5))
    bias, scalar = torch.nn.Parameter(torch.randn(5) * 7), torch.nn.Parameter(torch.tensor(3.0))
    opt = Amos([w, conv_zero, lin_zero, bias, scalar])
    eta = [opt.state[p]["eta"] for p in (w, conv_zero, lin_zero, bias, scalar)]
    assert eta[0] == eta[2] == pytest.approx(math.sqrt(2 / 5), rel=1e-12)  # by shape, the weights unread
    assert eta[1] == pytest.approx(math.sqrt(2 / 27), rel=1e-12)  # fan-in of (4, 3, 3, 3): 27
    assert eta[3] == 0.5 and eta[4] == 0.5


def test_eta_float_per_group_and_eta_fn_with_names():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    seen = []

    def eta_fn(name, p):
        seen.append(name)
        return 0.125 if name == "0.weight" else None  # None: the group's rule

    named = list(model.named_parameters())
    opt = Amos([{"params": named[:2], "eta": 0.03}, {"params": named[2:]}], eta_fn=eta_fn)
    eta = {n: opt.state[p]["eta"] for n, p in named}
    assert seen == ["0.weight", "0.bias", "1.weight", "1.bias"]
    rule = math.sqrt(2 / 3)  # the He scale of fan-in C = 3
    assert eta == pytest.approx({"0.weight": 0.125, "0.bias": 0.03, "1.weight": rule, "1.bias": 0.5}, rel=1e-12)
    # without names eta_fn gets None
    seen.clear()
    Amos(model.parameters(), eta_fn=eta_fn)
    assert seen == [None] * 4


@pytest.mark.parametrize("eta", [0.01, 0.04])
def test_eta_sets_the_first_amos_step(eta):
    # theta = 1, g = 2 on 4-element rows, t = 1, b = 0 (so c = d = 1), beta = 0.999:
    # S = 16, v = 0.001 * 16/4 = 0.004, r = 0.001 / 0.004 = 0.25, sqrt(r) * g = 1,
    # gamma = lr**2 * r * S/C = 1e-4; the move is alpha * 1 + gamma/2 * theta = lr * eta + 5e-5.
    p = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
    opt = Amos([p], lr=0.01, eta=eta, momentum=0.0)
    p.grad = torch.full((3, 4), 2.0, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(1 - p.detach(), torch.full((3, 4), 0.01 * eta + 5e-5, dtype=torch.float64),
                               rtol=1e-12, atol=0)


# ---- 5. bad input -------------------------------------------------------------------------------------

BAD_OPTIONS = [  # (options, the argument the message must name, a fragment of the fix)
    (dict(lr=-0.1), "lr", ">= 0"),
    (dict(lr=float("nan")), "lr", ">= 0"),
    (dict(beta=1.0), "beta", "[0, 1)"),
    (dict(beta=-0.1), "beta", "[0, 1)"),
    (dict(momentum=1.0), "momentum", "[0, 1)"),
    (dict(momentum=-0.5), "momentum", "[0, 1)"),
    (dict(schedule="cosine"), "schedule", "inverse_time"),
    (dict(granularity="column"), "granularity", "element"),
    (dict(schedule="inverse_time"), "half_life", "half_life > 0"),
    (dict(schedule="inverse_square", half_life=0), "half_life", "half_life > 0"),
    (dict(schedule="amos", half_life=10), "half_life", "half_life=None"),
    (dict(schedule="constant", q=0.0), "q", "> 0"),
    (dict(schedule="constant", q=-1.0), "q", "> 0"),
    (dict(eta=0.0), "eta", "> 0"),
    (dict(eta=-0.5), "eta", "> 0"),
    (dict(eps=0.0), "eps", "> 0"),
    (dict(clip_value=0.0), "clip_value", "> 0"),
    (dict(momentum_dtype=torch.int32), "momentum_dtype", "bfloat16"),
    (dict(schedule="amos", q=2.0), "q", "leave it at 1.0"),
    (dict(schedule="constant", d_coef=0.5), "d_coef", "leave it at 0.25"),
    (dict(schedule="inverse_time", half_life=5, c_coef=0.5), "c_coef", "leave it at 0.25"),
    (dict(schedule="constant", extra_l2=0.1), "extra_l2", "leave it at 0.0"),
]


@pytest.mark.parametrize("where", ["constructor", "group override", "add_param_group"])
@pytest.mark.parametrize("options,arg,fix", BAD_OPTIONS, ids=[f"{a}-{i}" for i, (_, a, _) in enumerate(BAD_OPTIONS)])
def test_bad_options_raise_naming_argument_and_fix(options, arg, fix, where):
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    if where == "constructor":
        with pytest.raises(ValueError) as err:
            Amos([p], **options)
    elif where == "group override":
        with pytest.raises(ValueError) as err:
            Amos([{"params": [q]}, {"params": [p], **options}])
        assert "param group 1" in str(err.value)
    else:
        opt = Amos([q])
        with pytest.raises(ValueError) as err:
            opt.add_param_group({"params": [p], **options})
        assert len(opt.param_groups) == 1 and p not in opt.state, "a rejected group must not be added"
    msg = str(err.value)
    assert f"{arg}=" in msg and fix in msg, msg


def test_unknown_backend_and_bad_eta_fn():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"backend='tpu'.*reference"):
        Amos([p], backend="tpu")
    with pytest.raises(TypeError, match="eta_fn must be callable"):
        Amos([p], eta_fn=0.3)
    with pytest.raises(ValueError, match=r"eta for parameter w.*> 0"):
        Amos([("w", p)], eta_fn=lambda name, t: -1.0)


def test_complex_and_integer_params_rejected():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match=r"params\[1\].*complex.*view_as_real"):
        Amos([torch.nn.Parameter(torch.zeros(2)), z])
    with pytest.raises(TypeError, match=r"dtype torch.int64.*floating-point"):
        Amos([torch.zeros(3, dtype=torch.int64)])


def _trained(groups_options=({}, {}), steps=2):
    """Two groups of the mixed model with state from `steps` good steps."""
    params = make_params(torch.float32, shapes={"w": (4, 3), "bias": (3,), "emb": (5, 2)})
    opt = Amos([{"params": [("w", params["w"]), ("bias", params["bias"])], **groups_options[0]},
                {"params": [("emb", params["emb"])], **groups_options[1]}], lr=0.1)
    for t in range(1, steps + 1):
        set_grads(params, t)
        opt.step()
    return params, opt


def test_sparse_gradient_raises_and_changes_nothing():
    params, opt = _trained()
    set_grads(params, 10)
    params["emb"].grad = params["emb"].grad.to_sparse()  # the LAST group: earlier groups must stay put
    before = snapshot(opt, params)
    with pytest.raises(TypeError, match=r"'emb'.*sparse gradients.*sparse=False"):
        opt.step()
    assert_bitwise_equal(before, snapshot(opt, params))


@pytest.mark.parametrize("option,value", [("lr", -1.0), ("beta", 1.5), ("granularity", "tensor")])
def test_group_edited_to_invalid_raises_at_step_and_changes_nothing(option, value):
    params, opt = _trained()
    set_grads(params, 10)
    opt.param_groups[1][option] = value
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=option):
        opt.step()
    assert_bitwise_equal(before, snapshot(opt, params))


# ---- non-finite gradients and GradScaler ------------------------------------------------------------

def test_nonfinite_gradient_without_scaler_skips_counts_and_warns_once():
    params, opt = _trained()
    opt.guard = "step"  # the whole-step skip (the default, guard="slice": test_guard.py)
    before = snapshot(opt, params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in (float("nan"), float("inf")):
            set_grads(params, 20)
            params["bias"].grad[1] = bad
            opt.step()
    assert_bitwise_equal(before, snapshot(opt, params))
    assert opt.skipped_steps == 2
    msgs = [str(w.message) for w in caught if "NaN or Inf" in str(w.message)]
    assert len(msgs) == 1, msgs
    set_grads(params, 21)  # a finite step afterwards runs normally
    opt.step()
    assert opt.state[params["w"]]["step"].item() == 3 and not torch.equal(params["w"], before[0]["w"])


def _scaled_backward(model, scaler, x, y):
    loss = torch.nn.functional.mse_loss(model(x), y)
    (scaler.scale(loss) if scaler else loss).backward()


def test_gradscaler_cpu_unscales_inside_and_skips_on_inf():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    models = [torch.nn.Linear(3, 2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    # clip_value makes the step depend on the gradient's scale (Amos alone is scale-invariant),
    # so a missing unscale, or clipping before unscaling, shows
    opts = [Amos(m.parameters(), lr=0.1, clip_value=0.5) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    # a good scaled step equals a plain step: power-of-two scaling and unscaling are exact
    for i in range(2):
        for m, o, sc in zip(models, opts, (scaler, None)):
            o.zero_grad()
            _scaled_backward(m, sc, x, y)
            if sc:
                sc.step(o)
                sc.update()
            else:
                g = models[1].weight.grad.abs()
                assert (g < 0.5).any() and (g > 0.5).any(), "clip_value 0.5 must clip some entries, not all"
                o.step()
    assert torch.equal(models[0].weight, models[1].weight) and torch.equal(models[0].bias, models[1].bias)
    # an inf in a scaled gradient: nothing changes, the step is counted, the scale halves
    params = dict(models[0].named_parameters())
    opts[0].zero_grad()
    _scaled_backward(models[0], scaler, x, y)
    models[0].weight.grad[0, 0] = float("inf")
    before = snapshot(opts[0], params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaler's skip is not a non-finite-gradient warning
        scaler.step(opts[0])
    scaler.update()
    assert_bitwise_equal(before, snapshot(opts[0], params))
    assert opts[0].skipped_steps == 1 and scaler.get_scale() == 2.0**9
    assert opts[0].state[models[0].weight]["step"].item() == 2
