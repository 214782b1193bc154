"""The launch-plan caches and their CUDA-graph rules, on any machine (capture state injected).

backend="cuda" keeps its plans in csrc/plan_cache.h (run here through the test hook
amos_fused::_plan_cache_trace), backend="triton" in kernels/tables.Cache; both must:
- keep every plan of a training loop with many param groups (no rebuild per step),
- never drop what a CUDA graph capture used (pinned), however many other plans come after,
- build nothing while capturing (a miss raises, with the fix),
- drop plans whose tensors are gone (a process that builds many models keeps none of theirs).
The GPU side (captures replayed against eager steps) is tests/test_graphs.py.
"""
import gc
import warnings

import pytest
import torch

from amos_fused import Amos, cpp_backend

triton = pytest.importorskip("triton")
from amos_fused import triton_backend  # noqa: E402
from amos_fused.kernels import tables  # noqa: E402


# ---- the two caches, driven by one script format ----------------------------------------------
# an operation is (key, mode): mode "get" a lookup, "capture" a lookup while capturing, "kill" the
# tensors of key's entry are gone; results: "found", "built", "refused" (a miss while capturing)
def run_python(keep, script):
    cache, made, out = tables.Cache(keep), {}, []

    class Value:
        dead = False

    for key, mode in script:
        if mode == "kill":
            made[key].dead = True
            continue
        built = []
        value = cache.get(key, mode == "capture", lambda: built.append(1) or Value(), lambda v: v.dead)
        if built:
            made[key] = value
        out.append("refused" if value is None else "built" if built else "found")
    return out, len(cache.entries), len(cache.pinned)


def run_cpp(keep, script):
    codes = {"get": 0, "capture": 1, "kill": 2}
    res = torch.ops.amos_fused._plan_cache_trace(keep, [4 * key + codes[mode] for key, mode in script])
    names = {0: "found", 1: "built", 2: "refused"}
    return [names[r] for r in res[:-2] if r != 3], res[-2], res[-1]


CACHES = [pytest.param(run_python, id="triton")]
if cpp_backend._C is not None:
    CACHES.append(pytest.param(run_cpp, id="cuda"))


@pytest.mark.parametrize("run", CACHES)
def test_twenty_groups_are_built_once_then_found(run):
    steps = [(group, "get") for _ in range(5) for group in range(20)]
    out, size, pinned = run(256, steps)
    assert out[:20] == ["built"] * 20 and out[20:] == ["found"] * 80, out
    assert (size, pinned) == (20, 0)


@pytest.mark.parametrize("run", CACHES)
def test_least_recently_used_goes_past_keep(run):
    out, size, _ = run(2, [(0, "get"), (1, "get"), (0, "get"), (2, "get"), (0, "get"), (1, "get")])
    assert out == ["built", "built", "found", "built", "found", "built"]  # 2 evicted 1, 1 evicted 2
    assert size == 2


@pytest.mark.parametrize("run", CACHES)
def test_what_a_capture_used_is_never_dropped(run):
    warm = [(0, "get"), (1, "get")]
    capture = [(0, "capture"), (1, "capture")]
    others = [(k, "get") for k in range(10, 40)]  # many more plans than keep, and their tensors die
    kills = [(k, "kill") for k in (0, 1)]  # even when its tensors are gone (the graph holds them)
    out, size, pinned = run(4, warm + capture + others + kills + [(50, "get")] + capture)
    assert out[2:4] == ["found", "found"]
    assert out[-2:] == ["found", "found"], "a captured plan was dropped: the graph would read freed memory"
    assert pinned == 2 and size == 2 + 4


@pytest.mark.parametrize("run", CACHES)
def test_a_miss_while_capturing_builds_nothing(run):
    out, size, pinned = run(4, [(0, "get"), (1, "capture"), (0, "capture"), (1, "capture")])
    assert out == ["built", "refused", "found", "refused"]
    assert (size, pinned) == (1, 1)


@pytest.mark.parametrize("run", CACHES)
def test_plans_of_dead_tensors_are_dropped_at_the_next_miss(run):
    # a key found again means new tensors at the very addresses: the plan is right for them
    out, size, _ = run(256, [(0, "get"), (1, "get"), (2, "get"), (0, "kill"), (1, "kill"), (1, "get")])
    assert out == ["built", "built", "built", "found"] and size == 3
    out, size, _ = run(256, [(0, "get"), (1, "get"), (2, "get"), (0, "kill"), (1, "kill"), (3, "get")])
    assert out == ["built"] * 4 and size == 2  # the miss dropped 0 and 1


# ---- the Triton backend with the capture state injected -----------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3 + i % 4, 5, generator=gen).to(DEVICE).requires_grad_() for i in range(n)]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)


def _count_builds(monkeypatch):
    built = []

    class Counting(tables.Plan):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tables, "Plan", Counting)
    tables.clear_cache()
    return built


def test_forty_groups_and_two_optimizers_build_their_plans_once(monkeypatch):
    built = _count_builds(monkeypatch)
    a, b = _params(40), _params(3, seed=1)  # more groups than the old caches held (8 cuda, 32 triton)
    opt_a = Amos([{"params": [p], "lr": 0.01 * (i + 1)} for i, p in enumerate(a)], backend="triton")
    opt_b = Amos(b, backend="triton")
    for step in range(2):
        _grads(a, step)  # new gradient tensors every step (zero_grad(set_to_none=True))
        _grads(b, step)
        opt_a.step()
        opt_b.step()
    assert len(built) == 41, "40 groups and a second optimizer: one plan each, built at the first step only"


def test_capture_pins_and_a_miss_while_capturing_raises(monkeypatch):
    built = _count_builds(monkeypatch)
    params = _params(4)
    opt = Amos(params, backend="triton", capturable=True)
    _grads(params, 0)
    with pytest.raises(RuntimeError, match="never built.*eager step.*set_to_none=False"):
        with monkeypatch.context() as m:  # capturing before any eager step: no plan yet
            m.setattr(tables, "capturing", lambda device: True)
            opt.step()
    assert built == [] and not tables._PLANS.entries
    opt.step()  # the warm-up
    plan = next(iter(tables._PLANS.entries.values()))
    captured = tuple(p.grad.data_ptr() for p in params)
    with monkeypatch.context() as m:
        m.setattr(tables, "capturing", lambda device: True)
        opt.step()  # found: pinned, with its gradient table
        assert len(tables._PLANS.pinned) == 1 and plan.g_tables.pinned == {captured}
        kept = [p.grad for p in params]
        _grads(params, 1)  # set_to_none=True: the backward inside the capture makes new gradients
        with pytest.raises(RuntimeError, match="gradient table of this step was never built"):
            opt.step()
    tables_before = dict(plan.g_tables.entries)
    for seed in range(2, 14):  # eager steps with other gradients: new tables, the captured one stays
        _grads(params, seed)
        opt.step()
    assert captured in plan.g_tables.entries and plan.g_tables.entries[captured] is tables_before[captured]
    assert len(plan.g_tables.entries) == tables.KEEP_GRAD_TABLES + 1
    for p, g in zip(params, kept):
        p.grad = g
    with monkeypatch.context() as m:
        m.setattr(tables, "capturing", lambda device: True)
        opt.step()  # the captured gradients again: found
    assert len(built) == 1


def test_plans_of_a_dropped_model_are_freed(monkeypatch):
    _count_builds(monkeypatch)
    for seed in range(3):
        params = _params(2, seed)
        opt = Amos(params, backend="triton")
        _grads(params, seed)
        opt.step()
        del params, opt
        gc.collect()
    assert len(tables._PLANS.entries) == 1, "the plans of the dead models were not dropped"


def test_a_cpu_tensor_lr_is_read_on_the_host_beside_cuda_parameters():
    group = dict(lr=torch.tensor(0.05), beta=0.999, eps=1e-8, c_coef=0.25, d_coef=0.25, extra_l2=0.0, q=1.0,
                 half_life=None, momentum=0.9, clip_value=None)
    on_cuda = triton_backend._scalars(group, torch.device("cuda"))  # builds nothing on the device
    assert not on_cuda["LR_IS_PTR"] and on_cuda["lr_ptr"] is None
    assert on_cuda["lr"] == torch.tensor(0.05).item()  # the fp32 value
    on_cpu = triton_backend._scalars(group, torch.device("cpu"))  # the interpreter reads it in place
    assert on_cpu["LR_IS_PTR"] and on_cpu["lr_ptr"].data_ptr() == group["lr"].data_ptr()


# ---- the optimizer's side: counters made up front, every verdict read ---------------------------
def test_capturable_makes_its_counters_with_the_optimizer():
    params = _params(2)
    opt = Amos(params, backend="reference" if DEVICE == "cpu" else "auto", capturable=True, guard="slice")
    device = params[0].device
    assert set(opt._skipped_on) == {device} and set(opt._guarded_on) == {device}
    counters = (opt._skipped_on[device], opt._guarded_on[device])
    opt.add_param_group({"params": _params(1, seed=3)})
    _grads([p for g in opt.param_groups for p in g["params"]], 0)
    opt.step()
    assert (opt._skipped_on[device], opt._guarded_on[device]) == counters  # the same tensors
    assert not Amos(_params(1), capturable=False)._skipped_on  # without capturable: made when needed


class _Event:
    def __init__(self, done):
        self.done = done

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def _verdict(skip, guarded):
    return torch.tensor(float(skip)), torch.tensor(guarded)


def test_every_pending_verdict_is_read_in_order():
    """A CPU running ahead of the GPU queues a verdict per step; each is read once it has arrived
    (a later one arriving first does not replace or skip an earlier one)."""
    opt = Amos(_params(1), backend="reference")
    first, second = _Event(False), _Event(True)
    opt._notices.pending.append((first, *_verdict(True, 0), False))  # the skip: still in flight
    opt._notices.pending.append((second, *_verdict(False, 0), False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt._notices.check_pending()  # the oldest has not arrived: nothing is read, nothing is lost
    assert len(opt._notices.pending) == 2
    first.done = True
    with pytest.warns(UserWarning, match="skipped"):
        opt._notices.check_pending()
    assert not opt._notices.pending
    opt._notices.pending.append((_Event(True), *_verdict(False, 3), False))
    with pytest.warns(UserWarning, match="3 slice"):
        opt._notices.check_pending()
    opt._notices.pending.append((_Event(True), *_verdict(True, 0), True))  # a GradScaler skip: no warning
    opt._notices.warned_nonfinite = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt._notices.check_pending()


def test_a_long_queue_waits_for_its_oldest_verdict():
    from amos_fused import verdict

    opt = Amos(_params(1), backend="reference")
    events = [_Event(False) for _ in range(verdict.MAX_PENDING)]
    for e in events:
        opt._notices.pending.append((e, *_verdict(False, 0), False))
    opt._notices.check_pending()
    assert events[0].done and len(opt._notices.pending) == verdict.MAX_PENDING - 1
