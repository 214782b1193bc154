"""What a step does: the full path (`collect` checks every input, `full_run` resolves the
backends) and the step plan (`Plan`), which lets later steps skip the full path's per-tensor
Python while nothing it was built from changes.

One step's work is a `Run`: per group a `GroupRun`; `grads` all groups' gradients in order (the
verdict reads them), `checks` the verdict's (verdict.layout), `fresh` when from the full path,
`steps` all groups' step counters in order (None: the step makes the state first).
"""
import collections
import itertools
import math
import operator

import torch

from . import backends, verdict
from .groups import param_name
from .options import OPTION_KEYS, check_options, lr_ok, scalar_lr
from .state import check_state

_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Run = collections.namedtuple("Run", "groups devices on_device checks grads grad_devices fresh steps",
                             defaults=(None,))
# states None: created by step(); fused/lists: a planned call of the compiled op (GroupPlan)
GroupRun = collections.namedtuple("GroupRun", "group params grads states calls fused lists")
Fused = collections.namedtuple("Fused", "kernel_step options")


# ---- the full path --------------------------------------------------------------------------
def collect(param_groups, state, checked):
    """(group, params, grads) per group, with every check done before anything changes.

    `checked`: id(param) -> what its state was last checked against (kept by the caller): a
    state is checked again only when the granularity or the state tensors change.
    """
    work = []
    for gi, group in enumerate(param_groups):
        check_options(group, f"Amos param group {gi}")
        scalar_lr(group)
        params, grads = [], []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise TypeError(f"{param_name(gi, group, i)}: sparse gradients are not supported; use "
                                "dense gradients (e.g. nn.Embedding(..., sparse=False))")
            if g.shape != p.shape or g.dtype not in _GRAD_DTYPES:
                raise ValueError(f"{param_name(gi, group, i)}: gradient has shape {tuple(g.shape)} and "
                                 f"dtype {g.dtype}; it must have the parameter's shape and a floating-point dtype")
            if g.device != p.device:
                raise ValueError(f"{param_name(gi, group, i)}: gradient is on {g.device}, parameter on "
                                 f"{p.device}; move them together")
            st = state.get(p)
            if st and torch.compiler.is_compiling():
                check_state(st, p, group, gi, i)  # a hit or miss of `checked` would be a guard: a recompile
            elif st:
                key = (group["granularity"], id(st.get("v")), id(st.get("m")))
                if checked.get(id(p)) != key:
                    check_state(st, p, group, gi, i)
                    checked[id(p)] = key
            params.append(p)
            grads.append(g)
        work.append((group, params, grads))
    return work


def full_run(work, backend, guard, capturable, bound_cache):
    """The `Run` of `collect`'s work: backends resolved and capturable checked (raising before
    anything changes), states left to the step (created after the verdict)."""
    calls, devices = [], set()  # per group, (step function, indices or None: all) per device
    for group, params, grads in work:
        by_device = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        devices.update(by_device)
        # resolved before anything changes: an error leaves everything as it was
        calls.append([(backends.resolve(backend, device), None if len(by_device) == 1 else idx)
                      for device, idx in by_device.items()])
    # On the device (no host sync) when every parameter is on one CUDA device, or capturable;
    # else (the CPU, several devices) the verdict is read on the host first.
    on_device = len(devices) == 1 and (capturable or next(iter(devices)).type == "cuda")
    if capturable:
        _check_capturable(work, calls, on_device, backend)
    checks, flat, grad_devices = verdict.layout(work, guard == "step", bound_cache)
    groups = [GroupRun(group, params, grads, None, group_calls, None, None)
              for (group, params, grads), group_calls in zip(work, calls)]
    # no plan from a traced step: its frames may resume outside Dynamo
    return Run(groups, devices, on_device, checks, flat, grad_devices, fresh=not torch.compiler.is_compiling())


def _check_capturable(work, calls, on_device, backend):
    """capturable=True: raise, before anything changes, for a setup that needs the host."""
    if not on_device:
        raise RuntimeError("Amos(capturable=True): every parameter must be on one device (the verdict of a step "
                           "over several devices is read on the host); use capturable=False")
    for (group, params, _), group_calls in zip(work, calls):
        for fn, idx in group_calls:
            first = params[0 if idx is None else idx[0]] if params else None
            if first is not None and first.device.type == "cuda" and fn is backends.reference_unless_skipped:
                raise RuntimeError("Amos(capturable=True): CUDA parameters need a fused backend ('cuda' or "
                                   f"'triton'), but backend={backend!r} runs the reference path here")
        for p in params:
            if p.dtype == torch.float64 or not p.is_contiguous():
                raise RuntimeError(f"Amos(capturable=True): a parameter of shape {tuple(p.shape)} is "
                                   f"{'fp64' if p.dtype == torch.float64 else 'not contiguous'}; the fused "
                                   "kernels take contiguous fp32/bf16/fp16 parameters only")


# ---- the step plan --------------------------------------------------------------------------
_options_of = operator.itemgetter(*OPTION_KEYS)
_GRAD, _SHAPE, _DTYPE, _DEVICE, _IS_SPARSE = map(operator.attrgetter, ("grad", "shape", "dtype", "device", "is_sparse"))
_IS_CONTIGUOUS, _CONTIGUOUS = torch.Tensor.is_contiguous, torch.Tensor.contiguous  # twice methodcaller's speed
_V, _B, _STEP, _ETA, _PARAMS, _LR = map(operator.itemgetter, ("v", "b", "step", "eta", "params", "lr"))
_M, _M_ITEM = operator.methodcaller("get", "m"), operator.itemgetter("m")


def _same(xs, ys):
    return all(map(operator.is_, xs, ys))


def _lrs_ok(lrs):
    """Every group's lr as the full path takes it unchanged: `lr_ok`, and a tensor lr 0-d (the
    full path makes others 0-d: `scalar_lr`). All floats, the usual case, in one pass: a NaN or
    inf makes the sum not finite, a negative one the minimum."""
    if set(map(type, lrs)) == {float}:
        return 0.0 <= min(lrs) and sum(lrs) < math.inf
    return all(lr_ok(lr) and not (torch.is_tensor(lr) and lr.dim()) for lr in lrs)


def _layout(group):
    """The options a plan is built on (state shapes, the verdict's vectors, which state exists)."""
    return group["granularity"], group["clip_value"], group["momentum"] > 0, group["momentum_dtype"]


class Plan:
    """What the last full step found, kept so the next steps skip its per-tensor Python.

    Valid while nothing it was built from changes, which every step checks: by identity the
    param groups, their params, the state dicts and the state tensors v and m; the gradients'
    and parameters' layout (which params have a gradient; sparsity, shapes, dtypes, devices,
    the parameters' contiguity), which the full path checks or decides with; the options by
    value, and if some changed, check_options again (schedulers change lr, some momentum).
    Otherwise the step takes the full path, which raises for bad input and builds a new plan.
    Each check is one pass over all groups' lists end to end, not one per group: with many
    param groups (layer-wise learning rates) a pass per group would multiply its fixed cost.
    """

    def __init__(self, opt, run):
        self.state_map, self.state_dicts = opt.state, list(opt.state.values())
        self.mode = (opt.guard, opt.backend, opt.capturable)
        self.groups = [GroupPlan(opt, gi, gr) for gi, gr in enumerate(run.groups)]
        self.devices, self.on_device, self.checks, self.grad_devices = (run.devices, run.on_device, run.checks,
                                                                        run.grad_devices)
        self.group_dicts = [gr.group for gr in run.groups]
        self.sizes = [len(gr.group["params"]) for gr in run.groups]
        self.options = [plan.options for plan in self.groups]
        # every group on a device has that device's backend
        self.backends = {gr.params[0 if idx is None else idx[0]].device: fn for gr in run.groups for fn, idx in gr.calls}
        self.all_params = [p for gr in run.groups for p in gr.group["params"]]
        params = self.params = [p for gr in run.groups for p in gr.params]
        with_grad = {id(p) for p in params}
        self.mask = [id(p) in with_grad for p in self.all_params]
        self.missing = [not m for m in self.mask]
        self.some_missing = not all(self.mask)
        self.shapes, self.pdtypes = [p.shape for p in params], [p.dtype for p in params]
        self.gdtypes = [g.dtype for gr in run.groups for g in gr.grads]
        self.tensor_devices, self.contiguous = [p.device for p in params], [p.is_contiguous() for p in params]
        self.states = [st for plan in self.groups for st in plan.states]
        self.vs, self.ms = [st["v"] for st in self.states], [st.get("m") for st in self.states]
        with_m = sum(m is not None for m in self.ms)
        self.ms_kind = "all" if with_m == len(self.ms) else "none" if with_m == 0 else "some"
        ends = list(itertools.accumulate(len(plan.params) for plan in self.groups))
        self.cuts = list(zip([0] + ends[:-1], ends))  # each group's part of the flat lists
        self.any_fused = any(plan.fused is not None for plan in self.groups)

    def same_ms(self, states):
        """m unchanged (a new m is checked again, like v), tested the cheapest way for the usual cases."""
        if self.ms_kind == "all":
            return _same(map(_M_ITEM, states), self.ms)
        if self.ms_kind == "none":
            return not any(map(operator.contains, states, itertools.repeat("m")))
        return _same(map(_M, states), self.ms)

    def run(self, opt):
        """This step's `Run`, or None when the plan does not hold any more."""
        groups = opt.param_groups
        if (opt.state is not self.state_map or len(opt.state) != len(self.state_dicts)
                or (opt.guard, opt.backend, opt.capturable) != self.mode or len(groups) != len(self.group_dicts)
                or not _same(groups, self.group_dicts) or list(map(len, map(_PARAMS, groups))) != self.sizes
                or not _same(opt.state.values(), self.state_dicts)):
            return None
        for device, fn in self.backends.items():
            if backends.resolve(opt.backend, device) is not fn:  # a backend can become unavailable
                return None
        if not _lrs_ok(list(map(_LR, groups))):
            return None  # the full path checks it, or makes it 0-d
        options = list(map(_options_of, groups))
        if options != self.options:  # a value changed (a scheduler's momentum, say)
            for plan, group, now in zip(self.groups, groups, options):
                if now != plan.options and not plan.update(group, now):
                    return None
            self.options = options
        plist = list(itertools.chain.from_iterable(map(_PARAMS, groups)))
        if not _same(plist, self.all_params):
            return None
        grads = list(map(_GRAD, plist))
        if list(map(operator.is_, grads, itertools.repeat(None))) != self.missing:
            return None
        if self.some_missing:
            grads = list(itertools.compress(grads, self.mask))
        params = self.params
        if (any(map(_IS_SPARSE, grads)) or list(map(_SHAPE, grads)) != self.shapes
                or list(map(_SHAPE, params)) != self.shapes or list(map(_DTYPE, grads)) != self.gdtypes
                or list(map(_DTYPE, params)) != self.pdtypes or list(map(_DEVICE, grads)) != self.tensor_devices
                or list(map(_DEVICE, params)) != self.tensor_devices
                or list(map(_IS_CONTIGUOUS, params)) != self.contiguous):
            return None
        states = self.states
        if not _same(map(_V, states), self.vs) or not self.same_ms(states):
            return None
        # built at every step: cheaper than checking that kept lists still hold
        bs, steps, etas = list(map(_B, states)), list(map(_STEP, states)), list(map(float, map(_ETA, states)))
        # the op takes contiguous gradients (made once here); the other backends get them as they are
        op_grads = list(map(_CONTIGUOUS, grads)) if self.any_fused else grads
        parts = [plan.part((grads if plan.fused is None else op_grads)[a:b], bs[a:b], steps[a:b], etas[a:b])
                 for plan, (a, b) in zip(self.groups, self.cuts)]
        return Run(parts, self.devices, self.on_device, self.checks, grads if self.checks else [], self.grad_devices,
                   fresh=False, steps=steps)


class GroupPlan:
    """One param group's part of a `Plan`: its backend calls, and when one call of the compiled
    op takes all its tensors, that op's arguments but the gradients (`fused`, `lists`)."""

    def __init__(self, opt, index, run):
        group, params = run.group, run.params
        self.group, self.index, self.calls = group, index, run.calls
        self.options, self.layout = _options_of(group), _layout(group)
        self.params = list(params)
        self.states = [opt.state[p] for p in params]
        self.vs, self.ms = [st["v"] for st in self.states], [st.get("m") for st in self.states]
        momentum = group["momentum"]
        # the op called straight from the plan's lists when the kernels take every tensor
        # (the op's own test: m's layout is the optimizer's, fixed while m is)
        op = (backends.kernel_op_for(self.calls[0][0], params, run.grads, self.states, momentum)
              if len(self.calls) == 1 and params else None)
        self.fused = Fused(op.step, op.options(group)) if op is not None else None
        self.option_args = op.options if op is not None else None
        self.op_ms = self.ms if momentum > 0 else []

    def update(self, group, options):
        """The group's options changed to `options`: raise for a bad value (as the full path
        would), False when the plan cannot follow (its layout changed), else follow them."""
        check_options(group, f"Amos param group {self.index}")
        if _layout(group) != self.layout:
            return False
        self.options = options
        if self.fused is not None:
            self.fused = self.fused._replace(options=self.option_args(group))
        return True

    def part(self, grads, bs, steps, etas):
        """This step's `GroupRun`, from its part of the flat lists `Plan.run` checked."""
        lists = None if self.fused is None else (self.vs, bs, self.op_ms, steps, etas)
        return GroupRun(self.group, self.params, grads, self.states, self.calls, self.fused, lists)


# ---- steps of DTensor parameters ------------------------------------------------------------
class WorkCheck:
    """One param group as the last full step of DTensor parameters found it (`sharded_work`)."""

    def __init__(self, group, params, grads):
        self.group, self.all_params, self.options = group, list(group["params"]), _options_of(group)
        with_grad = {id(p) for p in params}
        self.mask = [id(p) in with_grad for p in self.all_params]
        self.params = list(params)
        self.dtypes, self.shapes = [g.dtype for g in grads], [g.shape for g in grads]

    def grads(self, group):
        """This step's gradients of `params`, or None when anything checked has changed."""
        plist = group["params"]
        if (group is not self.group or len(plist) != len(self.all_params) or not _same(plist, self.all_params)
                or not _same(_options_of(group), self.options) or not lr_ok(group["lr"])):
            return None
        grads = list(map(_GRAD, plist))
        if [g is not None for g in grads] != self.mask:
            return None
        grads = list(itertools.compress(grads, self.mask))
        if list(map(_DTYPE, grads)) != self.dtypes or list(map(_SHAPE, grads)) != self.shapes:
            return None
        return grads


def sharded_work(checks, param_groups):
    """The work of a step of DTensor parameters when everything `collect` checked at the last step
    is unchanged (groups, parameters, options, which gradients exist, their dtypes and shapes),
    else None (the full path then checks everything)."""
    if checks is None or len(checks) != len(param_groups) or torch.compiler.is_compiling():
        return None
    work = []
    for group, check in zip(param_groups, checks):
        grads = check.grads(group)
        if grads is None:
            return None
        work.append((group, check.params, grads))
    return work
