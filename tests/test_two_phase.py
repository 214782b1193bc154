"""The backends' two-phase ops (the sharded step's phase 1 and phase 3) against the reference's.

In one process, with no ranks: each tensor stands for a rank's local part of a sharded tensor,
with `rows` local slices whose global slice length and element count (`slice_lens`, `numels`)
are larger than the local ones, as under tensor parallelism; phase 3 gets complete sums S_r (here
the local sums times a factor, as other ranks would add) and the closed forms' ||u||**2. Cases
cover both families, 16-bit storage, clipping, GradScaler's scale, a guarded slice (S_r NaN or
Inf), an empty local part of a slice held elsewhere, and a skipped step. Runs on CPU tensors
(cpu, triton under the interpreter) and on CUDA when there is a GPU (cuda, triton).
Tolerances: tests/backend_grid.py's (the phase-1 sums differ in order only; phase 3 computes
the same formulas from the same inputs).
"""
import pytest
import torch

from amos_fused import backends, cpp_backend
from backend_grid import _tol, assert_close

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (local shape, local rows, global slice length, global numel) per tensor
TENSORS = [((6, 5), 6, 10, 120), ((7,), 1, 20, 20), ((0,), 1, 9, 9), ((3, 2, 4), 3, 16, 96), ((4, 70),  4, 140, 560),
           ((1, 3), 1, 3, 12)]


def _ops(name):
    if name == "reference":
        return backends.REFERENCE_TWO_PHASE
    if name == "triton":
        from amos_fused import triton_backend as module
    else:
        module = cpp_backend
    return backends.TwoPhase(module.two_phase_sums, module.two_phase_apply)


def _backends():
    out = []
    if cpp_backend.unavailable(DEVICE) is None:
        out.append(DEVICE)
    try:
        import amos_fused.triton_backend  # noqa: F401
        out.append("triton")
    except ImportError:
        pass
    return out


def _case(options, dtypes=(F32, F32), mdt=None, scale=None, poison=False, skip=False):
    return dict(options=options, dtypes=dtypes, mdt=mdt, scale=scale, poison=poison, skip=skip)


CASES = [
    _case(dict(schedule="amos", momentum=0.9)),
    _case(dict(schedule="amos", momentum=0.0, clip_value=0.05, extra_l2=0.01)),
    _case(dict(schedule="inverse_time", half_life=3, momentum=0.9), poison=True),
    _case(dict(schedule="constant", q=2.0, momentum=0.0), scale=1024.0),
    _case(dict(schedule="amos", momentum=0.9), dtypes=(BF16, BF16), mdt=BF16, poison=True),
    _case(dict(schedule="inverse_square", half_life=2, momentum=0.5), dtypes=(F16, F32), mdt=F16),
    _case(dict(schedule="amos", momentum=0.9), skip=True),
    _case(dict(schedule="inverse_time", half_life=3, momentum=0.9), poison=True,  # several launches a call
          dtypes=[(F32, F32), (BF16, BF16), (F16, F32), (F32, BF16), (BF16, F16), (F32, F32)]),
]


def _group(options):
    group = dict(lr=0.05, schedule="amos", half_life=None, q=1.0, beta=0.999, momentum=0.9, momentum_dtype=None,
                 clip_value=None, d_coef=0.25, c_coef=0.25, extra_l2=0.0, eps=2.0**-125, eta=None, granularity="row")
    group.update(options)
    return group


def _inputs(case, device):
    gen = torch.Generator().manual_seed(3)
    dtypes = case["dtypes"] if isinstance(case["dtypes"], list) else [case["dtypes"]] * len(TENSORS)
    momentum = case["options"].get("momentum", 0.9) > 0
    params, grads, states = [], [], []
    for k, ((shape, R, C, n), (pd, gd)) in enumerate(zip(TENSORS, dtypes)):
        params.append((torch.randn(shape, generator=gen) * 0.1).to(device, pd))
        g = torch.randn(shape, generator=gen) * 0.01 * (case["scale"] or 1.0)
        grads.append(g.to(device, gd))
        st = dict(v=torch.rand(R, generator=gen).to(device) * 1e-4, b=torch.rand(R, generator=gen).to(device),
                  step=torch.tensor(float(3 + k), device=device), eta=0.1 + 0.05 * k)
        if momentum:
            st["m"] = (torch.randn(shape, generator=gen) * 1e-3).to(device, case["mdt"] or F32)
        states.append(st)
    return params, grads, states


def _run(name, case, device):
    params, grads, states = _inputs(case, device)
    group = _group(case["options"])
    rows = [R for _, R, _, _ in TENSORS]
    ops = _ops(name)
    scale = torch.tensor(case["scale"], device=device) if case["scale"] else None
    S = ops.sums(grads, rows, group, scale, torch.float32)
    S_complete = S * 1.75  # what the other ranks' parts would add
    if case["poison"]:
        S_complete[2] = float("nan")
        S_complete[-1] = float("inf")
    norms = None
    if group["schedule"] != "amos":
        norms = torch.linspace(0.5, 2.0, len(TENSORS), device=device)
    skip = torch.tensor(1.0 if case["skip"] else 0.0, device=device)
    guarded = torch.zeros((), dtype=torch.int64, device=device)
    ops.apply(params, grads, states, rows, [C for _, _, C, _ in TENSORS], [n for _, _, _, n in TENSORS], S_complete,
              norms, group, scale, skip, guarded)
    return S, params, states, guarded


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c["options"].items())
                         + ("-poison" if c["poison"] else "") + ("-skip" if c["skip"] else "")
                         + ("-mixed" if isinstance(c["dtypes"], list) else f"-{c['dtypes'][0]}".replace("torch.", "")))
def test_two_phase_ops_match_the_reference(backend, case):
    S, params, states, guarded = _run(backend, case, DEVICE)
    S_ref, params_ref, states_ref, guarded_ref = _run("reference", case, DEVICE)
    assert_close(S, S_ref.to(torch.float32), _tol(F32), "phase 1: S")
    assert int(guarded) == int(guarded_ref), f"guarded {int(guarded)} vs {int(guarded_ref)}"
    for i, (p, q, st, sq) in enumerate(zip(params, params_ref, states, states_ref)):
        where = f"tensor {i} {tuple(p.shape)}"
        rtol, atol = _tol(p.dtype)
        assert_close(p, q, (rtol, atol), f"{where}: param")
        for key in ("v", "b"):
            assert_close(st[key], sq[key], _tol(F32), f"{where}: {key}")
        if "m" in sq:
            assert_close(st["m"], sq["m"], _tol(sq["m"].dtype, p.dtype), f"{where}: m")


def test_a_skipped_phase_3_changes_nothing():
    case = next(c for c in CASES if c["skip"])
    params, _, states = _inputs(case, DEVICE)
    _, after, states_after, guarded = _run("reference", case, DEVICE)
    for p, q, st, sq in zip(params, after, states, states_after):
        assert torch.equal(p, q) and all(torch.equal(st[k], sq[k]) for k in ("v", "b", "m"))
    assert int(guarded) == 0
