"""`Amos`: the torch.optim front end. Checks options, keeps state, hands each group to a backend."""
import collections
import itertools
import math
import numbers
import operator
import warnings

import torch

from . import backends, distributed
from .distributed import local
from .reference import compute_dtype
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


def _lr_ok(lr):
    if type(lr) is float:  # the common case, fast (checked at every step)
        return 0.0 <= lr < math.inf
    if torch.is_tensor(lr):
        return lr.numel() == 1 and lr.is_floating_point()
    return _number(lr) and lr >= 0


def check_options(o, where):
    """Raise ValueError/TypeError naming the option and the fix; `o` is a group (or defaults)."""

    def bad(name, need):
        raise ValueError(f"{where}: {name}={o[name]!r} is invalid; {need}")

    if o["schedule"] not in SCHEDULES:  # first: an unknown schedule also leaves lr=None unresolved
        bad("schedule", f"use one of {SCHEDULES}")
    lr = o["lr"]
    if not _lr_ok(lr):
        bad("lr", "a tensor lr must be a floating-point scalar tensor" if torch.is_tensor(lr) else
            "use a finite number >= 0")
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
        guard: what a non-finite gradient skips. ``"step"`` (default): the whole step, exactly
            (one extra read of the gradients decides it before anything changes). ``"slice"``:
            only the slices (rows) whose sum of squares ``S_r`` is not finite keep their
            parameters and state, the rest of the step goes ahead; no extra read (one pass over
            the gradients, the byte floor of the fused kernels), counted in ``guarded_slices``.
            GradScaler's ``found_inf`` skips the whole step in both modes, and DTensor (FSDP2)
            parameters always skip whole steps (their verdict rides on the step's all-reduce).
        capturable: no host synchronisation at all in ``step()``, so a whole training step can be
            captured in a CUDA graph; a float lr becomes a 0-d tensor on the parameters' device
            (LR schedulers fill it in place, so replays see new values). Needs a fused backend
            ("cuda" or "triton") for CUDA parameters.

    With ``guard="step"``, a step is skipped (changes nothing; counted in ``skipped_steps``) when GradScaler's
    ``found_inf`` is set, or when for some parameter the unscaled, clipped gradient x has
    ``max|x|`` NaN or Inf, or ``C * max|x|**2`` overflows the compute dtype (C: the slice length),
    the bound that guarantees no slice sum S_r = sum x*x can overflow (|x| ~ 1.8e19/sqrt(C) and
    up in fp32). Without a scaler a skip is also warned about once. The decision is made on the
    gradients' device: on CUDA nothing waits for the GPU (the kernels read the verdict), on the
    CPU it is read at once.
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf

    def __init__(self, params, lr=None, *, schedule="amos", half_life=None, q=1.0, beta=0.999,
                 momentum=0.9, momentum_dtype=None, clip_value=None, d_coef=0.25, c_coef=0.25,
                 extra_l2=0.0, eps=2.0**-125, eta=None, eta_fn=None, granularity="row",
                 backend="auto", guard="step", capturable=False):
        defaults = dict(lr=lr, schedule=schedule, half_life=half_life, q=q, beta=beta,
                        momentum=momentum, momentum_dtype=momentum_dtype, clip_value=clip_value,
                        d_coef=d_coef, c_coef=c_coef, extra_l2=extra_l2, eps=eps, eta=eta,
                        granularity=granularity)
        backends.check_backend(backend)
        if eta_fn is not None and not callable(eta_fn):
            raise TypeError(f"Amos: eta_fn must be callable as eta_fn(name, param), got {eta_fn!r}")
        if guard not in GUARDS:
            raise ValueError(f"Amos: guard={guard!r} is invalid; use 'step' (a non-finite gradient skips the whole "
                             "step) or 'slice' (only its slices keep their values; one pass, faster)")
        if not isinstance(capturable, bool):
            raise TypeError(f"Amos: capturable must be True or False, got {capturable!r}")
        self.backend = backend
        self.eta_fn = eta_fn
        self.capturable = capturable
        self.guard = guard
        self._skipped = 0  # skips decided on the host ...
        self._skipped_on = {}  # ... and on each device: 0-d fp32 counters, read by skipped_steps
        self._guarded_on = {}  # device -> 0-d int64 counter the kernels add guarded slices to
        # per CUDA step not yet read, oldest first: (event, pinned verdict or None, pinned guarded count, scaled)
        self._pending = collections.deque()
        self._warned_nonfinite = False
        self._warned_guarded = False
        self._bound_cache = {}  # (device, params, options) -> (C, clip) vectors of the skip test
        self._state_ok = {}  # id(param) -> what its state was last checked against (_collect)
        self._plan = None  # what the last full step found (_Plan), reused while it holds
        super().__init__(params, defaults)

    @property
    def skipped_steps(self):
        """Steps skipped for non-finite gradients or GradScaler's found_inf (reading it waits for
        the GPU when the verdicts were counted there)."""
        return self._skipped + sum(int(c.item()) for c in self._skipped_on.values())

    @skipped_steps.setter
    def skipped_steps(self, n):
        # the device counters are zeroed in place: a captured CUDA graph adds into them
        for counter in self._skipped_on.values():
            counter.zero_()
        self._skipped = int(n)

    @property
    def guarded_slices(self):
        """Slices left unchanged because their S_r was not finite (guard="slice"; always 0 with
        guard="step", where such a gradient skips the step). Reading it waits for the GPU."""
        return sum(int(c.item()) for c in self._guarded_on.values())

    @guarded_slices.setter
    def guarded_slices(self, n):
        if n:
            raise ValueError("Amos.guarded_slices can only be reset to 0")
        for counter in self._guarded_on.values():  # in place: a captured CUDA graph adds into them
            counter.zero_()

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
        if self.capturable:
            # a float is baked into a captured graph; a tensor on the device is read at every replay
            first = next((p[1] if isinstance(p, tuple) else p for p in
                          ([group["params"]] if torch.is_tensor(group["params"]) else group["params"])), None)
            device = distributed.local(first).device if first is not None else None
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
            elif device is not None and group["lr"].device != device:
                raise ValueError(f"{where}: lr is a tensor on {group['lr'].device}, the parameters are on {device}; "
                                 "with capturable=True the kernels read lr on the parameters' device (a captured "
                                 f"graph would freeze a value read elsewhere): pass a float or a tensor on {device}")
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
        self._plan = None
        for p, eta in zip(tensors, etas):
            self.state[p]["eta"] = eta
        if self.capturable:
            self._make_counters({distributed.local(p).device for p in tensors})

    def _make_counters(self, devices):
        """capturable=True: the device counters are made with the optimizer, not at the first step:
        made inside a CUDA graph capture, their zero-fill would be replayed with the graph."""
        for device in devices:
            self._guarded_counter(device)
            if device not in self._skipped_on:
                self._skipped_on[device] = torch.zeros((), dtype=torch.float32, device=device)

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

    def _check_state(self, p, group, group_index, i):
        state = self.state[p]
        shape = distributed.slice_state_shape(p, group["granularity"])  # (R,), or p's shape (FSDP2, "element")
        if "v" in state and tuple(state["v"].shape) != shape:
            raise ValueError(f"{self._param_name(group_index, group, i)}: state 'v' has shape "
                             f"{tuple(state['v'].shape)} but granularity={group['granularity']!r} needs {shape}; a "
                             "group's granularity cannot change once it has state: build a new optimizer")
        if "m" in state and state["m"].shape != p.shape:
            raise ValueError(f"{self._param_name(group_index, group, i)}: state 'm' has shape "
                             f"{tuple(state['m'].shape)}, parameter has {tuple(p.shape)}; the state belongs to "
                             "another model")

    def load_state_dict(self, state_dict):
        """Load `state_dict` after checking that it fits these parameters (if not, nothing changes).

        torch casts floating state to each parameter's dtype on load, through
        `Optimizer._process_value_according_to_param_policy` called by class name (a subclass
        cannot override it); Amos keeps v, b, m in their saved dtypes (fp32 v/b with bf16
        params, bf16 m with fp32 params) and only moves them to the parameter's device.
        """
        self._check_loadable(state_dict)
        self._plan = None  # the state tensors and groups are replaced
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
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError(f"{self._param_name(gi, group, i)}: sparse gradients are not supported; use "
                                    "dense gradients (e.g. nn.Embedding(..., sparse=False))")
                if g.shape != p.shape or g.dtype not in _GRAD_DTYPES:
                    raise ValueError(f"{self._param_name(gi, group, i)}: gradient has shape {tuple(g.shape)} and "
                                     f"dtype {g.dtype}; it must have the parameter's shape and a floating-point dtype")
                if g.device != p.device:
                    raise ValueError(f"{self._param_name(gi, group, i)}: gradient is on {g.device}, parameter on "
                                     f"{p.device}; move them together")
                state = self.state.get(p)
                if state:
                    # checked again only when the granularity or the state tensors change
                    key = (group["granularity"], id(state.get("v")), id(state.get("m")))
                    if self._state_ok.get(id(p)) != key:
                        self._check_state(p, group, gi, i)
                        self._state_ok[id(p)] = key
                params.append(p)
                grads.append(g)
            work.append((group, params, grads))
        return work

    # ---- the skip verdict -----------------------------------------------------------------
    def _verdicts(self, work, read_grads=True):
        """{device: 0-d fp32 tensor, 1.0 when this step must be skipped}, computed on the device.

        The test (class docstring): GradScaler's found_inf, or for some parameter max|x| of its
        unscaled, clipped gradient x NaN/Inf or C * max|x|**2 past the compute dtype's range.
        max|g| per gradient takes one fused read of all gradients (torch._foreach_norm with
        ord=inf on CUDA; the extension's max_abs on the CPU, faster than torch's there).
        `read_grads=False` (guard="slice"): found_inf only, no read of the gradients.
        """
        return self._flags(*self._verdict_layout(work, read_grads))

    def _verdict_layout(self, work, read_grads):
        """(checks, grads, devices): `grads` all of `work`'s gradients in order (local parts of
        DTensors), `devices` theirs, and per (device, fp64 gradient, fp64 parameter) one check
        (device, compute dtype, limit, indices into `grads` or None for all, C, clip)."""
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
            C, clip = self._bound_vectors(device, cdt, [(p, group) for _, p, group in items])
            idx = [i for i, _, _ in items]
            checks.append((device, cdt, limit, None if len(idx) == len(flat) else idx, C, clip))
        return checks, flat, devices

    def _flags(self, checks, grads, devices):
        """The verdicts of `_verdict_layout`'s checks on `grads`, and GradScaler's found_inf."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        flags = {}
        for device, cdt, limit, idx, C, clip in checks:
            x = _max_abs(grads if idx is None else [grads[i] for i in idx], cdt)
            if grad_scale is not None:
                x = x / grad_scale.to(device, cdt)
            bound = torch.minimum(x, clip).square() * C
            bad = (~(bound < limit)).any().to(torch.float32)  # NaN compares False: bad too
            flags[device] = torch.maximum(flags[device], bad) if device in flags else bad
        if found_inf is not None:
            for device in devices:
                inf = found_inf.reshape(()).to(device, torch.float32)
                flags[device] = torch.maximum(flags[device], inf) if device in flags else inf
        return flags

    def _bound_vectors(self, device, cdt, items):
        """The slice lengths C and clip values (inf: none) of `items` ((param, group) pairs), cached
        on the device: a new tensor from a list would copy from the host at every step (and
        cannot be captured)."""
        key = (device, cdt, tuple(id(p) for p, _ in items),
               tuple((g["granularity"], g["clip_value"]) for g in {id(g): g for _, g in items}.values()))
        hit = self._bound_cache.get(key)
        if hit is None:
            if len(self._bound_cache) > 64:  # param lists change rarely; bound the cache anyway
                self._bound_cache.clear()
            C = [float(slice_shape(p.shape, g["granularity"])[1]) for p, g in items]
            clip = [math.inf if g["clip_value"] is None else float(g["clip_value"]) for _, g in items]
            hit = self._bound_cache[key] = (torch.tensor(C, dtype=cdt, device=device),
                                            torch.tensor(clip, dtype=cdt, device=device))
        return hit

    def _found_inf_set(self):
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.reshape(()).item())

    def _warn_nonfinite(self):
        if not self._warned_nonfinite:
            warnings.warn("Amos: a gradient holds NaN or Inf, or its sum of squares overflows; the step was "
                          "skipped (parameters and state unchanged) and counted in optimizer.skipped_steps. "
                          "This warning is shown once.")
            self._warned_nonfinite = True

    def _check_pending(self):
        """Warn about skips and guarded slices decided on the GPU at earlier steps, once their
        verdicts have arrived (without waiting for them: a warning may come a step or two late).
        Every step's verdict is read: a queue, so a CPU running ahead of the GPU misses none."""
        pending = self._pending
        if len(pending) >= _MAX_PENDING:  # the GPU is far behind: wait for the oldest (a rare sync)
            pending[0][0].synchronize()
        while pending and pending[0][0].query():
            event, flag, count, scaled = pending.popleft()
            if flag is not None and flag.item() and not scaled:
                self._warn_nonfinite()
            self._check_guarded(int(count.item()))

    # ---- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_pending()
        run = self._planned_run()
        if run is None:  # the full path: every check, then a plan for the next steps
            work = self._collect()
            if any(distributed.is_dtensor(p) for _, ps, _ in work for p in ps):
                return self._sharded_step(work, getattr(self, "grad_scale", None), loss)
            run = self._full_run(work)
        # the rest in this frame, as one function: Dynamo splits it at the host reads below
        flags = self._flags(run.checks, run.grads, run.grad_devices)
        guarded = {d: self._guarded_counter(d) for d in run.devices}
        skip = None  # None: nothing to judge (guard="slice" or no gradient elements, and no scaler)
        if run.on_device:
            device = next(iter(run.devices))
            skip = flags.get(device)
            if skip is not None:
                counter = self._skipped_on.get(device)
                if counter is None:
                    counter = self._skipped_on[device] = torch.zeros((), dtype=torch.float32, device=device)
                counter.add_(skip)
                keep = 1.0 - skip
        elif any(bool(f) for f in flags.values()):
            self._count_host_skip()
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        all_cpu = all(d.type == "cpu" for d in run.devices)
        work, steps = run.groups, run.steps  # every group's step counters advance in one call
        if steps is None:  # the full path: the state is made now, after the verdict
            work, steps = [], []
            for group, params, grads, states, group_calls, fused, lists in run.groups:
                states = [self._state_for(p, group) for p in params]
                steps += [st["step"] for st in states]
                work.append((group, params, grads, states, group_calls, fused, lists))
        if steps:
            if skip is None:
                _add_one(steps, all_cpu)
            else:  # a list, not one tensor: torch 2.11 reads a tensor scalar on the host (seen on an H200)
                torch._foreach_add_(steps, [keep] * len(steps))
        single = next(iter(guarded.values())) if len(guarded) == 1 else None  # the usual case: one device
        for group, params, grads, states, group_calls, fused, lists in work:
            if fused is not None:  # planned: the op with the plan's lists (contiguous gradients), no per-tensor Python
                counter = guarded[params[0].device] if single is None else single
                fused.kernel_step(params, grads, *lists, group["lr"], fused.options, grad_scale, skip, counter)
                continue
            for fn, idx in group_calls:
                if idx is None:
                    args = (params, grads, states, group, grad_scale)
                else:
                    args = ([params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx], group, grad_scale)
                counter = guarded[(params if idx is None else [params[i] for i in idx])[0].device]
                fn(*args, guarded=counter) if skip is None else fn(*args, skip=skip, guarded=counter)
        if run.fresh:
            self._plan = _Plan.build(self, run)
        if self.capturable:
            return loss  # nothing read on the host: guarded_slices tells
        if run.on_device and device.type == "cuda":
            self._remember(skip, guarded[device])  # read when it has arrived, by a later step
        elif all_cpu:
            self._check_guarded(self.guarded_slices)  # CPU counters: read at once (free)
        return loss

    def _full_run(self, work):
        """The `_Run` of `_collect`'s work: backends resolved and capturable checked (raising
        before anything changes), states left to `step` (created after the verdict)."""
        calls, devices = [], set()  # per group, (step function, indices or None: all) per device
        for group, params, grads in work:
            by_device = {}
            for i, p in enumerate(params):
                by_device.setdefault(p.device, []).append(i)
            devices.update(by_device)
            # resolved before anything changes: an error leaves everything as it was
            calls.append([(backends.resolve(self.backend, device), None if len(by_device) == 1 else idx)
                          for device, idx in by_device.items()])
        # On the device (no host sync) when every parameter is on one CUDA device, or capturable;
        # else (the CPU, several devices) the verdict is read on the host first.
        on_device = len(devices) == 1 and (self.capturable or next(iter(devices)).type == "cuda")
        if self.capturable:
            self._check_capturable(work, calls, on_device)
        checks, flat, grad_devices = self._verdict_layout(work, read_grads=self.guard == "step")
        groups = [_GroupRun(group, params, grads, None, group_calls, None, None)
                  for (group, params, grads), group_calls in zip(work, calls)]
        # no plan from a traced step: its frames may resume outside Dynamo
        return _Run(groups, devices, on_device, checks, flat, grad_devices, fresh=not torch.compiler.is_compiling())

    def _planned_run(self):
        """This step's `_Run` from the plan of an earlier step, or None when anything the plan
        depends on has changed (or is bad: the full path then raises for it)."""
        if torch.compiler.is_compiling():  # Dynamo traces the full path (and no guard on the plan)
            return None
        plan = getattr(self, "_plan", None)
        if plan is None:
            return None
        try:
            return plan.run(self)
        except Exception:  # odd input (a missing key, a strange value): the full path judges it
            return None

    def _guarded_counter(self, device):
        counter = self._guarded_on.get(device)
        if counter is None:
            counter = self._guarded_on[device] = torch.zeros((), dtype=torch.int64, device=device)
        return counter

    def _check_guarded(self, count):
        """Warn once, when the guarded slices counted so far (`count`) first become nonzero."""
        if count and not self._warned_guarded:
            warnings.warn(f"Amos(guard='slice'): {count} slice(s) had a gradient with NaN or Inf or a sum of "
                          "squares past the compute dtype's range; they kept their parameters and state, the "
                          "rest of the step went ahead (counted in optimizer.guarded_slices). This warning is "
                          "shown once.")
            self._warned_guarded = True

    def _sharded_step(self, work, grad_scale, loss):
        """FSDP2 (DTensor parameters): the reference math with one all-reduce per step, which
        also carries every rank's verdict, so all ranks skip alike (distributed.sharded_step)."""
        if self.capturable:
            raise RuntimeError("Amos(capturable=True): DTensor (FSDP2) parameters are stepped with an all-reduce "
                               "whose verdict is read on the host; use capturable=False")
        flags = self._verdicts(work)
        device = next(local(p).device for _, ps, _ in work for p in ps)
        skip = torch.zeros((), dtype=torch.float32, device=device)
        for flag in flags.values():
            skip = torch.maximum(skip, flag.to(device))
        if distributed.sharded_step(self, work, grad_scale, skip):
            self._count_host_skip()
        return loss

    def _count_host_skip(self):
        self._skipped += 1
        if not self._found_inf_set():
            self._warn_nonfinite()

    def _remember(self, skip, guarded):
        """Keep host copies of this step's verdict and guarded count (arriving asynchronously)
        for the warnings."""
        flag = None
        if skip is not None:
            flag = torch.empty((), dtype=torch.float32, pin_memory=True)
            flag.copy_(skip, non_blocking=True)
        count = torch.empty((), dtype=torch.int64, pin_memory=True)
        count.copy_(guarded, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(guarded.device))  # the copies' stream (not the current device's)
        self._pending.append((event, flag, count, getattr(self, "found_inf", None) is not None))

    def _check_capturable(self, work, calls, on_device):
        """capturable=True: raise, before anything changes, for a setup that needs the host."""
        if not on_device:
            raise RuntimeError("Amos(capturable=True): every parameter must be on one device and none a DTensor "
                               "(FSDP2 steps read the verdict of all ranks on the host); use capturable=False")
        for (group, params, _), group_calls in zip(work, calls):
            for fn, idx in group_calls:
                first = params[0 if idx is None else idx[0]] if params else None
                if first is not None and first.device.type == "cuda" and fn is backends.reference_unless_skipped:
                    raise RuntimeError("Amos(capturable=True): CUDA parameters need a fused backend ('cuda' or "
                                       f"'triton'), but backend={self.backend!r} runs the reference path here")
            for p in params:
                if p.dtype == torch.float64 or not p.is_contiguous():
                    raise RuntimeError(f"Amos(capturable=True): a parameter of shape {tuple(p.shape)} is "
                                       f"{'fp64' if p.dtype == torch.float64 else 'not contiguous'}; the fused "
                                       "kernels take contiguous fp32/bf16/fp16 parameters only")


GUARDS = ("step", "slice")
_MAX_PENDING = 64  # CUDA steps whose verdicts may be in flight before step() waits for the oldest
_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FP32_MAX = torch.finfo(torch.float32).max


def _add_one(steps, all_cpu):
    """steps += 1; CPU counters in one call of the extension's op when it is built (torch's
    foreach add on CPU tensors dispatches once per tensor: about 0.45 ms for 148 of them)."""
    if all_cpu:
        from . import cpp_backend
        if cpp_backend.add_one is not None:
            return cpp_backend.add_one(steps)
    torch._foreach_add_(steps, 1.0)


def _max_abs(grads, dtype):
    """max|g| of each gradient (NaN if it holds one) as one `dtype` vector on their device."""
    if grads[0].device.type == "cpu" and dtype == torch.float32:
        from . import cpp_backend  # the extension loads at first use, as in backends.py
        if cpp_backend.max_abs is not None:
            return cpp_backend.max_abs(grads)
    return torch.stack(torch._foreach_norm(grads, float("inf"), dtype=dtype))


# ---- the step plan ----------------------------------------------------------------------------
# One step's work: per group a _GroupRun; `grads` all groups' gradients in order (the verdict
# reads them), `checks` the verdict's (Amos._verdict_layout), `fresh` when from the full path.
_Run = collections.namedtuple("_Run", "groups devices on_device checks grads grad_devices fresh steps",
                              defaults=(None,))  # steps: all groups' counters (planned runs)
# states None: created by step(); fused/lists: a planned call of the compiled op (_GroupPlan)
_GroupRun = collections.namedtuple("_GroupRun", "group params grads states calls fused lists")
_Fused = collections.namedtuple("_Fused", "kernel_step options")

# every option check_options reads but lr (a scheduler changes lr at every step: checked by value)
_OPTION_KEYS = ("schedule", "granularity", "half_life", "beta", "momentum", "momentum_dtype", "clip_value",
                "d_coef", "c_coef", "extra_l2", "q", "eps", "eta")
_options_of = operator.itemgetter(*_OPTION_KEYS)
_GRAD, _SHAPE, _DTYPE, _DEVICE, _IS_SPARSE = map(operator.attrgetter, ("grad", "shape", "dtype", "device", "is_sparse"))
_IS_CONTIGUOUS, _CONTIGUOUS = operator.methodcaller("is_contiguous"), operator.methodcaller("contiguous")
_V, _B, _STEP, _ETA, _PARAMS, _LR = map(operator.itemgetter, ("v", "b", "step", "eta", "params", "lr"))
_M, _M_ITEM = operator.methodcaller("get", "m"), operator.itemgetter("m")


def _same(xs, ys):
    return all(map(operator.is_, xs, ys))


def _lrs_ok(lrs):
    """`_lr_ok` of every group's lr; all floats (the usual case) in one pass: a NaN or inf makes
    the sum not finite, a negative one the minimum."""
    if set(map(type, lrs)) == {float} and 0.0 <= min(lrs) and sum(lrs) < math.inf:
        return True
    return all(map(_lr_ok, lrs))


def _layout(group):
    """The options a plan is built on (state shapes, the verdict's vectors, which state exists)."""
    return group["granularity"], group["clip_value"], group["momentum"] > 0, group["momentum_dtype"]


class _Plan:
    """What the last full step found, kept so the next steps skip its per-tensor Python.

    Valid while nothing it was built from changes, which every step checks: by identity the
    param groups, their params, the state dicts and the state tensors v and m; the gradients'
    and parameters' layout (which params have a gradient; sparsity, shapes, dtypes, devices,
    the parameters' contiguity), which the full path checks or decides with; the options by
    value, and if some changed, check_options again (schedulers change lr, some momentum).
    Otherwise the step takes the full path, which raises for bad input and builds a new plan.
    Each check runs once over all groups (flat lists), not once per group: with many param
    groups (layer-wise learning rates) a pass per group would multiply its fixed cost.
    """

    def __init__(self, opt, run, groups):
        self.state_map, self.state_dicts = opt.state, list(opt.state.values())
        self.mode = (opt.guard, opt.backend, opt.capturable)
        self.groups = groups
        self.devices, self.on_device, self.checks, self.grad_devices = (run.devices, run.on_device, run.checks,
                                                                        run.grad_devices)
        def cat(name):  # all groups' lists end to end
            return [x for g in groups for x in getattr(g, name)]

        self.all_params, self.missing, self.mask = cat("all_params"), cat("missing"), cat("mask")
        self.some_missing = any(self.missing)
        self.params, self.shapes, self.devices_of = cat("params"), cat("shapes"), cat("devices")
        self.pdtypes, self.gdtypes, self.contiguous = cat("pdtypes"), cat("gdtypes"), cat("contiguous")
        self.states, self.vs, self.ms = cat("states"), cat("vs"), cat("ms")
        with_m = sum(m is not None for m in self.ms)
        self.ms_kind = "all" if with_m == len(self.ms) else "none" if with_m == 0 else "some"
        ends = list(itertools.accumulate(len(g.params) for g in groups))
        self.cuts = list(zip([0] + ends[:-1], ends))  # each group's tensors in the flat lists
        self.group_dicts, self.sizes = [g.group for g in groups], [len(g.all_params) for g in groups]
        self.options = [g.options for g in groups]
        self.call_fns = [fn for g in groups for fn, _ in g.calls]
        self.call_devices = [device for g in groups for device in g.call_devices]
        self.etas = self.bs = self.steps = None  # set by split() at the first run

    @classmethod
    def build(cls, opt, run):
        from . import cpp_backend  # loaded already when a group runs its kernels
        return cls(opt, run, [_GroupPlan(opt, gi, gr, cpp_backend) for gi, gr in enumerate(run.groups)])

    def run(self, opt):
        """This step's `_Run`, or None when the plan does not hold any more."""
        if (opt.state is not self.state_map or len(opt.state) != len(self.state_dicts)
                or (opt.guard, opt.backend, opt.capturable) != self.mode or len(opt.param_groups) != len(self.groups)
                or not _same(opt.state.values(), self.state_dicts)):
            return None
        groups, one = opt.param_groups, len(self.groups) == 1
        if not _same(groups, self.group_dicts) or list(map(len, map(_PARAMS, groups))) != self.sizes:
            return None
        resolved = {device: backends.resolve(opt.backend, device) for device in set(self.call_devices)}
        if not _same(map(resolved.__getitem__, self.call_devices), self.call_fns):  # a backend can become unavailable
            return None
        if not _lrs_ok(list(map(_LR, groups))):
            return None
        options = list(map(_options_of, groups))
        if options != self.options:  # a value changed (a scheduler's momentum, say): checked as the full path would
            for plan, group, now in zip(self.groups, groups, options):
                if now != plan.options and not plan.update(group, now):
                    return None
            self.options = options
        plist = groups[0]["params"] if one else list(itertools.chain.from_iterable(map(_PARAMS, groups)))
        if len(plist) != len(self.all_params) or not _same(plist, self.all_params):
            return None
        grads = list(map(_GRAD, plist))
        if list(map(operator.is_, grads, itertools.repeat(None))) != self.missing:
            return None
        if self.some_missing:
            grads = list(itertools.compress(grads, self.mask))
        params = self.params
        if (any(map(_IS_SPARSE, grads)) or list(map(_SHAPE, grads)) != self.shapes
                or list(map(_SHAPE, params)) != self.shapes or list(map(_DTYPE, grads)) != self.gdtypes
                or list(map(_DTYPE, params)) != self.pdtypes or list(map(_DEVICE, grads)) != self.devices_of
                or list(map(_DEVICE, params)) != self.devices_of
                or list(map(_IS_CONTIGUOUS, params)) != self.contiguous):
            return None
        grads = list(map(_CONTIGUOUS, grads))  # as the kernels take them (the same values for the verdict)
        states = self.states
        if not _same(map(_V, states), self.vs) or not self.same_ms(states):
            return None
        etas, bs, steps = list(map(float, map(_ETA, states))), list(map(_B, states)), list(map(_STEP, states))
        if etas != self.etas or not _same(bs, self.bs) or not _same(steps, self.steps):
            self.split(etas, bs, steps)  # the op's lists of each group, kept while these hold
        if one:
            groups = [self.groups[0].part(grads)]
        else:
            groups = [plan.part(grads[a:b]) for plan, (a, b) in zip(self.groups, self.cuts)]
        return _Run(groups, self.devices, self.on_device, self.checks, grads if self.checks else [], self.grad_devices,
                    fresh=False, steps=steps)

    def split(self, etas, bs, steps):
        self.etas, self.bs, self.steps = etas, bs, steps
        for plan, (a, b) in zip(self.groups, self.cuts):
            plan.lists = (plan.vs, bs[a:b], plan.op_ms, steps[a:b], etas[a:b])

    def same_ms(self, states):
        """m unchanged (a new m is checked again, like v), tested the cheapest way for the usual cases."""
        if self.ms_kind == "all":
            return _same(map(_M_ITEM, states), self.ms)
        if self.ms_kind == "none":
            return not any(map(operator.contains, states, itertools.repeat("m")))
        return _same(map(_M, states), self.ms)


class _GroupPlan:
    """One param group's part of a `_Plan`."""

    def __init__(self, opt, index, run, cpp_backend):
        group, params = run.group, run.params
        self.group, self.index = group, index
        self.all_params = list(group["params"])
        self.options, self.layout = _options_of(group), _layout(group)
        with_grad = {id(p) for p in params}
        self.mask = [id(p) in with_grad for p in self.all_params]
        self.missing = [not m for m in self.mask]
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
        self.option_args = cpp_backend.option_args
        momentum = group["momentum"]
        # the op called straight from the plan's lists when the kernels take every tensor
        # (cpp_backend.fused_step's test: m's layout is the optimizer's, fixed while m is)
        fused = (len(self.calls) == 1 and self.calls[0][0] is cpp_backend.fused_step and params
                 and torch.float64 not in self.gdtypes
                 and all(cpp_backend._kernel_takes(p, st, momentum) for p, st in zip(params, self.states)))
        self.fused = _Fused(cpp_backend.kernel_step, cpp_backend.option_args(group)) if fused else None
        self.op_ms = self.ms if momentum > 0 else []
        self.lists = None  # the op's lists but the gradients (set by _Plan.split)

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

    def part(self, grads):
        """This step's `_GroupRun`, with its part of the gradients `_Plan.run` checked."""
        return _GroupRun(self.group, self.params, grads, self.states, self.calls, self.fused,
                         None if self.fused is None else self.lists)
