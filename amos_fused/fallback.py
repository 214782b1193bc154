"""The reference step behind a verdict: what a fused backend runs for the tensors its kernels
do not take (fp64, non-contiguous), and the step function of backend="reference"."""
from .reference import reference_step


def reference_unless_skipped(params, grads, states, group, grad_scale=None, skip=None, guarded=None):
    """The reference step unless `skip` (the step's verdict, a 0-d tensor or None) is set. It reads
    `skip` on the host (a sync on CUDA), so the fused backends use it only for the tensors their
    kernels do not take."""
    if skip is None or not bool(skip):
        reference_step(params, grads, states, group, grad_scale, guarded)
