"""The reference step: docs/algorithm.md ("Second moment" to "Apply and momentum") in plain PyTorch,
the oracle of every fused backend.

It reads like the spec and favours obviousness over speed. The math is written once, as
functions of per-slice vectors, in the spec's order:
  reduce    `slice_sums`                       S_r = sum over slice r of g*g
  finalize  `second_moment`, `amos_coefficients` / `closed_coefficients` (with `u_norm2`)
  apply     `apply_update`                     theta (and m) from K_r, D_r
`reference_step` runs them tensor by tensor. The same functions finalize the slices of sharded
tensors over flat vectors of many tensors' slices at once (distributed.py), so a sharded step
computes each slice's coefficients with exactly these operations.

Math runs in fp32 whatever the storage dtype (fp64 for fp64 parameters); `v` and `b` are fp32
(fp64 for fp64 parameters); `theta`, `g` and `m` are stored back with round-to-nearest-even.
A slice whose S_r is not finite is guarded: its parameters and state keep their values.
"""
import math

import torch

from .schedules import decay
from .slices import slice_shape


def compute_dtype(param):
    return torch.float64 if param.dtype == torch.float64 else torch.float32


# ---- the math, on per-slice vectors --------------------------------------------------------------

def grad_slices(grad, R, dtype, o, grad_scale=None):
    """The gradient as [R, C] slices in `dtype`: unscaled first (GradScaler), then clipped."""
    g = grad.to(dtype).reshape(R, -1)
    if grad_scale is not None:  # GradScaler's fused protocol: unscale first, then clip
        g = g / grad_scale.to(g.device, g.dtype)
    if o["clip_value"] is not None:
        g = g.clamp(-o["clip_value"], o["clip_value"])
    return g


def slice_sums(g):
    """§3, the one reduction: S_r = sum of g*g over each row of `g` ([R, C])."""
    return (g * g).sum(dim=1)


def bias_correction(t, beta, dtype):
    # 1 - beta**t cancels: fp32(0.999) is off by 1.3e-8, i.e. by 1.3e-5 of bc, which would reach
    # r, K, gamma and b (tests/test_golden.py); so form it in fp64 and round once.
    return (1.0 - beta ** torch.as_tensor(t).double()).to(dtype)


def second_moment(S, v_prev, t, C, o):
    """§3: (v_r, r_r = 1 / v_hat_r) from the complete S_r, the previous v (None: zero), step t
    and slice length C (`t` and `C` are numbers, 0-d tensors or per-slice vectors)."""
    beta = o["beta"]
    bc = bias_correction(torch.as_tensor(t, device=S.device), beta, S.dtype)
    v_prev = 0.0 if v_prev is None else v_prev.to(S.dtype).reshape(-1)
    v = beta * v_prev + (1.0 - beta) * S / C
    return v, bc / v.clamp_min(o["eps"])


def amos_coefficients(S, r, b, xi, eta, C, o):
    """§4, the official rule with the OLD b: (K_r, D_r, new b_r). `eta` and `C` are numbers or
    per-slice vectors, `xi` the lr as a 0-d tensor in the compute dtype."""
    alpha = xi * eta
    c = torch.rsqrt(1.0 + o["c_coef"] * xi.sqrt() * b)
    gamma = c * xi**2 * r * S / C
    d = 1.0 / (1.0 + o["d_coef"] * alpha.sqrt() * b)
    K = d * alpha * r.sqrt()
    D = d * (gamma / 2.0 + o["extra_l2"])
    return K, D, b + gamma * (1.0 + b)


def u_norm2(S, r):
    """||u||**2 = sum of S_r * r_r over the slices that are not guarded (S_r finite)."""
    return torch.where(torch.isfinite(S), S * r, torch.zeros_like(S)).sum()


def eps0(numel, ndim, eta):
    """§5: ||theta_0 - theta*|| of a tensor of `numel` elements and `ndim` dimensions (a Python float)."""
    return math.sqrt(numel) * eta * (math.sqrt(2.0) if ndim >= 2 else 1.0)


def closed_coefficients(r, unorm2, xi, t, eps_0, o):
    """§5, scale separation over the whole tensor: (K_r, D) from r_r and the tensor's complete
    ||u||**2 (`unorm2`, `t` and `eps_0`: one per tensor, or per-slice vectors)."""
    s = decay(o["schedule"], torch.as_tensor(t, device=r.device).to(r.dtype), o["half_life"])
    unorm = unorm2.sqrt()
    A = torch.where(unorm > 0, xi * eps_0 * s / unorm, torch.zeros_like(unorm))
    return A * r.sqrt(), (xi**2 / (2.0 * o["q"]) * s).expand(r.shape)


def apply_update(theta, g, m, K, D, o):
    """§6 on [R, C] slices: (new theta, new m or None); m is the old m in the compute dtype."""
    delta = -K[:, None] * g - D[:, None] * theta
    if o["momentum"] > 0:
        m = o["momentum"] * m + (1.0 - o["momentum"]) * delta
        delta = m  # theta moves by the unrounded m; the stored m is rounded to its dtype
    return theta + delta, m


def lr_of(o, dtype, device):
    return torch.as_tensor(o["lr"], dtype=dtype, device=device).reshape(())


# ---- the reference step ---------------------------------------------------------------------------

@torch.no_grad()
def reference_step(params, grads, states, group, grad_scale=None, guarded=None):
    """One step for every (param, grad, state) of a group; `state["step"]` is already t.

    A slice whose S_r is not finite (a NaN or Inf gradient, or a sum of squares past the compute
    dtype's range) is guarded: its parameters and state stay as they were, the closed forms' ||u||
    leaves it out, and `guarded` (an int64 0-d tensor, or None) counts it (Amos(guard=...)).
    """
    for p, grad, state in zip(params, grads, states):
        if p.numel():
            _step_tensor(p, grad, state, group, grad_scale, guarded)


def _step_tensor(p, grad, state, o, grad_scale, guarded, S=None, unorm2=None, C=None, numel=None):
    """One tensor's step. A sharded tensor's local part gets its complete S_r (and the closed
    forms' ||u||**2) handed in, with the global slice length C and element count (distributed.py)."""
    cd = compute_dtype(p)
    if S is None:
        R, C = slice_shape(p.shape, o["granularity"])
        g = grad_slices(grad, R, cd, o, grad_scale)
        S = slice_sums(g)  # 1. reduce
    else:
        S = S.to(cd)
        g = grad_slices(grad, S.numel(), cd, o, grad_scale) if p.numel() else None
    t = state["step"].to(S.device, cd)
    xi = lr_of(o, cd, S.device)
    v, r = second_moment(S, state["v"], t, C, o)  # 2. finalize
    ok = torch.isfinite(S)  # the guard: everything below is kept where it is False
    if guarded is not None:
        guarded.add_((~ok).sum().to(guarded.device))
    if o["schedule"] == "amos":
        b = state["b"].to(cd).reshape(-1)  # v and b may have the parameter's shape (sharded, "element")
        K, D, b_new = amos_coefficients(S, r, b, xi, state["eta"], C, o)
        write(state["b"], torch.where(ok, b_new, b))
    else:
        unorm2 = u_norm2(S, r) if unorm2 is None else unorm2.to(cd)
        K, D = closed_coefficients(r, unorm2, xi, t, eps0(numel or p.numel(), p.ndim, state["eta"]), o)
    write(state["v"], torch.where(ok, v, state["v"].to(cd).reshape(-1)))
    if g is None:
        return  # an empty local part of a slice held by other ranks: its v and b only
    theta = p.to(cd).reshape(g.shape)  # 3. apply
    m_old = state["m"].to(cd).reshape(g.shape) if o["momentum"] > 0 else None
    _apply_kept(p, state.get("m"), theta, g, m_old, K, D, ok, o)


def _apply_kept(p, m_store, theta, g, m_old, K, D, ok, o):
    """apply_update, then store theta (and m) where the slice is not guarded."""
    new_theta, m = apply_update(theta, g, m_old, K, D, o)
    keep = ok[:, None]
    if m is not None:
        write(m_store, torch.where(keep, m, m_old))
    write(p, torch.where(keep, new_theta, theta))


def write(dst, value):
    """dst = value, in dst's dtype and shape."""
    dst.copy_(value.reshape(dst.shape))


# ---- the two-phase protocol of sharded tensors (distributed.py), in plain PyTorch -----------------
# The fused backends provide the same two functions with their kernels (backends.py).

@torch.no_grad()
def two_phase_sums(grads, rows, group, grad_scale=None, dtype=torch.float32):
    """Phase 1: S_r of every local slice of every gradient (`rows[i]` slices of grads[i]), as one
    flat vector in `dtype`, the compute dtype of their parameters."""
    parts = [slice_sums(grad_slices(g, R, dtype, group, grad_scale)) if g.numel()
             else torch.zeros(R, dtype=dtype, device=g.device) for g, R in zip(grads, rows)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


@torch.no_grad()
def two_phase_apply(params, grads, states, rows, slice_lens, numels, S, norms, group, grad_scale=None, skip=None,
                    guarded=None):
    """Phase 3: every tensor's step from the complete S_r of its `rows[i]` local slices (flat, in
    the order of `two_phase_sums`), its global slice length and element count, and for the closed
    forms its complete ||u||**2 (`norms[i]`). Nothing changes when `skip` is set."""
    if skip is not None and bool(skip):
        return
    at = 0
    for i, (p, g, st, R) in enumerate(zip(params, grads, states, rows)):
        _step_tensor(p, g, st, group, grad_scale, guarded, S=S[at:at + R], unorm2=None if norms is None else norms[i],
                     C=slice_lens[i], numel=numels[i])
        at += R
