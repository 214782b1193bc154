"""What Amos does with the options a user leaves out: eta, lr, beta, momentum storage (docs/defaults.md).

Each rule is a pure function of what it is given (shapes, the number of matrices, the run
length): the optimizer stores what it returns (eta in each parameter's state, lr in the param
group), so a resumed run reads the values back and never derives them again.
"""
import math
import numbers
import warnings

import torch

from .reference import compute_dtype

# lr of groups given without one (`lr`; docs/defaults.md, "The learning rate and total_steps"): the
# closed forms' constant, and schedule="amos"'s rule for a model of M matrices, min(0.275/M, 0.15)
DEFAULT_LR = {"constant": 0.1, "inverse_time": 0.1, "inverse_square": 0.1}
LR_SCALE = 0.275  # 0.025 for 11 matrices, 0.0028 for 100 ...
MAX_LR = 0.15  # ... and 0.15 at most (one matrix or none): the largest measured to help

# total_steps: the lr schedule of groups given without lr (lr, lr_factor); the shape and beta were
# chosen by the study in docs/defaults.md ("Candidate rules measured")
WARMUP_FRACTION = 0.2  # the lr rises linearly over the first 20 % of the run ...
COOLDOWN_FRACTION = 0.3  # ... and decays over the last 30 %
LONG_RUN = 3.0  # peak lr <= 3/sqrt(N): 0.03 at N = 10 000; 0.0055 at 300k (official BERT run: 0.005)
SCHEDULE_KEY = "lr_schedule"  # group entry (peak, total_steps, steps taken, cooldown, warmup), saved with the group
# no total_steps: the lr still anneals, without a run length: a linear warmup over ANYTIME_WARMUP
# steps, then peak * sqrt(ANYTIME_WARMUP / step); entry (peak, None, steps taken, None, ANYTIME_WARMUP)
ANYTIME_WARMUP = 200
LEGACY_WARMUP = 0.05  # the warmup of entries saved without one (three or four fields)

# beta of groups given without one: the official 0.999; 0.95 where the lr follows a schedule of the rules
BETA = 0.999
SCHEDULED_BETA = 0.95

MOMENTUM_AUTO = "auto"
BF16 = torch.bfloat16


def check_total_steps(total_steps, where="Amos"):
    """Raise ValueError unless `total_steps` is None or a whole number >= 1."""
    if total_steps is None:
        return
    ok = isinstance(total_steps, numbers.Integral) and not isinstance(total_steps, bool) and total_steps >= 1
    if not ok:
        raise ValueError(f"{where}: total_steps={total_steps!r} is invalid; use None (no run length: the "
                         "schedule without one) or the number of optimizer steps the run will take, a whole "
                         "number >= 1")


def has_rule(schedule):
    """Whether groups of `schedule` given without lr get one from `lr` (False: an unknown schedule)."""
    return schedule == "amos" or schedule in DEFAULT_LR


def lr(schedule, total_steps=None, matrices=1):
    """The lr of a group of `schedule` given without one. The closed forms: DEFAULT_LR. "amos", for
    a model of `matrices` M parameters of two or more dimensions: min(LR_SCALE / M, MAX_LR), the
    peak of its lr schedule (`lr_schedule`); with `total_steps` N, also at most LONG_RUN / sqrt(N).
    Each step moves every matrix by about lr of its scale, each move along its own gradient, so
    their effects on the loss add up: the lr falls as 1/M (measured on the quality suite,
    docs/defaults.md); past about 120 M^2 steps the peak is 1/sqrt(N)-like, as the official
    long-run advice."""
    check_total_steps(total_steps)
    if schedule != "amos":
        return DEFAULT_LR[schedule]
    rule = min(LR_SCALE / max(1, matrices), MAX_LR)
    return rule if total_steps is None else min(rule, LONG_RUN / math.sqrt(total_steps))


def lr_schedule(schedule, total_steps, matrices=1, capturable=False):
    """The group entry `SCHEDULE_KEY` of a group whose lr the rules chose, or None (a constant lr).
    schedule="amos" groups get, with `total_steps`, a warmup, a constant lr and a linear decay to 0
    at the run's end; without it, a warmup and an inverse-square-root decay that needs no run
    length, unless `capturable` (a captured graph would freeze it): `lr_factor`."""
    if schedule != "amos":
        return None
    if total_steps is None:
        return None if capturable else (lr(schedule, None, matrices), None, 0, None, ANYTIME_WARMUP)
    # (peak, N, steps taken, cooldown, warmup)
    return (lr(schedule, total_steps, matrices), int(total_steps), 0, COOLDOWN_FRACTION, WARMUP_FRACTION)


def beta(scheduled):
    """beta of a group given without one: SCHEDULED_BETA when its lr follows a schedule of the
    rules (`scheduled`: with or without total_steps), else the official BETA. Under 0.999 the
    second moment remembers about 1000 steps, the whole of a short run: v stays high from the
    early, large gradients and the steps come out smaller than the schedule's lr says, most on the
    GRU and the CNN of the quality suite (docs/defaults.md); 0.95 follows the current gradients,
    as AdamW's pretraining recipes do."""
    return SCHEDULED_BETA if scheduled else BETA


def lr_factor(steps_taken, total_steps, cooldown=COOLDOWN_FRACTION, warmup=WARMUP_FRACTION):
    """Multiplier of the peak lr at the step after `steps_taken` steps (warmup-stable-decay): linear
    warmup over the first `warmup` fraction of the run, the peak, then a linear decay over the last
    `cooldown` fraction of the run to 0 at `total_steps` (0 after it). `cooldown` None: the decay
    spans the whole run after the warmup (the schedule of entries saved without a cooldown).
    `total_steps` None (no run length): a linear warmup over `warmup` steps, then
    sqrt(warmup / step), the same at every run length: a run of N steps ends at lr ~ 1/sqrt(N), as
    the official long-run advice, and every step it takes is annealed as far as that."""
    if total_steps is None:
        step = steps_taken + 1
        return min(step / warmup, math.sqrt(warmup / step))
    rise = max(1, round(warmup * total_steps))  # warmup steps
    if steps_taken < rise:
        return (steps_taken + 1) / rise
    length = max(1, total_steps - rise) if cooldown is None else max(1, round(cooldown * total_steps))
    return max(0.0, min(1.0, (total_steps - steps_taken) / length))


def _parts(entry):
    """(peak, total_steps, steps taken, cooldown, warmup) of a `SCHEDULE_KEY` entry. Entries saved by
    earlier versions resume the schedule they were saved with: three fields, a linear decay over
    the whole run after a LEGACY_WARMUP; four, the cooldown after a LEGACY_WARMUP."""
    peak, total, taken = entry[:3]
    cooldown = entry[3] if len(entry) > 3 else None
    return peak, total, taken, cooldown, entry[4] if len(entry) > 4 else LEGACY_WARMUP


def scheduled_lr(entry):
    """The lr of the coming step of a group whose `SCHEDULE_KEY` entry is `entry`."""
    peak, total, taken, cooldown, warmup = _parts(entry)
    return peak * lr_factor(taken, total, cooldown, warmup)


def schedule_lr(param_groups):
    """Set the lr of every group with a `SCHEDULE_KEY` for the coming step (called by step()). An lr
    set by an LR scheduler or the user's code over a total_steps schedule raises, before anything
    changes; over the schedule without a run length, theirs rules from then on (the entry is
    dropped, the lr left as they set it)."""
    entries = [(group, group[SCHEDULE_KEY]) for group in param_groups if group.get(SCHEDULE_KEY) is not None]
    scheduled, yielded = [], []
    for group, entry in entries:
        peak, total, taken, cooldown, warmup = _parts(entry)
        now = scheduled_lr(entry)
        # the lr this rule set last (or, after a step that raised, for this step); anything else was
        # written by someone else (ReduceLROnPlateau leaves no 'initial_lr'), and would be overwritten
        ours = (peak if taken == 0 else peak * lr_factor(taken - 1, total, cooldown, warmup), now)
        if "initial_lr" in group or group["lr"] not in ours:
            if total is None:
                yielded.append(group)
                continue
            raise RuntimeError(f"Amos: the lr of this param group follows total_steps (warmup, constant, decay), "
                               f"but an LR scheduler or your code set it (lr={group['lr']!r}, the schedule's: "
                               f"{ours[0]!r}); give Amos an lr to use your scheduler, or drop the scheduler")
        scheduled.append((group, entry, now))
    for group in yielded:
        group[SCHEDULE_KEY] = None
    for group, entry, now in scheduled:
        total, taken = _parts(entry)[1:3]
        if taken == total:
            warnings.warn(f"Amos: this run has taken total_steps={total} steps; the lr of groups that follow "
                          "total_steps is 0 from now on (their lr schedule ends there)")
        group["lr"] = now


class TotalStepsLR:
    """A stand-in LR scheduler for an Amos whose lr follows `total_steps` (or the schedule without a
    run length), for frameworks that want a scheduler object beside the optimizer (Hugging Face's
    Trainer builds its own otherwise, which would write over the schedule). Amos moves the lr itself
    inside `step()`, so this one never writes it: `step()` does nothing, `get_last_lr()` reports
    each group's lr for the coming step (as torch's schedulers do, for logging), and the schedule is
    saved with the optimizer's `state_dict()`, so there is nothing to save here."""

    def __init__(self, optimizer):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"TotalStepsLR: {type(optimizer).__name__} is not an optimizer; pass the Amos instance")
        self.optimizer = optimizer

    def step(self, *args, **kwargs):
        """Nothing: Amos took its schedule's step in `optimizer.step()`."""

    def get_last_lr(self):
        groups = self.optimizer.param_groups
        return [scheduled_lr(g[SCHEDULE_KEY]) if g.get(SCHEDULE_KEY) is not None else g["lr"] for g in groups]

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        """Nothing to load: the schedule comes back with the optimizer's state_dict."""


def count_scheduled_step(param_groups):
    """One more step taken by every scheduled group (called at the end of a step)."""
    for group in param_groups:
        entry = group.get(SCHEDULE_KEY)
        if entry is not None:
            group[SCHEDULE_KEY] = (*entry[:2], entry[2] + 1, *entry[3:])  # a new tuple: saved state dicts keep theirs


def eta(shape):
    """eta of a parameter of `shape`: 0.5 for vectors and scalars (biases, norm gains), the official
    value; sqrt(2 / C) for matrices (C = prod(shape[1:]), the fan-in of a Linear or conv weight, the
    width of an embedding table), the He scale, at which a layer keeps its activations of order one.

    eta is the scale the weights should have at the optimum, and the initialisation does not say
    it: torch's nn.Embedding is N(0, 1), GPT-2's matrices N(0, 0.02), torch's nn.Linear and conv
    kaiming-uniform with RMS sqrt(1/(3C)); the He scale trained the quality suite's four models best
    (docs/defaults.md), so the weights are not read.
    """
    if len(shape) <= 1:
        return 0.5
    fan_in = math.prod(shape[1:])
    return math.sqrt(2.0 / fan_in) if fan_in else 1.0


def momentum_dtype(option, param):
    """The dtype `m` is stored in for `param` under the group's `momentum_dtype` option: "auto"
    is bfloat16 for parameters of 32 bits or fewer (fp64 parameters keep fp64), None the compute
    dtype (fp32; fp64 for fp64 parameters), a dtype itself."""
    wide = compute_dtype(param)
    if option == MOMENTUM_AUTO:
        return wide if wide.itemsize > 4 else BF16
    return option or wide
