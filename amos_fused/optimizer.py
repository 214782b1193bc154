"""`Amos`: the torch.optim front end. Checks options, keeps state, hands each group to a backend."""
import math
import numbers
import warnings

import torch

from . import backends, distributed
from .distributed import local
from .reference import compute_dtype, reference_step
from .schedules import CLOSED_FORMS, DECAYING
from .slices import GRANULARITIES, default_eta, slice_shape

SCHEDULES = ("amos",) + CLOSED_FORMS
MOMENTUM_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)

# Default lr per family, measured by the main job (benchmarks/convergence.py, default preset:
# 400 steps, one seed; benchmarks/results/convergence_lr_sweep.md, README "Defaults"): "amos" was
# best at 0.03 of 0.01/0.03/0.1/0.3, "inverse_time" at 0.1 of 0.03/0.1/0.3; "constant" and
# "inverse_square" were not swept and take inverse_time's value.
DEFAULT_LR = {"amos": 0.03, "constant": 0.1, "inverse_time": 0.1, "inverse_square": 0.1}

# Options only one family reads, with their neutral values: setting them for the other family
# is an error rather than a silent no-op.
_AMOS_ONLY = {"d_coef": 0.25, "c_coef": 0.25, "extra_l2": 0.0}
_CLOSED_FORM_ONLY = {"q": 1.0}


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_options(o, where):
    """Raise ValueError/TypeError naming the option and the fix; `o` is a group (or defaults)."""

    def bad(name, need):
        raise ValueError(f"{where}: {name}={o[name]!r} is invalid; {need}")

    if o["schedule"] not in SCHEDULES:  # first: an unknown schedule also leaves lr=None unresolved
        bad("schedule", f"use one of {SCHEDULES}")
    lr = o["lr"]
    if torch.is_tensor(lr):
        if lr.numel() != 1 or not lr.is_floating_point():
            bad("lr", "a tensor lr must be a floating-point scalar tensor")
    elif not (_number(lr) and lr >= 0):
        bad("lr", "use a finite number >= 0")
    if o["granularity"] not in GRANULARITIES:
        bad("granularity", f"use one of {GRANULARITIES}")
    if o["schedule"] in DECAYING:
        if not (_number(o["half_life"]) and o["half_life"] > 0):
            bad("half_life", f"schedule={o['schedule']!r} needs half_life > 0 (in steps)")
    elif o["half_life"] is not None:
        bad("half_life", f"schedule={o['schedule']!r} does not decay; leave half_life=None")
    for name in ("beta", "momentum"):
        if not (_number(o[name]) and 0 <= o[name] < 1):
            bad(name, "use a number in [0, 1)")
    if o["momentum_dtype"] not in MOMENTUM_DTYPES:
        bad("momentum_dtype", "use None (fp32), torch.float32, torch.bfloat16 or torch.float16")
    if o["clip_value"] is not None and not (_number(o["clip_value"]) and o["clip_value"] > 0):
        bad("clip_value", "use None (no clipping) or a number > 0")
    for name in ("d_coef", "c_coef", "extra_l2"):
        if not (_number(o[name]) and o[name] >= 0):
            bad(name, "use a finite number >= 0")
    for name in ("q", "eps"):
        if not (_number(o[name]) and o[name] > 0):
            bad(name, "use a finite number > 0")
    if o["eta"] is not None and not (_number(o["eta"]) and o["eta"] > 0):
        bad("eta", "use None (measured from the initial weights) or a number > 0")
    unused = _CLOSED_FORM_ONLY if o["schedule"] == "amos" else _AMOS_ONLY
    for name, neutral in unused.items():
        if o[name] != neutral:
            bad(name, f"schedule={o['schedule']!r} does not use it; leave it at {neutral}")


class Amos(torch.optim.Optimizer):
    r"""Amos (Tian & Parikh, arXiv 2210.11693) and its closed-form schedules; see ALGORITHM.md.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or group dicts;
            every option below except ``eta_fn`` and ``backend`` can be overridden per group.
        lr: the global learning rate ``xi`` (``alpha0``); read at every step, so LR schedulers
            work. None picks the family's default (``DEFAULT_LR``).
        schedule: ``"amos"`` (official, adaptive decay) or ``"constant"``, ``"inverse_time"``,
            ``"inverse_square"`` (closed forms; the last two need ``half_life`` in steps).
        q: closed forms only: the decoupled decay rate is ``lr**2 / (2q) * s(t)``.
        beta: decay of the second moment ``v``.
        momentum: EMA of the whole update (0 disables it and its state ``m``).
        momentum_dtype: storage of ``m``: None (fp32), float32, bfloat16 or float16.
        clip_value: element-wise gradient clipping (after unscaling), or None.
        d_coef, c_coef, extra_l2: ``"amos"`` only, as in the official code.
        eps: floor of ``v`` (not an addend).
        eta: the expected RMS of each parameter's entries. None measures it once, from the
            initial weights (matrices) or uses 0.5 (vectors and scalars); a float sets it.
        eta_fn: ``eta_fn(name, param) -> float or None`` per parameter (name is None when
            params came without names); None falls back to the group's ``eta`` rule.
        granularity: ``"row"`` (default), ``"tensor"`` or ``"element"``: the slices of ``v``.
        backend: ``"auto"`` or an explicit backend from ``amos_fused.backends.BACKENDS``.

    A step whose gradients hold NaN or Inf, or whose unscaled, clipped gradient has a slice sum
    of squares that overflows (|g| ~ 1e19 and up in fp32), changes nothing: it is counted in
    ``skipped_steps`` and warned about once. With ``torch.amp.GradScaler`` the scaler's
    ``found_inf`` decides the skip and the gradients are unscaled inside the step.
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf

    def __init__(self, params, lr=None, *, schedule="amos", half_life=None, q=1.0, beta=0.999,
                 momentum=0.9, momentum_dtype=None, clip_value=None, d_coef=0.25, c_coef=0.25,
                 extra_l2=0.0, eps=2.0**-125, eta=None, eta_fn=None, granularity="row",
                 backend="auto"):
        defaults = dict(lr=lr, schedule=schedule, half_life=half_life, q=q, beta=beta,
                        momentum=momentum, momentum_dtype=momentum_dtype, clip_value=clip_value,
                        d_coef=d_coef, c_coef=c_coef, extra_l2=extra_l2, eps=eps, eta=eta,
                        granularity=granularity)
        backends.check_backend(backend)
        if eta_fn is not None and not callable(eta_fn):
            raise TypeError(f"Amos: eta_fn must be callable as eta_fn(name, param), got {eta_fn!r}")
        self.backend = backend
        self.eta_fn = eta_fn
        self.skipped_steps = 0  # steps skipped for non-finite gradients or GradScaler's found_inf
        self._warned_nonfinite = False
        super().__init__(params, defaults)

    # ---- groups and eta -------------------------------------------------------------------
    def add_param_group(self, param_group):
        group = dict(param_group)
        if not torch.is_tensor(group.get("params")) and not isinstance(group.get("params"), set):
            group["params"] = list(group["params"])  # a generator (model.parameters()) reads only once
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        if group["lr"] is None and group.get("schedule") in DEFAULT_LR:
            group["lr"] = DEFAULT_LR[group["schedule"]]
        where = f"Amos param group {len(self.param_groups)}"
        check_options(group, where)
        tensors = [p[1] if isinstance(p, tuple) else p for p in
                   ([group["params"]] if torch.is_tensor(group["params"]) else list(group["params"]))]
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
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(tensors):  # torch only warns within a group: the tensor would step twice
            if id(p) in seen:
                raise ValueError(f"{where}: params[{i}] (shape {tuple(p.shape)}) is already in this or an earlier "
                                 "param group; list every parameter once (tied weights are one tensor)")
            seen.add(id(p))
        for i, p in enumerate(tensors):
            distributed.is_sharded(p)  # raises now for DTensor placements Amos cannot step
            if distributed.is_dtensor(p) and self.backend not in ("auto", "reference"):
                raise ValueError(f"{where}: params[{i}] is a DTensor (FSDP2); backend={self.backend!r} steps plain "
                                 "tensors only: use backend='auto' or 'reference' (DTensors run the reference path)")
        if self.backend != "auto":
            for p in tensors:
                backends.resolve(self.backend, p.device)  # raises now, with the reason
        names = [p[0] if isinstance(p, tuple) else None for p in
                 ([group["params"]] if torch.is_tensor(group["params"]) else group["params"])]
        etas = [self._measure_eta(name, p, group) for name, p in zip(names, tensors)]  # may raise: before adding
        super().add_param_group(group)
        for p, eta in zip(tensors, etas):
            self.state[p]["eta"] = eta

    def _measure_eta(self, name, p, group):
        eta = self.eta_fn(name, p) if self.eta_fn is not None else None
        if eta is None:
            eta = group["eta"] if group["eta"] is not None else default_eta(p)
        if not (_number(eta) and eta > 0):
            raise ValueError(f"Amos: eta for parameter {name or tuple(p.shape)} is {eta!r}; "
                             "eta_fn and eta must give a number > 0")
        return float(eta)

    # ---- state ----------------------------------------------------------------------------
    def _state_for(self, p, group):
        """The state of `p`, created at its first step: v, b (one per slice), m, step."""
        state = self.state[p]
        if "v" not in state:
            wide = compute_dtype(p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            # (R,) tensors; for DTensor (FSDP2) parameters sharded like the slices (distributed.py)
            state["v"] = distributed.new_slice_state(p, group["granularity"], wide)
            state["b"] = distributed.new_slice_state(p, group["granularity"], wide)
        if group["momentum"] > 0 and "m" not in state:
            mdt = group["momentum_dtype"] or compute_dtype(p)
            state["m"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
        return state

    def _check_state(self, p, group, where):
        state = self.state.get(p, {})
        shape = distributed.slice_state_shape(p, group["granularity"])  # (R,), or p's shape (FSDP2, "element")
        if "v" in state and tuple(state["v"].shape) != shape:
            raise ValueError(f"{where}: state 'v' has shape {tuple(state['v'].shape)} but granularity="
                             f"{group['granularity']!r} needs {shape}; a group's granularity cannot change "
                             "once it has state: build a new optimizer")
        if "m" in state and state["m"].shape != p.shape:
            raise ValueError(f"{where}: state 'm' has shape {tuple(state['m'].shape)}, parameter has "
                             f"{tuple(p.shape)}; the state belongs to another model")

    def load_state_dict(self, state_dict):
        """Load `state_dict` after checking that it fits these parameters (if not, nothing changes).

        torch casts floating state to each parameter's dtype on load, through
        `Optimizer._process_value_according_to_param_policy` called by class name (a subclass
        cannot override it); Amos keeps v, b, m in their saved dtypes (fp32 v/b with bf16
        params, bf16 m with fp32 params) and only moves them to the parameter's device.
        """
        self._check_loadable(state_dict)
        # torch.distributed.checkpoint saves no state for frozen parameters: they keep their eta
        etas = {p: self.state[p]["eta"] for g in self.param_groups for p in g["params"] if "eta" in self.state[p]}
        super().load_state_dict(state_dict)
        for p, eta in etas.items():
            self.state[p].setdefault("eta", eta)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device)

    def _check_loadable(self, state_dict):
        """Raise ValueError naming the group or parameter whose saved state does not fit."""
        where = "Amos.load_state_dict"
        saved_groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(state, dict):
            raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups', as Amos.state_dict() returns")
        fix = "load it into an Amos built on the same model with the same param groups"
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{where}: the state dict has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}; {fix}")
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}: param group {gi} holds {len(saved['params'])} parameters in the state "
                                 f"dict and {len(group['params'])} here; {fix}")
            opts = {**self.defaults, **saved}
            check_options(opts, f"{where}: saved param group {gi}")
            for j, (i, p) in enumerate(zip(saved["params"], group["params"])):
                st, name = state.get(i, {}), self._param_name(gi, group, j)
                vb = distributed.slice_state_shape(p, opts["granularity"])
                for key, shape in (("v", vb), ("b", vb), ("m", tuple(p.shape)), ("step", ())):
                    if key in st and tuple(st[key].shape) != shape:
                        raise ValueError(f"{where}: {name}: saved state '{key}' has shape {tuple(st[key].shape)}, "
                                         f"expected {shape}; the state dict belongs to another model: {fix}")
                if "eta" not in st and p.requires_grad:  # frozen ones: see load_state_dict
                    raise ValueError(f"{where}: {name} has no saved 'eta' (Amos saves it for every parameter); "
                                     "pass a state dict made by Amos.state_dict()")

    # ---- the step -------------------------------------------------------------------------
    def _param_name(self, group_index, group, i):
        names = group.get("param_names")
        p = group["params"][i]
        label = repr(names[i]) if names else f"param_groups[{group_index}]['params'][{i}]"
        return f"Amos parameter {label} (shape {tuple(p.shape)})"

    def _collect(self):
        """(group, params, grads) per group, with every check done before anything changes."""
        work = []
        for gi, group in enumerate(self.param_groups):
            check_options(group, f"Amos param group {gi}")
            params, grads = [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g, where = p.grad, self._param_name(gi, group, i)
                if g.is_sparse:
                    raise TypeError(f"{where}: sparse gradients are not supported; use dense gradients "
                                    "(e.g. nn.Embedding(..., sparse=False))")
                if g.shape != p.shape or g.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                    raise ValueError(f"{where}: gradient has shape {tuple(g.shape)} and dtype {g.dtype}; it must "
                                     "have the parameter's shape and a floating-point dtype")
                if g.device != p.device:
                    raise ValueError(f"{where}: gradient is on {g.device}, parameter on {p.device}; move them together")
                self._check_state(p, group, where)
                params.append(p)
                grads.append(g)
            work.append((group, params, grads))
        return work

    def _should_skip(self, work):
        """True when GradScaler found inf or a gradient is non-finite: then nothing changes."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return True
        # DTensor (FSDP2) gradients: each rank checks its shard, and all ranks must agree to skip
        nonfinite = self._nonfinite([(group, [local(p) for p in ps], [local(g) for g in gs]) for group, ps, gs in work])
        sharded = [p for _, ps, _ in work for p in ps if distributed.is_sharded(p)]
        if sharded:
            nonfinite = distributed.any_rank(nonfinite, sharded)
        if nonfinite:
            if not self._warned_nonfinite:
                warnings.warn("Amos: a gradient holds NaN or Inf, or its sum of squares overflows; the step was "
                              "skipped (parameters and state unchanged) and counted in optimizer.skipped_steps. "
                              "This warning is shown once.")
                self._warned_nonfinite = True
            return True
        return False

    def _nonfinite(self, work):
        """True when a gradient holds NaN/Inf, or a slice's S_r = sum g*g would overflow.

        A finite gradient can still overflow S_r (1e30**2 in fp32), which would write inf into v
        and NaN into b and the parameters. One fused norm per gradient finds both cases (a finite
        ||g/grad_scale||**2 bounds every S_r); only when it is not finite do we check exactly what
        the backends square: the unscaled, clipped gradient in the compute dtype.
        """
        grad_scale = getattr(self, "grad_scale", None)
        items = [(p, g, group) for group, ps, gs in work for p, g in zip(ps, gs) if g.numel()]
        if not items:
            return False
        # An upper bound of ||g / grad_scale||**2 per gradient, which bounds every S_r: for large
        # gradients numel * max|g|**2 from aminmax (one vectorised read, about twice as fast as a
        # norm on CPU, where this check cost as much as the fused step), for small ones the norm
        # itself (one fused call for all of them). NaN propagates through both.
        big = [i for i, (_, g, _) in enumerate(items) if g.numel() >= 1 << 16]
        small = [i for i, (_, g, _) in enumerate(items) if g.numel() < 1 << 16]
        bound = {}
        for i in big:
            g = items[i][1]
            lo, hi = torch.aminmax(g)
            bound[i] = (torch.maximum(-lo, hi), float(g.numel()))
        if small:
            for i, n in zip(small, torch._foreach_norm([items[i][1] for i in small])):
                bound[i] = (n, 1.0)
        flags = {}  # one host sync per device
        for i, (p, _, _) in enumerate(items):
            n, count = bound[i]
            n = n.to(compute_dtype(p))
            if grad_scale is not None:
                n = n / grad_scale.to(n.device, n.dtype)
            flags.setdefault(n.device, []).append((n * n * count).isfinite())
        if all(bool(torch.stack(f).all()) for f in flags.values()):
            return False
        for p, g, group in items:
            x = g.to(compute_dtype(p))
            if grad_scale is not None:
                x = x / grad_scale.to(x.device, x.dtype)
            if group["clip_value"] is not None:
                x = x.clamp(-group["clip_value"], group["clip_value"])
            S = (x * x).reshape(slice_shape(p.shape, group["granularity"])).sum(dim=1)
            if not (bool(g.isfinite().all()) and bool(S.isfinite().all())):
                return True
        return False

    def _step_function(self, device, params):
        # The fused backends step plain tensors; DTensor (FSDP2) parameters run the reference
        # path, whose phase 2 all-reduces the statistics that span ranks (distributed.py).
        if any(distributed.is_dtensor(p) for p in params):
            return reference_step
        return backends.resolve(self.backend, device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect()
        if self._should_skip(work):
            self.skipped_steps += 1
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        calls = []  # per group, (step function, indices) per device; resolved first: an error changes nothing
        for group, params, grads in work:
            by_device = {}
            for i, p in enumerate(params):
                by_device.setdefault(p.device, []).append(i)
            calls.append([(self._step_function(device, [params[i] for i in idx]), idx) for device, idx in by_device.items()])
        for (group, params, grads), group_calls in zip(work, calls):
            states = [self._state_for(p, group) for p in params]
            for state in states:
                state["step"] += 1
            for fn, idx in group_calls:
                fn([params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx], group, grad_scale)
        return loss
