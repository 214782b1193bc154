"""FSDP2 / DTensor parameters: Amos' statistics over the global tensor from each rank's shard.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) every parameter is a DTensor split on dim 0
(`Shard(0)`, uneven splits allowed) over a 1-D device mesh, and the optimizer sees each rank's
rows. Amos' statistics are sums over slices (ALGORITHM.md §1, §3, §5):
  - a row of a matrix (granularity "row", ndim >= 2) lives whole on one rank: S_r is local;
  - an element ("element") is local;
  - a slice that spans ranks (granularity "tensor", or a 1-D parameter under "row": R = 1) has
    a partial S on each rank;
  - the closed-form ||u|| sums over all slices of a tensor, so it spans ranks whenever the tensor
    does; with local slices each rank holds a partial sum of S_r * r_r.
The reference step (reference.py) computes these partials for a whole param group on the local
shards, completes them with `complete_sums`: ONE all-reduce of one flat vector per param group
and step, never one per parameter; then finalizes and applies each tensor locally.
The default eta is measured over the global tensor (`mean_square`, at construction).

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
Shard(1), HSDP's 2-D meshes); DeepSpeed ZeRO and FSDP1 flat parameters (see README).
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


def complete_sums(params, granularity, sums, norms):
    """Phase 2 of the reference step: sum the partial statistics over ranks, in one all-reduce.

    `sums[i]` is S of params[i]'s local slices, `norms[i]` the local part of its ||u||**2 or
    None. The entries that are partial (S of a spanning slice, ||u||**2 of a sharded tensor)
    go into one flat vector (fp32, fp64 if any of them is) and are all-reduced together; in
    FSDP2 all parameters share one mesh, so that is one collective per step. Returns the
    completed (sums, norms); without sharded parameters nothing is communicated.
    """
    sums, norms = list(sums), list(norms)
    slots = {}  # process group -> [(list, index)] of the partial entries it completes
    for i, p in enumerate(params):
        if spans_ranks(p, granularity):
            slots.setdefault(_group(p), []).append((sums, i))
        elif norms[i] is not None and norm_spans_ranks(p, granularity):
            slots.setdefault(_group(p), []).append((norms, i))
    for pg, entries in slots.items():
        parts = [values[i].reshape(-1) for values, i in entries]
        wide = torch.float64 if any(x.dtype == torch.float64 for x in parts) else torch.float32
        flat = torch.cat([x.to(wide) for x in parts])
        dist.all_reduce(flat, group=pg)
        for (values, i), total in zip(entries, flat.split([x.numel() for x in parts])):
            values[i] = total.to(values[i].dtype).reshape(values[i].shape)
    return sums, norms


def any_rank(flag, params):
    """`flag` (a bool) OR-ed over the ranks sharing `params`' meshes (one tiny all-reduce each).

    The skip decision for non-finite gradients must be the same on every rank: a rank that
    skips while another steps would leave the others waiting in `complete_sums`.
    """
    groups = {}
    for p in params:
        if is_sharded(p):
            groups.setdefault(_group(p), local(p).device)
    for pg, device in groups.items():
        x = torch.tensor([float(flag)], device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=pg)
        flag = bool(x.item())
    return flag


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
