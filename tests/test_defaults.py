"""The rules for options left out (amos_fused/defaults.py, docs/defaults.md): eta, lr and its
total_steps schedule, momentum storage, the guard; what is stored, what a resumed run reads back,
and that anything the user gives is used exactly."""
import copy
import math
import pickle
import warnings

import pytest
import torch

from amos_fused import DEFAULT_LR, Amos, TotalStepsLR, defaults


# ---- eta ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,expected", [
    ((256, 128), math.sqrt(2 / 128)),  # a Linear weight or an embedding table: C = 128
    ((16, 8, 3, 3), math.sqrt(2 / 72)),  # conv: C = in * kh * kw
    ((4, 5), math.sqrt(2 / 5)),
    ((4, 0), 1.0),  # no elements
    ((7,), 0.5), ((), 0.5),  # vectors and scalars: the official 0.5
])
def test_eta_rule(shape, expected):
    assert defaults.eta(shape) == pytest.approx(expected, rel=1e-12)


def test_eta_ignores_the_initial_weights_and_a_resumed_run_keeps_the_saved_one():
    def two(scale):  # torch's N(0, 1) embedding and a matrix at `scale`
        gen = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(50, 32, generator=gen)),
                torch.nn.Parameter(torch.randn(32, 32, generator=gen) * scale)]

    for scale in (0.0, 0.02, 0.22, 3.0):
        opt = Amos(two(scale))
        assert [st["eta"] for st in opt.state.values()] == pytest.approx([math.sqrt(2 / 32)] * 2, rel=1e-12)
    saved = copy.deepcopy(opt.state_dict())
    for st in saved["state"].values():
        st["eta"] = 0.0123  # a checkpoint whose eta came from another rule (or an earlier version)
    fresh = Amos(two(1.0))
    fresh.load_state_dict(saved)
    assert [st["eta"] for st in fresh.state.values()] == [0.0123] * 2


def test_given_eta_and_eta_fn_are_used_exactly():
    emb = torch.nn.Parameter(torch.randn(50, 32))
    w = torch.nn.Parameter(torch.randn(32, 32) * 0.01)
    opt = Amos([{"params": [("emb", emb)], "eta": 1.0}, {"params": [("w", w)]}],
               eta_fn=lambda n, p: 0.0123 if n == "w" else None)
    assert opt.state[emb]["eta"] == 1.0 and opt.state[w]["eta"] == 0.0123


# ---- lr and total_steps -----------------------------------------------------------------------------

M = 2  # the matrices of _model(): the lr rule's M


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _steps(model, opt, n, start=0):
    lrs = []
    for t in range(start, start + n):
        gen = torch.Generator().manual_seed(100 + t)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def anytime(steps, peak=0.1375, warmup=defaults.ANYTIME_WARMUP):
    """The lr of the first `steps` steps without total_steps: a linear warmup, then peak * sqrt(W/t)."""
    return [peak * min(t / warmup, math.sqrt(warmup / t)) for t in range(1, steps + 1)]


def test_lr_without_total_steps_anneals_without_a_run_length_and_given_lr_is_kept():
    for schedule in DEFAULT_LR:  # the closed forms: their constant
        extra = {"half_life": 10} if schedule in ("inverse_time", "inverse_square") else {}
        opt = Amos(_model().parameters(), schedule=schedule, **extra)
        assert opt.param_groups[0]["lr"] == DEFAULT_LR[schedule] and defaults.SCHEDULE_KEY not in opt.param_groups[0]
    assert "amos" not in DEFAULT_LR  # "amos": the peak by the model's matrices, as the total_steps peak's rule
    model = _model()
    opt = Amos(model.parameters())
    assert opt.param_groups[0]["lr"] == defaults.lr("amos", None, M) == 0.1375  # 0.275 / 2: the peak, before a step
    assert opt.param_groups[0][defaults.SCHEDULE_KEY] == (0.1375, None, 0, None, 200)
    assert opt.param_groups[0]["beta"] == defaults.beta(scheduled=True)
    before = [p.detach().clone() for p in model.parameters()]
    lrs = _steps(model, opt, 3) + _steps(model, opt, 797, start=3)
    assert lrs == pytest.approx(anytime(800), rel=1e-12)
    assert lrs[199] == pytest.approx(0.1375) and lrs[799] == pytest.approx(0.1375 / 2)  # the peak, then half at 4W
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model = _model()
    opt = Amos(model.parameters(), lr=0.0042)  # given: exactly that lr, no schedule, the official beta
    assert _steps(model, opt, 3) == [0.0042] * 3 and opt.param_groups[0]["beta"] == 0.999
    assert defaults.SCHEDULE_KEY not in opt.param_groups[0]
    opt = Amos(model.parameters(), lr=0.0042, total_steps=100)  # given with total_steps: the same
    assert _steps(model, opt, 3) == [0.0042] * 3


def test_without_total_steps_an_lr_scheduler_or_your_lr_takes_over():
    """The schedule without a run length is a default, not a request: a scheduler attached before
    the first step starts from the peak and rules alone; an lr written later is kept from then on."""
    model = _model()
    opt = Amos(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    lrs = []
    for t in range(4):
        lrs += _steps(model, opt, 1, start=t)
        sched.step()
    assert lrs == [0.1375 * 0.5 ** k for k in range(4)] and opt.param_groups[0][defaults.SCHEDULE_KEY] is None
    for written in ("lr", "plateau"):
        model = _model()
        opt = Amos(model.parameters())
        _steps(model, opt, 5)
        if written == "lr":
            opt.param_groups[0]["lr"] = 0.003
        else:
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
            plateau.step(1.0), plateau.step(2.0)  # no better: the lr falls tenfold
        set_to = opt.param_groups[0]["lr"]
        assert _steps(model, opt, 3, start=5) == [set_to] * 3 and opt.param_groups[0][defaults.SCHEDULE_KEY] is None
    assert set_to == pytest.approx(anytime(5)[-1] * 0.1)


def test_without_total_steps_a_resumed_run_continues_the_schedule_and_old_checkpoints_keep_their_lr():
    model = _model()
    opt = Amos(model.parameters())
    _steps(model, opt, 250)
    saved = copy.deepcopy(opt.state_dict())
    resumed = Amos(model.parameters())
    resumed.load_state_dict(saved)
    assert _steps(model, resumed, 3, start=250) == pytest.approx(anytime(253)[250:], rel=1e-12)
    for group in saved["param_groups"]:  # saved by a version without the schedule: its constant lr
        del group[defaults.SCHEDULE_KEY]
        group["lr"] = 0.1375
    resumed = Amos(model.parameters())
    resumed.load_state_dict(saved)
    assert _steps(model, resumed, 3, start=250) == [0.1375] * 3


def test_capturable_without_total_steps_keeps_a_constant_lr():
    opt = Amos(_model().parameters(), capturable=True)  # a captured graph would freeze a host schedule
    assert defaults.SCHEDULE_KEY not in opt.param_groups[0]
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1375)
    assert opt.param_groups[0]["beta"] == 0.999


@pytest.mark.parametrize("total", [1, 20, 1000, 10_000, 300_000])
def test_total_steps_schedule_warmup_stable_then_linear_decay_to_zero(total):
    peak = defaults.lr("amos", total, M)
    assert peak == pytest.approx(min(0.275 / M, 0.15, 3 / math.sqrt(total)), rel=1e-12)
    factors = [defaults.lr_factor(k, total) for k in range(total + 2)]
    warmup, cooldown = max(1, round(0.2 * total)), max(1, round(0.3 * total))
    assert factors[:warmup] == pytest.approx([(k + 1) / warmup for k in range(warmup)])
    assert max(factors) == 1.0 and factors[warmup - 1] == 1.0
    stable = factors[warmup - 1:total - cooldown + 1]  # the peak from 20 % until the last 30 % of the run
    assert stable == [1.0] * len(stable)
    cool = factors[total - cooldown:total + 1]  # then a straight line to 0 at total_steps
    assert cool == pytest.approx([(cooldown - k) / cooldown for k in range(cooldown + 1)], abs=1e-12)
    assert factors[total - 1] > 0 and factors[total] == 0 and factors[total + 1] == 0


def test_the_lr_and_the_total_steps_peak_fall_with_the_models_matrices():
    def peak(params, total=1000):
        return Amos(params, total_steps=total).param_groups[0][defaults.SCHEDULE_KEY][0]

    def constant(params):
        return Amos(params).param_groups[0]["lr"]

    def layers(n, width=8):  # n matrices and n biases
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n)])

    for n in (1, 2, 3, 4, 11, 100):
        assert peak(layers(n).parameters(), total=100) == pytest.approx(min(0.275 / n, 0.15), rel=1e-12)
        assert constant(layers(n).parameters()) == pytest.approx(min(0.275 / n, 0.15), rel=1e-12)
    assert constant(layers(3).parameters()) == pytest.approx(0.275 / 3)  # no total_steps: no 3/sqrt(N) cap
    assert peak(layers(11).parameters()) == pytest.approx(0.025)  # the quality suite's transformer
    assert peak(layers(3).parameters()) == pytest.approx(0.275 / 3)  # its CNN
    assert peak(layers(3).parameters(), total=10_000) == pytest.approx(0.03)  # a long run's cap, 3/sqrt(N)
    assert peak([torch.nn.Parameter(torch.ones(4))], total=100) == 0.15  # no matrix: M = 1, the largest peak
    # M counts every group given to the constructor: a split into matrices and vectors (generators
    # read once), named parameters and a single group all get the peak of the whole model
    model = layers(4)
    split = Amos([{"params": (p for p in model.parameters() if p.ndim == 2)},
                  {"params": (p for p in model.parameters() if p.ndim < 2)}], total_steps=100)
    assert [len(g["params"]) for g in split.param_groups] == [4, 4]
    assert [g[defaults.SCHEDULE_KEY][0] for g in split.param_groups] == [0.275 / 4] * 2
    assert peak(model.named_parameters(), total=100) == 0.275 / 4
    # a group added later counts the matrices of every group once it is in, and keeps the others' peak
    split.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 3)) for _ in range(5)]})
    assert [g[defaults.SCHEDULE_KEY][0] for g in split.param_groups] == [0.275 / 4] * 2 + [pytest.approx(0.275 / 9)]
    plain = Amos([{"params": (p for p in model.parameters() if p.ndim == 2)},  # the same without total_steps
                  {"params": (p for p in model.parameters() if p.ndim < 2)}])
    plain.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 3)) for _ in range(5)]})
    assert [g["lr"] for g in plain.param_groups] == [0.275 / 4] * 2 + [pytest.approx(0.275 / 9)]
    # a resumed run reads the peak back, whatever model it is loaded into
    state = split.state_dict()
    resumed = Amos([{"params": g["params"]} for g in split.param_groups], total_steps=100)
    assert [g[defaults.SCHEDULE_KEY][0] for g in resumed.param_groups] == [pytest.approx(0.275 / 9)] * 3  # M = 9
    resumed.load_state_dict(state)
    assert [g[defaults.SCHEDULE_KEY][0] for g in resumed.param_groups] == [0.275 / 4] * 2 + [pytest.approx(0.275 / 9)]


def test_total_steps_sets_the_lr_of_every_step_and_a_resumed_run_continues_it():
    model = _model()
    opt = Amos(model.parameters(), total_steps=40)
    peak = defaults.lr("amos", 40, M)
    assert opt.param_groups[0]["lr"] == peak * defaults.lr_factor(0, 40)  # read before the first step: its lr
    lrs = _steps(model, opt, 25)
    assert lrs == pytest.approx([peak * defaults.lr_factor(k, 40) for k in range(25)], rel=1e-12)
    saved = copy.deepcopy(opt.state_dict())
    rest = _steps(model, opt, 10, start=25)

    resumed_model = _model()
    with torch.no_grad():
        for p, q in zip(resumed_model.parameters(), model.parameters()):
            p.copy_(q)  # any weights: only the lr trajectory is compared here
    resumed = Amos(resumed_model.parameters(), total_steps=40)
    resumed.load_state_dict(saved)
    assert _steps(resumed_model, resumed, 10, start=25) == rest


@pytest.mark.parametrize("fields", [3, 4])
def test_a_schedule_saved_by_an_earlier_version_resumes_that_schedule(fields):
    # entries of three (peak, N, steps taken) decayed linearly over the whole run after a 5 %
    # warmup; entries of four (... , cooldown) held the peak until the cooldown after a 5 % warmup.
    # A run saved with one resumes that schedule, not this version's, and without an error.
    model = _model()
    opt = Amos(model.parameters(), total_steps=40)
    _steps(model, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    peak, warmup = defaults.lr("amos", 40, M), round(0.05 * 40)
    if fields == 3:
        older = [peak * ((k + 1) / warmup if k < warmup else (40 - k) / (40 - warmup)) for k in range(41)]
    else:
        older = [peak * min(1.0, (k + 1) / warmup, (40 - k) / 12) for k in range(41)]  # cooldown: 30 % of 40
    entry = (peak, 40, 1, 0.3)[:fields]
    saved["param_groups"][0][defaults.SCHEDULE_KEY] = entry
    saved["param_groups"][0]["lr"] = older[0]  # the lr the older schedule set for step 1
    resumed = Amos(model.parameters(), total_steps=40)
    resumed.load_state_dict(saved)
    assert _steps(model, resumed, 39, start=1) == pytest.approx(older[1:40], rel=1e-12)
    assert resumed.param_groups[0][defaults.SCHEDULE_KEY] == (peak, 40, 40, 0.3)[:fields]


def test_beta_is_the_official_one_unless_the_lr_follows_a_schedule_of_the_rules():
    assert Amos(_model().parameters()).param_groups[0]["beta"] == defaults.SCHEDULED_BETA  # without total_steps too
    assert Amos(_model().parameters(), lr=0.01).param_groups[0]["beta"] == defaults.BETA == 0.999
    scheduled = Amos(_model().parameters(), total_steps=100)
    assert scheduled.param_groups[0]["beta"] == defaults.SCHEDULED_BETA == 0.95
    assert Amos(_model().parameters(), total_steps=100, beta=0.99).param_groups[0]["beta"] == 0.99  # given: kept
    assert Amos(_model().parameters(), lr=0.01, total_steps=100).param_groups[0]["beta"] == 0.999  # no schedule
    closed = Amos(_model().parameters(), schedule="inverse_time", half_life=5, total_steps=100)
    assert closed.param_groups[0]["beta"] == 0.999
    model = _model()
    opt = Amos([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5},
                {"params": [torch.nn.Parameter(torch.ones(2))], "beta": 0.9}], total_steps=100)
    assert [g["beta"] for g in opt.param_groups] == [0.95, 0.999, 0.9]
    scheduled.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})  # follows total_steps too
    assert scheduled.param_groups[1]["beta"] == 0.95 and scheduled.defaults["beta"] is None
    # a resumed run reads the saved beta back: a checkpoint from before the rule keeps its 0.999
    model = _model()
    saved = Amos(model.parameters(), total_steps=100)
    _steps(model, saved, 2)
    state = copy.deepcopy(saved.state_dict())
    state["param_groups"][0]["beta"] = 0.999
    resumed = Amos(model.parameters(), total_steps=100)
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["beta"] == 0.999


def test_total_steps_leaves_closed_forms_and_given_lrs_alone():
    model = _model()
    opt = Amos([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}],
               schedule="inverse_time", half_life=5, total_steps=30)
    assert [g["lr"] for g in opt.param_groups] == [DEFAULT_LR["inverse_time"], 0.5]
    assert all(defaults.SCHEDULE_KEY not in g for g in opt.param_groups)
    opt = Amos([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], total_steps=30)
    assert defaults.SCHEDULE_KEY in opt.param_groups[0] and defaults.SCHEDULE_KEY not in opt.param_groups[1]
    assert _steps(model, opt, 3) == pytest.approx([defaults.lr("amos", 30, M) * defaults.lr_factor(k, 30)
                                                   for k in range(3)])
    assert opt.param_groups[1]["lr"] == 0.5


def test_past_total_steps_the_lr_is_zero_and_a_warning_says_so():
    model = _model()
    opt = Amos(model.parameters(), total_steps=4, momentum=0.0)  # momentum would coast on
    _steps(model, opt, 4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="total_steps=4"):
        _steps(model, opt, 1, start=4)
    assert opt.param_groups[0]["lr"] == 0.0
    # lr 0: Amos's update and decay both scale with lr, so nothing moves
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100", float("nan"), 1e4])
def test_bad_total_steps_raises_naming_it(bad):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"total_steps=.*whole number >= 1"):
        Amos(model.parameters(), total_steps=bad)
    with pytest.raises(ValueError, match="total_steps"):
        defaults.lr("amos", bad, M)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_total_steps_with_an_lr_scheduler_raises_before_anything_changes():
    model = _model()
    opt = Amos(model.parameters(), total_steps=10)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="LR scheduler"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all("v" not in opt.state[p] for p in model.parameters())
    assert opt.param_groups[0][defaults.SCHEDULE_KEY][2] == 0  # no step counted


def test_total_steps_lr_reports_the_coming_steps_lr_and_never_writes_it():
    """TotalStepsLR, the stand-in scheduler for frameworks that want one: after every step it
    reports the lr the next step() will use (as torch's schedulers do), a group with its own lr
    reports that lr, and stepping it or loading its state changes nothing."""
    model = _model()
    opt = Amos([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.005}], total_steps=10)
    sched = TotalStepsLR(opt)
    assert not any("initial_lr" in g for g in opt.param_groups)  # a torch scheduler's mark, which would raise
    reported = [sched.get_last_lr()]
    for t in range(10):
        used = _steps(model, opt, 1, start=t)
        assert used == reported[-1][:1]  # the reported lr is the one the step used
        assert opt.param_groups[1]["lr"] == 0.005
        sched.step()
        sched.load_state_dict(sched.state_dict())
        reported.append(sched.get_last_lr())
    peak = opt.param_groups[0][defaults.SCHEDULE_KEY][0]
    assert [r[0] for r in reported] == pytest.approx([peak * defaults.lr_factor(t, 10) for t in range(11)])
    assert reported[-1] == [0.0, 0.005] and sched.state_dict() == {}
    with pytest.raises(TypeError, match="not an optimizer"):
        TotalStepsLR(model)


def test_total_steps_with_capturable_raises():
    with pytest.raises(ValueError, match="capturable"):
        Amos(_model().parameters(), total_steps=10, capturable=True)
    Amos(_model().parameters(), lr=0.01, total_steps=10, capturable=True)  # a given lr: no schedule, fine


# ---- momentum storage and the guard -------------------------------------------------------------------

@pytest.mark.parametrize("dtype,expected", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                            (torch.float16, torch.bfloat16), (torch.float64, torch.float64)])
def test_momentum_is_stored_in_bf16_by_default_fp64_in_fp64(dtype, expected):
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=dtype))
    p.grad = torch.randn(4, 3, dtype=dtype)
    opt = Amos([p], lr=0.1)
    opt.step()
    assert opt.state[p]["m"].dtype == expected
    q = torch.nn.Parameter(torch.randn(4, 3, dtype=dtype))
    q.grad = torch.randn(4, 3, dtype=dtype)
    opt = Amos([q], lr=0.1, momentum_dtype=None)  # None: the compute dtype, as before
    opt.step()
    assert opt.state[q]["m"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_default_guard_is_slice():
    p = torch.nn.Parameter(torch.ones(3, 4))
    opt = Amos([p], lr=0.1)
    assert opt.guard == "slice"
    p.grad = torch.full((3, 4), 0.5)
    p.grad[1, 2] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert opt.guarded_slices == 1 and opt.skipped_steps == 0
    assert torch.equal(p[1], torch.ones(4)) and not torch.equal(p[0], torch.ones(4))
    assert p.isfinite().all() and all(v.isfinite().all() for v in opt.state[p].values() if torch.is_tensor(v))


def test_copies_keep_total_steps_and_continue_the_schedule():
    model = _model()
    opt = Amos(model.parameters(), total_steps=30)
    _steps(model, opt, 4)
    assert "total_steps=30" in repr(opt)
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.total_steps == 30
        assert twin.param_groups[0][defaults.SCHEDULE_KEY] == opt.param_groups[0][defaults.SCHEDULE_KEY]
        params = [p for g in twin.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.ones_like(p)
        twin.step()
        assert twin.param_groups[0]["lr"] == pytest.approx(defaults.lr("amos", 30, M) * defaults.lr_factor(4, 30))
        twin.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})  # a new group follows total_steps too
        assert twin.param_groups[1][defaults.SCHEDULE_KEY] == defaults.lr_schedule("amos", 30, M)


def test_total_steps_in_a_param_group_sets_that_groups_schedule_and_is_checked():
    model = _model()
    opt = Amos([{"params": model[0].parameters(), "total_steps": 20}, {"params": model[2].parameters()}],
               total_steps=40)
    assert opt.param_groups[0][defaults.SCHEDULE_KEY] == defaults.lr_schedule("amos", 20, M)
    assert opt.param_groups[1][defaults.SCHEDULE_KEY] == defaults.lr_schedule("amos", 40, M)
    assert defaults.lr_schedule("amos", 20, M) == (defaults.lr("amos", 20, M), 20, 0, defaults.COOLDOWN_FRACTION,
                                                defaults.WARMUP_FRACTION)
    assert all("total_steps" not in g for g in opt.param_groups)  # kept in the schedule, not as an option
    opt = Amos([{"params": model.parameters(), "total_steps": 20}])  # without an optimizer-wide one
    assert opt.param_groups[0][defaults.SCHEDULE_KEY] == defaults.lr_schedule("amos", 20, M)
    for bad in (0, 2.5, "100"):
        with pytest.raises(ValueError, match=r"param group 0: total_steps=.*whole number >= 1"):
            Amos([{"params": _model().parameters(), "total_steps": bad}])
        opt = Amos(model[0].parameters(), total_steps=10)
        with pytest.raises(ValueError, match=r"param group 1: total_steps="):
            opt.add_param_group({"params": model[2].parameters(), "total_steps": bad})
        assert len(opt.param_groups) == 1 and len(opt.state) == 2  # nothing added


@pytest.mark.parametrize("writer", ["plateau", "by hand"])
def test_an_lr_written_over_the_total_steps_schedule_raises_before_anything_changes(writer):
    # ReduceLROnPlateau leaves no mark on the groups (no 'initial_lr'): the schedule would overwrite its lr
    model = _model()
    opt = Amos(model.parameters(), total_steps=10)
    _steps(model, opt, 2)
    if writer == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
        plateau.step(1.0)
        plateau.step(1.0)  # no better: the lr is cut by 10
    else:
        opt.param_groups[0]["lr"] = 1e-4
    written = opt.param_groups[0]["lr"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="LR scheduler"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    fresh = defaults.lr_schedule("amos", 10, M)
    assert opt.param_groups[0][defaults.SCHEDULE_KEY] == (*fresh[:2], 2, *fresh[3:])  # two steps taken
    assert opt.param_groups[0]["lr"] == written
    assert all(torch.equal(opt.state[p]["step"], s["step"]) for p, s in zip(model.parameters(), state["state"].values()))


def test_a_step_that_raises_leaves_the_schedule_resumable():
    model = _model()
    opt = Amos(model.parameters(), total_steps=10)
    _steps(model, opt, 2)
    opt.param_groups[0]["beta"] = 2.0  # bad input: the step raises
    with pytest.raises(ValueError, match="beta"):
        _steps(model, opt, 1, start=2)
    opt.param_groups[0]["beta"] = 0.999
    assert _steps(model, opt, 1, start=2) == [defaults.lr("amos", 10, M) * defaults.lr_factor(2, 10)]
