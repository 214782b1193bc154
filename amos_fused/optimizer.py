"""`Amos`: the torch.optim front end. Keeps the settings, counters and state, and runs a step:
checks (plan.py; options.py, groups.py, state.py), the skip verdict (verdict.py), then each group
handed to its backend (backends.py)."""
import torch

from . import backends, distributed, pickling, verdict
from . import defaults as default_rules
from .defaults import DEFAULT_LR  # noqa: F401  (amos_fused.optimizer.DEFAULT_LR)
from .groups import count_matrices, listed, prepare
from .options import check_foreign, check_settings
from .plan import Plan, WorkCheck, collect, full_run, sharded_work
from .state import check_loadable, loaded, new_state


class Amos(torch.optim.Optimizer):
    r"""Amos (Tian & Parikh, arXiv 2210.11693) and its closed-form schedules; see docs/algorithm.md.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or group dicts;
            every option below except ``eta_fn``, ``backend``, ``guard`` and ``capturable`` can be
            overridden per group.
        lr: the global learning rate ``xi`` (``alpha0``); read at every step, so LR schedulers
            work. None: the lr rule (``defaults.lr``): for ``"amos"`` the peak ``min(0.275 / M, 0.15)``
            for a model of M matrices of a schedule: with ``total_steps`` a warmup and a decay to 0
            at the run's end; without it a warmup over 200 steps, then ``peak * sqrt(200 / t)`` at
            step t, which an LR scheduler or an lr you set replaces (a constant lr with
            ``capturable=True``); the closed forms ``DEFAULT_LR``.
        schedule: ``"amos"`` (official, adaptive decay) or ``"constant"``, ``"inverse_time"``,
            ``"inverse_square"`` (closed forms; the last two need ``half_life`` in steps).
        q: closed forms only: the decoupled decay rate is ``lr**2 / (2q) * s(t)``.
        beta: decay of the second moment ``v``. None: 0.999 (the official), or 0.95 for groups
            whose lr follows one of those schedules (``defaults.beta``).
        momentum: EMA of the whole update (0 disables it and its state ``m``).
        momentum_dtype: storage of ``m``: "auto" (default: bfloat16; fp64 for fp64 parameters),
            None (the compute dtype: fp32, fp64 for fp64 parameters), float32, bfloat16 or float16.
        clip_value: element-wise gradient clipping (after unscaling), or None.
        d_coef, c_coef, extra_l2: ``"amos"`` only, as in the official code.
        eps: floor of ``v`` (not an addend).
        eta: the expected RMS of each parameter's entries. None: the eta rule (``defaults.eta``:
            ``sqrt(2 / fan_in)`` for matrices, 0.5 for vectors and scalars); a float sets it.
        eta_fn: ``eta_fn(name, param) -> float or None`` per parameter (name is None when
            params came without names); None falls back to the group's ``eta`` rule.
        granularity: ``"row"`` (default), ``"tensor"`` or ``"element"``: the slices of ``v``.
        backend: ``"auto"`` or an explicit backend from ``amos_fused.backends.BACKENDS``.
        guard: what a non-finite gradient skips. ``"slice"`` (default): only the slices (rows)
            whose sum of squares ``S_r`` is not finite keep their parameters and state, the rest
            of the step goes ahead; no extra read (one pass over the gradients, the byte floor of
            the fused kernels), counted in ``guarded_slices``. ``"step"``: the whole step, exactly
            (one extra read of the gradients decides it before anything changes). GradScaler's
            ``found_inf`` skips the whole step in both modes. With DTensor parameters (FSDP2,
            HSDP, tensor parallel) every rank takes the same decision: the verdicts ride on the
            step's all-reduce.
        total_steps: the number of optimizer steps the run will take, or None. Read only by the
            lr rule, for groups without an lr: a linear warmup over the first 20 %, the peak
            ``min(0.275 / M, 0.15, 3 / sqrt(total_steps))`` for a model of M matrices (parameters of
            two or more dimensions, in all the groups given), and a linear decay over the last 30 %
            to 0 at ``total_steps`` (``defaults.lr_schedule``), kept in the group's ``"lr_schedule"``,
            so a resumed run continues it; such groups' beta is 0.95. Not with an LR scheduler (pass
            lr then) or ``capturable=True``.
        capturable: no host synchronisation at all in ``step()``, so a whole training step can be
            captured in a CUDA graph; a float lr becomes a 0-d tensor on the parameters' device
            (LR schedulers fill it in place, so replays see new values). Needs a fused backend
            ("cuda" or "triton") for CUDA parameters, and an eager step before the capture (it
            builds the kernels' tables). With DTensor parameters the verdict stays on the device too.

    Options of torch's own optimizers that Amos does not have (``weight_decay``, ``betas``,
    ``amsgrad``, ``maximize``, ``foreach``, ``fused``, ...) raise TypeError saying what to do instead,
    given to the constructor or set in a param group (other keys of a group are kept, as torch does).

    Each parameter is listed once: one that appears twice, in a group or across groups, raises
    ValueError (torch warns about duplicates within a group, and steps them twice). A tensor lr
    may have any shape with one element (it is kept as a 0-d view of itself); more elements raise
    ValueError. Complex parameters raise TypeError (step ``torch.view_as_real`` views instead).
    ``copy.deepcopy`` and ``pickle`` keep the settings, counters and state; an ``eta_fn`` that
    cannot be pickled (a lambda) is dropped by pickle, and the copy raises if it needs one.

    With ``guard="step"``, a step is skipped (changes nothing; counted in ``skipped_steps``) when GradScaler's
    ``found_inf`` is set, or when for some parameter the unscaled, clipped gradient x has
    ``max|x|`` NaN or Inf, or ``C * max|x|**2`` overflows the compute dtype (C: the slice length),
    the bound that guarantees no slice sum S_r = sum x*x can overflow (|x| ~ 1.8e19/sqrt(C) and
    up in fp32). Without a scaler a skip is also warned about once. The decision is made on the
    gradients' device: on CUDA nothing waits for the GPU (the kernels read the verdict), on the
    CPU it is read at once.
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf

    def __init__(self, params, lr=None, *, schedule="amos", half_life=None, q=1.0, beta=None,
                 momentum=0.9, momentum_dtype="auto", clip_value=None, d_coef=0.25, c_coef=0.25,
                 extra_l2=0.0, eps=2.0**-125, eta=None, eta_fn=None, granularity="row",
                 backend="auto", guard="slice", capturable=False, total_steps=None, **others):
        check_foreign(list(others), "Amos")
        defaults = dict(lr=lr, schedule=schedule, half_life=half_life, q=q, beta=beta,
                        momentum=momentum, momentum_dtype=momentum_dtype, clip_value=clip_value,
                        d_coef=d_coef, c_coef=c_coef, extra_l2=extra_l2, eps=eps, eta=eta,
                        granularity=granularity)
        check_settings(backend, eta_fn, guard, capturable, total_steps)
        self.backend = backend
        self.total_steps = total_steps  # read by the lr rule when a group without lr is added
        self.eta_fn = eta_fn
        self.capturable = capturable
        self.guard = guard
        self._skipped = 0  # skips decided on the host ...
        self._skipped_on = {}  # ... and on each device: 0-d fp32 counters, read by skipped_steps
        self._guarded_on = {}  # device -> 0-d int64 counter the kernels add guarded slices to
        self._notices = verdict.Notices()  # the warnings shown once, and the last CUDA step's pending verdict
        self._new_caches()
        params, given = listed(params)
        self._matrices_given = count_matrices(given)  # the lr rule's M for the groups given here
        super().__init__(params, defaults)
        del self._matrices_given

    def _new_caches(self):
        self._bound_cache = {}  # (device, params, options) -> (C, clip) vectors of the skip test
        self._state_ok = {}  # id(param) -> what its state was last checked against (plan.collect)
        self._plan = None  # what the last full step found (plan.Plan), reused while it holds
        self._sharded = None  # the DTensor parameters' step plan (distributed.ShardedStep)
        self._sharded_checks = None  # what the last full DTensor step checked (plan.WorkCheck per group)

    # ---- copies and printing --------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in pickling.KEPT})
        state["eta_fn"] = pickling.EtaFn(self.eta_fn)
        return state

    def __setstate__(self, state):
        state = dict(state)
        if isinstance(state.get("eta_fn"), pickling.EtaFn):
            state["eta_fn"] = state["eta_fn"].fn
        super().__setstate__(state)
        self._new_caches()  # keyed by the tensors of the original

    def __repr__(self):
        text = super().__repr__()  # "Amos (" and the param groups
        head = f"{type(self).__name__} ("
        settings = (f"backend={self.backend!r}, guard={self.guard!r}, capturable={self.capturable}, "
                    f"eta_fn={self.eta_fn!r}, total_steps={self.total_steps!r}")
        return head + settings + text[len(head):]

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

    # ---- groups and state -----------------------------------------------------------------
    def add_param_group(self, param_group):
        if not isinstance(param_group, dict):
            raise TypeError(f"Amos.add_param_group: param_group must be a dict such as {{'params': [...]}}, "
                            f"not a {type(param_group).__name__}")
        (param_group,), _ = listed([param_group])
        # M: the matrices of every group given to the constructor, or of every group once this one is in
        model_matrices = max(self.__dict__.get("_matrices_given", 0),
                             count_matrices(self.param_groups) + count_matrices([param_group]))
        group, tensors, etas = prepare(param_group, self.defaults, self.param_groups, self.backend, self.capturable,
                                       self.eta_fn, self.total_steps, model_matrices)  # raises before anything changes
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

    def _state_for(self, p, group):
        """The state of `p`, created at its first step: v, b (one per slice), m, step."""
        return new_state(self.state[p], p, group)

    @torch._disable_dynamo
    def load_state_dict(self, state_dict):
        """Load `state_dict` after checking that it fits these parameters (if not, nothing changes).

        As torch's `Optimizer.load_state_dict` (its pre-hooks may edit the state dict or return
        another, its post-hooks run after), except that v, b and m keep their saved dtypes (fp32
        v/b with bf16 params, bf16 m with fp32 params; torch casts floating state to the
        parameter's dtype) and move to the parameter's device, as does step; a step saved as a
        number (torch's older format) becomes a tensor.
        """
        state_dict = state_dict.copy()  # shallow, as torch's: a hook may edit it in place
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        check_loadable(state_dict, self.param_groups, self.defaults)
        self.state, self.param_groups = loaded(state_dict, self.param_groups, self.state)
        self._plan = None  # the state tensors and groups are replaced
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ---- the step -------------------------------------------------------------------------
    def _collect(self):
        """(group, params, grads) per group, with every check done before anything changes."""
        return collect(self.param_groups, self.state, self._state_ok)

    def _planned_run(self):
        """This step's `plan.Run` from the plan of an earlier step, or None when anything the plan
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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._notices.check_pending()
        default_rules.schedule_lr(self.param_groups)  # the lr of groups that follow a schedule of the lr rule
        run = self._planned_run()
        if run is None:  # the full path: every check, then a plan for the next steps
            work = sharded_work(self._sharded_checks, self.param_groups) if self._sharded is not None else None
            fresh = work is None  # else DTensor parameters, nothing changed since the last step
            if fresh:
                work = self._collect()
            if not fresh or any(distributed.is_dtensor(p) for _, ps, _ in work for p in ps):
                loss = self._sharded_step(work, getattr(self, "grad_scale", None), loss)
                if fresh:
                    self._sharded_checks = [WorkCheck(group, params, grads) for group, params, grads in work]
                default_rules.count_scheduled_step(self.param_groups)
                return loss
            run = full_run(work, self.backend, self.guard, self.capturable, self._bound_cache)
        default_rules.count_scheduled_step(self.param_groups)  # checks passed: this step is taken
        # the rest in this frame, as one function: Dynamo splits it at the host reads below
        flags = verdict.flags(run.checks, run.grads, run.grad_devices, getattr(self, "grad_scale", None),
                              getattr(self, "found_inf", None))
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
        group_runs, steps = run.groups, run.steps
        if steps is None:  # the full path: the state is made now, after the verdict
            group_runs = [gr._replace(states=[self._state_for(p, gr.group) for p in gr.params]) for gr in run.groups]
            steps = [st["step"] for gr in group_runs for st in gr.states]
        if steps:  # every group's counters in one call (a call costs a few us)
            if skip is None:
                backends.add_one(steps, all_cpu)
            else:  # a list, not one tensor: torch 2.11 reads a tensor scalar on the host (seen on an H200)
                torch._foreach_add_(steps, [keep] * len(steps))
        one = next(iter(guarded.values())) if len(guarded) == 1 else None  # the usual case: one device
        for group, params, grads, states, group_calls, fused, lists in group_runs:
            if fused is not None:  # planned: the op with the plan's lists (contiguous gradients), no per-tensor Python
                counter = guarded[params[0].device] if one is None else one
                fused.kernel_step(params, grads, *lists, group["lr"], fused.options, grad_scale, skip, counter)
                continue
            for fn, idx in group_calls:
                if idx is None:
                    args = (params, grads, states, group, grad_scale)
                else:
                    args = ([params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx], group, grad_scale)
                counter = guarded[params[0 if idx is None else idx[0]].device] if one is None else one
                fn(*args, guarded=counter) if skip is None else fn(*args, skip=skip, guarded=counter)
        if run.fresh:
            self._plan = Plan(self, run)
        if self.capturable:
            return loss  # nothing read on the host: guarded_slices tells
        if run.on_device and device.type == "cuda":
            # read when it has arrived, by a later step
            self._notices.remember(skip, guarded[device], getattr(self, "found_inf", None) is not None)
        elif all_cpu:
            self._notices.guarded(self.guarded_slices)  # CPU counters: read at once (free)
        return loss

    def _guarded_counter(self, device):
        counter = self._guarded_on.get(device)
        if counter is None:
            counter = self._guarded_on[device] = torch.zeros((), dtype=torch.int64, device=device)
        return counter

    def _sharded_step(self, work, grad_scale, loss):
        """DTensor parameters (FSDP2, HSDP, tensor parallel): the fused kernels on the local shards,
        with one all-reduce per process group that needs one, which also carries every rank's
        verdict, so all ranks skip alike (distributed.sharded_step)."""
        if any(ps for _, ps, _ in work) and distributed.sharded_step(self, work, grad_scale):
            self._count_host_skip()
        return loss

    def _verdicts(self, work, read_grads):
        """{device: 0-d fp32 flag, 1.0 = skip} of this rank's gradients (verdict.py)."""
        return verdict.flags(*verdict.layout(work, read_grads, self._bound_cache), getattr(self, "grad_scale", None),
                             getattr(self, "found_inf", None))

    def _count_device_skip(self, skip):
        """Count a verdict decided on the device (0-d fp32, 1.0 = skipped) without reading it."""
        counter = self._skipped_on.get(skip.device)
        if counter is None:
            counter = self._skipped_on[skip.device] = torch.zeros((), dtype=torch.float32, device=skip.device)
        counter.add_(skip)

    def _advance_steps(self, steps, skip, device):
        """steps += 1, or += 1 - skip for a verdict on the device."""
        if not steps:
            return
        if skip is None:
            backends.add_one(steps, device.type == "cpu")
        else:  # a list, not one tensor: torch 2.11 reads a tensor scalar on the host (seen on an H200)
            torch._foreach_add_(steps, [1.0 - skip] * len(steps))

    def _count_host_skip(self):
        self._skipped += 1
        found_inf = getattr(self, "found_inf", None)
        if not (found_inf is not None and bool(found_inf.reshape(()).item())):
            self._notices.skipped()
