"""The skip verdict of a step (guard="step"): does some gradient hold NaN or Inf, or a sum of
squares past the compute dtype's range? Decided on the gradients' device, with the warnings
(shown once) about skipped steps and guarded slices.

The test (Amos' docstring): GradScaler's found_inf, or for some parameter max|x| of its unscaled,
clipped gradient x NaN/Inf or C * max|x|**2 past the compute dtype's range (C: the slice length).
max|g| per gradient takes one fused read of all gradients (torch._foreach_norm with ord=inf on
CUDA; the extension's max_abs on the CPU, faster than torch's there: backends.max_abs).
"""
import collections
import math
import warnings

import torch

from . import backends
from .distributed import local
from .slices import slice_shape

_FP32_MAX = torch.finfo(torch.float32).max


def layout(work, read_grads, bound_cache):
    """(checks, grads, devices) of `work` ((group, params, grads) per group): `grads` all its
    gradients in order (local parts of DTensors), `devices` theirs, and per (device, fp64 gradient,
    fp64 parameter) one check (device, compute dtype, limit, indices into `grads` or None for all,
    C, clip). `read_grads=False` (guard="slice"): no checks, found_inf only."""
    by_key, devices, flat = {}, set(), []
    for group, ps, gs in work:
        for p, g in zip(ps, gs):
            g = local(g)
            devices.add(g.device)  # found_inf applies on every device, empty gradients' too
            if g.numel() and read_grads:
                key = (g.device, g.dtype == torch.float64, p.dtype == torch.float64)
                by_key.setdefault(key, []).append((len(flat), p, group))
            flat.append(g)
    checks = []
    for (device, g64, p64), items in by_key.items():
        # read fp64 gradients in fp64; judge against the range the kernels compute in: fp64
        # for fp64 parameters, else fp32 (an fp64 gradient of an fp32 parameter is cast)
        cdt = torch.float64 if g64 or p64 else torch.float32
        limit = math.inf if p64 else _FP32_MAX
        C, clip = _bound_vectors(bound_cache, device, cdt, [(p, group) for _, p, group in items])
        idx = [i for i, _, _ in items]
        checks.append((device, cdt, limit, None if len(idx) == len(flat) else idx, C, clip))
    return checks, flat, devices


def flags(checks, grads, devices, grad_scale, found_inf):
    """{device: 0-d fp32 tensor, 1.0 when this step must be skipped}: the verdicts of `layout`'s
    checks on `grads`, and GradScaler's found_inf; computed on the device."""
    out = {}
    for device, cdt, limit, idx, C, clip in checks:
        x = backends.max_abs(grads if idx is None else [grads[i] for i in idx], cdt)
        if grad_scale is not None:
            x = x / grad_scale.to(device, cdt)
        bound = torch.minimum(x, clip).square() * C
        bad = (~(bound < limit)).any().to(torch.float32)  # NaN compares False: bad too
        out[device] = torch.maximum(out[device], bad) if device in out else bad
    if found_inf is not None:
        for device in devices:
            inf = found_inf.reshape(()).to(device, torch.float32)
            out[device] = torch.maximum(out[device], inf) if device in out else inf
    return out


def _bound_vectors(cache, device, cdt, items):
    """The slice lengths C and clip values (inf: none) of `items` ((param, group) pairs), cached
    on the device: a new tensor from a list would copy from the host at every step (and
    cannot be captured)."""
    key = (device, cdt, tuple(id(p) for p, _ in items),
           tuple((g["granularity"], g["clip_value"]) for g in {id(g): g for _, g in items}.values()))
    hit = cache.get(key)
    if hit is None:
        if len(cache) > 64:  # param lists change rarely; bound the cache anyway
            cache.clear()
        C = [float(slice_shape(p.shape, g["granularity"])[1]) for p, g in items]
        clip = [math.inf if g["clip_value"] is None else float(g["clip_value"]) for _, g in items]
        hit = cache[key] = (torch.tensor(C, dtype=cdt, device=device),
                            torch.tensor(clip, dtype=cdt, device=device))
    return hit


MAX_PENDING = 64  # CUDA steps whose verdicts may be in flight before a step waits for the oldest


class Notices:
    """The warnings shown once (a skipped step, guarded slices), and the CUDA steps' verdicts and
    guarded counts, awaited for them without waiting for the GPU."""

    def __init__(self):
        self.warned_nonfinite = False
        self.warned_guarded = False
        # per CUDA step not yet read, oldest first: (event, pinned verdict or None, pinned guarded count, scaled)
        self.pending = collections.deque()

    def __getstate__(self):
        # a CUDA event cannot be copied: a copy starts without the pending verdicts
        return {**self.__dict__, "pending": collections.deque()}

    def skipped(self):
        if not self.warned_nonfinite:
            warnings.warn("Amos: a gradient holds NaN or Inf, or its sum of squares overflows; the step was "
                          "skipped (parameters and state unchanged) and counted in optimizer.skipped_steps. "
                          "This warning is shown once.")
            self.warned_nonfinite = True

    def guarded(self, count):
        """Warn once, when the guarded slices counted so far (`count`) first become nonzero."""
        if count and not self.warned_guarded:
            warnings.warn(f"Amos(guard='slice'): {count} slice(s) had a gradient with NaN or Inf or a sum of "
                          "squares past the compute dtype's range; they kept their parameters and state, the "
                          "rest of the step went ahead (counted in optimizer.guarded_slices). This warning is "
                          "shown once.")
            self.warned_guarded = True

    def remember(self, skip, guarded, scaled):
        """Keep host copies of this step's verdict and guarded count (arriving asynchronously)
        for the warnings; `scaled`: GradScaler decided the verdict (it warns about nothing)."""
        flag = None
        if skip is not None:
            flag = torch.empty((), dtype=torch.float32, pin_memory=True)
            flag.copy_(skip, non_blocking=True)
        count = torch.empty((), dtype=torch.int64, pin_memory=True)
        count.copy_(guarded, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(guarded.device))  # the copies' stream (not the current device's)
        self.pending.append((event, flag, count, scaled))

    def check_pending(self):
        """Warn about skips and guarded slices decided on the GPU at earlier steps, once their
        verdicts have arrived (without waiting for them: a warning may come a step or two late).
        Every step's verdict is read: a queue, so a CPU running ahead of the GPU misses none."""
        pending = self.pending
        if len(pending) >= MAX_PENDING:  # the GPU is far behind: wait for the oldest (a rare sync)
            pending[0][0].synchronize()
        while pending and pending[0][0].query():
            event, flag, count, scaled = pending.popleft()
            if flag is not None and flag.item() and not scaled:
                self.skipped()
            self.guarded(int(count.item()))
