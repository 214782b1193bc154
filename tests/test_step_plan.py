"""Amos' step plan (amos_fused.plan.Plan): later steps reuse what the last full step found.

The plan must change nothing but host time: planned steps are compared bit for bit with the
same steps on the full path (the plan switched off), through the changes a plan depends on
(gradients missing or not contiguous, lr and momentum changed by a schedule, gradients in
another dtype, non-finite gradients, a state dict loaded, a parameter's data replaced), and bad
input given after the plan was built must still raise before anything changes.
"""
import copy

import pytest
import torch

from amos_fused import Amos, cpp_backend
from test_conformance import assert_same

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    cpp_backend.unavailable("cpu") is not None, reason=f"backend='cpu': {cpp_backend.unavailable('cpu')}"))]


def make_params():
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 2, 4), (7, 3), (4,)]
    params = [(torch.randn(shape, generator=gen) * 0.1).requires_grad_() for shape in shapes]
    params.append((torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.1).requires_grad_())  # reference path
    for p in params:
        if hasattr(p, "grad_dtype"):
            p.grad_dtype = None  # torch >= 2.9: a gradient may have another dtype than its parameter
    return params


def make_opt(params, backend, guard, momentum):
    groups = [{"params": params[:3]},
              {"params": params[3:], "granularity": "tensor", "clip_value": 1.0}]
    return Amos(groups, lr=0.05, backend=backend, guard=guard, momentum=momentum)


def new_grads(params, gen):
    """New gradient tensors, as zero_grad(set_to_none=True) and backward() make them."""
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def set_grads(params, step, gen):
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if step == 3 and i == 1:
            g = None  # a parameter without a gradient for one step (full path at steps 3 and 4)
        elif step == 5 and i in (0, 5):  # a transposed gradient: the op's copy made contiguous, the reference's as is
            g = torch.randn(p.shape[::-1], generator=gen, dtype=p.dtype).t()
        elif step == 6 and i == 0:
            g = g.to(torch.bfloat16)  # another gradient dtype (full path at steps 6 and 7)
        elif step == 8 and i == 3:
            g[1, 2] = float("nan")  # guard="step" skips the step; "slice" guards the tensor (granularity "tensor")
        elif step == 9 and i == 0:
            g[2, 0] = float("inf")
        p.grad = g


def run(backend, guard, momentum, planned, monkeypatch):
    """Params, state and counters after a scripted run, with or without the plan."""
    with monkeypatch.context() as m:
        if not planned:
            m.setattr(Amos, "_planned_run", lambda self: None)
        params = make_params()
        opt = make_opt(params, backend, guard, momentum)
        gen = torch.Generator().manual_seed(1)
        for step in range(1, 13):
            set_grads(params, step, gen)
            opt.param_groups[0]["lr"] *= 0.9  # a schedule: lr changes at every step
            if step in (2, 12) and momentum:
                for group in opt.param_groups:
                    group["momentum"] -= 0.1  # as OneCycleLR's cycle_momentum does
            if step == 10:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            if step == 11:
                with torch.no_grad():
                    params[4].data = params[4].data.clone()  # new data, same layout
            opt.step()
        state = {i: dict(opt.state[p]) for i, p in enumerate(params)}
        return [p.detach().clone() for p in params], state, opt.skipped_steps, opt.guarded_slices


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("guard", ["step", "slice"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_planned_steps_match_full_steps_bitwise(backend, guard, momentum, monkeypatch):
    full = run(backend, guard, momentum, planned=False, monkeypatch=monkeypatch)
    planned = run(backend, guard, momentum, planned=True, monkeypatch=monkeypatch)
    assert_same(planned, full, "run")
    skipped, guarded = full[2], full[3]
    assert (skipped, guarded > 0) == ((2, False) if guard == "step" else (0, True))  # the script did poison


class CountFullSteps:
    def __init__(self, monkeypatch):
        self.n = 0
        collect = Amos._collect

        def counting(opt):
            self.n += 1
            return collect(opt)
        monkeypatch.setattr(Amos, "_collect", counting)


def train(backend, steps, edit):
    """`steps` steps on fresh params, new gradients each; edit(step, opt, params) before each step."""
    params = make_params()
    opt = make_opt(params, backend, "step", 0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        new_grads(params, gen)
        edit(step, opt, params)
        opt.step()
    return opt, params


@pytest.mark.parametrize("backend", BACKENDS)
def test_later_steps_reuse_the_plan(backend, monkeypatch):
    full = CountFullSteps(monkeypatch)

    def schedule(step, opt, params):
        opt.param_groups[0]["lr"] *= 0.5
        opt.param_groups[step % 2]["momentum"] = 0.9 - 0.1 * step  # options re-checked, the plan kept
    opt, _ = train(backend, 6, schedule)
    assert full.n == 1
    assert opt._plan is not None


def changes():
    """Changes (change(opt, params)) that each send the next step down the full path."""
    def no_grad(opt, params):
        params[2].grad = None

    def new_state(opt, params):
        opt.load_state_dict(opt.state_dict())

    def momentum_off(opt, params):
        opt.param_groups[0]["momentum"] = 0.0

    def new_dtype(opt, params):
        with torch.no_grad():
            params[0].data = params[0].data.to(torch.bfloat16)
        params[0].grad = torch.zeros_like(params[0])

    def transposed(opt, params):
        with torch.no_grad():
            params[3].data = params[3].data.t().contiguous().t()  # same shape, not contiguous

    def new_group(opt, params):
        extra = torch.zeros(3, requires_grad=True)
        extra.grad = torch.ones(3)
        opt.add_param_group({"params": [extra]})

    def state_reset(opt, params):
        opt.state[params[1]] = {"eta": opt.state[params[1]]["eta"]}

    def grad_dtype(opt, params):
        params[4].grad = params[4].grad.double()

    # (change, full steps of 4): the first and the changed one, and the next when it is undone
    return [(no_grad, 3), (new_state, 2), (momentum_off, 2), (new_dtype, 2), (transposed, 2), (new_group, 2),
            (state_reset, 2), (grad_dtype, 3)]


@pytest.mark.parametrize("change,full_steps", changes(), ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_change_takes_the_full_path_and_matches_it(backend, change, full_steps, monkeypatch):
    def steps(planned):
        with monkeypatch.context() as m:
            if not planned:
                m.setattr(Amos, "_planned_run", lambda self: None)
            full = CountFullSteps(m)
            opt, params = train(backend, 4, lambda step, opt, params: change(opt, params) if step == 2 else None)
            state = [dict(opt.state[p]) for p in params]
            return [p.detach().clone() for p in params], state, full.n

    params_full, state_full, _ = steps(planned=False)
    params_planned, state_planned, n = steps(planned=True)
    assert n == full_steps
    assert_same((params_planned, state_planned), (params_full, state_full), "after the change")


def test_bad_input_after_the_plan_raises_before_anything_changes():
    params = make_params()[:5]
    opt = make_opt(params, "reference", "step", 0.9)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert opt._plan is not None

    def snapshot():
        return [p.detach().clone() for p in params], [{k: v.clone() if torch.is_tensor(v) else v
                                                       for k, v in opt.state[p].items()} for p in params]

    before = snapshot()
    for bad, error, words in [
        (lambda: opt.param_groups[0].__setitem__("lr", -1.0), ValueError, "lr=-1.0"),
        (lambda: opt.param_groups[1].__setitem__("beta", 1.5), ValueError, "beta=1.5"),
        (lambda: opt.param_groups[0].__setitem__("lr", torch.tensor([0.1, 0.2])), ValueError, "lr="),
        (lambda: setattr(params[1].grad, "data", torch.ones(6)), ValueError, "shape (6,)"),
        (lambda: setattr(params[0], "grad", torch.ones(6, 5).to_sparse()), TypeError, "sparse"),
    ]:
        saved = [dict(g) for g in opt.param_groups]
        bad()
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            opt.step()
        assert_same(snapshot(), before, "after a failed step")
        for group, options in zip(opt.param_groups, saved):
            group.update(options)
        for p in params:
            p.grad = torch.ones_like(p)
    opt.step()  # all put back: steps again
    assert not torch.equal(params[0].detach(), before[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_groups_planned_match_full_steps_bitwise(backend, monkeypatch):
    """16 groups (the plan checks them all at once, over flat lists): layer-wise lr schedules,
    one group's momentum changed, and a tensor moved to the next group (the flat list of
    parameters unchanged: the plan must still notice) give the full path's bits."""
    def steps(planned):
        with monkeypatch.context() as m:
            if not planned:
                m.setattr(Amos, "_planned_run", lambda self: None)
            full = CountFullSteps(m)
            gen = torch.Generator().manual_seed(3)
            params = [(torch.randn(2 + i % 3, 4, generator=gen) * 0.1).requires_grad_() for i in range(32)]
            opt = Amos([{"params": params[2 * i:2 * i + 2], "lr": 0.05 * 0.9**i} for i in range(16)],
                       backend=backend, momentum=0.9)
            for step in range(6):
                new_grads(params, gen)
                for group in opt.param_groups:
                    group["lr"] *= 0.8
                if step == 2:
                    opt.param_groups[5]["momentum"] = 0.5  # re-checked, the plan kept
                if step == 4:
                    opt.param_groups[7]["params"].append(opt.param_groups[8]["params"].pop(0))
                opt.step()
            return [p.detach().clone() for p in params], [dict(opt.state[p]) for p in params], full.n

    params_full, state_full, _ = steps(planned=False)
    params_planned, state_planned, n = steps(planned=True)
    assert n == 2  # the first step and the one after the move
    assert_same((params_planned, state_planned), (params_full, state_full), "16 groups")
