"""Launch plans for the multi-tensor Triton kernels: device-side tables, tiles and block sizes.

A plan covers the tensors of one (device, param dtype, grad dtype, momentum dtype) combination.
It holds, on the device: `info` (int64, one row of addresses and geometry per tensor; column
names in amos_triton.py), `finfo` (fp32 eta, eps0, C per tensor), the tile tables of every
launch, and fp32 scratch for per-slice coefficients and partial sums. Plans are cached while the
parameters are the same tensors (same data_ptr, shape and state buffers), so after the first
step a step builds nothing; the gradients' addresses are a small table of their own, cached per
plan by those addresses, so gradients that move cost a new table, not a new plan.
Both caches follow `Cache`'s rules for CUDA graphs: what a capture used is never dropped, and
nothing is built while capturing (that raises `capture_miss`, with the fix).
This module needs torch only (no triton), so it can be read and tested anywhere.

Block sizes come from a fixed heuristic, not autotuning (autotuning would re-apply the in-place
step while it times configurations):
- A slice of C <= `long_row` elements is owned by one program of `_rows_kernel`. Its column block
  is COLB = next_pow2(C) capped at `max_colb`; a program holds ROWS = `tile` // COLB slices (at
  most next_pow2 of the bucket's total slices), so a launch per distinct COLB (two when some
  slices are packed). Whole groups of ROWS rows of one tensor make plain programs; the other
  slices (biases, norm gains, scalars, remainders) are packed ROWS to a program, so thousands
  of small tensors take a few programs, not one each. `long_row` bounds the bytes of g a
  program re-reads in its apply walk, so that second read stays in L2.
- Tensors whose theta, m and gradient rows all start on 4 elements get launches of their own
  with VEC4 (the kernels tell the compiler, which then loads and stores 4 elements at a time);
  a gradient's alignment is part of the plan's key, so a misaligned one (a view into a flat
  buffer) only moves its own tensor to a plain launch.
- Longer slices (a big 1-D tensor, `"tensor"` granularity) are split into chunks of `chunk`
  columns (one program each, walking `block`-wide vectors): partial sums, a fixed-order sum per
  slice (a finalize program sums ROWS slices of KB chunks at a time, ROWS * KB <= `final_tile`),
  then the apply; no atomics, so results do not depend on scheduling.
- Closed forms: `_norm_kernel` sums each tensor's per-slice S*r in a fixed order,
  `norm_tensors` tensors per program (one program walks all slices of its tensors: fine for
  "row"/"tensor", slow for a huge tensor under "element" granularity).
- The interpreter's cost grows with the number of programs (and loop iterations), not elements,
  so under TRITON_INTERPRET=1 every size is larger.
"""
import collections
import dataclasses
import math
import weakref

import torch

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
NINFO, NFINFO = 10, 3  # must match amos_triton.py (checked in tests)


@dataclasses.dataclass(frozen=True)
class Heuristic:
    tile: int  # elements a `_rows_kernel` program holds at once (ROWS * COLB)
    max_colb: int  # widest column block of `_rows_kernel`
    long_row: int  # slices longer than this are split across programs
    chunk: int  # columns per program of a split slice (a multiple of `block`)
    block: int  # vector width of `_chunk_kernel`
    norm_tensors: int  # tensors per program of `_norm_kernel`
    num_warps: int
    final_tile: int = 1024  # partial sums a `_split_finalize_kernel` program holds (ROWS * KB):
    # at most 1024 over its 4 warps kept sm_90 at <= 89 registers, no spills, for every ROWS x KB


# GPU: 4096 fp32 per program over 8 warps is 16 values per thread in flight per array; a slice
# of up to 16k elements (64 KB of fp32 g) per program keeps the apply walk's re-read in L2.
COMPILED = Heuristic(tile=4096, max_colb=1024, long_row=16384, chunk=16384, block=2048, norm_tensors=8,
                     num_warps=8, final_tile=1024)
INTERPRETED = Heuristic(tile=16384, max_colb=4096, long_row=32768, chunk=32768, block=32768, norm_tensors=256,
                        num_warps=1, final_tile=65536)


def next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


class Plan:
    """Tables and scratch for one (device, dtype-combination) set of tensors."""

    def __init__(self, params, grads, states, closed, heuristic, momentum):
        self.device = params[0].device
        self.p_dtype, self.n = params[0].dtype, len(params)
        self.m_dtype = states[0]["m"].dtype if momentum else None
        self.heuristic = h = heuristic
        geometry = []  # (R, C) per tensor
        for p, st in zip(params, states):
            R = st["v"].numel()
            geometry.append((R, p.numel() // R))
        owned = [i for i, (_, C) in enumerate(geometry) if C <= h.long_row]
        split = [i for i, (_, C) in enumerate(geometry) if C > h.long_row]
        is_split = set(split)

        info = [[0] * NINFO for _ in params]
        finfo = [[0.0] * NFINFO for _ in params]
        for i, (p, st) in enumerate(zip(params, states)):
            R, C = geometry[i]
            eps0 = math.sqrt(p.numel()) * st["eta"] * (math.sqrt(2.0) if p.ndim >= 2 else 1.0)
            info[i][:6] = [p.data_ptr(), st["m"].data_ptr() if momentum else 0, st["v"].data_ptr(),
                           st["b"].data_ptr(), st["step"].data_ptr(), R]
            info[i][6] = C
            finfo[i] = [float(st["eta"]), eps0, float(C)]

        # per-slice scratch: closed forms (sqrt(r), S*r) and split slices (K, D)
        n_coef = 0
        for i, (R, _) in enumerate(geometry):
            if closed or i in is_split:
                info[i][7] = n_coef
                n_coef += R

        # owned slices: one launch of `_rows_kernel` per column-block width. Full groups of
        # ROWS rows of one tensor are plain tiles; the other rows (small tensors, remainders)
        # are packed ROWS to a program through the slot tables.
        # Plain tiles of tensors whose theta, m and gradient rows start 4-element aligned are a
        # launch of their own, with VEC4 (vector loads and stores). Gradients enter the plan's key
        # by their alignment only (`plan_key`), so gradients that move but stay aligned reuse it.
        by_colb = collections.defaultdict(list)
        for i in owned:
            by_colb[min(next_pow2(geometry[i][1]), h.max_colb)].append(i)
        aligned = [geometry[i][1] % 4 == 0 and _aligned4(p) and _aligned4(g) and (not momentum or _aligned4(st["m"]))
                   for i, (p, g, st) in enumerate(zip(params, grads, states))]
        self.buckets = []  # (rows, colb, one_block, packed, tiles, slot_i, slot_r, ntiles, vec)
        for colb, members in sorted(by_colb.items()):
            rows = max(1, min(h.tile // colb, next_pow2(sum(geometry[i][0] for i in members))))
            tiles, loose_i, loose_r = {True: [], False: []}, [], []
            for i in members:
                R, C = geometry[i]
                full = R // rows
                tiles[aligned[i]] += [(i, k * rows, -1, C) for k in range(full)]
                if full * rows < R:
                    loose_r.append(torch.arange(full * rows, R, dtype=torch.int64))
                    loose_i.append(torch.full((R - full * rows,), i, dtype=torch.int64))
            one_block = max(geometry[i][1] for i in members) <= colb
            none = self._to_device([0], torch.int64)
            for vec in (True, False):
                if tiles[vec]:
                    self.buckets.append((rows, colb, one_block, False, self._to_device(tiles[vec], torch.int64),
                                         none, none, len(tiles[vec]), vec))
            if loose_r:  # a second launch: its slots' metadata differ, so they are gathered per slot
                slot_i, slot_r = torch.cat(loose_i), torch.cat(loose_r)
                pad = -len(slot_r) % rows
                slot_i = torch.cat([slot_i, torch.zeros(pad, dtype=torch.int64)])
                slot_r = torch.cat([slot_r, torch.full((pad,), -1, dtype=torch.int64)])
                ncols = torch.tensor([geometry[i][1] for i in range(self.n)], dtype=torch.int64)
                cmax = ncols[slot_i].view(-1, rows).amax(dim=1).tolist()
                packed = [(0, 0, k * rows, c) for k, c in enumerate(cmax)]
                self.buckets.append((rows, colb, one_block, True, self._to_device(packed, torch.int64),
                                     self._to_device(slot_i, torch.int64), self._to_device(slot_r, torch.int64),
                                     len(packed), False))

        # split slices: chunk programs, then one finalize program per group of rows
        n_part = 0
        chunk_tiles, final_tiles = [], []
        self.final_rows = self.kb = 1
        if split:
            nsplits = [-(-geometry[i][1] // h.chunk) for i in split]
            self.kb = min(1024, next_pow2(max(nsplits)))
            # ROWS x KB partials per program, at most `final_tile`: each row's finalize math stays
            # in registers (64 rows x 512 chunks, a 1-D tensor of 8M elements beside wide
            # matrices, spilled 10 KB per thread on sm_90)
            self.final_rows = max(1, min(64, next_pow2(max(geometry[i][0] for i in split)), h.final_tile // self.kb))
            for i, nsplit in zip(split, nsplits):
                R, C = geometry[i]
                info[i][8], info[i][9] = n_part, nsplit
                n_part += R * nsplit
                for row in range(R):
                    for k in range(nsplit):
                        chunk_tiles.append((i, row, k * h.chunk, k))
                final_tiles += [(i, row0) for row0 in range(0, R, self.final_rows)]
        self.chunk_tiles = (self._to_device(chunk_tiles, torch.int64), len(chunk_tiles))
        self.chunk_vec = bool(split) and all(aligned[i] for i in split) and h.chunk % 4 == 0
        self.final_tiles = (self._to_device(final_tiles, torch.int64), len(final_tiles))
        self.norm_tb = min(h.norm_tensors, next_pow2(self.n))
        self.norm_qb = max(1, min(h.tile // self.norm_tb, next_pow2(max(R for R, _ in geometry))))

        self.info = self._to_device(info, torch.int64)
        self.finfo = self._to_device(finfo, torch.float32)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.coef_k = torch.empty(max(n_coef, 1), **f32)
        self.coef_d = torch.empty(max(n_coef, 1), **f32)
        self.partial = torch.empty(max(n_part, 1), **f32)
        self.tensor_a = torch.empty(self.n, **f32)
        self.g_tables = Cache(KEEP_GRAD_TABLES)
        self._tensors = [weakref.ref(t) for p, st in zip(params, states)
                         for t in (p, st["v"], st["b"], st["step"]) + ((st["m"],) if momentum else ())]

    def _to_device(self, rows, dtype):
        """A host list (of lists) as a flat device tensor; pinned + non-blocking on CUDA."""
        if torch.is_tensor(rows):
            host = rows.to(dtype).flatten()
        else:
            host = torch.tensor(rows if rows else [0], dtype=dtype).flatten()
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def g_table(self, grads, capturing=False):
        """The gradients' addresses on the device, built when a gradient moved to addresses not
        seen lately (zero_grad(set_to_none=True)); tables of other addresses stay (an eager step
        with other gradients leaves a captured graph's table alone)."""
        key = tuple(g.data_ptr() for g in grads)
        table = self.g_tables.get(key, capturing, lambda: self._to_device(list(key), torch.int64))
        if table is None:
            raise RuntimeError(capture_miss("gradient table"))
        return table

    def dead(self):
        """Whether a tensor it was built for is gone (its plan can then never be found again)."""
        return any(ref() is None for ref in self._tensors)


def _aligned4(t):
    """Whether t's data starts on a multiple of 4 elements (then so does every row of a
    contiguous t whose rows hold a multiple of 4 elements): the VEC kernels' promise to the
    compiler. Tensors from torch's allocators are, views into a flat buffer may not be."""
    return t.data_ptr() % (4 * t.element_size()) == 0


class Cache:
    """Launch plans (or gradient tables) by key, with the rules CUDA graphs need:
    - at most `keep` entries that are not pinned; past that the least recently used one goes;
    - an entry found while a CUDA graph is being captured is pinned: the graph replays with its
      device addresses, so it is never dropped;
    - a miss while capturing builds nothing and returns None (the caller raises): building
      copies host memory to the device, which a graph replays from a buffer that gets reused;
    - on a miss, unpinned entries that `dead(entry)` calls gone are dropped first (a key found is
      used as is: the same key means tensors at the same addresses, with the layout it fits).
    csrc/plan_cache.h is the same for backend="cuda"."""

    def __init__(self, keep):
        self.keep = keep
        self.entries = collections.OrderedDict()  # least recently used first
        self.pinned = set()

    def get(self, key, capturing, build, dead=None):
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            if capturing:
                self.pinned.add(key)
            return value
        if capturing:
            return None
        if dead is not None:
            for k in [k for k, v in self.entries.items() if k not in self.pinned and dead(v)]:
                del self.entries[k]
        value = self.entries[key] = build()
        excess = len(self.entries) - len(self.pinned) - self.keep
        if excess > 0:
            for k in [k for k in self.entries if k not in self.pinned][:excess]:
                del self.entries[k]
        return value

    def clear(self):
        self.entries.clear()
        self.pinned.clear()


KEEP_PLANS = 256  # unpinned plans kept: one per param group, device and dtype combination
KEEP_GRAD_TABLES = 8  # unpinned gradient tables kept per plan
_PLANS = Cache(KEEP_PLANS)


def capturing(device):
    """Whether the current stream of `device` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def capture_miss(what):
    return (f"amos_fused (backend='triton'): a CUDA graph is being captured, but the {what} of this step was "
            "never built: it is built from host memory, which a graph cannot replay. Run one eager step first "
            "(e.g. torch's warm-up iterations on a side stream) with the same parameters, optimizer state and "
            "gradient tensors, and keep the gradients in place between that step and the capture "
            "(optimizer.zero_grad(set_to_none=False), not set_to_none=True, which makes the backward inside the "
            "capture allocate new gradients).")


def plan_key(params, grads, states, closed, heuristic, momentum):
    """Everything a plan's tables depend on; gradients enter only through their dtype and
    alignment (their addresses are `g_table`'s)."""
    per_tensor = tuple(
        (p.data_ptr(), tuple(p.shape), p.dtype, g.dtype, _aligned4(g), st["v"].data_ptr(), st["v"].numel(),
         st["b"].data_ptr(),
         st["step"].data_ptr(), st["eta"]) + ((st["m"].data_ptr(), st["m"].dtype) if momentum else ())
        for p, g, st in zip(params, grads, states))
    return (per_tensor, closed, heuristic, momentum, params[0].device)


def get_plan(params, grads, states, closed, heuristic, momentum, capturing=False):
    """The cached plan for these tensors (all of one dtype combination), built on first use;
    `capturing`: a CUDA graph is being captured (then it must exist, and stays for good)."""
    key = plan_key(params, grads, states, closed, heuristic, momentum)
    plan = _PLANS.get(key, capturing, lambda: Plan(params, grads, states, closed, heuristic, momentum), Plan.dead)
    if plan is None:
        raise RuntimeError(capture_miss("launch plan"))
    return plan


def clear_cache():
    _PLANS.clear()
