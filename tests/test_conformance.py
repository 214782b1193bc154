"""Amos behaves as torch.optim optimizers do where torch's own generic optimizer tests
(test/test_optim.py, TestOptimRenewed) check something that applies to an optimizer without
foreach/fused flags: it trains, lr schedulers and tensor lrs work, copies and pickles keep
everything, state dicts save, load (older formats too) and run their hooks, step hooks run,
it prints, and bad input raises torch's errors.

Where Amos differs on purpose, a test says so: duplicate parameters raise within a group too
(torch warns and steps them twice); complex parameters raise; closed-form schedules decay the
weights with zero gradients (like weight decay).
"""
import contextlib
import copy
import functools
import io
import pickle

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from amos_fused import Amos, cpp_backend

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    cpp_backend.unavailable("cpu") is not None, reason=f"backend='cpu': {cpp_backend.unavailable('cpu')}"))]
FAMILIES = {"amos": {}, "inverse_time": {"schedule": "inverse_time", "half_life": 10}}


def named_eta(name, param):
    """A picklable eta_fn (module level)."""
    return 0.25 if param.ndim == 1 else None


def linear(contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        w, b = torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen)
    else:  # views with strides, as torch's test makes them
        w, b = torch.randn(10, 5, 2, generator=gen)[..., 0], torch.randn(10, 2, generator=gen)[..., 0]
    return torch.nn.Parameter(w), torch.nn.Parameter(b), torch.randn(5, generator=gen)


def loss_of(opt, w, b, x):
    opt.zero_grad()
    loss = (w.mv(x) + b).pow(2).sum()
    loss.backward()
    return loss


def assert_same(a, b, where="value"):
    """Equal bit for bit: tensors (dtype, shape, bits), and dicts, lists and plain values inside."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():  # the bits: NaN equals NaN, -0.0 differs from 0.0
            a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def train_in_step(pairs, steps, seed=1):
    """Step each (optimizer, params) on the same gradients, `steps` times."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in pairs[0][1]]
        for opt, params in pairs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()


# ---- training, schedulers, tensor lr ---------------------------------------------------------
@pytest.mark.parametrize("scheduler", [None, "step", "plateau"])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_goes_right_direction(backend, family, contiguous, scheduler):
    w, b, x = linear(contiguous)
    opt = Amos([w, b], lr=0.01, backend=backend, **FAMILIES[family])
    sched = {None: None, "step": lambda: StepLR(opt, gamma=0.9, step_size=10),
             "plateau": lambda: ReduceLROnPlateau(opt)}[scheduler]
    sched = sched() if sched else None
    closure = functools.partial(loss_of, opt, w, b, x)
    first = closure().item()
    for _ in range(20):
        loss = opt.step(closure)
        if isinstance(sched, ReduceLROnPlateau):
            sched.step(loss.item())
        elif sched is not None:
            sched.step()
    assert closure().item() < first


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_with_a_tiny_lr_stays_put(backend):
    w, b, x = linear()
    other = torch.nn.Parameter(torch.randn(2))
    before = other.detach().clone()
    opt = Amos([{"params": [w, b], "lr": 0.01}, {"params": [other]}], lr=1e-28, backend=backend)
    for _ in range(20):
        loss_of(opt, w, b, x)
        other.grad = torch.rand_like(other)
        opt.step()
    assert torch.equal(other.detach(), before)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_one_element_tensor_lr_steps_as_the_float(backend, family, shape):
    runs = []
    for lr in (1e-3, torch.full(shape, 1e-3)):
        w, b, x = linear()
        opt = Amos([w, b], lr=lr, backend=backend, **FAMILIES[family])
        for _ in range(5):
            opt.step(functools.partial(loss_of, opt, w, b, x))
        runs.append((w.detach(), b.detach(), opt.state[w]))
    assert_same(runs[0], runs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_element_lr_set_later_and_its_scheduler_reach_the_step(backend):
    """A (1, 1) lr put in a group after steps (planned ones) works, and a scheduler's in-place
    updates of it reach the step: the run matches one with float lrs."""
    runs = []
    for tensor in (False, True):
        w, b, x = linear()
        opt = Amos([w, b], lr=0.01, backend=backend)
        for step in range(6):
            if step == 2:
                opt.param_groups[0]["lr"] = torch.tensor([[0.005]]) if tensor else 0.005
                sched = StepLR(opt, step_size=1, gamma=0.5)
            opt.step(functools.partial(loss_of, opt, w, b, x))
            if step >= 2:
                sched.step()
        runs.append((w.detach(), b.detach()))
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.005 * 0.5**4, rel=1e-6)
    assert_same(runs[0], runs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_lr_with_more_elements_raises_and_changes_nothing(backend):
    w, b, x = linear()
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        Amos([w, b], lr=torch.tensor([0.001, 0.001]), backend=backend)
    opt = Amos([w], lr=0.01, backend=backend)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.add_param_group({"params": [b], "lr": torch.ones(2, 1)})
    opt.step(functools.partial(loss_of, opt, w, b, x))
    before = copy.deepcopy((w.detach(), opt.state_dict()))
    opt.param_groups[0]["lr"] = torch.tensor([0.01, 0.01])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.step()
    opt.param_groups[0]["lr"] = before[1]["param_groups"][0]["lr"]
    assert_same((w.detach(), opt.state_dict()), before)


# ---- copies and pickles ---------------------------------------------------------------------
def primed(backend, guard, eta_fn=named_eta, **options):
    """An optimizer after three steps, one of them with a NaN gradient (a skip or a guarded slice)."""
    w, b, _ = linear()
    opt = Amos([w, b], lr=0.01, backend=backend, guard=guard, eta_fn=eta_fn, **options)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        for p in (w, b):
            p.grad = torch.randn(p.shape, generator=gen)
        if step == 1:
            w.grad[3, 1] = float("nan")
        with pytest.warns(UserWarning) if step == 1 else contextlib.nullcontext():
            opt.step()
    return opt


def params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def public(opt):
    return {k for k in vars(opt) if not k.startswith("_")}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("guard", ["step", "slice"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_copy_keeps_settings_counters_and_state_and_steps_alike(backend, guard, how):
    opt = primed(backend, guard, momentum_dtype=torch.bfloat16)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert public(twin) == public(opt)
    assert (twin.backend, twin.guard, twin.capturable, twin.eta_fn) == (backend, guard, False, named_eta)
    assert (twin.skipped_steps, twin.guarded_slices) == (opt.skipped_steps, opt.guarded_slices)
    assert (opt.skipped_steps, opt.guarded_slices > 0) == ((1, False) if guard == "step" else (0, True))
    assert twin._plan is None and twin._state_ok == {} and twin._bound_cache == {}  # rebuilt for its own tensors
    assert_same(twin.state_dict(), opt.state_dict())
    assert all(p is not q for p, q in zip(params_of(twin), params_of(opt)))
    train_in_step([(opt, params_of(opt)), (twin, params_of(twin))], steps=4)
    assert_same([p.detach() for p in params_of(twin)], [p.detach() for p in params_of(opt)])
    assert_same(twin.state_dict(), opt.state_dict())
    twin.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})  # eta_fn kept: eta 0.25
    assert twin.state[twin.param_groups[1]["params"][0]]["eta"] == 0.25


def test_a_lambda_eta_fn_survives_deepcopy_and_is_dropped_by_pickle():
    opt = primed("reference", "step", eta_fn=lambda name, p: 0.5)
    assert copy.deepcopy(opt).eta_fn is opt.eta_fn
    twin = pickle.loads(pickle.dumps(opt))
    assert "not picklable" in repr(twin.eta_fn) and "not picklable" in repr(twin)
    twin.step()  # everything else works
    with pytest.raises(RuntimeError, match="could not be pickled"):
        twin.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
    assert len(twin.param_groups) == 1
    twin.eta_fn = named_eta  # the fix the error names
    twin.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})


# ---- state dicts ----------------------------------------------------------------------------
@pytest.mark.parametrize("named", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_is_deterministic_and_loads_into_a_clone(backend, named):
    w, b, x = linear()
    opt = Amos([("w", w), ("b", b)] if named[0] else [w, b], lr=0.01, backend=backend)
    for _ in range(10):
        opt.step(functools.partial(loss_of, opt, w, b, x))
    with torch.no_grad():
        wc, bc = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    clone = Amos([("w", wc), ("b", bc)] if named[1] else [wc, bc], lr=0.01, backend=backend)
    saved = copy.deepcopy(opt.state_dict())  # (a state dict holds the optimizer's own tensors)
    kept = copy.deepcopy(saved)
    clone.load_state_dict(saved)
    assert_same(saved, kept)  # loading changes nothing in the dict
    for _ in range(10):
        opt.step(functools.partial(loss_of, opt, w, b, x))
        clone.step(functools.partial(loss_of, clone, wc, bc, x))
        assert_same((wc.detach(), bc.detach()), (w.detach(), b.detach()))
    if named[0] or named[1]:
        assert clone.param_groups[0]["param_names"] == ["w", "b"]

    def without_names(sd):
        return {**sd, "param_groups": [{k: v for k, v in g.items() if k != "param_names"} for g in sd["param_groups"]]}
    assert_same(without_names(clone.state_dict()), without_names(opt.state_dict()))
    clone.param_groups.extend(clone.param_groups)  # a repeated group is saved like the original
    assert_same(without_names(clone.state_dict())["param_groups"][-1],
                without_names(opt.state_dict())["param_groups"][-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_and_loads_with_weights_only(backend):
    opt = primed(backend, "step", momentum_dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    for weights_only in (False, True):
        buffer.seek(0)
        assert_same(torch.load(buffer, weights_only=weights_only), opt.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_older_state_dict_with_number_steps_loads(backend):
    runs = []
    for number in (False, True):
        opt = primed(backend, "step")
        state_dict = copy.deepcopy(opt.state_dict())
        if number:
            for st in state_dict["state"].values():
                st["step"] = st["step"].item()
        opt.load_state_dict(state_dict)
        assert all(torch.is_tensor(st["step"]) and st["step"].dtype == torch.float32 for st in opt.state.values())
        train_in_step([(opt, params_of(opt))], steps=3)
        runs.append(([p.detach() for p in params_of(opt)], opt.state_dict()))
    assert_same(runs[1], runs[0])


def test_a_bad_number_step_raises_before_anything_changes():
    opt = primed("reference", "step")
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["state"][0]["step"] = -1.0
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="'step' is -1.0"):
        opt.load_state_dict(state_dict)
    assert_same(opt.state_dict(), before)


def test_state_dict_hooks_run():
    opt = primed("reference", "step")

    def pre(optimizer):
        optimizer.state["test"] = 1

    def post(optimizer, state_dict):
        state_dict["ran_pre_hook"] = state_dict["state"].pop("test", None) == 1
        return state_dict
    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(post)
    state_dict = opt.state_dict()
    assert state_dict["ran_pre_hook"] and "test" not in state_dict["state"]


def test_load_state_dict_hooks_run_in_order_and_their_changes_are_loaded():
    opt = primed("reference", "step")
    saved = copy.deepcopy(opt.state_dict())
    w = opt.param_groups[0]["params"][0]

    def set_lr(optimizer, state_dict):  # edits the (shallow-copied) dict in place
        state_dict["param_groups"][0]["lr"] = 0.002

    def replace(optimizer, state_dict):  # returns another dict, with new state tensors
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.003
        state_dict["state"][0]["v"] = torch.full_like(state_dict["state"][0]["v"], 7.0)
        return state_dict
    seen = []
    opt.register_load_state_dict_post_hook(lambda optimizer: seen.append(optimizer.param_groups[0]["lr"]))
    first = opt.register_load_state_dict_pre_hook(set_lr)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(replace, prepend=True)  # runs first: set_lr has the last word
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.002
    assert torch.equal(opt.state[w]["v"], torch.full((10,), 7.0))  # the hook's tensor, not the original's
    first.remove()
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.003
    assert seen == [0.002, 0.002, 0.003]
    opt.step()


# ---- step hooks, printing, errors -------------------------------------------------------------
def test_step_hooks_run_in_order_and_can_be_removed():
    w, b, x = linear()
    opt = Amos([w, b], lr=0.01)
    other = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda *a: calls.append(0)),
               register_optimizer_step_post_hook(lambda *a: calls.append(5))]
    try:
        for o in (opt, other):
            handles.append(o.register_step_pre_hook(lambda *a: calls.append(1)))
            handles.append(o.register_step_post_hook(lambda *a: calls.append(2)))
        opt.step(functools.partial(loss_of, opt, w, b, x))
        other.step()
        opt.step(functools.partial(loss_of, opt, w, b, x))
        assert calls == [0, 1, 2, 5] * 3
    finally:
        for handle in handles:
            handle.remove()
    opt.step(functools.partial(loss_of, opt, w, b, x))
    assert calls == [0, 1, 2, 5] * 3


def test_prints_settings_and_groups():
    text = repr(primed("reference", "slice", momentum_dtype=torch.bfloat16))
    assert text.startswith("Amos (backend='reference', guard='slice', capturable=False, eta_fn=<function named_eta")
    assert "Parameter Group 0" in text and "momentum_dtype: torch.bfloat16" in text and "lr: 0.01" in text


def test_duplicate_parameters_raise_in_a_group_and_across_groups():
    w, b, _ = linear()
    with pytest.raises(ValueError, match="a parameter group with duplicate parameters"):
        Amos([w, b, w])  # torch warns here and steps w twice
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        Amos([{"params": [w]}, {"params": [w]}])
    opt = Amos([w])
    with pytest.raises(ValueError, match="already in param group 0"):
        opt.add_param_group({"params": [b, w]})
    assert len(opt.param_groups) == 1 and len(opt.state) == 1


def test_torchs_construction_errors():
    w, b, _ = linear()
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        Amos(w)
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        Amos([("weight", w), b])
    with pytest.raises(ValueError, match="with/without names"):
        Amos([{"params": [w]}, {"params": [("bias", b)]}])
    with pytest.raises(TypeError, match="complex"):  # differs from torch: no complex parameters
        Amos([torch.randn(3, dtype=torch.complex64, requires_grad=True)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradients_or_zero_gradients(backend, family):
    """No gradient: nothing changes. Zero gradients: "amos" changes nothing; the closed forms
    decay the weights by lr**2/(2q)*s(t) (decoupled, like weight decay, which torch's test skips)."""
    w, b, _ = linear()
    before = (w.detach().clone(), b.detach().clone())
    opt = Amos([w, b], lr=0.01, backend=backend, **FAMILIES[family])
    assert opt.step(lambda: torch.tensor(1.0)) == torch.tensor(1.0)
    assert_same((w.detach(), b.detach()), before)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    assert all(len(st) > 0 for st in opt.state.values())
    if family == "amos":
        assert_same((w.detach(), b.detach()), before)
    else:
        for p, old in zip((w, b), before):
            assert (p.detach().abs() < old.abs()).all()
