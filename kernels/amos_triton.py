"""Triton kernels of the Amos step (docs/algorithm.md, formulas and "Kernel phases").

Every kernel is multi-tensor: it reads the tensors' addresses and geometry from the int64 table
`info` (columns below, built by kernels/tables.py) and its work items from a tile table, so one
launch covers all tensors of a (device, dtype-combination) group. All math is fp32; values are
upcast right after `tl.load` (the interpreter cannot do bf16 arithmetic) and rounded to nearest
even when stored. Per-step scalars (t, lr, bias correction, s(t)) are read on the device.

Kernels:
- `_rows_kernel`: a program owns ROWS whole slices (consecutive rows of one tensor, or packed
  rows of many small tensors). PHASE 0 (schedule "amos"): reduce -> finalize -> apply in one
  pass; the second walk over g hits registers (one column block) or L2. PHASE 1 (closed forms,
  reduce): writes v, and sqrt(r) and S*r per slice. PHASE 2 (closed forms, apply).
- `_chunk_kernel`: slices too long for one program are cut into chunks of one row; PHASE 1 writes
  the chunk's partial sum of g*g, PHASE 2 applies with the slice's finalized coefficients.
- `_split_finalize_kernel`: sums a long slice's chunk partials in a fixed order and finalizes.
- `_norm_kernel`: closed forms: ||u|| per tensor from its slices' S*r, in a fixed order.
No atomics in the math: every sum has a fixed shape and order, so runs are bitwise reproducible.

The slice guard: a slice whose S_r is not finite keeps theta, m, v and b (masked out of every
store), adds 0 to ||u||**2, and is counted into `guarded` (an integer atomic add: the count does
not depend on order). Stages after a finalize learn which slices are guarded from the marker
GUARDED in `coef_k` (K or sqrt(r) there is never negative otherwise).
"""
import os

import triton
import triton.language as tl

# Whether the kernels below were defined for the interpreter (decided at import, like triton).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Device helpers are inlined by the compiler. The interpreter instead re-patches triton.language
# on every call of a jit function (~10 ms each, a dozen per program), so there they are plain
# Python functions, run with the kernel's already patched `tl`.
_helper = (lambda fn: fn) if INTERPRET else triton.jit


def _constants(n):  # globals a kernel reads must be tl.constexpr (their .value on the host)
    return [tl.constexpr(v) for v in range(n)]


# int64 columns of the `info` table, one row per tensor (see tables.py)
P_ADDR, M_ADDR, V_ADDR, B_ADDR, STEP_ADDR, NROWS, NCOLS, COEF_BASE, PART_BASE, NSPLIT = _constants(10)
NINFO = tl.constexpr(10)
# fp32 columns of the `finfo` table
ETA, EPS0, NCOLS_F = _constants(3)
NFINFO = tl.constexpr(3)
# schedule codes
AMOS, CONSTANT, INVERSE_TIME, INVERSE_SQUARE = _constants(4)
SCHEDULE_CODE = {"amos": 0, "constant": 1, "inverse_time": 2, "inverse_square": 3}
# phases
FUSED, REDUCE, APPLY = _constants(3)
# the largest fp32: S_r <= FLT_MAX is false exactly when S_r is NaN or +Inf
FLT_MAX = tl.constexpr(3.4028234663852886e38)
# coef_k of a guarded slice (K >= 0 and sqrt(r) >= 0, or NaN, for every other slice)
GUARDED = tl.constexpr(-1.0)


@_helper
def _to_out(x, DTYPE: tl.constexpr, RTNE_BY_HAND: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even (the interpreter's bf16 cast truncates)."""
    if DTYPE == tl.bfloat16 and RTNE_BY_HAND:
        b = x.to(tl.uint32, bitcast=True)
        b = b + (((b >> 16) & 1) + 0x7FFF)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@_helper
def _ptr(info, i, col, DTYPE: tl.constexpr, VEC4: tl.constexpr = False):
    return _as_ptr(tl.load(info + i * NINFO + col), DTYPE, VEC4)


@_helper
def _as_ptr(addr, DTYPE: tl.constexpr, VEC4: tl.constexpr):
    """An int64 address as a DTYPE pointer; VEC4: it is a multiple of 4 elements (the plan checked,
    tables._aligned4), which with C % 4 == 0 lets the compiler load and store 4 elements at a time
    (the hint must sit on the pointer: on the integer it is lost in the cast)."""
    ptr = addr.to(tl.pointer_type(DTYPE))
    if VEC4:
        ptr = tl.multiple_of(ptr, DTYPE.primitive_bitwidth // 2)
    return ptr


@_helper
def _col(x, VEC: tl.constexpr):
    """x as a column of a [ROWS, COLB] tile when it is per slot; scalars broadcast as they are."""
    if VEC:
        return x[:, None]
    else:
        return x


@_helper
def _bias_correction(beta, beta_lo, t, VEC: tl.constexpr):
    """bc = 1 - beta**t in fp64, rounded once (as the reference does).

    It cancels: at t = 1, fp32(0.999) is off by 1.3e-5 of bc. beta arrives as two fp32 halves
    (beta + beta_lo, 48 bits) and the power of the integral step count t < 2**31 is formed by
    squaring in fp64 (only multiplies: no transcendental whose accuracy differs by platform).
    """
    n = t.to(tl.int32)
    b = (t * 0.0 + beta).to(tl.float64) + (t * 0.0 + beta_lo).to(tl.float64)  # tensors: the interpreter passes floats
    acc = b * 0.0 + 1.0
    if VEC:  # one t per slot of the program (slots may belong to different tensors)
        go = tl.max(n, axis=0) > 0
    else:
        go = n > 0
    while go:  # log2(t) rounds (a fixed 31 would cost the interpreter dearly per program)
        acc = tl.where((n & 1) != 0, acc * b, acc)
        b = b * b
        n = n >> 1
        if VEC:
            go = tl.max(n, axis=0) > 0
        else:
            go = n > 0
    return (1.0 - acc).to(tl.float32)


@_helper
def _step_scalars(info, i, lr, lr_ptr, beta, beta_lo, half_life, LR_IS_PTR: tl.constexpr, SCHED: tl.constexpr,
                  NEED_BC: tl.constexpr, VEC: tl.constexpr):
    """t (this tensor's step count), xi (lr), bc = 1 - beta**t and s(t), all fp32 on the device.

    `i` is a tensor index, or with VEC a vector of them (one per slot).
    """
    t = tl.load(_ptr(info, i, STEP_ADDR, tl.float32))
    if LR_IS_PTR:
        xi = tl.load(lr_ptr).to(tl.float32)
    else:
        xi = lr
    if NEED_BC:
        bc = _bias_correction(beta, beta_lo, t, VEC)
    else:
        bc = t
    return xi, bc, _decay(t, half_life, SCHED)


@_helper
def _decay(t, half_life, SCHED: tl.constexpr):
    """s(t) of the closed forms (1 for "amos" and "constant")."""
    if SCHED == INVERSE_TIME:
        s = tl.math.div_rn(1.0, 1.0 + tl.math.div_rn(t - 1.0, half_life))
    elif SCHED == INVERSE_SQUARE:
        x = 1.0 + 0.41421356237309515 * tl.math.div_rn(t - 1.0, half_life)
        s = tl.math.div_rn(1.0, x * x)
    else:
        s = t * 0.0 + 1.0
    return s


@_helper
def _load_g(g_ptr, offs, mask, scale_ptr, clip, HAS_SCALE: tl.constexpr, CLIP: tl.constexpr):
    """The gradient in fp32: unscaled (GradScaler), then clipped; a NaN stays NaN (as torch.clamp),
    so that the slice guard sees it."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.math.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    if CLIP:
        g = tl.minimum(tl.maximum(g, -clip, propagate_nan=tl.PropagateNan.ALL), clip,
                       propagate_nan=tl.PropagateNan.ALL)
    return g


@_helper
def _apply(p_ptr, m_ptr, offs, mask, g, K, D, momentum, one_minus_momentum,
           P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, RTNE: tl.constexpr):
    """§6: delta = -K*g - D*theta; momentum EMA; theta moves by the unrounded m."""
    theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    delta = -K * g - D * theta
    if MOMENTUM:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        delta = momentum * m + one_minus_momentum * delta
        tl.store(m_ptr + offs, _to_out(delta, M_DTYPE, RTNE), mask=mask)
    tl.store(p_ptr + offs, _to_out(theta + delta, P_DTYPE, RTNE), mask=mask)


@_helper
def _finalize(S, v_old, b_old, C_f, eta, xi, bc, beta, one_minus_beta, eps, c_coef, d_coef, extra_l2,
              SCHED: tl.constexpr):
    """§3-§4 per slice: v, r = 1/v_hat, and for "amos" b and the coefficients K, D.

    Returns (v, r, b, K, D); for the closed forms b is unchanged and K, D are unused.
    """
    v = beta * v_old + tl.math.div_rn(one_minus_beta * S, C_f)
    r = tl.math.div_rn(bc, tl.maximum(v, eps))
    if SCHED == AMOS:
        alpha = xi * eta
        c = tl.math.div_rn(1.0, tl.sqrt_rn(1.0 + c_coef * tl.sqrt_rn(xi) * b_old))
        gamma = tl.math.div_rn(c * (xi * xi) * r * S, C_f)
        d = tl.math.div_rn(1.0, 1.0 + d_coef * tl.sqrt_rn(alpha) * b_old)
        K = d * alpha * tl.sqrt_rn(r)
        D = d * (gamma / 2.0 + extra_l2)
        b = b_old + gamma * (1.0 + b_old)
    else:
        K = r
        D = r
        b = b_old
    return v, r, b, K, D


@_helper
def _count_guarded(guarded_ptr, rmask, ok, HAS_GUARD: tl.constexpr):
    """Adds the live slices that are guarded (rmask and not ok) to the int64 counter."""
    if HAS_GUARD:
        n = tl.sum((rmask & (ok == 0)).to(tl.int32), axis=0).to(tl.int64)
        tl.atomic_add(guarded_ptr, n, mask=n > 0)


@_helper
def _closed_coefs(A, sqrt_r, xi, s, two_q):
    """§5: K = A*sqrt(r), D = xi**2/(2q)*s."""
    return A * sqrt_r, tl.math.div_rn(xi * xi, two_q) * s


@triton.jit
def _rows_kernel(info, finfo, g_addrs, tiles, slot_i, slot_r, coef_k, coef_d, tensor_a, scale_ptr, skip_ptr,
                 guarded_ptr, lr, lr_ptr, beta, beta_lo, one_minus_beta, eps, c_coef, d_coef, extra_l2, two_q,
                 half_life, momentum, one_minus_momentum, clip,
                 P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                 SCHED: tl.constexpr, PHASE: tl.constexpr, MOMENTUM: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_GUARD: tl.constexpr, CLIP: tl.constexpr,
                 LR_IS_PTR: tl.constexpr, ROWS: tl.constexpr, COLB: tl.constexpr, ONE_BLOCK: tl.constexpr,
                 PACKED: tl.constexpr, RTNE: tl.constexpr, VEC4: tl.constexpr = False):
    """A program owns ROWS whole slices (slots).

    tile = (tensor, first row, slot offset, widest slice). Unless PACKED, the slots are ROWS
    consecutive rows of one tensor; PACKED, slot k is (slot_i, slot_r)[offset + k], which packs
    the slices of many small tensors into one program (rows of -1 are padding).
    """
    pid = tl.program_id(0).to(tl.int64)
    i0 = tl.load(tiles + pid * 4)
    row0 = tl.load(tiles + pid * 4 + 1)
    off = tl.load(tiles + pid * 4 + 2)
    cmax = tl.load(tiles + pid * 4 + 3)
    k = tl.arange(0, ROWS).to(tl.int64)
    if PACKED:  # per-slot metadata, gathered
        i = tl.load(slot_i + off + k)
        r = tl.load(slot_r + off + k)
    else:  # one tensor: its metadata are scalars
        i = i0
        r = row0 + k
    R = tl.load(info + i * NINFO + NROWS)
    C = tl.load(info + i * NINFO + NCOLS)
    if VEC4:  # one tensor (not PACKED) whose rows start 4-element aligned: see _as_ptr
        C = tl.multiple_of(C, 4)
    rmask = (r >= 0) & (r < R)
    if HAS_SKIP:  # a skipped step (found_inf / non-finite gradients, decided on the device) stores nothing
        rmask = rmask & (tl.load(skip_ptr + tl.zeros_like(r)) == 0)  # a vector load: the interpreter needs it
    p_ptr = _col(_ptr(info, i, P_ADDR, P_DTYPE, VEC4), PACKED)
    g_ptr = _col(_as_ptr(tl.load(g_addrs + i), G_DTYPE, VEC4), PACKED)
    m_ptr = _col(_ptr(info, i, M_ADDR, M_DTYPE, VEC4), PACKED)
    v_ptr = _ptr(info, i, V_ADDR, tl.float32)
    b_ptr = _ptr(info, i, B_ADDR, tl.float32)
    slices = tl.load(info + i * NINFO + COEF_BASE) + r
    xi, bc, s = _step_scalars(info, i, lr, lr_ptr, beta, beta_lo, half_life, LR_IS_PTR, SCHED, PHASE != APPLY,
                              PACKED)

    cols = tl.arange(0, COLB).to(tl.int64)
    base = (r * C)[:, None]  # int64 element offsets
    C2 = _col(C, PACKED)

    if PHASE != APPLY:
        # reduce: S_r = sum of g*g over each owned slice
        if ONE_BLOCK:
            offs = base + cols[None, :]
            mask = rmask[:, None] & (cols[None, :] < C2)
            g = _load_g(g_ptr, offs, mask, scale_ptr, clip, HAS_SCALE, CLIP)
            S = tl.sum(g * g, axis=1)
        else:
            acc = tl.zeros((ROWS, COLB), dtype=tl.float32)
            for c0 in range(0, cmax, COLB):
                offs = base + (c0 + cols)[None, :]
                mask = rmask[:, None] & ((c0 + cols)[None, :] < C2)
                gb = _load_g(g_ptr, offs, mask, scale_ptr, clip, HAS_SCALE, CLIP)
                acc += gb * gb
            S = tl.sum(acc, axis=1)
        ok = S <= FLT_MAX  # the guard: a slice with S_r NaN or Inf keeps everything
        _count_guarded(guarded_ptr, rmask, ok, HAS_GUARD)
        wmask = rmask & ok  # the slices this program writes
        # finalize
        v_old = tl.load(v_ptr + r, mask=rmask, other=0.0)
        b_old = tl.load(b_ptr + r, mask=rmask, other=0.0)
        eta = tl.load(finfo + i * NFINFO + ETA)
        C_f = tl.load(finfo + i * NFINFO + NCOLS_F)
        v, rr, b, K, D = _finalize(S, v_old, b_old, C_f, eta, xi, bc, beta, one_minus_beta, eps,
                                   c_coef, d_coef, extra_l2, SCHED)
        tl.store(v_ptr + r, v, mask=wmask)
        if SCHED == AMOS:
            tl.store(b_ptr + r, b, mask=wmask)
        else:  # per slice: sqrt(r) for the apply (GUARDED: keep), S*r for ||u|| (0: left out)
            tl.store(coef_k + slices, tl.where(ok, tl.sqrt_rn(rr), GUARDED), mask=rmask)
            tl.store(coef_d + slices, tl.where(ok, S * rr, 0.0), mask=rmask)

    if PHASE != REDUCE:
        if PHASE == APPLY:
            sqrt_r = tl.load(coef_k + slices, mask=rmask, other=0.0)
            wmask = rmask & (sqrt_r != GUARDED)
            K, D = _closed_coefs(tl.load(tensor_a + i), sqrt_r, xi, s, two_q)
            D = D + tl.zeros_like(sqrt_r)  # a scalar for one tensor; per slot when packed
        if PHASE == APPLY or not ONE_BLOCK:
            for c0 in range(0, cmax, COLB):
                offs = base + (c0 + cols)[None, :]
                mask = wmask[:, None] & ((c0 + cols)[None, :] < C2)
                gb = _load_g(g_ptr, offs, mask, scale_ptr, clip, HAS_SCALE, CLIP)  # L2 hit in PHASE 0
                _apply(p_ptr, m_ptr, offs, mask, gb, K[:, None], D[:, None], momentum, one_minus_momentum,
                       P_DTYPE, M_DTYPE, MOMENTUM, RTNE)
        else:  # one column block: g is still in registers
            _apply(p_ptr, m_ptr, offs, mask & ok[:, None], g, K[:, None], D[:, None], momentum,
                   one_minus_momentum, P_DTYPE, M_DTYPE, MOMENTUM, RTNE)


@triton.jit
def _chunk_kernel(info, g_addrs, tiles, coef_k, coef_d, partial, tensor_a, scale_ptr, skip_ptr, lr, lr_ptr,
                  beta, beta_lo, two_q, half_life, momentum, one_minus_momentum, clip,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                  SCHED: tl.constexpr, PHASE: tl.constexpr, MOMENTUM: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr, CLIP: tl.constexpr, LR_IS_PTR: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, RTNE: tl.constexpr, VEC4: tl.constexpr = False):
    """Part of one long slice: tile = (tensor, row, first column, chunk index).

    PHASE 2 changes nothing in a slice the finalize marked GUARDED."""
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(tiles + pid * 4)
    row = tl.load(tiles + pid * 4 + 1)
    col0 = tl.load(tiles + pid * 4 + 2)
    C = tl.load(info + i * NINFO + NCOLS)
    if VEC4:  # every split tensor's rows start 4-element aligned (see _as_ptr); chunks are CHUNK apart
        C = tl.multiple_of(C, 4)
        col0 = tl.multiple_of(col0, 4)
    g_ptr = _as_ptr(tl.load(g_addrs + i), G_DTYPE, VEC4)
    start = row * C + col0
    cols = tl.arange(0, BLOCK).to(tl.int64)
    if PHASE == REDUCE:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(0, CHUNK, BLOCK):
            mask = (col0 + c + cols) < C
            g = _load_g(g_ptr, start + c + cols, mask, scale_ptr, clip, HAS_SCALE, CLIP)
            acc += g * g
        slot = tl.load(info + i * NINFO + PART_BASE) + row * tl.load(info + i * NINFO + NSPLIT) \
            + tl.load(tiles + pid * 4 + 3)
        tl.store(partial + slot, tl.sum(acc, axis=0))
    else:
        slice_id = tl.load(info + i * NINFO + COEF_BASE) + row
        kc = tl.load(coef_k + slice_id)  # K ("amos") or sqrt(r); GUARDED: keep the slice
        if SCHED == AMOS:
            K = kc
            D = tl.load(coef_d + slice_id)
        else:
            xi, bc, s = _step_scalars(info, i, lr, lr_ptr, beta, beta_lo, half_life, LR_IS_PTR, SCHED, False, False)
            K, D = _closed_coefs(tl.load(tensor_a + i), kc, xi, s, two_q)
        p_ptr = _ptr(info, i, P_ADDR, P_DTYPE, VEC4)
        m_ptr = _ptr(info, i, M_ADDR, M_DTYPE, VEC4)
        keep = (tl.zeros((BLOCK,), dtype=tl.float32) + kc) != GUARDED  # a vector: the interpreter needs it
        if HAS_SKIP:  # reduced to one value, so that the mask stays uniform over vectors (VEC4)
            keep = keep & (tl.max(tl.load(skip_ptr + tl.zeros_like(cols)), axis=0) == 0)
        for c in range(0, CHUNK, BLOCK):
            mask = ((col0 + c + cols) < C) & keep
            g = _load_g(g_ptr, start + c + cols, mask, scale_ptr, clip, HAS_SCALE, CLIP)
            _apply(p_ptr, m_ptr, start + c + cols, mask, g, K, D, momentum, one_minus_momentum,
                   P_DTYPE, M_DTYPE, MOMENTUM, RTNE)


@triton.jit
def _split_finalize_kernel(info, finfo, tiles, coef_k, coef_d, partial, skip_ptr, guarded_ptr, lr, lr_ptr,
                           beta, beta_lo, one_minus_beta, eps, c_coef, d_coef, extra_l2, half_life,
                           SCHED: tl.constexpr, LR_IS_PTR: tl.constexpr, HAS_SKIP: tl.constexpr,
                           HAS_GUARD: tl.constexpr, ROWS: tl.constexpr, KB: tl.constexpr):
    """Long slices: S_r = sum of the row's chunk partials (fixed order), then finalize; a guarded
    slice gets coef_k = GUARDED, which the chunk apply reads."""
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(tiles + pid * 2)
    row0 = tl.load(tiles + pid * 2 + 1)
    R = tl.load(info + i * NINFO + NROWS)
    nsplit = tl.load(info + i * NINFO + NSPLIT)
    pbase = tl.load(info + i * NINFO + PART_BASE)
    v_ptr = _ptr(info, i, V_ADDR, tl.float32)
    b_ptr = _ptr(info, i, B_ADDR, tl.float32)
    xi, bc, s = _step_scalars(info, i, lr, lr_ptr, beta, beta_lo, half_life, LR_IS_PTR, SCHED, True, False)
    rows = row0 + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < R
    if HAS_SKIP:
        rmask = rmask & (tl.load(skip_ptr + tl.zeros_like(rows)) == 0)
    ks = tl.arange(0, KB).to(tl.int64)
    acc = tl.zeros((ROWS, KB), dtype=tl.float32)
    for k0 in range(0, nsplit, KB):
        mask = rmask[:, None] & ((k0 + ks) < nsplit)[None, :]
        acc += tl.load(partial + pbase + rows[:, None] * nsplit + (k0 + ks)[None, :], mask=mask, other=0.0)
    S = tl.sum(acc, axis=1)
    ok = S <= FLT_MAX  # the guard, as in _rows_kernel
    _count_guarded(guarded_ptr, rmask, ok, HAS_GUARD)
    wmask = rmask & ok
    v_old = tl.load(v_ptr + rows, mask=rmask, other=0.0)
    b_old = tl.load(b_ptr + rows, mask=rmask, other=0.0)
    eta = tl.load(finfo + i * NFINFO + ETA)
    C_f = tl.load(finfo + i * NFINFO + NCOLS_F)
    v, r, b, K, D = _finalize(S, v_old, b_old, C_f, eta, xi, bc, beta, one_minus_beta, eps,
                              c_coef, d_coef, extra_l2, SCHED)
    tl.store(v_ptr + rows, v, mask=wmask)
    slices = tl.load(info + i * NINFO + COEF_BASE) + rows
    if SCHED == AMOS:
        tl.store(b_ptr + rows, b, mask=wmask)
        tl.store(coef_k + slices, tl.where(ok, K, GUARDED), mask=rmask)
        tl.store(coef_d + slices, tl.where(ok, D, 0.0), mask=rmask)
    else:
        tl.store(coef_k + slices, tl.where(ok, tl.sqrt_rn(r), GUARDED), mask=rmask)
        tl.store(coef_d + slices, tl.where(ok, S * r, 0.0), mask=rmask)


@triton.jit
def _norm_kernel(info, finfo, coef_d, tensor_a, n_tensors, lr, lr_ptr, beta, beta_lo, half_life,
                 SCHED: tl.constexpr, LR_IS_PTR: tl.constexpr, TB: tl.constexpr, QB: tl.constexpr):
    """Closed forms, TB tensors per program: ||u|| = sqrt(sum over a tensor's slices of S*r),
    in a fixed order, then A = xi*eps0*s/||u||."""
    i = tl.program_id(0).to(tl.int64) * TB + tl.arange(0, TB).to(tl.int64)
    live = i < n_tensors
    i = tl.where(live, i, 0)
    cb = tl.load(info + i * NINFO + COEF_BASE)[:, None]
    R = tl.where(live, tl.load(info + i * NINFO + NROWS), 0)[:, None]
    ks = tl.arange(0, QB).to(tl.int64)[None, :]
    acc = tl.zeros((TB, QB), dtype=tl.float32)
    for k0 in range(0, tl.max(R), QB):
        acc += tl.load(coef_d + cb + k0 + ks, mask=(k0 + ks) < R, other=0.0)
    unorm = tl.sqrt_rn(tl.sum(acc, axis=1))
    xi, bc, s = _step_scalars(info, i, lr, lr_ptr, beta, beta_lo, half_life, LR_IS_PTR, SCHED, False, True)
    eps0 = tl.load(finfo + i * NFINFO + EPS0)
    A = tl.where(unorm > 0, tl.math.div_rn(xi * eps0 * s, tl.where(unorm > 0, unorm, 1.0)), 0.0)
    tl.store(tensor_a + i, A, mask=live)
