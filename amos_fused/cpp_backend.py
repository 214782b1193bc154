"""backend="cpu" and backend="cuda": the compiled extension amos_fused._C (csrc/).

Both call one torch.library op, `torch.ops.amos_fused.amos_step_`, which mutates params, v, b
and m in place and dispatches on the tensors' device to the CPU kernels (csrc/amos_cpu.cpp) or
the CUDA kernels (csrc/amos_cuda.cu). Its fake implementation (it returns nothing, so it is
empty) lets torch.compile trace a training step that calls the optimizer.

Tensors the kernels do not take go to the reference path, with the same result: fp64
parameters (the kernels compute in fp32) and non-contiguous parameters or momentum.
"""
import torch

from .fallback import reference_unless_skipped

try:
    from . import _C
    IMPORT_ERROR = None
except ImportError as err:  # not built: pip install --no-build-isolation -e .
    _C, IMPORT_ERROR = None, err

SCHEDULE_CODE = {"amos": 0, "constant": 1, "inverse_time": 2, "inverse_square": 3}

if _C is not None:
    @torch.library.register_fake("amos_fused::amos_step_")
    def _amos_step_fake(params, grads, vs, bs, ms, steps, etas, lr, lr_tensor, grad_scale, skip, guarded, schedule, beta,
                        eps, momentum, clip_value, d_coef, c_coef, extra_l2, q, half_life):
        return None

# max|x| per tensor on the CPU (csrc/checks_cpu.cpp), for Amos' skip test; None when not built
max_abs = getattr(torch.ops.amos_fused, "max_abs", None) if _C is not None else None

if max_abs is not None:
    @torch.library.register_fake("amos_fused::max_abs")
    def _max_abs_fake(xs):
        return xs[0].new_empty((len(xs),), dtype=torch.float32)

# steps += 1 for CPU step counters in one call (csrc/steps_cpu.cpp); None when not built
add_one = getattr(torch.ops.amos_fused, "add_one_", None) if _C is not None else None

if add_one is not None:
    @torch.library.register_fake("amos_fused::add_one_")
    def _add_one_fake(steps):
        return None


def unavailable(kind):
    """Why backend=kind ("cpu" or "cuda") cannot run on this machine, or None when it can."""
    if _C is None:
        return (f"the extension amos_fused._C is not built or failed to import ({IMPORT_ERROR}); "
                "build it with `pip install --no-build-isolation -e .`")
    if kind == "cuda":
        if not _C.with_cuda:
            return ("amos_fused._C was built without its CUDA kernels (no CUDA toolkit or a CPU torch at "
                    "build time); rebuild with AMOS_FUSED_CUDA=1 pip install --no-build-isolation -e .")
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


def kernel_takes(p, state, momentum):
    """Whether the kernels take this parameter and its state (else: the reference path)."""
    return p.dtype != torch.float64 and p.is_contiguous() and (momentum == 0 or state["m"].is_contiguous())


@torch.no_grad()
def fused_step(params, grads, states, group, grad_scale=None, skip=None, guarded=None):
    """One step of a group's tensors on one device (CPU or CUDA) with the compiled kernels."""
    mom = group["momentum"]
    takes = [kernel_takes(p, st, mom) for p, st in zip(params, states)]
    if not all(takes):
        reference_unless_skipped([p for p, k in zip(params, takes) if not k], [g for g, k in zip(grads, takes) if not k],
                                 [st for st, k in zip(states, takes) if not k], group, grad_scale, skip, guarded)
        params = [p for p, k in zip(params, takes) if k]
        grads = [g for g, k in zip(grads, takes) if k]
        states = [st for st, k in zip(states, takes) if k]
    if not params:
        return
    # fp64 gradients of other params: the reference computes in fp32 for these params too
    gs = [(g.float() if g.dtype == torch.float64 else g).contiguous() for g in grads]
    kernel_step(params, gs, [st["v"] for st in states], [st["b"] for st in states],
                [st["m"] for st in states] if mom > 0 else [], [st["step"] for st in states],
                [float(st["eta"]) for st in states], group["lr"], option_args(group), grad_scale, skip, guarded)


def option_args(group):
    """The op's arguments from a group's options other than lr (Amos caches them per option values)."""
    return (SCHEDULE_CODE[group["schedule"]], float(group["beta"]), float(group["eps"]), float(group["momentum"]),
            float(group["clip_value"] or 0.0), float(group["d_coef"]), float(group["c_coef"]),
            float(group["extra_l2"]), float(group["q"]), float(group["half_life"] or 0.0))


def kernel_step(params, gs, vs, bs, ms, steps, etas, lr, options, grad_scale=None, skip=None, guarded=None):
    """The op on tensors the kernels take (`kernel_takes`), with contiguous fp32/bf16/fp16
    gradients `gs`; `ms` is empty without momentum; `options` from `option_args`."""
    # A tensor lr stays a tensor: the kernels read it (on the device for CUDA: no host sync),
    # and under torch.compile a new value is new data, not a recompilation.
    lr_tensor = None
    if torch.is_tensor(lr):
        lr, lr_tensor = 0.0, lr.detach().to(torch.float32)
    if grad_scale is not None:
        grad_scale = grad_scale.to(params[0].device, torch.float32)
    if skip is not None:
        skip = skip.to(params[0].device, torch.float32)
    torch.ops.amos_fused.amos_step_(params, gs, vs, bs, ms, steps, etas, float(lr), lr_tensor, grad_scale, skip,
                                    guarded, *options)


# ---- the two-phase protocol of sharded tensors (backends.TwoPhase, csrc/two_phase.cpp) ----------

def two_phase_takes(param, grad):
    """Whether the two-phase ops take this local parameter (and its gradient, cast if fp64)."""
    return _C is not None and param.dtype != torch.float64 and param.is_contiguous()


def _grads(grads):
    return [(g.float() if g.dtype == torch.float64 else g).contiguous() for g in grads]


def _scalar(x, device):
    return None if x is None else x.detach().reshape(()).to(device, torch.float32)


def two_phase_sums(grads, rows, group, grad_scale=None, dtype=torch.float32):
    gs = _grads(grads)
    return torch.ops.amos_fused.two_phase_sums(gs, list(rows), _scalar(grad_scale, gs[0].device),
                                               float(group["clip_value"] or 0.0))


def two_phase_apply(params, grads, states, rows, slice_lens, numels, S, norms, group, grad_scale=None, skip=None,
                    guarded=None):
    device = params[0].device
    lr, lr_tensor = group["lr"], None
    if torch.is_tensor(lr):
        lr, lr_tensor = 0.0, lr.detach().reshape(()).to(torch.float32)
    ms = [st["m"] for st in states] if group["momentum"] > 0 else []
    torch.ops.amos_fused.two_phase_apply_(
        params, _grads(grads), [st["v"] for st in states], [st["b"] for st in states], ms,
        [st["step"] for st in states], [float(st["eta"]) for st in states], list(rows), list(slice_lens),
        list(numels), S.to(torch.float32), None if norms is None else norms.to(torch.float32), float(lr), lr_tensor,
        _scalar(grad_scale, device), _scalar(skip, device), guarded, *option_args(group))


if _C is not None:
    @torch.library.register_fake("amos_fused::two_phase_sums")
    def _two_phase_sums_fake(grads, rows, grad_scale, clip_value):
        return grads[0].new_empty((sum(rows),), dtype=torch.float32)

    @torch.library.register_fake("amos_fused::two_phase_apply_")
    def _two_phase_apply_fake(params, grads, vs, bs, ms, steps, etas, rows, slice_lens, numels, S, norms, lr,
                              lr_tensor, grad_scale, skip, guarded, schedule, beta, eps, momentum, clip_value, d_coef,
                              c_coef, extra_l2, q, half_life):
        return None
