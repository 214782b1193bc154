"""Per-parameter state: v and b (one per slice), m, step and eta; created at a parameter's first
step, checked against the parameter before a step, and loaded from a state dict."""
import collections
import copy

import torch

from . import defaults, distributed
from .groups import param_name
from .options import check_options, is_number
from .reference import compute_dtype


def new_state(state, p, group):
    """Fill `state` (the state dict of `p`) with what is missing: v, b, step, and m with momentum."""
    if "v" not in state:
        wide = compute_dtype(p)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        # (R,) tensors; for DTensor (FSDP2) parameters sharded like the slices (distributed.py)
        state["v"] = distributed.new_slice_state(p, group["granularity"], wide)
        state["b"] = distributed.new_slice_state(p, group["granularity"], wide)
    if group["momentum"] > 0 and "m" not in state:
        mdt = defaults.momentum_dtype(group["momentum_dtype"], p)
        state["m"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
    return state


def check_state(state, p, group, group_index, i):
    """Raise when the state of `p` (parameter `i` of its group) does not fit it or its group."""
    shape = distributed.slice_state_shape(p, group["granularity"])  # (R,), or p's shape (FSDP2, "element")
    if "v" in state and tuple(state["v"].shape) != shape:
        raise ValueError(f"{param_name(group_index, group, i)}: state 'v' has shape "
                         f"{tuple(state['v'].shape)} but granularity={group['granularity']!r} needs {shape}; a "
                         "group's granularity cannot change once it has state: build a new optimizer")
    if "m" in state and state["m"].shape != p.shape:
        raise ValueError(f"{param_name(group_index, group, i)}: state 'm' has shape "
                         f"{tuple(state['m'].shape)}, parameter has {tuple(p.shape)}; the state belongs to "
                         "another model")


def check_loadable(state_dict, param_groups, defaults):
    """Raise ValueError naming the group or parameter whose saved state does not fit."""
    where = "Amos.load_state_dict"
    saved_groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(saved_groups, list) or not isinstance(state, dict):
        raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups', as Amos.state_dict() returns")
    fix = "load it into an Amos built on the same model with the same param groups"
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"{where}: the state dict has {len(saved_groups)} param groups, this optimizer "
                         f"{len(param_groups)}; {fix}")
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where}: param group {gi} holds {len(saved['params'])} parameters in the state "
                             f"dict and {len(group['params'])} here; {fix}")
        opts = {**defaults, **saved}
        check_options(opts, f"{where}: saved param group {gi}")
        for j, (i, p) in enumerate(zip(saved["params"], group["params"])):
            st, name = state.get(i, {}), param_name(gi, group, j)
            vb = distributed.slice_state_shape(p, opts["granularity"])
            step = st.get("step")
            if step is not None and not torch.is_tensor(step) and not (is_number(step) and step >= 0):
                raise ValueError(f"{where}: {name}: saved state 'step' is {step!r}; it must be a tensor or a "
                                 f"number >= 0 (the steps taken): {fix}")
            for key, shape in (("v", vb), ("b", vb), ("m", tuple(p.shape)), ("step", ())):
                if torch.is_tensor(st.get(key)) and tuple(st[key].shape) != shape:
                    raise ValueError(f"{where}: {name}: saved state '{key}' has shape {tuple(st[key].shape)}, "
                                     f"expected {shape}; the state dict belongs to another model: {fix}")
            if "eta" not in st and p.requires_grad:  # frozen ones: see loaded
                raise ValueError(f"{where}: {name} has no saved 'eta' (Amos saves it for every parameter); "
                                 "pass a state dict made by Amos.state_dict()")


def loaded(state_dict, param_groups, state):
    """(state, param groups) after loading `state_dict` (checked by `check_loadable`) into an
    optimizer with these `param_groups` and `state`, as torch loads one: the saved ids map to
    these parameters in order, state not keyed by a parameter is kept as it is, each group takes
    its saved options with these parameters (and names, unless saved). Unlike torch, tensors keep
    their saved dtypes and move to their parameter's device; a step saved as a number becomes a
    tensor; a parameter without saved state keeps its eta (torch.distributed.checkpoint saves
    no state for frozen parameters)."""
    saved_groups = copy.deepcopy(state_dict["param_groups"])
    params = [p for g in param_groups for p in g["params"]]
    id_map = dict(zip([i for g in saved_groups for i in g["params"]], params))
    new = collections.defaultdict(dict)
    for key, saved in state_dict["state"].items():
        p = id_map.get(key)
        if p is None:
            new[key] = saved
            continue
        new[p] = {k: v.to(device=p.device) if torch.is_tensor(v) else v for k, v in saved.items()}
        step = new[p].get("step")
        if step is not None and not torch.is_tensor(step):
            new[p]["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
    for p in params:
        if "eta" in state.get(p, ()):
            new[p].setdefault("eta", state[p]["eta"])
    for group, saved in zip(param_groups, saved_groups):
        saved["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            saved["param_names"] = group["param_names"]
    return new, saved_groups
