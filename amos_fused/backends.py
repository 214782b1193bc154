"""The one place that chooses how a step is computed.

A backend is a function `step(params, grads, states, group, grad_scale, skip=None, guarded=None)`
that applies one Amos step (docs/algorithm.md) to the tensors of one param group, with
`state["step"]` already t. `skip` is None, or the step's verdict as a 0-d fp32 tensor on the
device (optimizer.py): the fused backends read it in their kernels (no host sync) and change
nothing when it is nonzero. Every backend guards slices: one whose S_r is not finite keeps its
parameters and state, and is added to `guarded` (an int64 0-d tensor on the device, or None).
Each entry of `_BACKENDS` says whether it can run on a device and, if not, why.
"""
from .reference import reference_step

BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")


def reference_unless_skipped(params, grads, states, group, grad_scale=None, skip=None, guarded=None):
    """The reference step behind a verdict: it reads `skip` on the host (a sync on CUDA), so the
    fused backends use it only for the tensors their kernels do not take (fp64, non-contiguous)."""
    if skip is None or not bool(skip):
        reference_step(params, grads, states, group, grad_scale, guarded)


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
