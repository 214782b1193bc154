"""The grid every fused backend is tested on against the reference path.

Usage in a backend's test file:

    from backend_grid import CASES, assert_matches_reference

    @pytest.mark.parametrize("case", CASES)
    def test_matches_reference(case):
        assert_matches_reference("triton", case)

A case is a dict: `shapes` (list of shapes), `dtypes` ((param dtype, grad dtype) per tensor, or one
pair for all), `options` (Amos keyword options), `scaler` (None, "finite" or "inf": GradScaler's
fused protocol, grads scaled by 2**10 and `grad_scale`/`found_inf` set as GradScaler does) and
`steps` (>= 5) and `poison` (True: at steps 2 and 4 some slices of some gradients get NaN, Inf or
a finite value whose square overflows fp32; for options with guard="slice", where only those slices
keep their values and `guarded_slices` counts them). Params, grads and every state entry are compared after EVERY step, so a failure
names the first step that diverged.

Tolerances (per stored dtype, |actual - expected| <= rtol * |expected| + atol):
- fp32: the backends reorder the one reduction S_r = sum g*g (blocks, splits, threads). In fp32 a
  sum of C terms has relative error ~sqrt(C)*2**-24 typically and C*2**-24 at worst; C <= ~5000 in
  the grid gives ~3e-6 typical. K_r goes with sqrt(1/S) (half that error), and everything else is
  element-wise with the same formula, so 1e-5 relative covers the reordering with margin while a
  wrong formula (off by any coefficient, a missed clip, a wrong slice) is off by >= 1e-3.
- bf16 / fp16 storage: both paths round the same fp32 value with RTNE, so results are identical
  unless the fp32 values straddle a rounding boundary; then they differ by one unit in the last place
  (ulp), and later steps can add at most another such flip. So 2 ulps: rtol 2**-7 for bf16 (8-bit
  significand), 2**-10 for fp16 (11-bit), with an atol of one ulp at the magnitude of the smallest
  values we generate (~1e-3), i.e. 2**-17 and 2**-20.
- Rounding itself is checked too: a boundary straddle is rare (probability ~ fp32 error / ulp, about
  1e-5 / 2**-8 < 0.3% of elements), while a wrong rounding mode (truncation instead of RTNE) changes
  about half of them. So at most 1% (+2) of the elements of a 16-bit tensor may differ at all.
- v and b are fp32 and depend only on the gradients (identical inputs) and lr/eta: fp32 tolerance.
- m holds -D*theta, so it inherits theta's rounding flips (scaled by D < 1): it gets the looser of
  its own dtype's and the parameter dtype's tolerance.
- The converse: theta moves by m, and the next step starts from the STORED (rounded) m. A 16-bit m
  that flipped by one ulp at step k moves theta by momentum * ulp at step k+1, momentum**2 * ulp at
  k+2, ...: at most (steps so far) * momentum * ulp(m). So a parameter whose m is 16-bit also gets
  that absolute term, with ulp(m) <= rtol(m dtype) * max|m| (a value far below what any wrong
  formula moves theta by, and the flip count above still pins m's rounding itself). m carries its
  own flip the same way (m_k+1 = momentum * m_k + ...), so it gets the same absolute term: seen in
  "guard-bf16-clip", where a one-ulp flip of a bf16 m at step 2 was still 0.81 ulp at step 4 on an
  element whose m had meanwhile passed near zero (relative tolerance alone: 2**-7 of a tiny |m|).
"""
import itertools

import pytest
import torch

from amos_fused import Amos

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: (1e-5, 1e-7), BF16: (2.0**-7, 2.0**-17), F16: (2.0**-10, 2.0**-20)}
SCALE = 2.0**10  # GradScaler-like scale: a power of two, so scaling is exact

MIX = [(), (7,), (3, 5), (1, 1), (5, 4097), (4, 3, 3, 3), (0,), (0, 5), (2, 0)]
MANY_SMALL = [(1 + i % 13,) for i in range(150)] + [(2 + i % 5, 3) for i in range(50)]
LONG_ROW = [(70000,)]
# rows of 2048-4096 (the kernels' vector loads and next-row prefetch; 2050 and 4097 are not
# 4-aligned) beside small odd shapes
WIDE = [(12, 2048), (6, 3072), (4, 4096), (3, 2050), (2, 4097), (3, 5), (7,), (1, 1), (5, 33)]


def _case(shapes, options, dtypes=(F32, F32), scaler=None, steps=5, tag="", poison=False):
    return dict(shapes=shapes, options=options, dtypes=dtypes, scaler=scaler, steps=steps, tag=tag, poison=poison)


def _cases():
    out = []
    # every granularity x family x momentum, fp32, mixed shapes
    for gran, sched, mom in itertools.product(("row", "tensor", "element"), ("amos", "inverse_time"), (0.0, 0.9)):
        opts = dict(granularity=gran, schedule=sched, momentum=mom)
        if sched == "inverse_time":
            opts["half_life"] = 3
        out.append(_case(MIX, opts, tag=f"{gran}-{sched}-m{mom}"))
    # dtypes: params/grads/momentum independently
    for (pd, gd), sched, mdt in [((BF16, BF16), "amos", None), ((F16, F16), "amos", None),
                                 ((F32, BF16), "amos", BF16), ((BF16, F32), "inverse_square", None),
                                 ((F16, F32), "amos", F16), ((BF16, BF16), "inverse_time", BF16),
                                 ((F16, F16), "constant", None), ((F32, F16), "inverse_time", F16)]:
        opts = dict(schedule=sched, momentum=0.9, momentum_dtype=mdt)
        if sched in ("inverse_time", "inverse_square"):
            opts["half_life"] = 4
        out.append(_case(MIX, opts, dtypes=(pd, gd), tag=f"{pd}-{gd}-{sched}-m{mdt}".replace("torch.", "")))
    mixed = [(F32, BF16), (BF16, BF16), (F16, F32), (F32, F32)]  # one group, tensors of different dtypes
    out.append(_case(MIX[:8], dict(momentum=0.9), dtypes=[mixed[i % 4] for i in range(8)], tag="mixed-dtypes"))
    # shapes: many small tensors, one long row
    for sched, gran in [("amos", "row"), ("inverse_time", "row"), ("amos", "element")]:
        opts = dict(schedule=sched, granularity=gran, momentum=0.0)
        if sched == "inverse_time":
            opts["half_life"] = 3
        out.append(_case(MANY_SMALL, opts, tag=f"many-small-{sched}-{gran}"))
        out.append(_case(LONG_ROW, dict(opts, granularity="tensor" if gran == "element" else gran),
                         tag=f"long-row-{sched}-{gran}"))
    # options
    out += [
        _case(MIX, dict(clip_value=0.05, momentum=0.9), tag="amos-clip"),
        _case(MIX, dict(schedule="inverse_square", half_life=2, clip_value=0.05, momentum=0.0), tag="closed-clip"),
        _case(MIX, dict(extra_l2=0.01, d_coef=0.5, c_coef=0.1, beta=0.99), tag="amos-coefs"),
        _case(MIX, dict(schedule="constant", q=2.5, momentum=0.5), tag="constant-q"),
        _case(MIX, dict(lr=torch.tensor(0.05)), tag="tensor-lr"),
    ]
    # GradScaler's fused protocol
    for sched, scaler in itertools.product(("amos", "inverse_time"), ("finite", "inf")):
        opts = dict(schedule=sched, momentum=0.9, clip_value=0.1)
        if sched == "inverse_time":
            opts["half_life"] = 3
        out.append(_case(MIX, opts, dtypes=(BF16, F16), scaler=scaler, tag=f"scaler-{scaler}-{sched}"))
    # guard="slice": poisoned slices keep their values, the rest steps (every path of the kernels)
    for gran, sched, mom in [("row", "amos", 0.9), ("row", "inverse_time", 0.0), ("tensor", "amos", 0.0),
                             ("tensor", "constant", 0.9), ("element", "amos", 0.9), ("element", "inverse_square", 0.0)]:
        opts = dict(guard="slice", granularity=gran, schedule=sched, momentum=mom)
        if sched in ("inverse_time", "inverse_square"):
            opts["half_life"] = 3
        out.append(_case(MIX, opts, tag=f"guard-{gran}-{sched}-m{mom}", poison=True))
    out += [
        _case(MIX, dict(guard="slice", momentum=0.9, momentum_dtype=BF16, clip_value=0.05), dtypes=(BF16, BF16),
              tag="guard-bf16-clip", poison=True),
        _case(MIX, dict(guard="slice", schedule="inverse_time", half_life=3), dtypes=(F16, F16), tag="guard-fp16",
              poison=True),
        _case(MANY_SMALL, dict(guard="slice", momentum=0.0), tag="guard-many-small", poison=True),
        _case(LONG_ROW + [(3, 70001)], dict(guard="slice", momentum=0.9), tag="guard-long-rows-amos", poison=True),
        _case(LONG_ROW + [(3, 70001)], dict(guard="slice", schedule="inverse_time", half_life=3, momentum=0.0),
              tag="guard-long-rows-closed", poison=True),
        _case(MIX, dict(guard="slice", schedule="inverse_time", half_life=3, momentum=0.9), dtypes=(BF16, F16),
              scaler="inf", tag="guard-scaler-inf", poison=True),
    ]
    # 16-bit vector loads and stores: bf16 params, grads and momentum on wide rows, guarded slices
    for sched in ("amos", "inverse_time"):
        opts = dict(guard="slice", schedule=sched, momentum=0.9, momentum_dtype=BF16)
        if sched == "inverse_time":
            opts["half_life"] = 3
        out.append(_case(WIDE, opts, dtypes=(BF16, BF16), tag=f"guard-wide-bf16-{sched}", poison=True))
    return out


CASES = [pytest.param(c, id=c["tag"]) for c in _cases()]


def _dtypes(case):
    d = case["dtypes"]
    return d if isinstance(d, list) else [d] * len(case["shapes"])


def make_params(case, device=DEVICE):
    gen = torch.Generator().manual_seed(1234)
    params = []
    for shape, (pd, _) in zip(case["shapes"], _dtypes(case)):
        scale = 0.5 if len(shape) <= 1 else 0.1
        params.append((torch.randn(shape, generator=gen) * scale + 0.01).to(device, pd))
    return params


def make_grads(case, step, device=DEVICE):
    gen = torch.Generator().manual_seed(100 + step)
    grads = []
    for shape, (_, gd) in zip(case["shapes"], _dtypes(case)):
        g = torch.randn(shape, generator=gen) * 0.1
        if len(shape) == 2 and shape[0] > 1:
            g[1] = 0.0  # a slice with an exactly zero gradient: gamma = 0, b unchanged
        grads.append(g.to(device, gd))
    return grads


def poison(grads, step):
    """Steps 2 and 4: NaN, Inf and (where the dtype holds it) 1e30, whose square overflows fp32,
    into some slices of some gradients, as the grid's guard="slice" cases need."""
    if step not in (1, 3):
        return
    for i, g in enumerate(grads):
        if g.numel() == 0 or i % 3 == 2:
            continue  # some tensors stay clean
        flat = g.view(-1)
        huge = float("inf") if g.dtype == F16 else 1e30  # fp16 holds no value whose square overflows fp32
        bad = (float("nan"), float("inf"), huge)[(i + step) % 3]
        flat[(7 * i + step) % g.numel()] = bad
        if g.dim() >= 2 and g.shape[0] > 2:
            g[-1, -1] = -float("inf")  # a second poisoned row in matrices


def run(backend, case, device=DEVICE):
    """Per-step snapshots [(params, states)] of `steps` steps of Amos with `backend`; each state
    dict also holds the optimizer's `guarded_slices` so far."""
    params = make_params(case, device)
    for p in params:
        if hasattr(p, "grad_dtype"):  # torch >= 2.10 insists grad dtype == param dtype unless cleared
            p.grad_dtype = None
    opts = dict(case["options"])
    lr = opts.pop("lr", 0.1)
    opt = Amos(params, lr=lr.clone() if torch.is_tensor(lr) else lr, backend=backend, **opts)
    snapshots = []
    for step in range(case["steps"]):
        grads = make_grads(case, step, device)
        if case.get("poison"):
            poison(grads, step)
        if case["scaler"]:
            inf = case["scaler"] == "inf" and step == 2
            for g in grads:
                g.mul_(SCALE)
            if inf and grads[2].numel():
                grads[2].view(-1)[0] = float("inf")
            opt.grad_scale = torch.tensor(SCALE, device=device)
            opt.found_inf = torch.tensor(1.0 if inf else 0.0, device=device)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for attr in ("grad_scale", "found_inf"):
            if hasattr(opt, attr):
                delattr(opt, attr)
        snapshots.append(([p.detach().clone() for p in params],
                          [{**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()},
                            "guarded_slices": opt.guarded_slices} for p in params]))
    return snapshots


def _tol(*dtypes):
    rtols, atols = zip(*(TOL.get(d, TOL[F32]) for d in dtypes))
    return max(rtols), max(atols)


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{what}: non-finite values differ"
    rtol, atol = tol
    if actual.dtype in (BF16, F16):
        flips = int((actual != expected).sum())
        assert flips <= 0.01 * actual.numel() + 2, (
            f"{what}: {flips}/{actual.numel()} 16-bit values differ from the reference at all; "
            "rounding must be RTNE of the same fp32 value")
    err = (a - e).abs()
    bad = err > rtol * e.abs() + atol
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements off (rtol={rtol}, atol={atol}); "
                             f"first at flat index {i}: {a.flatten()[i].item()!r} vs reference "
                             f"{e.flatten()[i].item()!r}; max abs err {err.max().item():.3g}")


def assert_matches_reference(backend, case, device=DEVICE):
    got, want = run(backend, case, device), run("reference", case, device)
    for step, ((gp, gs), (wp, ws)) in enumerate(zip(got, want), start=1):
        for i, (pd_gd, a, e, sa, se) in enumerate(zip(_dtypes(case), gp, wp, gs, ws)):
            pd = pd_gd[0]
            where = f"step {step}, tensor {i} shape {tuple(a.shape)}"
            rtol, atol = _tol(pd)
            m = se.get("m")
            if m is not None and m.dtype in (BF16, F16) and m.numel():
                mom = case["options"].get("momentum", 0.9)
                atol = max(atol, step * mom * TOL[m.dtype][0] * m.float().abs().max().item())
            assert_close(a, e, (rtol, atol), f"{where}: param")
            assert sorted(sa) == sorted(se), f"{where}: state keys {sorted(sa)} != {sorted(se)}"
            for key in se:
                if key in ("eta", "guarded_slices"):
                    assert sa[key] == se[key], f"{where}: {key} {sa[key]} != {se[key]}"
                elif key == "m":
                    m_rtol, m_atol = _tol(se[key].dtype, pd)
                    if se[key].dtype in (BF16, F16) and se[key].numel():
                        mom = case["options"].get("momentum", 0.9)
                        m_atol = max(m_atol, step * mom * TOL[se[key].dtype][0] * se[key].float().abs().max().item())
                    assert_close(sa[key], se[key], (m_rtol, m_atol), f"{where}: state m")
                else:
                    assert_close(sa[key], se[key], _tol(F32), f"{where}: state {key}")
