"""The reference step: docs/algorithm.md in plain PyTorch, tensor by tensor in three phases.

The phases (reduce S_r; complete sums over ranks; finalize and apply) are the spec in order for
ordinary tensors, and let FSDP2's DTensor parameters get global statistics (distributed.py).

This is the oracle every fused backend is tested against, so it reads like the spec and
favours obviousness over speed. Math runs in fp32 whatever the storage dtype (fp64 for fp64
parameters); `v` and `b` are fp32 (fp64 for fp64 parameters); `theta`, `g` and `m` are stored
back with round-to-nearest-even.
"""
import math

import torch

from . import distributed
from .distributed import local
from .schedules import decay
from .slices import slice_shape


def compute_dtype(param):
    return torch.float64 if param.dtype == torch.float64 else torch.float32


@torch.no_grad()
def reference_step(params, grads, states, group, grad_scale=None, guarded=None):
    """One step for every (param, grad, state) of a group; `state["step"]` is already t.

    A slice whose S_r is not finite (a NaN or Inf gradient, or a sum of squares past the compute
    dtype's range) is guarded: its parameters and state stay as they were, the closed forms' ||u||
    leaves it out, and `guarded` (an int64 0-d tensor, or None) counts it (Amos(guard=...)).

    In three phases, as the kernels run it (docs/algorithm.md, "Kernel phases"). For ordinary tensors they are the
    spec in order. For FSDP2's DTensor parameters each rank runs phase 1 on its own rows, and
    phase 2 completes the sums whose slices span ranks with one all-reduce (distributed.py;
    Amos.step runs DTensors through `distributed.sharded_step`, which also agrees on skips).
    """
    work = [(p, g, s) for p, g, s in zip(params, grads, states) if p.numel()]
    # 1. reduce: S_r of every local slice; for sharded closed-form tensors, the local ||u||**2
    reduced = [reduce_phase(p, g, group, grad_scale, s["v"], s["step"]) for p, g, s in work]
    # 2. complete the partial sums over ranks (nothing to do for tensors that are not sharded)
    sums, norms, _ = distributed.complete_sums([p for p, _, _ in work], [group["granularity"]] * len(work),
                                               [S for S, _ in reduced], [u for _, u in reduced])
    # 3. finalize and apply, tensor by tensor
    for (p, g, state), S, usq in zip(work, sums, norms):
        apply_phase(p, g, state, group, grad_scale, S, usq, guarded)


def _grad_slices(p, grad, o, grad_scale):
    """This rank's gradient as [R, C] slices in the compute dtype: unscaled first, then clipped."""
    R, C = distributed.local_slice_shape(p, o["granularity"])
    g = local(grad).to(compute_dtype(p)).reshape(R, C)
    if grad_scale is not None:  # GradScaler's fused protocol: unscale first, then clip
        g = g / grad_scale.to(g.device, g.dtype)
    if o["clip_value"] is not None:
        g = g.clamp(-o["clip_value"], o["clip_value"])
    return g


def _second_moment(p, S, v_prev, t, o):
    """§3: v_r and r_r = 1 / v_hat_r from the complete S_r, the previous v (None: zero) and step t."""
    cd, C = S.dtype, slice_shape(p.shape, o["granularity"])[1]
    t = torch.as_tensor(t).to(S.device, cd)
    beta = o["beta"]
    # 1 - beta**t cancels: fp32(0.999) is off by 1.3e-8, i.e. by 1.3e-5 of bc, which would reach
    # r, K, gamma and b (tests/test_golden.py); so form it in fp64 and round once.
    bc = (1.0 - beta ** t.double()).to(cd)
    v_prev = 0.0 if v_prev is None else local(v_prev).to(cd).reshape(-1)
    v = beta * v_prev + (1.0 - beta) * S / C
    r = bc / v.clamp_min(o["eps"])
    return v, r


def reduce_phase(p, grad, o, grad_scale, v_prev, t):
    """Phase 1: (S, local ||u||**2 or None); S = the one reduction, sum of g*g over each slice.

    `v_prev` is state "v" before this step (None before the first) and `t` this step's count: the
    phase changes nothing, so a step can still be skipped after it (distributed.sharded_step).
    """
    g = _grad_slices(p, grad, o, grad_scale)
    S = (g * g).sum(dim=1)
    usq = None
    if o["schedule"] != "amos" and distributed.norm_spans_ranks(p, o["granularity"]):
        _, r = _second_moment(p, S, v_prev, t, o)  # slices are whole here, so r is final
        usq = _u_norm2(S, r)
    return S, usq


def _u_norm2(S, r):
    """||u||**2 = sum of S_r * r_r over the slices that are not guarded (S_r finite)."""
    return torch.where(torch.isfinite(S), S * r, torch.zeros_like(S)).sum()


def apply_phase(p, grad, state, o, grad_scale, S, usq, guarded=None):
    """Phase 3: v, the coefficients K_r, D_r (and b), then the element-wise apply; `state["step"]` is t.

    S None: the slices are whole here and phase 1 left them for now (distributed.sharded_step).
    Slices with S_r not finite keep their old values (guarded; counted in `guarded` if given).
    """
    g = _grad_slices(p, grad, o, grad_scale)  # again: one tensor's converted copy alive at a time
    if S is None:
        S = (g * g).sum(dim=1)
    R = g.shape[0]
    C = slice_shape(p.shape, o["granularity"])[1]  # the global slice length (g holds a part of a spanning one)
    cd, dev = g.dtype, g.device
    theta = local(p).to(cd).reshape(g.shape)
    t = state["step"].to(dev, cd)
    xi = torch.as_tensor(o["lr"], dtype=cd, device=dev)
    v, r = _second_moment(p, S, state["v"], t, o)
    ok = torch.isfinite(S)  # the guard: everything below is kept where it is False
    if guarded is not None:
        guarded.add_((~ok).sum().to(guarded.device))

    if o["schedule"] == "amos":  # §4, with the old b
        b = local(state["b"]).to(cd).reshape(-1)
        alpha = xi * state["eta"]
        c = torch.rsqrt(1.0 + o["c_coef"] * xi.sqrt() * b)
        gamma = c * xi**2 * r * S / C
        d = 1.0 / (1.0 + o["d_coef"] * alpha.sqrt() * b)
        K = d * alpha * r.sqrt()
        D = d * (gamma / 2.0 + o["extra_l2"])
        _write(state["b"], torch.where(ok, b + gamma * (1.0 + b), b))
    else:  # §5: scale separation over the whole (global) tensor
        s = decay(o["schedule"], t, o["half_life"])
        unorm = (_u_norm2(S, r) if usq is None else usq).sqrt()
        eps0 = math.sqrt(p.numel()) * state["eta"] * (math.sqrt(2.0) if p.ndim >= 2 else 1.0)
        A = torch.where(unorm > 0, xi * eps0 * s / unorm, torch.zeros_like(unorm))
        K = A * r.sqrt()
        D = (xi**2 / (2.0 * o["q"]) * s).expand(R)

    # §6: the element-wise apply
    delta = -K[:, None] * g - D[:, None] * theta
    keep = ok[:, None]
    if o["momentum"] > 0:
        m_old = local(state["m"]).to(cd).reshape(g.shape)
        m = o["momentum"] * m_old + (1.0 - o["momentum"]) * delta
        _write(state["m"], torch.where(keep, m, m_old))
        delta = m  # theta moves by the unrounded m; the stored m is rounded to its dtype
    _write(state["v"], torch.where(ok, v, local(state["v"]).to(cd).reshape(-1)))
    _write(p, torch.where(keep, theta + delta, theta))


def _write(dst, value):
    """dst = value, in dst's dtype and (local) shape."""
    out = local(dst)
    out.copy_(value.reshape(out.shape))
