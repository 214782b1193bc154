"""CUDA graphs with many param groups, several optimizers and several graphs (a GPU only; run by
benchmarks/gpu_check.sh). The caches' rules themselves are tested on any machine in
tests/test_plan_cache.py; here the captured graphs are replayed against eager training:
- 12 param groups (layer-wise lr) in one graph: more plans than the old cache of 8 held;
- two optimizers in two graphs, with a third optimizer's eager steps (many groups, gradients that
  move every step) between the replays;
- eager steps of the captured optimizer itself with other gradient tensors between replays (the
  graph's gradient table must stay);
- zero_grad(set_to_none=True) before the backward inside the capture: a clear error;
- a GradScaler first used at the capture (its found_inf needs Amos' skip counter, which must not
  be created, and zero-filled, inside the graph);
- the non-finite and guarded-slice warnings of eager steps arrive without a host sync per step,
  while the CPU runs ahead of the GPU.
"""
import warnings

import pytest
import torch

from amos_fused import Amos, backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

BACKENDS = ["cuda", "triton"]
STEPS = 8
NAN_BATCH = 4


def _need(backend):
    fn, why = backends._BACKENDS[backend](torch.device("cuda"))
    if fn is None:
        pytest.skip(f"backend={backend!r}: {why}")


def _model(seed, blocks=6):
    torch.manual_seed(seed)
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.LayerNorm(32)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(32, 8)).cuda()


def _groups(model, n):
    """n param groups with layer-wise learning rates."""
    params = list(model.parameters())
    return [{"params": params[i::n], "lr": 0.02 * 0.9**i} for i in range(n)]


def _batches(seed=7, nan=True):
    gen = torch.Generator().manual_seed(seed)
    out = [(torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)) for _ in range(STEPS)]
    if nan:
        out[NAN_BATCH][0][0, 0] = float("nan")  # its gradients are NaN: the step is skipped inside the graph
    return [(x.cuda(), y.cuda()) for x, y in out]


def _train_step(model, opt, x, y, set_to_none=False, scaler=None):
    opt.zero_grad(set_to_none=set_to_none)
    loss = torch.nn.functional.mse_loss(model(x), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def _eager(make_model, make_opt, batches, scaler=None):
    """Parameters after each eager step."""
    model = make_model()
    opt = make_opt(model)
    out = []
    for x, y in batches:
        _train_step(model, opt, x, y, scaler=scaler)
        out.append([p.detach().clone() for p in model.parameters()])
    return out, opt


def _undo(model, opt, saved):
    """Back to before the warm-up step: parameters, Amos state and counters, in place (a graph
    holds their addresses)."""
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    for st in opt.state.values():
        for key in ("v", "b", "m", "step"):
            if key in st:
                st[key].zero_()
    opt.skipped_steps = 0
    opt.guarded_slices = 0


class Graphed:
    """A model and optimizer whose training step is captured in a CUDA graph, after one eager
    warm-up step on a side stream (state, launch plans, gradient tables), which is then undone."""

    def __init__(self, make_model, make_opt, batch, set_to_none=False, scaler=None):
        self.model = make_model()
        self.opt = make_opt(self.model)
        self.x, self.y = batch[0].clone(), batch[1].clone()
        saved = [p.detach().clone() for p in self.model.parameters()]
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _train_step(self.model, self.opt, self.x, self.y, set_to_none=set_to_none)  # never a scaler here
        torch.cuda.current_stream().wait_stream(side)
        _undo(self.model, self.opt, saved)
        if scaler is not None:
            scaler.scale(torch.ones((), device="cuda"))  # the scaler's own lazy state, before the capture
        self.capture(lambda: _train_step(self.model, self.opt, self.x, self.y, set_to_none=set_to_none, scaler=scaler))

    def capture(self, step):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()

    def replay(self, batch):
        self.x.copy_(batch[0])
        self.y.copy_(batch[1])
        self.graph.replay()
        return [p.detach() for p in self.model.parameters()]


def _assert_same(got, want, what):
    for i, (a, e) in enumerate(zip(got, want)):
        # the same kernels on the same inputs: equal but for library-level nondeterminism
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7, msg=f"{what}, tensor {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_twelve_param_groups_in_one_graph(backend):
    _need(backend)
    batches = _batches()

    def make_opt(model):
        return Amos(_groups(model, 12), backend=backend, capturable=True, guard="step")  # the NaN batch: a skip

    want, opt_e = _eager(lambda: _model(0), make_opt, batches)
    g = Graphed(lambda: _model(0), make_opt, batches[0])
    assert len(g.opt.param_groups) == 12
    for k, batch in enumerate(batches):
        _assert_same(g.replay(batch), want[k], f"{backend}, replay {k}")
    assert g.opt.skipped_steps == opt_e.skipped_steps == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_optimizers_two_graphs_and_other_eager_steps_between(backend):
    _need(backend)
    batches_a, batches_b = _batches(7), _batches(8, nan=False)

    def opt_a(model):
        return Amos(_groups(model, 3), backend=backend, capturable=True)

    def opt_b(model):
        return Amos(model.parameters(), lr=0.01, backend=backend, capturable=True, schedule="inverse_time",
                    half_life=5, momentum=0.0)

    want_a, _ = _eager(lambda: _model(0), opt_a, batches_a)
    want_b, _ = _eager(lambda: _model(1, blocks=2), opt_b, batches_b)
    a = Graphed(lambda: _model(0), opt_a, batches_a[0])
    b = Graphed(lambda: _model(1, blocks=2), opt_b, batches_b[0])
    # a third optimizer with 20 groups, stepped eagerly between the replays with new gradient
    # tensors every time: plans and gradient tables come and go around the captured ones
    other = [torch.randn(5, 7, device="cuda", requires_grad=True) for _ in range(20)]
    opt_c = Amos([{"params": [p]} for p in other], backend=backend)
    for k in range(STEPS):
        _assert_same(a.replay(batches_a[k]), want_a[k], f"{backend}, graph a, replay {k}")
        for p in other:
            p.grad = torch.randn_like(p)
        opt_c.step()
        _assert_same(b.replay(batches_b[k]), want_b[k], f"{backend}, graph b, replay {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_steps_with_other_gradients_leave_the_graphs_table_alone(backend):
    _need(backend)
    batches = _batches()

    def make_opt(model):
        return Amos(model.parameters(), lr=0.02, backend=backend, capturable=True)

    want, _ = _eager(lambda: _model(0), make_opt, batches)
    g = Graphed(lambda: _model(0), make_opt, batches[0])
    params = list(g.model.parameters())
    others = []  # kept alive: every eager step has gradients at new addresses
    for k, batch in enumerate(batches):
        # eager steps of the same optimizer with new gradient tensors (each a new gradient table:
        # twice as many over the loop as the cache keeps unpinned), then undone
        saved = [p.detach().clone() for p in params]
        state = {id(p): {key: v.clone() for key, v in g.opt.state[p].items() if torch.is_tensor(v)} for p in params}
        kept = [p.grad for p in params]
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
                others.append(p.grad)
            g.opt.step()
        with torch.no_grad():
            for p, s, grad in zip(params, saved, kept):
                p.copy_(s)
                for key, v in state[id(p)].items():
                    g.opt.state[p][key].copy_(v)
                p.grad = grad
        _assert_same(g.replay(batch), want[k], f"{backend}, replay {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_to_none_inside_the_capture_is_a_clear_error(backend):
    """zero_grad(set_to_none=True) in the captured step makes its backward allocate new gradients,
    whose addresses no eager step has seen: the step refuses to record a graph that would read
    a table built from host memory, and says what to do."""
    _need(backend)
    batches = _batches(nan=False)

    def make_opt(model):
        return Amos(model.parameters(), lr=0.02, backend=backend, capturable=True)

    with pytest.raises(RuntimeError, match=r"never built.*eager step.*set_to_none=False"):
        Graphed(lambda: _model(0), make_opt, batches[0], set_to_none=True)
    # the recipe the message gives works
    want, _ = _eager(lambda: _model(0), make_opt, batches)
    g = Graphed(lambda: _model(0), make_opt, batches[0], set_to_none=False)
    for k, batch in enumerate(batches):
        _assert_same(g.replay(batch), want[k], f"{backend}, replay {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_first_used_at_the_capture(backend):
    """Warm-up without a scaler (guard="slice": no skip verdict, so no skip counter needed yet),
    capture with one: Amos' skip counter exists from the start, so replays add to it instead of
    zero-filling it; the NaN batch is skipped in the graph and counted once."""
    _need(backend)
    batches = _batches()

    def make_opt(model):
        return Amos(model.parameters(), lr=0.02, backend=backend, capturable=True, guard="slice")

    def scaler():
        return torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=1000)

    want, opt_e = _eager(lambda: _model(0), make_opt, batches, scaler=scaler())
    g = Graphed(lambda: _model(0), make_opt, batches[0], scaler=scaler())
    for k, batch in enumerate(batches):
        _assert_same(g.replay(batch), want[k], f"{backend}, replay {k}")
    torch.cuda.synchronize()
    assert g.opt.skipped_steps == opt_e.skipped_steps == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guard", ["step", "slice"])
def test_warnings_arrive_without_a_sync_per_step(backend, guard):
    """The CPU runs ahead of a slowed GPU; steps may not synchronise (sync debug mode "error"),
    and the skip / guarded-slice warning of an early step still comes, a few steps late."""
    _need(backend)
    params = [torch.randn(64, 48, device="cuda"), torch.randn(48, device="cuda")]
    opt = Amos(params, lr=0.01, backend=backend, guard=guard)
    gen = torch.Generator(device="cuda").manual_seed(0)
    expected = "skipped" if guard == "step" else "guard='slice'"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            if step == 2:
                params[0].grad[3, 5] = float("nan")
            if step >= 2:  # after the first steps, which build state, plans and cached vectors
                torch.cuda._sleep(20_000_000)  # the GPU falls behind the CPU
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        opt.step()  # reads every verdict that has arrived
    assert sum(expected in str(w.message) for w in seen) == 1, [str(w.message) for w in seen]
    assert (opt.skipped_steps, opt.guarded_slices) == ((1, 0) if guard == "step" else (0, 1))
