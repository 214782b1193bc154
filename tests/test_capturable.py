"""capturable=True: no host synchronisation in Amos.step (CUDA graphs).

On the CPU (CI): the same step runs with the verdict kept on the device. After a first step
(the warm-up a graph capture needs anyway: it builds the kernels' launch tables from host lists),
every Python-side read of a tensor's value (`.item()`, `bool()`, `float()`, `.tolist()`) raises
during the step, and so does every call of an aten op that reads a tensor on the host in some
torch version (a foreach op with a tensor scalar: torch 2.11's CUDA kernel read it and broke an
H200 capture), so a host sync added later fails here; results equal capturable=False bitwise (same kernels, same
tensor lr); a non-finite step is skipped by the kernels themselves, with the step counts unchanged;
an LR scheduler's in-place update of the tensor lr takes effect.
On a GPU (skipped here, run by benchmarks/gpu_check.sh): a whole training step (forward,
backward, optimizer.step) captured in a CUDA graph and replayed matches eager training step by
step, with lr changes and a NaN batch skipped inside the graph.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amos_fused import Amos
from test_bad_input import assert_identical, cpu_backends, snapshot

OPTIONS = [dict(schedule="amos", momentum=0.9), dict(schedule="inverse_time", half_life=3, momentum=0.0),
           dict(schedule="amos", momentum=0.5, granularity="element", momentum_dtype=torch.bfloat16)]
SHAPES = [(6, 5), (7,), (), (3, 2, 4)]


def make(seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 0.5).to(device, dtype).requires_grad_() for s in SHAPES]


def set_grads(params, step, bad=False):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.device, p.dtype)
    if bad:
        params[0].grad.view(-1)[3] = float("nan")


def _reads_on_host(op):
    """aten ops that read a tensor's value on the host (in some torch version, on some device)."""
    name = op.name()
    if name in ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::allclose"):
        return True
    # foreach ops with a tensor scalar (overload "Tensor"): torch 2.11's CUDA kernels read it on the host
    return name.startswith("aten::_foreach_") and op._overloadname == "Tensor"


class _RefuseHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _reads_on_host(func):
            raise AssertionError(f"{func} reads a tensor's value on the host during a capturable step")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    """Every way Python reads a tensor's value, and every aten op that reads one on the host,
    raises inside the block."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host during a capturable step")

    names = ("item", "__bool__", "__float__", "__int__", "tolist", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        with _RefuseHostReads():
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_the_guard_catches_a_host_read():
    with pytest.raises(AssertionError, match="read on the host"):
        with no_host_reads():
            bool(torch.ones(()))
    steps = [torch.zeros(()), torch.zeros(())]
    with pytest.raises(AssertionError, match="reads a tensor.s value on the host"):
        with no_host_reads():
            torch._foreach_add_(steps, torch.ones(()))  # the call that broke capture on torch 2.11
    with no_host_reads():
        torch._foreach_add_(steps, [torch.ones(())] * 2)  # what Amos.step does instead


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_capturable_step_reads_nothing_on_the_host_and_matches(backend, options):
    eager, graphable = make(), make()
    # the same tensor lr for both (a float lr reaches the interpreted Triton kernels as fp64)
    opt_e = Amos(eager, lr=torch.tensor(0.05), backend=backend, guard="step", **options)
    opt_c = Amos(graphable, lr=0.05, backend=backend, capturable=True, guard="step", **options)
    assert torch.is_tensor(opt_c.param_groups[0]["lr"]), "capturable keeps lr as a tensor"
    for step in range(5):
        bad = step == 2
        set_grads(eager, step, bad)
        set_grads(graphable, step, bad)
        before = snapshot(opt_c, graphable)
        with pytest.warns(UserWarning) if bad else contextlib.nullcontext():
            opt_e.step()
        with no_host_reads() if step else contextlib.nullcontext():  # step 0 warms up (builds launch tables)
            opt_c.step()
        if bad:  # skipped by the kernels: nothing changed, step counts included
            after = snapshot(opt_c, graphable)
            after["skipped"], before["skipped"] = None, None
            assert_identical(after, {**before, "groups": after["groups"]})
        for p, q in zip(eager, graphable):
            assert torch.equal(p, q), f"{backend} step {step}"
            for key, value in opt_e.state[p].items():
                if torch.is_tensor(value):
                    assert torch.equal(value, opt_c.state[q][key]), f"{backend} step {step} state {key}"
    assert opt_c.skipped_steps == opt_e.skipped_steps == 1


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
def test_scheduler_changes_the_tensor_lr_in_place(backend):
    params = make()
    opt = Amos(params, lr=0.1, backend=backend, capturable=True, schedule="inverse_time", half_life=10, momentum=0.0)
    lr = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref = make()
    ref_opt = Amos(ref, lr=0.1, backend="reference", schedule="inverse_time", half_life=10, momentum=0.0)
    for step in range(3):
        set_grads(params, step)
        set_grads(ref, step)
        with no_host_reads() if step else contextlib.nullcontext():  # step 0 warms up
            opt.step()
        ref_opt.step()
        sched.step()
        ref_opt.param_groups[0]["lr"] *= 0.5
        assert opt.param_groups[0]["lr"] is lr, "the scheduler must fill the same tensor (a graph holds it)"
    assert float(lr) == pytest.approx(0.1 * 0.5**3)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_grad_scaler_found_inf_is_read_on_the_device():
    params = make()
    opt = Amos(params, lr=0.1, backend=cpu_backends()[-1], capturable=True)
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    before = snapshot(opt, params)
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())
    with no_host_reads():
        opt.step()
    del opt.grad_scale, opt.found_inf
    after = snapshot(opt, params)
    after["skipped"] = before["skipped"] = None
    assert_identical(after, before)
    assert opt.skipped_steps == 1


def test_capturable_refuses_what_needs_the_host():
    with pytest.raises(TypeError, match="capturable must be True or False"):
        Amos(make(), capturable=1)
    p64 = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True)]
    opt = Amos(p64, capturable=True, backend="cpu" if "cpu" in cpu_backends() else "reference")
    p64[0].grad = torch.randn(3, 4, dtype=torch.float64)
    before = snapshot(opt, p64)
    with pytest.raises(RuntimeError, match="fp64"):
        opt.step()
    assert_identical(snapshot(opt, p64), before)


# ---- CUDA graphs (a GPU only) ------------------------------------------------------------------
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, 8)).cuda()


def _batches(n):
    gen = torch.Generator().manual_seed(7)
    out = [(torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)) for _ in range(n)]
    out[4][0][0, 0] = float("nan")  # one batch whose gradients are NaN: skipped inside the graph
    return [(x.cuda(), y.cuda()) for x, y in out]


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_whole_training_step_replays_from_a_cuda_graph(backend):
    steps = 8
    batches = _batches(steps)

    def train_step(model, opt, x, y):
        opt.zero_grad(set_to_none=False)  # gradients keep their addresses: the kernels' tables stay valid
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    # eager run: the expected trajectory
    eager = _model(0)
    opt_e = Amos(eager.parameters(), lr=0.02, backend=backend, capturable=True)
    sched_e = torch.optim.lr_scheduler.StepLR(opt_e, step_size=3, gamma=0.5)
    expected = []
    for x, y in batches:
        train_step(eager, opt_e, x, y)
        sched_e.step()
        expected.append([p.detach().clone() for p in eager.parameters()])

    # graphed run: warm up on a side stream (creates state and launch tables), capture, replay
    model = _model(0)
    warm = _model(0)
    opt = Amos(model.parameters(), lr=0.02, backend=backend, capturable=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # one warm-up step with lr 0 changes nothing but the state's creation
        lr = opt.param_groups[0]["lr"].clone()
        opt.param_groups[0]["lr"].zero_()
        train_step(model, opt, static_x, static_y)
        opt.param_groups[0]["lr"].copy_(lr)
        for st in opt.state.values():  # undo the warm-up's step count and moments
            for key in ("v", "b", "m", "step"):
                if key in st:
                    st[key].zero_()
    torch.cuda.current_stream().wait_stream(side)
    for p, q in zip(model.parameters(), warm.parameters()):
        p.data.copy_(q.data)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x, static_y)
    for k, (x, y) in enumerate(batches):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        sched.step()
        for p, q in zip(model.parameters(), expected[k]):
            # same kernels on the same inputs: equal but for library-level nondeterminism
            torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7, msg=f"{backend} replay {k}")
    torch.cuda.synchronize()
    assert opt.skipped_steps == opt_e.skipped_steps == 1
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.02 * 0.5 ** (steps // 3))


def test_counters_reset_in_place_and_a_tensor_lr_elsewhere_is_refused():
    """A captured graph holds the counters' and lr's addresses: resetting skipped_steps or
    guarded_slices must zero the same tensors, and an lr tensor on another device than the
    parameters (its value would be frozen into the graph) is refused with the fix."""
    params = make()
    opt = Amos(params, lr=0.1, backend=cpu_backends()[-1], capturable=True, guard="slice")
    set_grads(params, 0, bad=True)
    opt.step()  # guards a slice
    opt.found_inf = torch.ones(())  # as GradScaler sets it: a verdict, so a skip counter
    opt.step()
    del opt.found_inf
    counters = list(opt._skipped_on.values()) + list(opt._guarded_on.values())
    assert opt.guarded_slices == 1 and opt.skipped_steps == 1
    opt.guarded_slices = 0
    opt.skipped_steps = 0
    assert opt.guarded_slices == 0 and opt.skipped_steps == 0
    now = list(opt._skipped_on.values()) + list(opt._guarded_on.values())
    assert len(now) == len(counters) == 2 and all(a is b for a, b in zip(now, counters))
    if torch.cuda.is_available():
        cuda_params = [p.detach().cuda().requires_grad_() for p in make()]
        with pytest.raises(ValueError, match="lr is a tensor on cpu, the parameters are on cuda"):
            Amos(cuda_params, lr=torch.tensor(0.1), capturable=True)
    meta_lr = torch.tensor(0.1, device="meta")
    with pytest.raises(ValueError, match="lr is a tensor on meta, the parameters are on cpu"):
        Amos(make(), lr=meta_lr, capturable=True)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
def test_capturable_slice_guard_reads_nothing_and_matches(backend):
    """guard="slice" under capturable=True: the guarded rows and their count stay on the device."""
    eager, graphable = make(), make()
    opt_e = Amos(eager, lr=torch.tensor(0.05), backend=backend, guard="slice")
    opt_c = Amos(graphable, lr=0.05, backend=backend, guard="slice", capturable=True)
    for step in range(4):
        set_grads(eager, step, bad=step == 2)
        set_grads(graphable, step, bad=step == 2)
        with pytest.warns(UserWarning, match="guard='slice'") if step == 2 else contextlib.nullcontext():
            opt_e.step()
        with no_host_reads() if step else contextlib.nullcontext():
            opt_c.step()
        for p, q in zip(eager, graphable):
            assert torch.equal(p, q), f"{backend} step {step}"
    assert opt_c.guarded_slices == opt_e.guarded_slices == 1
    assert opt_c.skipped_steps == 0
