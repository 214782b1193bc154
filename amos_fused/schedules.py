"""The closed-form decay s(t) of docs/algorithm.md ("The derivation"), and its plug-and-play recipe for torch AdamW.

`s(t)` is 1 at the first step (t = 1) and halves after `half_life` steps:
  "constant":       s = 1
  "inverse_time":   s = 1 / (1 + (t-1)/T)
  "inverse_square": s = 1 / (1 + (sqrt(2)-1)*(t-1)/T)**2
`t` may be a Python number or a tensor (the fused backends keep it on the device).
"""
import math

import torch

CLOSED_FORMS = ("constant", "inverse_time", "inverse_square")
DECAYING = ("inverse_time", "inverse_square")


def decay(schedule, t, half_life=None):
    """s(t) of a closed-form schedule at the 1-based step `t`."""
    if schedule == "constant":
        return t * 0 + 1.0 if torch.is_tensor(t) else 1.0
    if schedule not in DECAYING:
        raise ValueError(f"schedule={schedule!r} has no closed-form decay; use one of {CLOSED_FORMS}")
    if half_life is None or not half_life > 0:
        raise ValueError(f"schedule={schedule!r} needs half_life > 0 (in steps), got {half_life!r}")
    x = (t - 1) / half_life
    if schedule == "inverse_time":
        return 1.0 / (1.0 + x)
    return 1.0 / (1.0 + (math.sqrt(2.0) - 1.0) * x) ** 2


def decay_rate(lr, schedule, t, half_life=None, q=1.0):
    """The decoupled weight-decay rate rho_t = lr**2 / (2q) * s(t)."""
    return lr * lr / (2.0 * q) * decay(schedule, t, half_life)


def adamw_lr_lambda(schedule, half_life=None):
    """A `LambdaLR` factor giving lr_t = lr * s(t).

    LambdaLR calls it with the number of scheduler steps taken so far, k = t - 1.
    """
    decay(schedule, 1, half_life)  # validates the arguments now, not at the first step
    return lambda k: float(decay(schedule, k + 1, half_life))


def adamw_recipe(params, lr, schedule="inverse_time", half_life=None, q=1.0, **adamw_kwargs):
    """torch AdamW with the closed-form schedule: (optimizer, LambdaLR).

    With lr_t = lr * s(t) and weight_decay = lr / (2q), AdamW's decoupled decay per step is
    lr_t * weight_decay = lr**2 / (2q) * s(t), the rate of docs/algorithm.md, "The derivation".
    Call `scheduler.step()` after every `optimizer.step()`.
    """
    if "weight_decay" in adamw_kwargs:
        raise ValueError("adamw_recipe sets weight_decay = lr / (2q) itself; pass q instead")
    if not q > 0:
        raise ValueError(f"q must be > 0, got {q!r}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=lr / (2.0 * q), **adamw_kwargs)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, adamw_lr_lambda(schedule, half_life))
