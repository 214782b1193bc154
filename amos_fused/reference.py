"""The reference step: ALGORITHM.md §3-§6 in plain PyTorch, one tensor at a time.

This is the oracle every fused backend is tested against, so it reads like the spec and
favours obviousness over speed. Math runs in fp32 whatever the storage dtype (fp64 for fp64
parameters); `v` and `b` are fp32 (fp64 for fp64 parameters); `theta`, `g` and `m` are stored
back with round-to-nearest-even.
"""
import math

import torch

from .schedules import decay


def compute_dtype(param):
    return torch.float64 if param.dtype == torch.float64 else torch.float32


@torch.no_grad()
def reference_step(params, grads, states, group, grad_scale=None):
    """One step for every (param, grad, state) of a group; `state["step"]` is already t."""
    for p, g, state in zip(params, grads, states):
        if p.numel():
            _step_tensor(p, g, state, group, grad_scale)


def _step_tensor(p, grad, state, o, grad_scale):
    cd, dev = compute_dtype(p), p.device
    R = state["v"].numel()
    C = p.numel() // R
    theta = p.to(cd).reshape(R, C)
    g = grad.to(cd).reshape(R, C)
    if grad_scale is not None:  # GradScaler's fused protocol: unscale first, then clip
        g = g / grad_scale.to(dev, cd)
    if o["clip_value"] is not None:
        g = g.clamp(-o["clip_value"], o["clip_value"])

    # §3: the one reduction, the second moment and 1 / v_hat
    t = state["step"].to(dev, cd)
    xi = torch.as_tensor(o["lr"], dtype=cd, device=dev)
    beta = o["beta"]
    # 1 - beta**t cancels: fp32(0.999) is off by 1.3e-8, i.e. by 1.3e-5 of bc, which would reach
    # r, K, gamma and b (tests/test_golden.py); so form it in fp64 and round once.
    bc = (1.0 - beta ** t.double()).to(cd)
    S = (g * g).sum(dim=1)
    v = beta * state["v"].to(cd) + (1.0 - beta) * S / C
    r = bc / v.clamp_min(o["eps"])

    if o["schedule"] == "amos":  # §4, with the old b
        b = state["b"].to(cd)
        alpha = xi * state["eta"]
        c = torch.rsqrt(1.0 + o["c_coef"] * xi.sqrt() * b)
        gamma = c * xi**2 * r * S / C
        d = 1.0 / (1.0 + o["d_coef"] * alpha.sqrt() * b)
        K = d * alpha * r.sqrt()
        D = d * (gamma / 2.0 + o["extra_l2"])
        state["b"].copy_(b + gamma * (1.0 + b))
    else:  # §5: scale separation over the whole tensor
        s = decay(o["schedule"], t, o["half_life"])
        unorm = (S * r).sum().sqrt()
        eps0 = math.sqrt(p.numel()) * state["eta"] * (math.sqrt(2.0) if p.ndim >= 2 else 1.0)
        A = torch.where(unorm > 0, xi * eps0 * s / unorm, torch.zeros_like(unorm))
        K = A * r.sqrt()
        D = (xi**2 / (2.0 * o["q"]) * s).expand(R)

    # §6: the element-wise apply
    delta = -K[:, None] * g - D[:, None] * theta
    if o["momentum"] > 0:
        m = o["momentum"] * state["m"].to(cd).reshape(R, C) + (1.0 - o["momentum"]) * delta
        state["m"].copy_(m.reshape(p.shape))
        delta = m  # theta moves by the unrounded m; the stored m is rounded to its dtype
    state["v"].copy_(v)
    p.copy_((theta + delta).reshape(p.shape))
