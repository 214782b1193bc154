"""What a step does: the full path (`collect` checks every input, `full_run` resolves the
backends) and the step plan (`Plan`), which lets later steps skip the full path's per-tensor
Python while nothing it was built from changes.

One step's work is a `Run`: per group a `GroupRun`; `grads` all groups' gradients in order (the
verdict reads them), `checks` the verdict's (verdict.layout), `fresh` when from the full path.
"""
import collections
import itertools
import operator

import torch

from . import backends, verdict
from .groups import param_name
from .options import OPTION_KEYS, check_options, lr_ok, scalar_lr
from .state import check_state

_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Run = collections.namedtuple("Run", "groups devices on_device checks grads grad_devices fresh")
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
            if st:
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
_IS_CONTIGUOUS = operator.methodcaller("is_contiguous")
_V, _B, _STEP, _ETA = map(operator.itemgetter, ("v", "b", "step", "eta"))
_M, _M_ITEM = operator.methodcaller("get", "m"), operator.itemgetter("m")


def _same(xs, ys):
    return all(map(operator.is_, xs, ys))


def _layout(group):
    """The options a plan is built on (state shapes, the verdict's vectors, which state exists)."""
    return group["granularity"], group["clip_value"], group["momentum"] > 0, group["momentum_dtype"]


class Plan:
    """What the last full step found, kept so the next steps skip its per-tensor Python.

    Valid while nothing it was built from changes, which every step checks: by identity the
    param groups, their params, the state dicts and the state tensors v and m; the gradients'
    and parameters' layout (which params have a gradient; sparsity, shapes, dtypes, devices,
    the parameters' contiguity), which the full path checks or decides with; the options by
    identity, and if some changed, check_options again (schedulers change lr, some momentum).
    Otherwise the step takes the full path, which raises for bad input and builds a new plan.
    """

    def __init__(self, opt, run):
        self.state_map, self.state_dicts = opt.state, list(opt.state.values())
        self.mode = (opt.guard, opt.backend, opt.capturable)
        self.groups = [GroupPlan(opt, gi, gr) for gi, gr in enumerate(run.groups)]
        self.devices, self.on_device, self.checks, self.grad_devices = (run.devices, run.on_device, run.checks,
                                                                        run.grad_devices)

    def run(self, opt):
        """This step's `Run`, or None when the plan does not hold any more."""
        if (opt.state is not self.state_map or len(opt.state) != len(self.state_dicts)
                or (opt.guard, opt.backend, opt.capturable) != self.mode or len(opt.param_groups) != len(self.groups)
                or not _same(opt.state.values(), self.state_dicts)):
            return None
        groups = []
        for group, plan in zip(opt.param_groups, self.groups):
            run = plan.run(group, opt.backend)
            if run is None:
                return None
            groups.append(run)
        grads = [] if not self.checks else groups[0].grads if len(groups) == 1 else [g for r in groups for g in r.grads]
        return Run(groups, self.devices, self.on_device, self.checks, grads, self.grad_devices, fresh=False)


class GroupPlan:
    """One param group's part of a `Plan`."""

    def __init__(self, opt, index, run):
        group, params = run.group, run.params
        self.group, self.index = group, index
        self.all_params = list(group["params"])
        self.options, self.layout = _options_of(group), _layout(group)
        with_grad = {id(p) for p in params}
        self.mask = [id(p) in with_grad for p in self.all_params]
        self.missing = [not m for m in self.mask]
        self.some_missing = not all(self.mask)
        self.params = list(params)
        self.shapes = [p.shape for p in params]
        self.devices = [p.device for p in params]
        self.pdtypes = [p.dtype for p in params]
        self.gdtypes = [g.dtype for g in run.grads]
        self.contiguous = [p.is_contiguous() for p in params]
        self.states = [opt.state[p] for p in params]
        self.vs, self.ms = [st["v"] for st in self.states], [st.get("m") for st in self.states]
        self.calls = run.calls
        self.call_devices = [params[0 if idx is None else idx[0]].device for _, idx in self.calls]
        momentum = group["momentum"]
        # the op called straight from the plan's lists when the kernels take every tensor
        # (the op's own test: m's layout is the optimizer's, fixed while m is)
        op = backends.kernel_op(self.calls[0][0]) if len(self.calls) == 1 and params else None
        fused = (op is not None and torch.float64 not in self.gdtypes
                 and all(op.takes(p, st, momentum) for p, st in zip(params, self.states)))
        self.fused = Fused(op.step, op.options(group)) if fused else None
        self.option_args = op.options if fused else None
        self.op_ms = self.ms if momentum > 0 else []
        with_m = sum(m is not None for m in self.ms)
        self.ms_kind = "all" if with_m == len(self.ms) else "none" if with_m == 0 else "some"

    def same_ms(self, states):
        """m unchanged (a new m is checked again, like v), tested the cheapest way for the usual cases."""
        if self.ms_kind == "all":
            return _same(map(_M_ITEM, states), self.ms)
        if self.ms_kind == "none":
            return not any(map(operator.contains, states, itertools.repeat("m")))
        return _same(map(_M, states), self.ms)

    def run(self, group, backend):
        """This step's `GroupRun` for `group`, or None when the plan does not hold for it."""
        plist = group["params"]
        if group is not self.group or len(plist) != len(self.all_params) or not _same(plist, self.all_params):
            return None
        for (fn, _), device in zip(self.calls, self.call_devices):  # a backend can become unavailable
            if backends.resolve(backend, device) is not fn:
                return None
        lr = group["lr"]
        if not lr_ok(lr) or (torch.is_tensor(lr) and lr.dim()):  # the full path checks it, or makes it 0-d
            return None
        options = _options_of(group)
        if not _same(options, self.options):
            check_options(group, f"Amos param group {self.index}")  # raises for a bad value (the full path again)
            if _layout(group) != self.layout:
                return None
            self.options = options
            if self.fused is not None:
                self.fused = self.fused._replace(options=self.option_args(group))
        grads = list(map(_GRAD, plist))
        if list(map(operator.is_, grads, itertools.repeat(None))) != self.missing:
            return None
        if self.some_missing:
            grads = list(itertools.compress(grads, self.mask))
        params = self.params
        if (any(map(_IS_SPARSE, grads)) or list(map(_SHAPE, grads)) != self.shapes
                or list(map(_SHAPE, params)) != self.shapes or list(map(_DTYPE, grads)) != self.gdtypes
                or list(map(_DTYPE, params)) != self.pdtypes or list(map(_DEVICE, grads)) != self.devices
                or list(map(_DEVICE, params)) != self.devices or list(map(_IS_CONTIGUOUS, params)) != self.contiguous):
            return None
        states = self.states
        if not _same(map(_V, states), self.vs) or not self.same_ms(states):
            return None
        if self.fused is None:
            return GroupRun(group, params, grads, states, self.calls, None, None)
        etas = list(map(float, map(_ETA, states)))
        lists = (self.vs, list(map(_B, states)), self.op_ms, list(map(_STEP, states)), etas)
        return GroupRun(group, params, grads, states, self.calls, self.fused, lists)


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
