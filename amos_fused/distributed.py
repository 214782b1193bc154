"""FSDP2 / DTensor parameters: Amos' statistics over the global tensor from each rank's shard.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) every parameter is a DTensor split on dim 0
(`Shard(0)`, uneven splits allowed) over a 1-D device mesh, and the optimizer sees each rank's
rows. Amos' statistics are sums over slices (docs/algorithm.md: "Slices", "Second moment", "Closed-form schedules"):
  - a row of a matrix (granularity "row", ndim >= 2) lives whole on one rank: S_r is local;
  - an element ("element") is local;
  - a slice that spans ranks (granularity "tensor", or a 1-D parameter under "row": R = 1) has
    a partial S on each rank;
  - the closed-form ||u|| sums over all slices of a tensor, so it spans ranks whenever the tensor
    does; with local slices each rank holds a partial sum of S_r * r_r.

What is communicated per optimizer step (`sharded_step`): ONE all-reduce (sum) of one flat
vector, whatever the number of param groups and parameters. It holds one scalar per partial
statistic above (S of each spanning slice, ||u||**2 of each sharded closed-form tensor; rows of
dim-0 shards add nothing) and one skip flag: 4 bytes each (8 with fp64 parameters), so a few
hundred bytes for a model with a few hundred sharded tensors. The flag (this rank's verdict on
its local gradients, or GradScaler's found_inf) makes every rank skip together, and a total that
is not finite skips the step too; a skipped step changes nothing and creates no state. Each rank
then finalizes and applies its own shards. The step reads the verdict on the host once (after
the all-reduce). With parameters on several process groups (not FSDP2's case) each group gets
its own all-reduce. Outside the step, the default eta is measured over the global tensor
(`mean_square`: one all-reduce per matrix, at construction).

State under sharding (shapes are global; each rank holds its part; see `new_slice_state`):
  - "m": a DTensor like the parameter (Shard(0));
  - "v", "b" of local slices: under "row", a (R,) DTensor split like the parameter's rows;
    under "element", a DTensor with the parameter's shape (a flat (n,) DTensor would be split
    by torch.chunk over n elements, not along the parameter's rows);
  - "v", "b" of a spanning slice: a plain (1,) tensor, the same on every rank (each rank
    updates it from the same all-reduced S);
  - "step": a plain 0-d tensor; "eta": a float.
torch.distributed.checkpoint (DCP) saves the DTensors sharded and the plain tensors once.

Supported: DTensors with placement Shard(0) or Replicate on a 1-D mesh (FSDP2, and DTensors
that are not sharded). Not supported, with a clear error: other placements (tensor parallel
Shard(1), HSDP's 2-D meshes); DeepSpeed ZeRO and FSDP1 flat parameters (see docs/integrations.md).
"""
import sys

import torch
import torch.distributed as dist

from .slices import slice_shape


def is_dtensor(t):
    # A DTensor exists only once torch.distributed.tensor is imported, and importing it costs
    # seconds, so look it up instead of importing it with amos_fused.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t):
    """This rank's part of a DTensor (a view: writing it writes the DTensor); other tensors as they are."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(p):
    """True when `p` is a DTensor split on dim 0 over more than one rank."""
    if not is_dtensor(p):
        return False
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or not (placements[0].is_replicate() or placements[0].is_shard(0)):
        raise NotImplementedError(
            f"Amos: a DTensor parameter of shape {tuple(p.shape)} has placements {tuple(placements)} on a "
            f"{mesh.ndim}-D mesh; Amos supports Shard(0) (FSDP2's fully_shard) or Replicate on a 1-D mesh. "
            "Shard such parameters on dim 0 (fully_shard's default) or use DDP")
    return placements[0].is_shard(0) and mesh.size() > 1


def spans_ranks(p, granularity):
    """True when the slices of `p` (R = 1) are split across ranks; rows of dim-0 shards never are."""
    return is_sharded(p) and (granularity == "tensor" or (granularity == "row" and p.ndim <= 1))


def norm_spans_ranks(p, granularity):
    """True when `p`'s slices are local but the closed-form ||u|| (a sum over them) is not."""
    return is_sharded(p) and not spans_ranks(p, granularity)


def local_slice_shape(p, granularity):
    """(R, C) of this rank's part of `p`: its slices, or the parts of its one spanning slice."""
    if not is_sharded(p):
        return slice_shape(p.shape, granularity)
    n = local(p).numel()
    if spans_ranks(p, granularity):
        return 1, n
    _, C = slice_shape(p.shape, granularity)
    return n // C, C


def slice_state_shape(p, granularity):
    """The (global) shape of `v` and `b` for `p`; see the module docstring."""
    if is_sharded(p) and granularity == "element":
        return tuple(p.shape)
    return (slice_shape(p.shape, granularity)[0],)


def new_slice_state(p, granularity, dtype):
    """Zeros for `v` or `b` of `p`, sharded like `p`'s slices (module docstring)."""
    R, _ = slice_shape(p.shape, granularity)
    device = local(p).device
    if not is_sharded(p) or spans_ranks(p, granularity):
        return torch.zeros(R, dtype=dtype, device=device)
    if granularity == "element":
        return torch.zeros_like(p, dtype=dtype)
    from torch.distributed.tensor import DTensor, Shard

    rows = local(p).shape[0]
    return DTensor.from_local(torch.zeros(rows, dtype=dtype, device=device), p.device_mesh, [Shard(0)],
                              run_check=False, shape=(R,), stride=(1,))


def _group(p):
    return p.device_mesh.get_group()


def complete_sums(params, granularities, sums, norms, skip=None):
    """Phase 2: sum the partial statistics over ranks, with the skip flag, in one all-reduce.

    params[i] steps with granularities[i]; `sums[i]` is S of its local slices, `norms[i]` the
    local part of its ||u||**2 or None. The entries that are partial (S of a spanning slice,
    ||u||**2 of a sharded tensor) and `skip` (this rank's 0-d flag, 1.0 = skip, or None) go into
    one flat vector (fp32, fp64 if any entry is) per process group, all-reduced by sum: under
    FSDP2 every parameter shares one mesh, so one collective per step. With `skip`, a group of
    sharded parameters communicates even when nothing of it is partial, since ranks must agree.

    Returns the completed (sums, norms) and `skipped`: with `skip`, True when some rank flagged
    or a completed entry is not finite (every rank holds the same totals, so every rank decides
    alike); False without `skip`. Without sharded parameters nothing is communicated.
    """
    sums, norms = list(sums), list(norms)
    slots = {}  # process group -> (device, [(list, index)] of the partial entries it completes)
    for i, (p, granularity) in enumerate(zip(params, granularities)):
        if spans_ranks(p, granularity):
            entry = (sums, i)
        elif norms[i] is not None and norm_spans_ranks(p, granularity):
            entry = (norms, i)
        elif skip is not None and is_sharded(p):
            entry = None  # nothing partial, but its ranks must agree on the skip
        else:
            continue
        _, entries = slots.setdefault(_group(p), (local(p).device, []))
        if entry is not None:
            entries.append(entry)
    verdicts = []
    for pg, (device, entries) in slots.items():
        parts = [values[i].reshape(-1) for values, i in entries] + ([] if skip is None else [skip.reshape(1)])
        wide = torch.float64 if any(x.dtype == torch.float64 for x in parts) else torch.float32
        flat = torch.cat([x.to(device, wide) for x in parts])
        dist.all_reduce(flat, group=pg)
        if skip is not None:
            verdicts.append((flat[-1] > 0) | ~flat.isfinite().all())
        for (values, i), total in zip(entries, flat.split([x.numel() for x in parts])):
            values[i] = total.to(values[i].dtype).reshape(values[i].shape)
    if skip is None:
        return sums, norms, False
    if not verdicts:  # nothing sharded: this rank decides alone
        verdicts.append(skip.reshape(()) > 0)
    return sums, norms, bool(torch.stack([x.to(verdicts[0].device) for x in verdicts]).any())


@torch.no_grad()
def sharded_step(optimizer, work, grad_scale, skip):
    """One Amos step for an optimizer holding DTensor parameters, with one all-reduce.

    `work`: (group, params, grads) for every param group (params with a gradient; DTensors and
    plain tensors); `grad_scale`: GradScaler's scale or None; `skip`: this rank's verdict, a 0-d
    float tensor (1.0 = a local gradient is non-finite or GradScaler found inf). Phase 1 runs
    for the tensors with a partial statistic, changing nothing (it reads t as step + 1);
    phase 2 is one all-reduce of every group's partial statistics and the flag; only when no
    rank skips is the state created, the step counted and phase 3 applied (it reduces the
    tensors whose slices are whole on this rank, skipped by phase 1). Returns True when the step was skipped
    (on every rank alike).
    """
    from . import reference  # reference.py imports this module: import it when first needed

    todo = [(group, p, g) for group, params, grads in work for p, g in zip(params, grads) if p.numel()]
    reduced = []
    for group, p, g in todo:
        if not (spans_ranks(p, group["granularity"]) or
                (group["schedule"] != "amos" and norm_spans_ranks(p, group["granularity"]))):
            reduced.append((None, None))  # nothing partial: phase 3 reduces it, after the decision
            continue
        state = optimizer.state.get(p, {})  # .get: a skipped first step must create no state
        t = state["step"] + 1 if "step" in state else 1.0
        reduced.append(reference.reduce_phase(p, g, group, grad_scale, state.get("v"), t))
    sums, norms, skipped = complete_sums([p for _, p, _ in todo], [group["granularity"] for group, _, _ in todo],
                                         [S for S, _ in reduced], [u for _, u in reduced], skip)
    if skipped:
        return True
    for group, params, _ in work:
        for p in params:
            optimizer._state_for(p, group)["step"] += 1
    for (group, p, g), S, usq in zip(todo, sums, norms):
        reference.apply_phase(p, g, optimizer.state[p], group, grad_scale, S, usq)
    return False


def mean_square(p):
    """Mean of p*p over the global tensor, in fp64 (the default eta is its square root)."""
    if not is_sharded(p):
        return local(p).detach().double().square().mean().item()
    total = local(p).detach().double().square().sum()
    dist.all_reduce(total, group=_group(p))
    return total.item() / p.numel()


def init_state(optimizer):
    """Create v, b, m and step now (normally made at a parameter's first step) for every
    parameter that requires grad; they start at zero, exactly as a first step makes them.

    For torch.distributed.checkpoint: `dcp.load` fills the tensors of a template state dict, so
    call this on the fresh optimizer before `get_state_dict(model, optimizer)`. (torch's
    `get_state_dict` creates missing state itself, by a zero-lr step, only when the state is
    empty, and Amos' never is: it holds the eta measured at construction.)
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                optimizer._state_for(p, group)
