"""The one place that chooses how a step is computed, and the backends' helper ops Amos uses.

A backend is a function `step(params, grads, states, group, grad_scale, skip=None, guarded=None)`
that applies one Amos step (docs/algorithm.md) to the tensors of one param group, with
`state["step"]` already t. `skip` is None, or the step's verdict as a 0-d fp32 tensor on the
device (verdict.py): the fused backends read it in their kernels (no host sync) and change
nothing when it is nonzero. Every backend guards slices: one whose S_r is not finite keeps its
parameters and state, and is added to `guarded` (an int64 0-d tensor on the device, or None).
Each entry of `_BACKENDS` says whether it can run on a device and, if not, why.

The backend modules are imported when first needed (triton is slow to import, the extension
loads at first use); they depend on fallback.py and reference.py, never on this module.
"""
import collections

import torch

from . import reference
from .fallback import reference_unless_skipped

BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")


def _reference(device):
    return reference_unless_skipped, None


def _triton(device):
    # imported here: importing triton is slow and must not happen for the other backends
    try:
        from . import triton_backend
    except ImportError as err:
        return None, f"triton is not importable ({err}); pip install triton"
    interpreting = triton_backend.K.INTERPRET
    if device.type == "cuda" and interpreting:
        return None, ("TRITON_INTERPRET=1 is set, and the interpreter cannot run on CUDA tensors (its address "
                      "tables hold device pointers); unset TRITON_INTERPRET before importing amos_fused")
    if device.type == "cpu" and not interpreting:
        return None, ("triton needs a CUDA device; CPU tensors run only under the Triton interpreter: set "
                      "TRITON_INTERPRET=1 before importing amos_fused (slow, for tests)")
    if device.type not in ("cuda", "cpu"):
        return None, f"triton runs on CUDA devices (or on CPU under TRITON_INTERPRET=1), not {device.type}"
    return triton_backend.triton_step, None


def _compiled(kind):
    # the extension amos_fused._C (csrc/): "cpu" runs CPU tensors, "cuda" CUDA tensors
    def available(device):
        from . import cpp_backend
        why = cpp_backend.unavailable(kind)
        if why is None and device.type != kind:
            why = f"backend={kind!r} runs on {kind} tensors, not {device.type} tensors"
        return (None, why) if why else (cpp_backend.fused_step, None)
    return available


# name -> function(device) -> (step function or None, reason it cannot run)
_BACKENDS = {"reference": _reference, "triton": _triton, "cpu": _compiled("cpu"), "cuda": _compiled("cuda")}

# what "auto" tries, in order, per device type; "reference" always runs
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def check_backend(name):
    """Raise unless `name` is known (its availability is checked per device by `resolve`)."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; use one of {BACKENDS}")


def resolve(name, device):
    """The step function of backend `name` for tensors on `device`.

    An explicitly requested backend that cannot run raises with the reason; "auto" falls back
    quietly to the next choice and finally to the reference path.
    """
    check_backend(name)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ()):
            fn, _ = _BACKENDS[candidate](device)
            if fn is not None:
                return fn
        return reference_unless_skipped
    fn, why = _BACKENDS[name](device)
    if fn is None:
        raise RuntimeError(f"backend={name!r} cannot run on {device}: {why}. Use backend='auto' or 'reference'.")
    return fn


# ---- the op behind a step function, and helper ops ---------------------------------------------
KernelOp = collections.namedtuple("KernelOp", "step options takes")


def kernel_op(fn):
    """The op behind step function `fn` when that is one call over lists of tensors (the compiled
    backends), for a caller that keeps the lists itself (the step plan): `step(params, gs, vs, bs,
    ms, steps, etas, lr, options, grad_scale, skip, guarded)`, `options(group)` its option
    arguments, `takes(p, state, momentum)` whether its kernels take a tensor. None otherwise."""
    from . import cpp_backend
    if fn is cpp_backend.fused_step:
        return KernelOp(cpp_backend.kernel_step, cpp_backend.option_args, cpp_backend.kernel_takes)
    return None


def kernel_op_for(fn, params, grads, states, momentum):
    """`kernel_op(fn)` when its kernels take every tensor of a call (no fp64 gradient, and
    `takes` for each parameter and its state), else None: the caller then calls `fn`."""
    op = kernel_op(fn)
    if op is None or any(g.dtype == torch.float64 for g in grads):
        return None
    return op if all(op.takes(p, st, momentum) for p, st in zip(params, states)) else None


def add_one(steps, all_cpu):
    """steps += 1; CPU counters in one call of the extension's op when it is built (torch's
    foreach add on CPU tensors dispatches once per tensor: about 0.45 ms for 148 of them)."""
    if all_cpu:
        from . import cpp_backend
        if cpp_backend.add_one is not None:
            return cpp_backend.add_one(steps)
    torch._foreach_add_(steps, 1.0)


def max_abs(grads, dtype):
    """max|g| of each gradient (NaN if it holds one) as one `dtype` vector on their device."""
    if grads[0].device.type == "cpu" and dtype == torch.float32:
        from . import cpp_backend
        if cpp_backend.max_abs is not None:
            return cpp_backend.max_abs(grads)
    return torch.stack(torch._foreach_norm(grads, float("inf"), dtype=dtype))


# ---- the two-phase protocol of sharded tensors (distributed.py) ---------------------------------
# Phase 1 `sums(grads, rows, group, grad_scale, dtype)` -> S_r of every local slice, flat; phase 3
# `apply(params, grads, states, rows, slice_lens, numels, S, norms, group, grad_scale, skip,
# guarded)`: finalize every slice from the complete sums and apply. Every backend has both.
TwoPhase = collections.namedtuple("TwoPhase", "sums apply")
REFERENCE_TWO_PHASE = TwoPhase(reference.two_phase_sums, reference.two_phase_apply)


def two_phase(step_fn, param, grad):
    """The two-phase ops of the backend whose one-pass step is `step_fn`, for the local tensors
    `param` and `grad` (the reference's for tensors that backend's kernels do not take)."""
    if step_fn is reference_unless_skipped:
        return REFERENCE_TWO_PHASE
    from . import cpp_backend
    if step_fn is cpp_backend.fused_step:
        module = cpp_backend
    else:
        from . import triton_backend as module
    if not module.two_phase_takes(param, grad):
        return REFERENCE_TWO_PHASE
    return TwoPhase(module.two_phase_sums, module.two_phase_apply)
