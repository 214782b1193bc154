"""Amos' options: their values, defaults and checks (a bad value raises, naming the fix)."""
import math
import numbers

import torch

from . import backends
from .defaults import MOMENTUM_AUTO, check_total_steps
from .schedules import CLOSED_FORMS, DECAYING
from .slices import GRANULARITIES

SCHEDULES = ("amos",) + CLOSED_FORMS
MOMENTUM_DTYPES = (MOMENTUM_AUTO, None, torch.float32, torch.bfloat16, torch.float16)
GUARDS = ("step", "slice")

# Options only one family reads, with their neutral values: setting them for the other family
# is an error rather than a silent no-op.
_AMOS_ONLY = {"d_coef": 0.25, "c_coef": 0.25, "extra_l2": 0.0}
_CLOSED_FORM_ONLY = {"q": 1.0}

# Options of torch's own optimizers that Amos does not have, and what to do instead: given to Amos
# or set in a param group they raise, rather than being kept and silently ignored.
_KERNELS = "leave it out: Amos picks its fused kernels itself (or set backend=, see amos_fused.backends.BACKENDS)"
FOREIGN = {
    "weight_decay": "its update decays every tensor towards 0 by itself (the decay term of docs/algorithm.md); "
                    "leave weight_decay out, or add an L2 term with extra_l2 (schedule='amos')",
    "betas": "use beta for the decay of the second moment (one number; None: 0.95 where the lr rule "
             "schedules the lr, else 0.999) and momentum for the first moment's (0.9)",
    "amsgrad": "Amos has no AMSGrad variant; leave it out",
    "maximize": "Amos minimizes; use the negated objective as the loss to maximize it",
    "nesterov": "Amos's momentum is an EMA of the whole update (momentum=); leave nesterov out",
    "foreach": _KERNELS,
    "fused": _KERNELS,
    "differentiable": "Amos's step is not differentiable; leave it out",
}


def check_foreign(names, where):
    """Raise TypeError for options of torch's own optimizers (`FOREIGN`), or any other name, in `names`."""
    for name in names:
        if name in FOREIGN:
            raise TypeError(f"{where}: Amos has no option {name!r}; {FOREIGN[name]}")
    if names:
        raise TypeError(f"{where}: unexpected option(s) {', '.join(map(repr, names))}; use the options listed by "
                        "help(amos_fused.Amos)")


# every option check_options reads but lr (a scheduler changes lr at every step)
OPTION_KEYS = ("schedule", "granularity", "half_life", "beta", "momentum", "momentum_dtype", "clip_value",
               "d_coef", "c_coef", "extra_l2", "q", "eps", "eta")


def is_number(value):
    """A finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def lr_ok(lr):
    """A number >= 0 or a 1-element floating-point tensor (of any shape: see `scalar_lr`)."""
    if type(lr) is float:  # the common case, fast (checked at every step)
        return 0.0 <= lr < math.inf
    if torch.is_tensor(lr):
        return lr.numel() == 1 and lr.is_floating_point()
    return is_number(lr) and lr >= 0


def scalar_lr(group):
    """Make a checked tensor lr of shape (1,), (1, 1), ... a 0-d view of itself, as torch's
    optimizers take any 1-element lr: the backends read a number or a 0-d tensor, and a view
    shares the storage, so a scheduler's or the caller's in-place updates still reach it."""
    lr = group["lr"]
    if torch.is_tensor(lr) and lr.dim():
        group["lr"] = lr.view(())


def check_options(o, where):
    """Raise ValueError/TypeError naming the option and the fix; `o` is a group (or defaults)."""

    def bad(name, need):
        raise ValueError(f"{where}: {name}={o[name]!r} is invalid; {need}")

    if o["schedule"] not in SCHEDULES:  # first: an unknown schedule also leaves lr=None unresolved
        bad("schedule", f"use one of {SCHEDULES}")
    lr = o["lr"]
    if not lr_ok(lr):
        bad("lr", f"Tensor lr must be 1-element and floating-point (this one has {lr.numel()} {lr.dtype} "
            "elements), e.g. torch.tensor(0.01)" if torch.is_tensor(lr) else "use a finite number >= 0")
    if o["granularity"] not in GRANULARITIES:
        bad("granularity", f"use one of {GRANULARITIES}")
    if o["schedule"] in DECAYING:
        if not (is_number(o["half_life"]) and o["half_life"] > 0):
            bad("half_life", f"schedule={o['schedule']!r} needs half_life > 0 (in steps)")
    elif o["half_life"] is not None:
        bad("half_life", f"schedule={o['schedule']!r} does not decay; leave half_life=None")
    for name in ("beta", "momentum"):
        if not (is_number(o[name]) and 0 <= o[name] < 1):
            bad(name, "use a number in [0, 1)")
    if o["momentum_dtype"] not in MOMENTUM_DTYPES:
        bad("momentum_dtype", "use 'auto' (bf16; fp64 for fp64 params), None (the compute dtype: fp32, fp64 for "
            "fp64 params), torch.float32, torch.bfloat16 or torch.float16")
    if o["clip_value"] is not None and not (is_number(o["clip_value"]) and o["clip_value"] > 0):
        bad("clip_value", "use None (no clipping) or a number > 0")
    for name in ("d_coef", "c_coef", "extra_l2"):
        if not (is_number(o[name]) and o[name] >= 0):
            bad(name, "use a finite number >= 0")
    for name in ("q", "eps"):
        if not (is_number(o[name]) and o[name] > 0):
            bad(name, "use a finite number > 0")
    if o["eta"] is not None and not (is_number(o["eta"]) and o["eta"] > 0):
        bad("eta", "use None (the rule: sqrt(2/fan_in) for matrices, 0.5 for vectors) or a number > 0")
    unused = _CLOSED_FORM_ONLY if o["schedule"] == "amos" else _AMOS_ONLY
    for name, neutral in unused.items():
        if o[name] != neutral:
            bad(name, f"schedule={o['schedule']!r} does not use it; leave it at {neutral}")


def check_settings(backend, eta_fn, guard, capturable, total_steps):
    """Raise for a bad optimizer-wide setting (those a param group cannot override)."""
    backends.check_backend(backend)
    check_total_steps(total_steps)
    if eta_fn is not None and not callable(eta_fn):
        raise TypeError(f"Amos: eta_fn must be callable as eta_fn(name, param), got {eta_fn!r}")
    if guard not in GUARDS:
        raise ValueError(f"Amos: guard={guard!r} is invalid; use 'step' (a non-finite gradient skips the whole "
                         "step) or 'slice' (only its slices keep their values; one pass, faster)")
    if not isinstance(capturable, bool):
        raise TypeError(f"Amos: capturable must be True or False, got {capturable!r}")
