"""DTensor parameters (FSDP2, HSDP, tensor parallel, FSDP2 + TP): Amos' statistics over the
global tensor, from each rank's local shard, through the fused kernels.

A DTensor parameter lives on a device mesh; on each mesh dimension it is Replicate, or split along
one of its dims (Shard(d), or _StridedShard(d), which FSDP2 produces on top of tensor parallel).
Amos' statistics are sums over slices (docs/algorithm.md: "Slices", "Second moment", "Closed-form
schedules"). Per parameter (`Layout`):
  - S_r is PARTIAL over a mesh dimension that splits a slice: under "row" (ndim >= 2), a
    dimension splitting dim d >= 1 (RowwiseParallel's Shard(1)); under "tensor", or for a 1-D
    parameter under "row" (one slice), every splitting dimension;
  - the closed forms' ||u||**2 = sum of S_r * r_r (given the complete S_r) is partial over a
    dimension splitting the slices among ranks: dim 0 under "row" (FSDP2, ColwiseParallel's
    Shard(0)), every splitting dimension under "element".
A parameter with nothing partial ("amos" on rows whole on their rank, the common FSDP2 case)
takes its backend's one-pass kernel on the local shard, with no extra traffic. The others take
the two-phase path (`ShardedStep`):
  1. reduce: the backend's `two_phase_sums` writes S_r of every local slice of a bucket of
     tensors into one flat vector (one kernel call);
  2. complete: one all-reduce per mesh dimension (process group) that needs one, carrying every
     partial statistic of every param group and the skip flag; closed forms' partial ||u||**2 go
     out once their S_r are complete (`_schedule` orders the rounds so that one per dimension
     suffices for every placement torch produces);
  3. finalize and apply: the backend's `two_phase_apply` (one kernel call per bucket) updates v
     and b from the complete S_r and applies the step (the closed forms' ||u||**2, needed before
     it, comes from reference.py's second moment on the flat vectors).
Ranks must agree on skips: with guard="step" (or a GradScaler) the flag, this rank's verdict on
its local gradients, rides on the rounds (a flag-only all-reduce on a splitting dimension that has
no statistics), so every rank skips alike. With guard="slice" and no GradScaler nothing is
decided on a rank alone: a slice with a non-finite complete S_r is guarded on every rank holding
it. On CPU tensors the verdict is read on the host; on CUDA (or with capturable=True) it stays on
the device and the kernels read it.

State under sharding (shapes global; each rank holds its part):
  - "m": a DTensor like the parameter;
  - "v", "b" under "row" (ndim >= 2): an (R,) DTensor placed like the parameter's rows (dim-0
    placements kept, others Replicate) when some placement splits rows, else a plain (R,) tensor
    (the same on every rank); one slice ("tensor", 1-D): a plain (1,) tensor; "element": a
    DTensor like the parameter when it is split, else a plain (n,) tensor;
  - "step": a plain 0-d tensor; "eta": a float, the same on every rank (by the global shape).
torch.distributed.checkpoint (DCP) saves the DTensors sharded and the plain tensors once.
Not supported, with a clear error at construction: Partial placements (a parameter is never a
pending sum), DeepSpeed ZeRO and FSDP1 flat parameters (see README).
"""
import collections
import itertools
import operator
import sys

import torch
import torch.distributed as dist

from . import backends, reference
from .slices import slice_shape

# a DTensor's placements and local part: attribute reads in C (DTensor.placements is a property)
_SPEC_PLACEMENTS, _LOCAL = operator.attrgetter("_spec.placements"), operator.attrgetter("_local_tensor")
_VBSE, _GET_M = operator.itemgetter("v", "b", "step", "eta"), operator.methodcaller("get", "m")
_IS_CONTIGUOUS, _CONTIGUOUS = torch.Tensor.is_contiguous, torch.Tensor.contiguous
_B, _STEP, _ETA = map(operator.itemgetter, ("b", "step", "eta"))
_DTYPE = operator.attrgetter("dtype")


def is_dtensor(t):
    # A DTensor exists only once torch.distributed.tensor is imported, and importing it costs
    # seconds, so look it up instead of importing it with amos_fused.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t):
    """This rank's part of a DTensor (under no_grad the DTensor's own local tensor: writing it
    writes the DTensor); other tensors as they are."""
    return t.to_local() if is_dtensor(t) else t


# ---- placements -----------------------------------------------------------------------------------

def _split_dims(p):
    """[(mesh dim, tensor dim)] of every mesh dimension of size > 1 that splits `p`."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out = []
    for i, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            continue
        if not isinstance(pl, (Shard, _StridedShard)):
            raise NotImplementedError(
                f"Amos: a DTensor parameter of shape {tuple(p.shape)} has placements {tuple(p.placements)}; "
                f"{pl} on mesh dimension {i} is not supported (a parameter must be Shard, _StridedShard or "
                "Replicate on every mesh dimension: redistribute it, e.g. p.redistribute(placements=[Replicate()])")
        if p.device_mesh.size(i) > 1:
            out.append((i, pl.dim % max(p.ndim, 1)))
    return out


def check_placements(p):
    """Raise now (at construction) for a DTensor placement Amos cannot step."""
    if is_dtensor(p):
        _split_dims(p)


Layout = collections.namedtuple("Layout", "sum_groups norm_groups split_groups rows C")
# sum_groups: process groups over which S_r of the local slices is partial
# norm_groups: ... over which the closed forms' ||u||**2 is partial once S_r is complete
# split_groups: every group splitting the tensor (its ranks must agree on a skip)
# rows: local slices; C: the global slice length


def layout(p, granularity):
    """The `Layout` of parameter `p` stepped with `granularity` (plain tensors: nothing split)."""
    R, C = slice_shape(p.shape, granularity)
    if not is_dtensor(p):
        return Layout((), (), (), R, C)
    one_slice = granularity == "tensor" or (granularity == "row" and p.ndim <= 1)
    sums, norms, splits = [], [], []
    for mesh_dim, dim in _split_dims(p):
        group = p.device_mesh.get_group(mesh_dim)
        splits.append(group)
        if one_slice:
            sums.append(group)
        elif granularity == "element" or dim == 0:
            norms.append(group)
        else:
            sums.append(group)
    n = local(p).numel()
    rows = 1 if one_slice else n if granularity == "element" else local(p).shape[0] if p.ndim else 1
    return Layout(tuple(sums), tuple(norms), tuple(splits), rows, C)


def _rows_split(p):
    """The placements of an (R,) tensor holding one entry per row of `p` (dim-0 splits kept), or
    None when no placement splits rows."""
    from torch.distributed.tensor import Replicate

    kept = [pl if getattr(pl, "dim", None) == 0 and not pl.is_replicate() else Replicate() for pl in p.placements]
    return kept if any(not pl.is_replicate() for pl in kept) else None


def slice_state_shape(p, granularity):
    """The (global) shape of `v` and `b` for `p`; see the module docstring."""
    if is_dtensor(p) and granularity == "element" and _split_dims(p):
        return tuple(p.shape)
    return (slice_shape(p.shape, granularity)[0],)


def new_slice_state(p, granularity, dtype):
    """Zeros for `v` or `b` of `p`, placed like `p`'s slices (module docstring)."""
    R, _ = slice_shape(p.shape, granularity)
    device = local(p).device
    if not is_dtensor(p) or granularity == "tensor" or (granularity == "row" and p.ndim <= 1):
        return torch.zeros(R, dtype=dtype, device=device)  # plain tensors, or one slice: the same on every rank
    if granularity == "element":
        return torch.zeros_like(p, dtype=dtype) if _split_dims(p) else torch.zeros(R, dtype=dtype, device=device)
    placements = _rows_split(p)
    if placements is None:
        return torch.zeros(R, dtype=dtype, device=device)
    from torch.distributed.tensor import DTensor

    rows = local(p).shape[0]
    return DTensor.from_local(torch.zeros(rows, dtype=dtype, device=device), p.device_mesh, placements,
                              run_check=False, shape=(R,), stride=(1,))


def init_state(optimizer):
    """Create v, b, m and step now (normally made at a parameter's first step) for every
    parameter that requires grad; they start at zero, exactly as a first step makes them.

    For torch.distributed.checkpoint: `dcp.load` fills the tensors of a template state dict, so
    call this on the fresh optimizer before `get_state_dict(model, optimizer)`. (torch's
    `get_state_dict` creates missing state itself, by a zero-lr step, only when the state is
    empty, and Amos' never is: it holds the eta set at construction.)
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                optimizer._state_for(p, group)


# ---- the sharded step -------------------------------------------------------------------------------

def _local_grad(p, g):
    """This rank's part of `p`'s gradient, placed like `p` (a gradient torch left Partial, or placed
    otherwise, is redistributed first)."""
    local_tensor = getattr(g, "_local_tensor", None)  # DTensors have it (cheaper than isinstance)
    if local_tensor is None:
        return g
    if g.placements != p.placements:
        g = g.redistribute(p.device_mesh, p.placements)
        local_tensor = g._local_tensor
    return local_tensor  # under no_grad, what to_local() returns


class _Bucket:
    """Two-phase tensors of one param group that share a backend's ops and a compute dtype."""

    def __init__(self, group, ops, dtype, entries, params, layouts, device):
        self.group, self.ops, self.dtype, self.device = group, ops, dtype, device
        self.entries = entries  # indices into the plan's params
        self.layouts = layouts
        self.slice_lens = [lay.C for lay in layouts]  # the global geometry the local parts step with
        self.numels = [p.numel() for p in params]
        self.norm_rounds = torch.tensor([bool(lay.norm_groups) for lay in layouts], device=device)
        self.all_norm_rounds = all(lay.norm_groups for lay in layouts)
        self.rows = [lay.rows for lay in layouts]
        self.offsets = [0]
        for R in self.rows:
            self.offsets.append(self.offsets[-1] + R)
        n = self.offsets[-1]
        entry_of = torch.repeat_interleave(torch.arange(len(entries)), torch.tensor(self.rows, dtype=torch.long))
        self.entry_of = entry_of.to(device)  # slice -> entry
        self.C = torch.tensor([float(lay.C) for lay in layouts], dtype=dtype)[entry_of].to(device)
        self.n = n
        self.closed = group["schedule"] != "amos"

    def slot(self, entries):
        """A mask over this bucket's entries, True at `entries` (a position tensor)."""
        return torch.zeros(len(self.entries), dtype=torch.bool, device=self.device).index_fill_(0, entries, True)

    def slice_positions(self, which):
        """Positions in the flat vector of the slices of the entries `which` (positions in `entries`)."""
        idx = [i for e in which for i in range(self.offsets[e], self.offsets[e + 1])]
        return torch.tensor(idx, dtype=torch.long, device=self.device)


Round = collections.namedtuple("Round", "group sums norms ready flag")
# sums: [(bucket, slice positions)]; norms: [(bucket, entry positions)] of ||u||**2 to complete;
# ready: [(bucket, entry positions)] whose local ||u||**2 is computed before this round


def _schedule(buckets, flag_groups):
    """The all-reduce rounds of one step: per process group, the partial S_r, the partial ||u||**2
    whose S_r are complete by then, and the skip flag. Groups that complete slice sums go first,
    so every placement torch produces needs one round per group."""
    need_S = {(b, e): list(lay.sum_groups) for b, bk in enumerate(buckets) for e, lay in enumerate(bk.layouts)}
    need_N = {(b, e): list(lay.norm_groups) for b, bk in enumerate(buckets) for e, lay in enumerate(bk.layouts)
              if bk.closed}
    order = []
    for groups in list(need_S.values()) + list(need_N.values()) + [list(flag_groups)]:
        for g in groups:
            if g not in order:
                order.append(g)
    # stable: groups completing slice sums first, then those also splitting slices for a norm
    # (whose rounds must wait for complete sums), so each group needs one round
    order.sort(key=lambda g: (not any(g in gs for gs in need_S.values()), any(g in gs for gs in need_N.values())))
    flag_left = set(flag_groups)
    computed = set()  # (b, e) whose local ||u||**2 exists
    rounds = []
    while any(need_S.values()) or any(need_N.values()) or flag_left:
        progressed = False
        for g in order:
            sums = [(b, e) for (b, e), gs in need_S.items() if g in gs]
            ready = [k for k, gs in need_N.items() if not need_S[k] and k not in computed and gs]
            norms = [k for k, gs in need_N.items() if not need_S[k] and g in gs]
            if not sums and not norms and g not in flag_left:
                continue
            rounds.append((g, sums, norms, [k for k in ready if k in norms], g in flag_left))
            computed.update(k for k in ready if k in norms)
            for k in sums:
                need_S[k].remove(g)
            for k in norms:
                need_N[k].remove(g)
            flag_left.discard(g)
            progressed = True
        if not progressed:  # cannot happen: every pending entry names a group of `order`
            raise RuntimeError("Amos: no all-reduce schedule for these placements")

    def by_bucket(keys, positions):  # positions None: the bucket's whole vector
        out = collections.defaultdict(list)
        for b, e in keys:
            out[b].append(e)
        return [(b, None if es == list(range(len(buckets[b].entries))) else positions(b, es))
                for b, es in sorted(out.items())]

    slices = lambda b, es: buckets[b].slice_positions(es)  # noqa: E731
    entries = lambda b, es: torch.tensor(es, dtype=torch.long, device=buckets[b].device)  # noqa: E731
    return [Round(g, by_bucket(s, slices), by_bucket(n, entries), by_bucket(r, entries), f)
            for g, s, n, r, f in rounds]


def _plan_key(optimizer, work):
    return (optimizer.backend, optimizer.guard, optimizer.capturable,
            tuple((id(group), group["schedule"], group["granularity"], group["momentum"] > 0,
                   group["momentum_dtype"], tuple(map(id, params)), tuple(map(_DTYPE, params)),
                   tuple(map(_DTYPE, grads))) for group, params, grads in work))


class ShardedStep:
    """What one optimizer's sharded steps reuse: layouts, buckets, the all-reduce schedule; rebuilt
    when the param groups, their parameters with gradients or the options it depends on change."""

    def __init__(self, optimizer, work):
        self.key = _plan_key(optimizer, work)
        devices = {local(p).device for _, params, _ in work for p in params}
        if len(devices) != 1:
            raise RuntimeError(f"Amos: DTensor parameters must all have their local shards on one device, not on "
                               f"{sorted(map(str, devices))}")
        self.device = devices.pop()
        self.params = [p for _, params, _ in work for p in params]
        self.groups = []  # per group: (group, one-pass [(step fn, param positions)], two-phase bucket indices)
        self.buckets = []
        pos = 0
        split_groups = []
        fn = backends.resolve(optimizer.backend, self.device)
        for group, params, grads in work:
            onepass, twophase = collections.defaultdict(list), collections.defaultdict(list)
            for p, g in zip(params, grads):
                lay = layout(p, group["granularity"])
                for pg in lay.split_groups:
                    if pg not in split_groups:
                        split_groups.append(pg)
                if p.numel() == 0 or not lay.sum_groups and not (group["schedule"] != "amos" and lay.norm_groups):
                    onepass[fn].append(pos)  # (an empty parameter has nothing to step: the backends skip it)
                else:
                    ops = backends.two_phase(fn, local(p), _local_grad(p, g))
                    twophase[(ops, reference.compute_dtype(p))].append((pos, p, lay))
                pos += 1
            bucket_ids = []
            for (ops, dtype), items in twophase.items():
                bucket_ids.append(len(self.buckets))
                self.buckets.append(_Bucket(group, ops, dtype, [i for i, _, _ in items], [p for _, p, _ in items],
                                            [lay for _, _, lay in items], self.device))
            self.groups.append((group, list(onepass.items()), bucket_ids))
        self.split_groups = split_groups
        self.group_of = [group for group, params, _ in work for _ in params]
        self.flag_needed = optimizer.guard == "step"
        self.rounds = {flag: _schedule(self.buckets, split_groups if flag else ()) for flag in (False, True)}
        self.states = None  # local views of the state tensors, made at the first step that has state
        self.complete = False
        self.locals = None
        self.placements = [p._spec.placements if is_dtensor(p) else None for p in self.params]
        self.op_lists = {}  # (group position, call position) -> _OpLists, while the local views hold

    def local_grads(self, grads):
        """This rank's parts of `grads` (`_local_grad`), in one pass when every gradient is a
        DTensor placed like its parameter (the usual case)."""
        try:
            if list(map(_SPEC_PLACEMENTS, grads)) == self.placements:
                return list(map(_LOCAL, grads))
        except AttributeError:  # a plain tensor among them
            pass
        return list(map(_local_grad, self.params, grads))

    def local_params(self):
        """The local parts of the parameters, kept while the DTensors keep them (FSDP2 does)."""
        now = [getattr(p, "_local_tensor", p) for p in self.params]
        if self.locals is None or not all(map(operator.is_, now, self.locals)):
            self.locals = now
            self.op_lists = {}
        return self.locals

    def local_states(self, optimizer):
        """Per parameter {v, b, m, step, eta} with this rank's parts, cached while the state's
        entries stay the same objects (None for parameters without state yet)."""
        states = list(map(optimizer.state.get, self.params))
        if self.complete and _same(states, self.state_dicts) and _same(list(map(_GET_M, states)), self.ms) and \
                all(map(operator.is_, itertools.chain.from_iterable(map(_VBSE, states)), self.vbse)):
            return self.states
        self.op_lists = {}
        self.state_dicts = states
        self.ms = [st.get("m") if st else None for st in states]
        self.states = [{k: (local(x) if torch.is_tensor(x) else x) for k, x in st.items()} if st else None
                       for st in states]
        # every parameter has the state its step needs (until then, this is rebuilt at each call)
        self.complete = all(st is not None and "v" in st and (group["momentum"] == 0 or "m" in st)
                            for st, group in zip(states, self.group_of))
        # the entries' identities: one replaced (load_state_dict, by hand) makes new views
        self.vbse = list(itertools.chain.from_iterable(map(_VBSE, states))) if self.complete else []
        return self.states


def sharded_step(optimizer, work, grad_scale):
    """One Amos step for an optimizer holding DTensor parameters (module docstring). `work`:
    (group, params, grads) per param group, params with a gradient. Returns True when the step
    was skipped (decided on the host, every rank alike)."""
    plan = optimizer._sharded
    if plan is None or plan.key != _plan_key(optimizer, work):
        plan = optimizer._sharded = ShardedStep(optimizer, work)
    grads = plan.local_grads([g for _, _, gs in work for g in gs])
    device = plan.device
    on_device = optimizer.capturable or device.type == "cuda"
    guarded = optimizer._guarded_counter(device)

    # this rank's verdict: GradScaler's found_inf, and with guard="step" its gradients' bound
    found_inf = getattr(optimizer, "found_inf", None)
    flag = None
    if plan.flag_needed or found_inf is not None or grad_scale is not None:
        flags = optimizer._verdicts(work, read_grads=plan.flag_needed)
        flag = torch.zeros((), dtype=torch.float32, device=device)
        for f in flags.values():
            flag = torch.maximum(flag, f.to(device))

    # 1. reduce: S_r of the two-phase tensors' local slices (changes nothing)
    sums = [bk.ops.sums([grads[i] for i in bk.entries], bk.rows, bk.group, grad_scale, bk.dtype)
            if bk.n else torch.zeros(0, dtype=bk.dtype, device=device) for bk in plan.buckets]
    norms = [torch.zeros(len(bk.entries), dtype=bk.dtype, device=device) if bk.closed else None
             for bk in plan.buckets]
    rounds = plan.rounds[flag is not None]

    # 2. complete: the rounds of all-reduce (partial sums, partial norms, the flag). With no verdict
    # to agree on, the first round runs while the one-pass tensors step (nothing of theirs waits on it).
    states = None
    pending = _start_round(plan, optimizer, rounds[0], sums, norms, flag, states) if rounds else None
    if flag is None:
        states = _advance(optimizer, plan, None)
        _one_pass(plan, grads, states, grad_scale, None, guarded)
    for k, rnd in enumerate(rounds):
        flag = _finish_round(rnd, pending, sums, norms, flag)
        if k + 1 < len(rounds):
            pending = _start_round(plan, optimizer, rounds[k + 1], sums, norms, flag, states)
    for b, bk in enumerate(plan.buckets):  # ||u||**2 whose slices are all here: from the complete S_r
        if bk.closed and bk.n and not bk.all_norm_rounds:
            norms[b] = torch.where(bk.norm_rounds, norms[b],
                                   _norms(bk, sums[b], *_before_step(optimizer, plan, bk, states)))

    # the verdict, the same on every rank
    skip = None
    if flag is not None:
        if not on_device:
            if bool(flag > 0):
                return True
        else:
            skip = (flag > 0).to(torch.float32)
            optimizer._count_device_skip(skip)
        states = _advance(optimizer, plan, skip)
        _one_pass(plan, grads, states, grad_scale, skip, guarded)

    # 3. the two-phase tensors: the backends' phase 3 (finalize and apply) with the complete sums
    params = plan.local_params()
    for b, bk in enumerate(plan.buckets):
        if bk.n:
            bk.ops.apply([params[i] for i in bk.entries], [grads[i] for i in bk.entries],
                         [states[i] for i in bk.entries], bk.rows, bk.slice_lens, bk.numels, sums[b], norms[b],
                         bk.group, grad_scale, skip, guarded)
    return False


def _advance(optimizer, plan, skip):
    """Create the parameters' state at their first step and count the step (by 1 - skip); returns
    the local state views."""
    states = plan.local_states(optimizer)
    if not plan.complete:
        for p, group in zip(plan.params, plan.group_of):
            optimizer._state_for(p, group)
        states = plan.local_states(optimizer)
    optimizer._advance_steps(list(map(_STEP, states)), skip, plan.device)
    return states


_OpLists = collections.namedtuple("OpLists", "op params states vs ms")


def _op_lists(plan, key, fn, idx, group, params, grads, states):
    """The compiled op behind `fn` with the lists of its call that stay while the plan's local
    views do (as the step plan keeps them for plain tensors), or None when its kernels do not
    take every tensor (the plan's key fixes the gradients' dtypes and whether m exists)."""
    lists = plan.op_lists.get(key)
    if lists is None:
        ps, sts = [params[i] for i in idx], [states[i] for i in idx]
        op = backends.kernel_op_for(fn, ps, [grads[i] for i in idx], sts, group["momentum"])
        lists = plan.op_lists[key] = _OpLists(op, ps, sts, [st["v"] for st in sts],
                                              [st["m"] for st in sts] if op and group["momentum"] > 0 else [])
    return lists if lists.op is not None else None


def _one_pass(plan, grads, states, grad_scale, skip, guarded):
    """The tensors with nothing partial: their backend's one-pass step on the local parts; a
    compiled backend's op is called with kept lists (`_op_lists`)."""
    params = plan.local_params()
    for gi, (group, onepass, _) in enumerate(plan.groups):
        for k, (fn, idx) in enumerate(onepass):
            lists = _op_lists(plan, (gi, k), fn, idx, group, params, grads, states)
            if lists is not None and all(map(_IS_CONTIGUOUS, lists.params)):
                sts = lists.states
                lists.op.step(lists.params, [_CONTIGUOUS(grads[i]) for i in idx], lists.vs, list(map(_B, sts)),
                              lists.ms, list(map(_STEP, sts)), list(map(float, map(_ETA, sts))), group["lr"],
                              lists.op.options(group), grad_scale, skip, guarded)
                continue
            args = ([params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx], group, grad_scale)
            fn(*args, guarded=guarded) if skip is None else fn(*args, skip=skip, guarded=guarded)


def _start_round(plan, optimizer, rnd, sums, norms, flag, states):
    """Pack a round's partial statistics (and the flag) and start its all-reduce; a round of one
    whole vector is all-reduced in place."""
    for b, entries in rnd.ready:
        bk = plan.buckets[b]
        local_sq = _norms(bk, sums[b], *_before_step(optimizer, plan, bk, states))
        norms[b][...] = local_sq if entries is None else torch.where(bk.slot(entries), local_sq, norms[b])
    parts = [sums[b] if pos is None else sums[b][pos] for b, pos in rnd.sums] + \
            [norms[b] if pos is None else norms[b][pos] for b, pos in rnd.norms]
    if rnd.flag:
        parts.append(flag.reshape(1))
    wide = torch.float64 if any(x.dtype == torch.float64 for x in parts) else torch.float32
    whole = len(parts) == 1 and not rnd.flag and parts[0].dtype == wide and \
        (rnd.sums[0][1] if rnd.sums else rnd.norms[0][1]) is None
    flat = parts[0] if whole else torch.cat([x.to(wide) for x in parts])
    return flat, whole, dist.all_reduce(flat, group=rnd.group, async_op=True)


def _finish_round(rnd, pending, sums, norms, flag):
    """Wait for a round and unpack its totals; returns the flag (summed over the round's ranks)."""
    flat, whole, work = pending
    work.wait()
    if whole:
        return flag
    at = 0
    for vectors, parts in ((sums, rnd.sums), (norms, rnd.norms)):
        for b, pos in parts:
            n = vectors[b].numel() if pos is None else len(pos)
            total = flat[at:at + n].to(vectors[b].dtype)
            if pos is None:
                vectors[b].copy_(total)
            else:
                vectors[b][pos] = total
            at += n
    return flat[-1].to(torch.float32) if rnd.flag else flag


def _same(xs, ys):
    return len(xs) == len(ys) and all(map(operator.is_, xs, ys))


def _before_step(optimizer, plan, bk, states):
    """(v before this step, t of this step) of a bucket's slices, as phase 2 needs them. `states`:
    the local state views once the step counters have moved this step (t = step), or None when
    they have not (t = step + 1; a parameter's first step has no state yet: v = 0, t = 1)."""
    moved = states is not None
    if states is None:
        states = plan.local_states(optimizer)
    if all(states[i] is not None and "v" in states[i] for i in bk.entries):  # the usual case: a few ops
        v = torch.cat([states[i]["v"].reshape(-1) for i in bk.entries]).to(bk.dtype)
        t = torch.stack([states[i]["step"] for i in bk.entries]).to(bk.dtype)
        return v, (t if moved else t + 1)[bk.entry_of]
    vs, ts = [], []
    for i, R in zip(bk.entries, bk.rows):
        st = states[i]
        if st is not None and "v" in st:
            vs.append(st["v"].reshape(-1).to(bk.dtype))
            ts.append(st["step"].to(bk.device, bk.dtype) + (0 if moved else 1))
        else:
            vs.append(torch.zeros(R, dtype=bk.dtype, device=bk.device))
            ts.append(torch.ones((), dtype=bk.dtype, device=bk.device))
    return torch.cat(vs), torch.stack(ts)[bk.entry_of]


def _norms(bk, S, v_prev, t):
    """The local ||u||**2 of each tensor of a closed-form bucket from its complete S_r."""
    _, r = reference.second_moment(S, v_prev, t, bk.C, bk.group)
    terms = torch.where(torch.isfinite(S), S * r, torch.zeros_like(S))
    return torch.zeros(len(bk.entries), dtype=S.dtype, device=S.device).index_add_(0, bk.entry_of, terms)
