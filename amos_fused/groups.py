"""Param groups: a new group checked and completed (options, tensors, backends; an lr and a beta
left out from the rules), and each parameter's eta, set once when its group is added (given, or by
the eta rule: defaults.py; docs/defaults.md)."""
import torch

from . import backends, defaults, distributed
from .options import FOREIGN, check_foreign, check_options, is_number, scalar_lr


def _entries(group):
    """The group's params as given: tensors or (name, tensor) pairs."""
    return [group["params"]] if torch.is_tensor(group["params"]) else list(group["params"])


def tensors_of(group):
    """The tensors of a param group as given (a dict, or an iterable of tensors or (name, tensor))."""
    entries = _entries(group) if isinstance(group, dict) else group
    return [p[1] if isinstance(p, tuple) else p for p in entries]


def count_matrices(groups):
    """How many parameters of two or more dimensions `groups` hold (the lr rule's M)."""
    return sum(1 for group in groups for p in tensors_of(group) if torch.is_tensor(p) and p.ndim >= 2)


def _readable(params):
    """Whether `params` is read into a list here: not a tensor, and not a set (the checks refuse those)."""
    return params is not None and not torch.is_tensor(params) and not isinstance(params, set)


def listed(params):
    """(params, groups): `params` as given to the optimizer with every generator read into a list
    (a group dict is copied), so that they can be counted before they are added, and its groups."""
    if not _readable(params):
        return params, []
    params = [dict(g, params=list(g["params"])) if isinstance(g, dict) and _readable(g.get("params")) else g
              for g in params]
    return params, params if params and isinstance(params[0], dict) else [params]


def prepare(param_group, options, param_groups, backend, capturable, eta_fn, total_steps, model_matrices):
    """(group, tensors, etas): `param_group` completed with `options` (the optimizer's defaults)
    and checked against the optimizer's settings and its `param_groups` so far, raising before
    anything changes; its tensors, and the eta of each. `model_matrices`: the M of the lr rule."""
    group = dict(param_group)
    if not torch.is_tensor(group.get("params")) and not isinstance(group.get("params"), set):
        group["params"] = list(group["params"])  # a generator (model.parameters()) reads only once
    for key, value in options.items():
        group.setdefault(key, value)
    where = f"Amos param group {len(param_groups)}"
    # the caller's keys only: torch's Optimizer.__setstate__ adds 'differentiable' to the defaults of copies
    check_foreign([key for key in param_group if key in FOREIGN], where)
    total_steps = group.pop("total_steps", total_steps)  # a group's own, else the optimizer's
    defaults.check_total_steps(total_steps, where)
    if group["lr"] is None and defaults.has_rule(group.get("schedule")):
        scheduled = defaults.lr_schedule(group["schedule"], total_steps, model_matrices, capturable)
        if scheduled is None:
            group["lr"] = defaults.lr(group["schedule"], total_steps, model_matrices)
        else:
            if capturable:
                raise ValueError(f"{where}: total_steps schedules the lr on the host inside step(), which a "
                                 "captured graph would freeze; with capturable=True pass lr and step an LR "
                                 "scheduler outside the graph")
            group[defaults.SCHEDULE_KEY] = scheduled
            # total_steps: the first step's lr, read before it too; without, the peak, which an LR
            # scheduler attached before the first step takes as its base (the schedule then yields)
            group["lr"] = defaults.scheduled_lr(scheduled) if total_steps is not None else scheduled[0]
    if group["beta"] is None:
        group["beta"] = defaults.beta(scheduled=group.get(defaults.SCHEDULE_KEY) is not None)
    check_options(group, where)
    scalar_lr(group)
    if capturable:
        # a float is baked into a captured graph; a tensor on the device is read at every replay
        first = next((p[1] if isinstance(p, tuple) else p for p in _entries(group)), None)
        device = distributed.local(first).device if first is not None else None
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        elif device is not None and group["lr"].device != device:
            raise ValueError(f"{where}: lr is a tensor on {group['lr'].device}, the parameters are on {device}; "
                             "with capturable=True the kernels read lr on the parameters' device (a captured "
                             f"graph would freeze a value read elsewhere): pass a float or a tensor on {device}")
    tensors = tensors_of(group)
    for i, p in enumerate(tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: params[{i}] is a {type(p).__name__}, not a tensor")
        if p.is_complex():
            raise TypeError(f"{where}: params[{i}] (shape {tuple(p.shape)}) is complex; Amos "
                            "supports real floating-point parameters: split it with torch.view_as_real")
        if not p.is_floating_point():
            raise TypeError(f"{where}: params[{i}] has dtype {p.dtype}; Amos needs floating-point parameters")
        if p.device.type == "meta":
            raise ValueError(f"{where}: params[{i}] (shape {tuple(p.shape)}) is on the meta device and holds "
                             "no data; materialise the model (model.to_empty(device=...), then initialise "
                             "it) before building the optimizer")
    # a duplicate raises, within a group too (torch only warns there, and steps the tensor twice)
    owner = {id(p): gi for gi, g in enumerate(param_groups) for p in g["params"]}
    for i, p in enumerate(tensors):
        if id(p) in owner:
            again = ("appears twice in this param group (a parameter group with duplicate parameters would "
                     "step it twice)" if owner[id(p)] == len(param_groups) else
                     f"is already in param group {owner[id(p)]} (some parameters appear in more than one "
                     "parameter group)")
            raise ValueError(f"{where}: params[{i}] (shape {tuple(p.shape)}) {again}; list every parameter "
                             "once (tied weights are one tensor)")
        owner[id(p)] = len(param_groups)
    for i, p in enumerate(tensors):
        try:
            distributed.check_placements(p)  # raises now for DTensor placements Amos cannot step
        except NotImplementedError as err:
            raise NotImplementedError(f"{where}: params[{i}]: {err}") from None
    if backend != "auto":
        for p in tensors:
            backends.resolve(backend, p.device)  # raises now, with the reason
    names = [p[0] if isinstance(p, tuple) else None for p in _entries(group)]
    if group.get("param_names") and len(group["param_names"]) == len(names):
        names = list(group["param_names"])  # names given beside the tensors (torchtitan does)
    return group, tensors, etas_of(eta_fn, names, tensors, group)


def etas_of(eta_fn, names, params, group):
    """eta of each parameter (named, or None): eta_fn's, else the group's, else the default rule
    (by shape: defaults.eta)."""
    etas = [eta_fn(name, p) if eta_fn is not None else None for name, p in zip(names, params)]
    etas = [group["eta"] if eta is None else eta for eta in etas]
    etas = [defaults.eta(p.shape) if eta is None else eta for eta, p in zip(etas, params)]
    for name, p, eta in zip(names, params, etas):
        if not (is_number(eta) and eta > 0):
            raise ValueError(f"Amos: eta for parameter {name or tuple(p.shape)} is {eta!r}; "
                             "eta_fn and eta must give a number > 0")
    return [float(eta) for eta in etas]


def param_name(group_index, group, i):
    """How errors name parameter `i` of param group `group_index`."""
    names = group.get("param_names")
    p = group["params"][i]
    label = repr(names[i]) if names else f"param_groups[{group_index}]['params'][{i}]"
    return f"Amos parameter {label} (shape {tuple(p.shape)})"
