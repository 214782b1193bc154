"""Triton kernels of the two-phase step of sharded tensors (amos_fused/distributed.py).

For tensors whose slices (or the closed forms' ||u||) span ranks: phase 1 sums g*g over every
local slice, the ranks complete the sums, and phase 3 finalizes every slice from the complete S_r
and applies -- the CPU and CUDA kernels' protocol (csrc/two_phase.cpp), here for backend="triton".
Tables (int64 addresses, built at a first call and cached by amos_fused/triton_backend.py):
  items   [n_items, 4]: (tensor, slice, first element, elements), chunks of at most CHUNK of a slice
  g_addrs [n_tensors]: the gradients' addresses (a table of their own: gradients move)
  addrs   [n_tensors, 6]: addresses of p, (unused), m, v, b, step
  meta    [n_tensors, 3] fp32: eta, global slice length C, eps0; `first` [n_tensors]: first slice
  owner   [n_slices]: the tensor of each slice
Every sum has a fixed order (a chunk's block tree, then a slice's chunks in order): deterministic.
A guarded slice (S_r not finite) gets K = GUARDED and keeps v, b, theta and m, as in amos_triton.py.
"""
import triton
import triton.language as tl

from .amos_triton import AMOS, FLT_MAX, GUARDED, _apply, _as_ptr, _bias_correction, _count_guarded, _decay, _finalize, _load_g

P_COL, G_COL, M_COL, V_COL, B_COL, STEP_COL = 0, 1, 2, 3, 4, 5
NADDR = 6


@triton.jit
def _sums_kernel(items, g_addrs, partial, scale_ptr, clip, G_DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr,
                 CLIP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 1: the sum of g*g over one chunk of one slice."""
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(items + pid * 4)
    off = tl.load(items + pid * 4 + 2)
    n = tl.load(items + pid * 4 + 3)
    g_ptr = _as_ptr(tl.load(g_addrs + i), G_DTYPE, False)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, n, BLOCK):  # n <= CHUNK
        mask = (c + cols) < n
        g = _load_g(g_ptr, off + c + cols, mask, scale_ptr, clip, HAS_SCALE, CLIP)
        acc += g * g
    tl.store(partial + pid, tl.sum(acc, axis=0))


@triton.jit
def _slice_sums_kernel(first_item, partial, S):
    """A slice's S_r: its chunks' sums added in order (0 for the empty local part of a slice)."""
    j = tl.program_id(0).to(tl.int64)
    k0 = tl.load(first_item + j)
    k1 = tl.load(first_item + j + 1)
    total = tl.load(partial + k0, mask=k1 > k0, other=0.0)
    for k in range(k0 + 1, k1):
        total += tl.load(partial + k)
    tl.store(S + j, total)


@triton.jit
def _finalize_kernel(addrs, meta, first, owner, n_slices, S_ptr, norms, coef_k, coef_d, skip_ptr, guarded_ptr, lr,
                     lr_ptr, beta, beta_lo, one_minus_beta, eps, c_coef, d_coef, extra_l2, two_q, half_life,
                     SCHED: tl.constexpr, LR_IS_PTR: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_GUARD: tl.constexpr,
                     SB: tl.constexpr):
    """Phase 3, SB slices per program: v, b and the coefficients K_r, D_r from the complete S_r
    (the closed forms' A from the tensor's complete ||u||^2)."""
    j = tl.program_id(0).to(tl.int64) * SB + tl.arange(0, SB).to(tl.int64)
    live = j < n_slices
    j = tl.where(live, j, 0)
    i = tl.load(owner + j, mask=live, other=0).to(tl.int64)
    if HAS_SKIP:
        live = live & (tl.load(skip_ptr + tl.zeros_like(j)) == 0)
    r = j - tl.load(first + i)
    S = tl.load(S_ptr + j, mask=live, other=0.0)
    v_ptr = _as_ptr(tl.load(addrs + i * 6 + 3), tl.float32, False)
    b_ptr = _as_ptr(tl.load(addrs + i * 6 + 4), tl.float32, False)
    t = tl.load(_as_ptr(tl.load(addrs + i * 6 + 5), tl.float32, False), mask=live, other=1.0)
    if LR_IS_PTR:
        xi = tl.load(lr_ptr + tl.zeros_like(j)).to(tl.float32)
    else:
        xi = tl.zeros((SB,), dtype=tl.float32) + lr
    bc = _bias_correction(beta, beta_lo, t, True)
    eta = tl.load(meta + i * 3)
    C_f = tl.load(meta + i * 3 + 1)
    ok = S <= FLT_MAX  # the guard: a slice with S_r NaN or Inf keeps everything
    _count_guarded(guarded_ptr, live, ok, HAS_GUARD)
    wmask = live & ok
    v_old = tl.load(v_ptr + r, mask=live, other=0.0)
    b_old = tl.load(b_ptr + r, mask=live, other=0.0)
    v, rr, b, K, D = _finalize(S, v_old, b_old, C_f, eta, xi, bc, beta, one_minus_beta, eps, c_coef, d_coef,
                               extra_l2, SCHED)
    tl.store(v_ptr + r, v, mask=wmask)
    if SCHED == AMOS:
        tl.store(b_ptr + r, b, mask=wmask)
    else:  # the closed forms, with the complete ||u||^2
        s = _decay(t, half_life, SCHED)
        unorm = tl.sqrt_rn(tl.load(norms + i, mask=live, other=0.0))
        eps0 = tl.load(meta + i * 3 + 2)
        A = tl.where(unorm > 0, tl.math.div_rn(xi * eps0 * s, tl.where(unorm > 0, unorm, 1.0)), 0.0)
        K = A * tl.sqrt_rn(rr)
        D = tl.math.div_rn(xi * xi, two_q) * s
    tl.store(coef_k + j, tl.where(ok, K, GUARDED), mask=live)
    tl.store(coef_d + j, D, mask=live)


@triton.jit
def _apply_kernel(items, addrs, g_addrs, coef_k, coef_d, scale_ptr, skip_ptr, clip, momentum, one_minus_momentum,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr, CLIP: tl.constexpr, RTNE: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 3: §6 over one chunk of one slice with the slice's K_r, D_r (none of a guarded slice)."""
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(items + pid * 4)
    j = tl.load(items + pid * 4 + 1)
    off = tl.load(items + pid * 4 + 2)
    n = tl.load(items + pid * 4 + 3)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    K = tl.load(coef_k + j + tl.zeros_like(cols))  # vectors: the interpreter needs them
    D = tl.load(coef_d + j + tl.zeros_like(cols))
    keep = K != GUARDED
    if HAS_SKIP:
        keep = keep & (tl.load(skip_ptr + tl.zeros_like(cols)) == 0)
    p_ptr = _as_ptr(tl.load(addrs + i * 6), P_DTYPE, False)
    g_ptr = _as_ptr(tl.load(g_addrs + i), G_DTYPE, False)
    m_ptr = _as_ptr(tl.load(addrs + i * 6 + 2), M_DTYPE, False)
    for c in range(0, n, BLOCK):  # n <= CHUNK
        mask = ((c + cols) < n) & keep
        g = _load_g(g_ptr, off + c + cols, mask, scale_ptr, clip, HAS_SCALE, CLIP)
        _apply(p_ptr, m_ptr, off + c + cols, mask, g, K, D, momentum, one_minus_momentum, P_DTYPE, M_DTYPE,
               MOMENTUM, RTNE)
