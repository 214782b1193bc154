"""backend="triton": the host side of the fused multi-tensor Triton step (kernels/amos_triton.py).

`triton_step` has the backend signature of backends.py. Per (param, grad, momentum) dtype
combination it fetches a cached launch plan (kernels/tables.py) and launches:
- schedule="amos": one `_rows_kernel` pass per column-block bucket (reduce, finalize and apply
  fused); slices longer than the heuristic's `long_row` add chunk-reduce, finalize and
  chunk-apply launches.
- closed forms: reduce launches (v, and sqrt(r) and S*r per slice), one `_norm_kernel` launch
  (||u|| per tensor, summed in a fixed order) and apply launches.
Every kernel guards slices: one whose S_r is not finite keeps theta, m, v and b, and is counted
into `guarded` with an integer atomic add (kernels/amos_triton.py).
Every per-step scalar is read on the device (t from state["step"], lr when it is a tensor on the
device, GradScaler's scale; a CPU tensor lr is read on the host, which costs nothing), and nothing
is copied to the host, so a step is CUDA-graph capturable once its plan and gradient table exist:
warm up one eager step with the same gradient tensors before capturing (a capture that would
need a new one raises, saying so).

Tensors the kernels do not take run on the reference path instead (same results, slower):
fp64 params or grads (the kernels compute in fp32, the reference in fp64 for them),
non-contiguous params or momentum, and state loaded in another dtype or on another device.
Zero-size tensors are skipped, as on the reference path.
"""
import contextlib
import struct

import torch

from .kernels import amos_triton as K
from .kernels import tables
from .fallback import reference_unless_skipped

_TL_DTYPE = {torch.float32: K.tl.float32, torch.bfloat16: K.tl.bfloat16, torch.float16: K.tl.float16}

# Block sizes: a fixed heuristic (tables.py); tests may replace it to exercise small splits.
HEURISTIC = tables.INTERPRETED if K.INTERPRET else tables.COMPILED


def _on_kernels(p, g, st, momentum):
    """Whether this tensor's step can run in the kernels (else: the reference path)."""
    ok = (p.dtype in tables.SUPPORTED and g.dtype in tables.SUPPORTED and p.is_contiguous()
          and all(st[k].dtype == torch.float32 and st[k].is_contiguous() and st[k].device == p.device
                  for k in ("v", "b", "step")) and st["step"].numel() == 1)
    if momentum:
        m = st["m"]
        ok = ok and m.dtype in tables.SUPPORTED and m.is_contiguous() and m.device == p.device
    return ok


def _scalars(group, device):
    """Kernel arguments that do not depend on the tensor; no host synchronisation."""
    lr = group["lr"]
    # a tensor lr on the CPU beside CUDA parameters is read on the host (free for a CPU tensor;
    # a copy to the device would wait for it at every step); elsewhere the kernels read it
    on_host = torch.is_tensor(lr) and lr.device.type == "cpu" and device.type != "cpu"
    out = dict(lr=0.0, lr_ptr=None, LR_IS_PTR=torch.is_tensor(lr) and not on_host)
    if out["LR_IS_PTR"]:
        out["lr_ptr"] = lr.detach().reshape(1).to(device=device, dtype=torch.float32)
    else:
        out["lr"] = float(lr)
    beta = group["beta"]
    beta32 = struct.unpack("f", struct.pack("f", beta))[0]  # fp32(beta), without a tensor
    out.update(
        # fp32(beta) for beta*v; the pair (beta32, beta_lo) gives beta**t in fp64, as the reference
        beta=beta32, beta_lo=beta - beta32, one_minus_beta=1.0 - beta, eps=group["eps"],
        c_coef=group["c_coef"], d_coef=group["d_coef"], extra_l2=group["extra_l2"],
        two_q=2.0 * group["q"], half_life=float(group["half_life"] or 1.0),
        momentum=group["momentum"], one_minus_momentum=1.0 - group["momentum"],
        clip=float(group["clip_value"] or 0.0))
    return out


@torch.no_grad()
def triton_step(params, grads, states, group, grad_scale=None, skip=None, guarded=None):
    """One Amos step for the tensors of a group on one device (`state["step"]` is already t).

    Slices whose S_r is not finite keep their values and are added to `guarded` (int64 0-d, or None).
    """
    momentum = group["momentum"] > 0
    fallback, combos = [], {}
    for p, g, st in zip(params, grads, states):
        if p.numel() == 0:
            continue
        if not _on_kernels(p, g, st, momentum):
            fallback.append((p, g, st))
            continue
        key = (p.dtype, g.dtype, st["m"].dtype if momentum else None)
        combo = combos.setdefault(key, ([], [], []))
        combo[0].append(p)
        combo[1].append(g.contiguous())
        combo[2].append(st)
    if fallback:
        reference_unless_skipped(*map(list, zip(*fallback)), group, grad_scale, skip, guarded)
    if not combos:
        return
    device = next(iter(combos.values()))[0][0].device
    sc = _scalars(group, device)
    if grad_scale is not None:
        grad_scale = grad_scale.detach().reshape(1).to(device=device, dtype=torch.float32)
    closed = group["schedule"] != "amos"
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        capturing = tables.capturing(device)  # then the plans must exist (tables.Cache)
        for (pd, gd, md), (ps, gs, sts) in combos.items():
            plan = tables.get_plan(ps, gs, sts, closed, HEURISTIC, momentum, capturing)
            _launch(plan, plan.g_table(gs, capturing), sc, group["schedule"], grad_scale, skip, guarded,
                    dict(P_DTYPE=_TL_DTYPE[pd], G_DTYPE=_TL_DTYPE[gd], M_DTYPE=_TL_DTYPE[md or pd],
                         MOMENTUM=momentum, CLIP=group["clip_value"] is not None))


def _launch(plan, g_table, sc, schedule, grad_scale, skip, guarded, dtypes):
    h = plan.heuristic
    dummy = plan.tensor_a  # stands for absent pointers (never read)
    lr_ptr = sc["lr_ptr"] if sc["lr_ptr"] is not None else dummy
    scale_ptr = grad_scale if grad_scale is not None else dummy
    skip_ptr = skip if skip is not None else dummy
    guarded_ptr = guarded if guarded is not None else dummy
    has_guard = guarded is not None
    sched = K.SCHEDULE_CODE[schedule]
    flags = dict(SCHED=sched, HAS_SCALE=grad_scale is not None, HAS_SKIP=skip is not None, LR_IS_PTR=sc["LR_IS_PTR"],
                 RTNE=K.INTERPRET, **dtypes)
    step_args = (sc["lr"], lr_ptr, sc["beta"], sc["beta_lo"])

    def rows(phase):
        for n_rows, colb, one_block, packed, tiles, slot_i, slot_r, ntiles, vec in plan.buckets:
            K._rows_kernel[(ntiles,)](
                plan.info, plan.finfo, g_table, tiles, slot_i, slot_r, plan.coef_k, plan.coef_d, plan.tensor_a,
                scale_ptr, skip_ptr, guarded_ptr,
                *step_args, sc["one_minus_beta"], sc["eps"], sc["c_coef"], sc["d_coef"],
                sc["extra_l2"], sc["two_q"], sc["half_life"], sc["momentum"], sc["one_minus_momentum"], sc["clip"],
                PHASE=phase, ROWS=n_rows, COLB=colb, ONE_BLOCK=one_block, PACKED=packed, VEC4=vec, HAS_GUARD=has_guard,
                num_warps=h.num_warps, **flags)

    def chunks(phase):
        tiles, ntiles = plan.chunk_tiles
        if ntiles:
            K._chunk_kernel[(ntiles,)](
                plan.info, g_table, tiles, plan.coef_k, plan.coef_d, plan.partial, plan.tensor_a, scale_ptr, skip_ptr,
                *step_args, sc["two_q"], sc["half_life"], sc["momentum"], sc["one_minus_momentum"], sc["clip"],
                PHASE=phase, CHUNK=h.chunk, BLOCK=h.block, VEC4=plan.chunk_vec, num_warps=h.num_warps, **flags)

    def split_finalize():
        tiles, ntiles = plan.final_tiles
        if ntiles:
            K._split_finalize_kernel[(ntiles,)](
                plan.info, plan.finfo, tiles, plan.coef_k, plan.coef_d, plan.partial, skip_ptr, guarded_ptr,
                *step_args, sc["one_minus_beta"], sc["eps"], sc["c_coef"], sc["d_coef"],
                sc["extra_l2"], sc["half_life"], SCHED=sched, LR_IS_PTR=sc["LR_IS_PTR"], HAS_SKIP=skip is not None,
                HAS_GUARD=has_guard, ROWS=plan.final_rows, KB=plan.kb, num_warps=4)

    fused, reduce, apply = K.FUSED.value, K.REDUCE.value, K.APPLY.value
    if schedule == "amos":
        rows(fused)
        chunks(reduce)
        split_finalize()
        chunks(apply)
    else:
        rows(reduce)
        chunks(reduce)
        split_finalize()
        K._norm_kernel[(-(-plan.n // plan.norm_tb),)](
            plan.info, plan.finfo, plan.coef_d, plan.tensor_a, plan.n, *step_args, sc["half_life"],
            SCHED=sched, LR_IS_PTR=sc["LR_IS_PTR"], TB=plan.norm_tb, QB=plan.norm_qb, num_warps=4)
        rows(apply)
        chunks(apply)


# ---- the two-phase protocol of sharded tensors (backends.TwoPhase, kernels/two_phase_triton.py) ----

def two_phase_takes(param, grad):
    """Whether the two-phase kernels take this local parameter and its gradient."""
    return param.dtype in tables.SUPPORTED and grad.dtype in tables.SUPPORTED and param.is_contiguous()


def _two_phase_items(grads, rows, idx, starts, chunk):
    """The work items of one launch over the tensors `idx`: (items [n, 4] as tuples (tensor, slice
    in the flat vectors, first element, elements), each slice cut into chunks; the first item of
    each of the launch's slices; those slices' positions in the flat vectors)."""
    items, first, slices = [], [], []
    for i in idx:
        g, R = grads[i], rows[i]
        C = g.numel() // R if g.numel() else 0
        for r in range(R):
            first.append(len(items))
            slices.append(starts[i] + r)
            for c in range(0, C, chunk):
                items.append((i, starts[i] + r, r * C + c, min(chunk, C - c)))
    first.append(len(items))
    return items, first, slices


def _table(rows, device, dtype=torch.int64):
    """A host table on `device`; to a GPU from pinned memory, without waiting for it."""
    t = torch.tensor(rows, dtype=dtype)
    t = t.reshape(len(rows), -1) if rows and isinstance(rows[0], (tuple, list)) else t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _by_dtypes(params, grads, ms):
    """Tensor positions per (param, grad, m) dtype combination: one launch each."""
    combos = {}
    for i, (p, g, m) in enumerate(zip(params, grads, ms)):
        combos.setdefault((p.dtype, g.dtype, None if m is None else m.dtype), []).append(i)
    return combos


class _TwoPhasePlan:
    """The tables of the two-phase kernels for one call's tensors (phase 1: the gradients' layout;
    phase 3: also the parameters and state), cached like the one-pass plans (tables.Cache): built
    at a first call, found by the next ones and by a capture; the gradients' addresses are a table
    of their own, keyed by those addresses."""

    def __init__(self, device, rows, grads, params=None, ms=None, states=None, slice_lens=None, numels=None):
        chunk = HEURISTIC.chunk
        self.first_slice = [0]
        for R in rows:
            self.first_slice.append(self.first_slice[-1] + R)
        ms = ms or [None] * len(grads)
        self.launches = []  # (dtypes, positions, items, n_items, first item of each slice, slices)
        for dtypes, idx in _by_dtypes(params or grads, grads, ms).items():
            items, first, slices = _two_phase_items(grads, rows, idx, self.first_slice, chunk)
            if items:
                self.launches.append((dtypes, idx, _table(items, device), len(items), _table(first, device),
                                      _table(slices, device), len(slices)))
        self.gtables = tables.Cache(tables.KEEP_GRAD_TABLES)
        if params is None:
            return
        ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
        self.addrs = _table([(ptr(p), 0, ptr(m), ptr(st["v"]), ptr(st["b"]), ptr(st["step"]))
                             for p, m, st in zip(params, ms, states)], device)
        self.meta = _table([(float(st["eta"]), float(C), _eps0(n, p.ndim, float(st["eta"])))
                            for p, st, C, n in zip(params, states, slice_lens, numels)], device, torch.float32)
        self.first = _table(self.first_slice[:-1], device)
        self.owner = _table([i for i, R in enumerate(rows) for _ in range(R)], device, torch.int32)

    def g_table(self, grads, device, capturing):
        addresses = tuple(g.data_ptr() for g in grads)
        table = self.gtables.get(addresses, capturing, lambda: _table(list(addresses), device))
        if table is None:
            raise RuntimeError(tables.capture_miss("gradient table"))
        return table


_TWO_PHASE_PLANS = tables.Cache(tables.KEEP_PLANS)


def _two_phase_plan(device, rows, grads, params=None, ms=None, states=None, slice_lens=None, numels=None):
    capturing = tables.capturing(device)
    key = (device, tuple(rows), tuple((g.numel(), g.dtype) for g in grads))
    if params is not None:
        key += tuple((p.data_ptr(), p.dtype, p.ndim, 0 if m is None else m.data_ptr(), None if m is None else m.dtype,
                      st["v"].data_ptr(), st["b"].data_ptr(), st["step"].data_ptr(), float(st["eta"]), C, n)
                     for p, m, st, C, n in zip(params, ms, states, slice_lens, numels))
    plan = _TWO_PHASE_PLANS.get(key, capturing, lambda: _TwoPhasePlan(device, rows, grads, params, ms, states,
                                                                      slice_lens, numels))
    if plan is None:
        raise RuntimeError(tables.capture_miss("two-phase table"))
    return plan, capturing


@torch.no_grad()
def two_phase_sums(grads, rows, group, grad_scale=None, dtype=torch.float32):
    from .kernels import two_phase_triton as T2

    device = grads[0].device
    gs = [g.contiguous() for g in grads]
    S = torch.zeros(sum(rows), dtype=torch.float32, device=device)
    h = HEURISTIC
    scale = grad_scale.detach().reshape(1).to(device, torch.float32) if grad_scale is not None else S
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        plan, capturing = _two_phase_plan(device, rows, gs)
        g_addrs = plan.g_table(gs, device, capturing)
        for (_, gd, _), idx, items, n_items, first, slices, n_slices in plan.launches:
            partial = torch.empty(n_items, dtype=torch.float32, device=device)
            T2._sums_kernel[(n_items,)](items, g_addrs, partial, scale,
                                        float(group["clip_value"] or 0.0), G_DTYPE=_TL_DTYPE[gd],
                                        HAS_SCALE=grad_scale is not None, CLIP=group["clip_value"] is not None,
                                        CHUNK=h.chunk, BLOCK=h.block, num_warps=h.num_warps)
            # each slice's chunks are consecutive items: add them in order into its S
            out = torch.empty(n_slices, dtype=torch.float32, device=device)
            T2._slice_sums_kernel[(n_slices,)](first, partial, out)
            S[slices] = out
    return S


@torch.no_grad()
def two_phase_apply(params, grads, states, rows, slice_lens, numels, S, norms, group, grad_scale=None, skip=None,
                    guarded=None):
    from .kernels import two_phase_triton as T2

    device = params[0].device
    gs = [g.contiguous() for g in grads]
    momentum = group["momentum"] > 0
    ms = [st["m"] for st in states] if momentum else [None] * len(params)
    for i, st in enumerate(states):  # the tables hold addresses: what they point at must be as the kernels read it
        if not all(st[k].dtype == torch.float32 and st[k].is_contiguous() and st[k].device == device
                   for k in ("v", "b", "step")) or (momentum and not (ms[i].dtype in tables.SUPPORTED
                                                                      and ms[i].is_contiguous())):
            raise RuntimeError(f"amos_fused (backend='triton'): the state of sharded tensor {i} is not as the kernels "
                               "take it (fp32 contiguous v, b, step on the parameter's device; a contiguous "
                               "fp32/bf16/fp16 m); load state in those dtypes or use backend='reference'")
    S = S.to(torch.float32).contiguous()
    ns = S.numel()
    sc = _scalars(group, device)
    dummy = S
    h = HEURISTIC
    coef_k = torch.empty(ns, dtype=torch.float32, device=device)
    coef_d = torch.empty(ns, dtype=torch.float32, device=device)
    closed = group["schedule"] != "amos"
    lr_ptr = sc["lr_ptr"] if sc["lr_ptr"] is not None else dummy
    skip_t = skip.detach().reshape(1).to(device, torch.float32) if skip is not None else dummy
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        plan, capturing = _two_phase_plan(device, rows, gs, params, ms, states, slice_lens, numels)
        g_addrs = plan.g_table(gs, device, capturing)
        if ns:
            sb = 256 if K.INTERPRET else 128
            T2._finalize_kernel[(-(-ns // sb),)](
                plan.addrs, plan.meta, plan.first, plan.owner, ns, S,
                norms.to(torch.float32).contiguous() if closed else dummy, coef_k, coef_d, skip_t,
                guarded if guarded is not None else dummy, sc["lr"], lr_ptr, sc["beta"], sc["beta_lo"],
                sc["one_minus_beta"], sc["eps"], sc["c_coef"], sc["d_coef"], sc["extra_l2"], sc["two_q"],
                sc["half_life"], SCHED=K.SCHEDULE_CODE[group["schedule"]], LR_IS_PTR=sc["LR_IS_PTR"],
                HAS_SKIP=skip is not None, HAS_GUARD=guarded is not None, SB=sb, num_warps=4)
        scale = grad_scale.detach().reshape(1).to(device, torch.float32) if grad_scale is not None else dummy
        for (pd, gd, md), idx, items, n_items, _, _, _ in plan.launches:
            T2._apply_kernel[(n_items,)](
                items, plan.addrs, g_addrs, coef_k, coef_d, scale, skip_t,
                float(group["clip_value"] or 0.0), sc["momentum"], sc["one_minus_momentum"], P_DTYPE=_TL_DTYPE[pd],
                G_DTYPE=_TL_DTYPE[gd], M_DTYPE=_TL_DTYPE[md or pd], MOMENTUM=momentum,
                HAS_SCALE=grad_scale is not None, HAS_SKIP=skip is not None, CLIP=group["clip_value"] is not None,
                RTNE=K.INTERPRET, CHUNK=h.chunk, BLOCK=h.block, num_warps=h.num_warps)


def _eps0(numel, ndim, eta):
    from .reference import eps0
    return eps0(numel, ndim, eta)
