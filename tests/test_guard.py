"""guard="slice": a slice whose S_r is not finite keeps its values, the rest of the step goes ahead.

What it means, checked on every backend that runs here (the grid in backend_grid.py, cases
`guard-*`, compares the backends with the reference on poisoned gradients; this file pins the
reference's own behaviour, so the grid is not a comparison of two wrong things):
- a guarded slice keeps theta, m, v and b bit for bit, and `guarded_slices` counts it;
- "amos" slices are independent: every other slice ends exactly where a step with a finite
  gradient in the guarded slices takes it;
- closed forms: ||u|| leaves guarded slices out, i.e. every other slice ends exactly where a
  step with a zero gradient in the guarded slices (S_r * r_r = 0) takes it;
- with guard="slice" the gradients are not read before the kernels (no verdict pass);
- GradScaler's found_inf still skips the whole step; the warning comes once; bad values raise.
"""
import warnings

import pytest
import torch

from amos_fused import Amos, backends
from test_bad_input import cpu_backends

BACKENDS = cpu_backends()
NAN, INF = float("nan"), float("inf")


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 0.5).requires_grad_() for s in shapes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) * 0.1 for p in params]


def _train(backend, options, shapes, edit, steps=4, bad_step=2):
    """`steps` steps; at `bad_step` the gradients go through `edit(grads)` first.
    Returns the params, the optimizer and the snapshot before the edited step."""
    params = _params(shapes)
    opt = Amos(params, lr=0.1, backend=backend, guard="slice", **options)
    before = None
    for step in range(steps):
        grads = _grads(params, step)
        if step == bad_step:
            edit(grads)
            before = ([p.detach().clone() for p in params],
                      [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params])
        for p, g in zip(params, grads):
            p.grad = g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        if step == bad_step:
            after = ([p.detach().clone() for p in params],
                     [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params])
    return opt, before, after


def _rows(x, rows):
    return x.reshape(x.shape[0], -1)[rows] if x.dim() >= 1 and x.shape[0] > 1 else x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["amos", "inverse_time"])
def test_guarded_rows_keep_their_values_and_the_others_step(backend, schedule):
    options = dict(schedule=schedule, momentum=0.9)
    if schedule == "inverse_time":
        options["half_life"] = 3
    shapes = [(6, 9), (5,)]

    def poison(grads):
        grads[0][2, 4] = NAN
        grads[0][4, 0] = 1e30  # finite, but its square overflows fp32: S_r = inf
        grads[1][3] = INF  # the one row of a vector: the whole vector is guarded

    def stand_in(grads):  # what the guarded slices amount to for the others
        fill = 0.0 if schedule != "amos" else 0.05  # closed forms: S_r * r_r = 0 leaves ||u|| alone
        grads[0][2] = fill
        grads[0][4] = fill
        grads[1].fill_(fill)

    opt, before, after = _train(backend, options, shapes, poison)
    clean, _, clean_after = _train(backend, options, shapes, stand_in)
    assert opt.guarded_slices == 3
    assert clean.guarded_slices == 0
    kept, others = [2, 4], [0, 1, 3, 5]
    (p_before, s_before), (p_after, s_after), (p_clean, s_clean) = before, after, clean_after
    # the guarded slices: bit for bit as before the step
    assert torch.equal(p_after[0][kept], p_before[0][kept])
    assert torch.equal(p_after[1], p_before[1])
    for key in ("v", "b", "m"):
        assert torch.equal(_rows(s_after[0][key], kept), _rows(s_before[0][key], kept)), key
        assert torch.equal(s_after[1][key], s_before[1][key]), key
    # every other slice: exactly where the stand-in step took it
    assert torch.equal(p_after[0][others], p_clean[0][others])
    for key in ("v", "b", "m"):
        assert torch.equal(_rows(s_after[0][key], others), _rows(s_clean[0][key], others)), key
    assert all(torch.isfinite(p).all() for p in p_after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_element_granularity_guards_single_elements(backend):
    def poison(grads):
        grads[0][1, 1] = NAN
        grads[0][0, 2] = -INF

    opt, (p_before, s_before), (p_after, s_after) = _train(backend, dict(granularity="element"), [(3, 4)], poison)
    assert opt.guarded_slices == 2
    for idx in ((1, 1), (0, 2)):
        assert p_after[0][idx] == p_before[0][idx]
        for key in ("v", "b", "m"):  # v, b: one entry per element (flat or shaped)
            flat = idx[0] * 4 + idx[1]
            assert s_after[0][key].reshape(-1)[flat] == s_before[0][key].reshape(-1)[flat], key
    moved = (p_after[0] != p_before[0]).sum().item()
    assert moved == 10, "the other elements step"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_granularity_guards_the_whole_tensor_only(backend):
    def poison(grads):
        grads[1].view(-1)[5] = NAN

    opt, (p_before, _), (p_after, _) = _train(backend, dict(granularity="tensor"), [(4, 5), (3, 2, 2)], poison)
    assert opt.guarded_slices == 1
    assert torch.equal(p_after[1], p_before[1])
    assert not torch.equal(p_after[0], p_before[0])


def test_slice_guard_reads_no_gradient_before_the_kernels(monkeypatch):
    """The point of guard="slice": one pass over the gradients. The verdict's read (backends.max_abs)
    is refused; guard="step" needs it (so the refusal is real), guard="slice" does not."""
    def refuse(*args, **kwargs):
        raise AssertionError("the gradients were read for a verdict")

    monkeypatch.setattr(backends, "max_abs", refuse)
    for guard in ("step", "slice"):
        params = _params([(4, 3)])
        opt = Amos(params, guard=guard, backend="reference")
        params[0].grad = _grads(params, 0)[0]
        if guard == "step":
            with pytest.raises(AssertionError, match="read for a verdict"):
                opt.step()
        else:
            opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_still_skips_the_whole_step(backend):
    params = _params([(4, 3)])
    opt = Amos(params, backend=backend, guard="slice")
    params[0].grad = _grads(params, 0)[0]
    opt.step()
    params[0].grad = _grads(params, 1)[0]
    params[0].grad[1, 1] = NAN  # found_inf decides: no slice is guarded, nothing changes
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())
    before = params[0].detach().clone()
    state = {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}
    opt.step()
    assert torch.equal(params[0].detach(), before)
    for key, value in state.items():
        assert torch.equal(opt.state[params[0]][key], value), key
    assert opt.skipped_steps == 1 and opt.guarded_slices == 0


def test_warns_once_and_the_counter_resets():
    params = _params([(4, 3)])
    opt = Amos(params, backend="reference", guard="slice")
    for step in range(3):
        params[0].grad = _grads(params, step)[0]
        params[0].grad[0, 0] = NAN
        if step == 0:
            with pytest.warns(UserWarning, match="guard='slice'.*1 slice"):
                opt.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no second warning
                opt.step()
    assert opt.guarded_slices == 3
    assert opt.skipped_steps == 0
    opt.guarded_slices = 0
    assert opt.guarded_slices == 0
    with pytest.raises(ValueError, match="reset to 0"):
        opt.guarded_slices = 5


def test_bad_guard_names_the_option():
    with pytest.raises(ValueError, match=r"guard='rows' is invalid; use 'step'.*or 'slice'"):
        Amos(_params([(2, 2)]), guard="rows")


CUDA_BACKENDS = [b for b in cpu_backends("cuda") if b != "reference"] if torch.cuda.is_available() else []


@pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a GPU and a CUDA backend (cuda or triton)")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["none"])
@pytest.mark.parametrize("guard", ["slice", "step"])
def test_cuda_step_decides_on_the_device_and_warns_a_step_later(backend, guard):
    """Amos.step on CUDA tensors: the verdict (guard="step") or the kernels' slice guard
    (guard="slice", no verdict tensor at all) stay on the device, the counters match the
    reference on the CPU, the warning comes once the GPU has answered, and the parameters
    follow the reference (fp32: the grid's tolerance, backend_grid.TOL)."""
    shapes = [(6, 9), (5,)]
    ref = _params(shapes)
    gpu = [p.detach().cuda().requires_grad_() for p in ref]
    opt_ref = Amos(ref, lr=0.1, backend="reference", guard=guard, momentum=0.9)
    opt = Amos(gpu, lr=0.1, backend=backend, guard=guard, momentum=0.9)
    caught = []
    for step in range(4):
        grads = _grads(ref, step)
        if step == 1:
            grads[0][2, 4] = NAN
        for p, q, g in zip(ref, gpu, grads):
            p.grad, q.grad = g, g.cuda()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step()
        caught.append([str(x.message) for x in w if str(x.message).startswith("Amos")])  # not torch's or triton's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt_ref.step()
        torch.cuda.synchronize()  # the next step finds this one's answer
    assert caught[1] == [] and len(caught[2]) == 1 and caught[3] == [], caught
    assert ("guard='slice'" in caught[2][0]) == (guard == "slice")
    assert (opt.guarded_slices, opt.skipped_steps) == (opt_ref.guarded_slices, opt_ref.skipped_steps)
    assert (opt.guarded_slices, opt.skipped_steps) == ((1, 0) if guard == "slice" else (0, 1))
    for p, r in zip(gpu, ref):
        torch.testing.assert_close(p.detach().cpu(), r.detach(), rtol=1e-5, atol=1e-7)
        for key in ("v", "b", "m", "step"):
            torch.testing.assert_close(opt.state[p][key].cpu(), opt_ref.state[r][key], rtol=1e-5, atol=1e-7)
