// backend="cuda": the fused Amos step for all tensors of a group in a few launches.
//
// Launcher (multi-tensor apply of this project's design). The host cuts every tensor into work
// items and writes one metadata buffer: per tensor its pointers, shape, dtypes and scalars; per
// item its rows (and columns); per long row where its partial sums go. The buffer lives on the
// device and is cached, keyed by every pointer and shape but the gradients', so a training loop
// reuses it: no host work beyond a lookup and no copy. The gradients' addresses are a small table
// of their own (cached too), so gradients that move cost a new table, not a new plan. Neither is
// built while a CUDA graph is captured, and what a capture used is never freed (plan_cache.h).
// A tensor's rows go to one of four paths by the slice length C:
//   W1    C <= 8:      a thread owns a row    (element granularity: one thread per element)
//   W32   C <= 1024:   a warp owns a row
//   W256  C <= 8192:   a block owns a row
//   long  C >  8192:   blocks of kPiece elements; stage 1 sums each block, a finalize kernel
//                      adds a row's blocks in order, stage 2 applies
// For "amos", W1/W32/W256 are one pass: the group sums g*g over its row, finalizes the slice,
// then walks the row again (the second read of g hits L1/L2, the row having just been read).
// The closed forms need unorm over the whole tensor first: a reduce launch (S_r, v_r and
// sum of S_r * r_r per item), a per-tensor finalize (A, D), then an apply launch.
// Every sum has a fixed order (per lane in element order, then fixed shuffle/shared trees, then
// items in order), so results are deterministic. Per-step scalars (t, lr, grad_scale) are read
// on the device: no host sync, and the launches can be captured in a CUDA graph.
// The slice guard (guard="slice"): a slice whose S_r is not finite is left as it was (theta, m,
// v, b), adds nothing to a closed form's ||u||^2, and is counted in `guarded`. Each path tests S_r
// where it has it (one branch per slice); the apply launches learn of guarded slices from flags
// that the reduce stage writes: per item (rows paths) and per long row.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "ops.h"
#include "plan_cache.h"

namespace amos {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kPiece = 8192;  // elements per block of a long row
enum Path : int32_t { kW1 = 0, kW32 = 1, kW256 = 2, kLong = 3 };
enum Phase : int32_t { kOnePass = 0, kReduce = 1, kApply = 2 };

constexpr size_t kKeepPlans = 256;     // unpinned plans kept (a plan per param group and device)
constexpr size_t kKeepGradTables = 8;  // unpinned gradient tables kept per plan

struct TMeta {
  void* p;  // (the gradients' addresses are a table of their own: Grads)
  void* m;
  float* v;
  float* b;
  const float* step;
  int64_t R, C;
  int64_t item_begin, item_end;  // this tensor's items (for the closed forms' per-tensor sum)
  int64_t long_row_base;         // index of its first long row (kLong)
  float eta, eps0;
  int32_t tp, tg, tm;
  int32_t vec;  // p, g, m rows start 4-element aligned (16 B / 8 B) and C % 4 == 0
};

struct Item {
  int32_t tensor, path;
  int64_t row0, row1;  // whole rows, or one row of a long tensor ...
  int64_t col0, col1;  // ... and its columns
};

struct LongRow {
  int32_t tensor, pad;
  int64_t row;
  int64_t item;  // its first piece (global item index)
};

// Per-step scalars, read on the device.
struct Scalars {
  const float* lr_ptr;  // null: use lr
  float lr;
  const float* scale_ptr;  // null: no GradScaler
  const float* skip_ptr;   // null: never skip; else != 0 makes every kernel return at once
  unsigned long long* guarded_ptr;  // null: no counter; else += the number of guarded slices
  int32_t prefetch;  // 1: L2 prefetches ahead of the loads (AMOS_FUSED_CUDA_PREFETCH=0 turns them off)
};

// The gradients' addresses, one per tensor of the plan: a device table of its own, keyed apart
// from the plan, so gradients that move (zero_grad(set_to_none=True)) cost a small new table,
// not a new plan.
using Grads = const void* const* __restrict__;

// GradScaler's found_inf or Amos' own non-finite check, decided on the device (optimizer.py):
// every kernel of the step returns before touching anything, so a skipped step is a no-op.
__device__ __forceinline__ bool skipped(const Scalars& s) { return s.skip_ptr && *s.skip_ptr != 0.0f; }

__device__ __forceinline__ float read_lr(const Scalars& s) { return s.lr_ptr ? *s.lr_ptr : s.lr; }
__device__ __forceinline__ float read_scale(const Scalars& s) { return s.scale_ptr ? *s.scale_ptr : 1.0f; }

// The slice guard: S_r (sum of the squares of the unscaled, clipped g) NaN or +Inf, overflow
// included. Such a slice keeps theta, m, v and b.
__device__ __forceinline__ bool guarded_slice(float S) { return !isfinite(S); }

// Adds n to the guarded counter: one atomic per warp, and none when no lane guarded a slice.
// Every lane of the warp must call it (integer adds: the order does not matter).
__device__ __forceinline__ void count_guarded(unsigned n, const Scalars& s) {
  if (s.guarded_ptr == nullptr || !__any_sync(0xffffffffu, n != 0)) return;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
  if (threadIdx.x % 32 == 0) atomicAdd(s.guarded_ptr, static_cast<unsigned long long>(n));
}

// ---- loads and stores of 4 consecutive elements (chunk c = elements 4c .. 4c+3 of a span) ----
template <typename Index>
__device__ __forceinline__ float ld1(const void* base, int32_t dt, Index i) {
  if (dt == kF32) return static_cast<const float*>(base)[i];
  if (dt == kBF16) return to_f(static_cast<const c10::BFloat16*>(base)[i]);
  return to_f(static_cast<const c10::Half*>(base)[i]);
}

template <typename Index>
__device__ __forceinline__ void st1(void* base, int32_t dt, Index i, float x) {
  if (dt == kF32) static_cast<float*>(base)[i] = x;
  else if (dt == kBF16) static_cast<c10::BFloat16*>(base)[i] = from_f<c10::BFloat16>(x);
  else static_cast<c10::Half*>(base)[i] = from_f<c10::Half>(x);
}

__device__ __forceinline__ float bits_to_f(int32_t dt, uint16_t u) {
  if (dt == kBF16) return to_f(c10::BFloat16(u, c10::BFloat16::from_bits()));
  return to_f(c10::Half(u, c10::Half::from_bits()));
}

__device__ __forceinline__ uint16_t f_to_bits(int32_t dt, float x) {
  if (dt == kBF16) return from_f<c10::BFloat16>(x).x;
  return from_f<c10::Half>(x).x;
}

// x[j] = element i + j of base for j < n (0 past the end); one vector load when vec
template <typename Index>
__device__ __forceinline__ void ld4(const void* base, int32_t dt, Index i, int n, bool vec, float x[4]) {
  if (vec) {
    if (dt == kF32) {
      float4 q = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
      x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w;
    } else {
      uint2 q = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(base) + i);
      x[0] = bits_to_f(dt, q.x & 0xffff), x[1] = bits_to_f(dt, q.x >> 16);
      x[2] = bits_to_f(dt, q.y & 0xffff), x[3] = bits_to_f(dt, q.y >> 16);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) x[j] = j < n ? ld1(base, dt, i + j) : 0.0f;
}

template <typename Index>
__device__ __forceinline__ void st4(void* base, int32_t dt, Index i, int n, bool vec, const float x[4]) {
  if (vec) {
    if (dt == kF32) {
      *reinterpret_cast<float4*>(static_cast<float*>(base) + i) = make_float4(x[0], x[1], x[2], x[3]);
    } else {
      uint2 q;
      q.x = f_to_bits(dt, x[0]) | (static_cast<uint32_t>(f_to_bits(dt, x[1])) << 16);
      q.y = f_to_bits(dt, x[2]) | (static_cast<uint32_t>(f_to_bits(dt, x[3])) << 16);
      *reinterpret_cast<uint2*>(static_cast<uint16_t*>(base) + i) = q;
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (j < n) st1(base, dt, i + j, x[j]);
}

// ---- L2 prefetch: starts the DRAM reads of a span before its loads need them ----
// A hint: results never depend on it. It matters where a thread's loads wait on its own stores
// (apply_span: the compiler cannot move the next chunk's loads above this chunk's stores) and
// where a group waits at a sum (the one-pass rows): the span's reads are then already under way.
// sm_90: one bulk (TMA) prefetch issued by lane 0; older GPUs: one prefetch per 128-byte line,
// dealt to the lanes. The span is widened to 16-byte (bulk) or 128-byte (lines) bounds, which
// stay inside the pages that hold the span itself.
constexpr int64_t kPrefetchMin = 512;  // bytes: shorter spans are not worth an instruction per row

__device__ __forceinline__ void prefetch_l2(const void* base, int32_t dt, int64_t i, int64_t n, int lane, int lanes) {
  const int64_t es = dt == kF32 ? 4 : 2;
  if (base == nullptr || n * es < kPrefetchMin) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(i * es);
  const uintptr_t hi = (a + static_cast<uintptr_t>(n * es) + 15) & ~uintptr_t{15};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (lane == 0) {
    const uintptr_t lo = a & ~uintptr_t{15};  // spans here are at most kPiece elements: u32 bytes
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(__cvta_generic_to_global(reinterpret_cast<const void*>(lo))),
                 "r"(static_cast<uint32_t>(hi - lo)));  // no "memory" clobber: it changes no data
  }
#else
  for (uintptr_t x = (a & ~uintptr_t{127}) + 128 * static_cast<uintptr_t>(lane); x < hi; x += 128 * static_cast<uintptr_t>(lanes))
    asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(reinterpret_cast<const void*>(x))));
#endif
}

// ---- deterministic sums ----
__device__ __forceinline__ float warp_sum(float x) {
  // butterfly: every lane ends with the same value (a + b == b + a)
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// sum over the block, the same value in every thread; all threads must call it
__device__ __forceinline__ float block_sum(float x, float* smem) {
  x = warp_sum(x);
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = x;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += smem[w];
  __syncthreads();  // smem is free again
  return total;
}

template <int W>
__device__ __forceinline__ float group_sum(float x, float* smem) {
  if constexpr (W == 1) return x;
  else if constexpr (W == 32) return warp_sum(x);
  else return block_sum(x, smem);
}

// sum of g*g over elements [c0, c1) of the span at off, chunks of 4 dealt to `lanes` threads
template <typename Index>
__device__ __forceinline__ float partial_sumsq(const TMeta& T, const void* G, Index off, int64_t n, int lane, int lanes,
                                               bool vec, float scale, const Hyper& h) {
  float acc = 0.0f;
  for (int64_t c = 4 * static_cast<int64_t>(lane); c < n; c += 4 * static_cast<int64_t>(lanes)) {
    float x[4];
    const int k = n - c < 4 ? static_cast<int>(n - c) : 4;
    ld4(G, T.tg, off + static_cast<Index>(c), k, vec, x);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float g = j < k ? prep_grad(x[j], scale, h) : 0.0f;
      acc += g * g;
    }
  }
  return acc;
}

// the apply of §6 over [off, off + n), chunks of 4 dealt to `lanes` threads
template <typename Index>
__device__ __forceinline__ void apply_span(const TMeta& T, const void* G, Index off, int64_t n, int lane, int lanes,
                                           bool vec, float K, float D, float scale, const Hyper& h) {
  const bool has_m = T.tm != kNone;
  for (int64_t c = 4 * static_cast<int64_t>(lane); c < n; c += 4 * static_cast<int64_t>(lanes)) {
    const int k = n - c < 4 ? static_cast<int>(n - c) : 4;
    const Index i = off + static_cast<Index>(c);
    float g[4], p[4], m[4];
    ld4(G, T.tg, i, k, vec, g);
    ld4(T.p, T.tp, i, k, vec, p);
    if (has_m) ld4(T.m, T.tm, i, k, vec, m);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float delta = update(p[j], prep_grad(g[j], scale, h), K, D);
      if (has_m) {
        m[j] = momentum_update(h, m[j], delta);
        delta = m[j];  // theta moves by the unrounded m
      }
      p[j] = p[j] + delta;
    }
    st4(T.p, T.tp, i, k, vec, p);
    if (has_m) st4(T.m, T.tm, i, k, vec, m);
  }
}

// Whole rows: W threads per row. kOnePass ("amos"): reduce, finalize, apply. kReduce (closed
// forms): S_r, v_r and this item's sum of S_r * r_r. kApply (closed forms): apply.
// Guard: kOnePass and kReduce test S_r after the group sum (the same value in every lane of the
// group, so the branch is uniform) and skip the slice; kReduce sets itemG[it] when its item had a
// guarded row, and kApply, in those items only, sums S_r again (same lanes, same order: the same
// bits) to skip the same rows. Items without a guarded row cost kApply one flag read per block.
template <typename Index, int W, int PHASE>
__global__ void __launch_bounds__(kThreads) rows_kernel(const TMeta* __restrict__ metas, Grads grads,
                                                        const Item* __restrict__ items, int64_t item0, Hyper h,
                                                        Scalars sc, float* __restrict__ itemq,
                                                        float* __restrict__ itemG, const float* __restrict__ tAD) {
  if (skipped(sc)) return;
  __shared__ float smem[kWarps];
  const int64_t it = item0 + blockIdx.x;
  const Item item = items[it];
  const TMeta& T = metas[item.tensor];
  const void* G = grads[item.tensor];
  const int group = threadIdx.x / W, lane = threadIdx.x % W, groups = kThreads / W;
  const float scale = read_scale(sc), xi = read_lr(sc), t = *T.step;
  const float bc = bias_correction(h, t), C = static_cast<float>(T.C);
  const bool vec = T.vec;
  const AmosTensor at = amos_tensor(h, xi, T.eta);
  float q = 0.0f;       // kReduce: sum of S_r * r_r over the rows this thread leads
  unsigned nguard = 0;  // guarded rows this thread leads
  const bool recheck = PHASE == kApply && itemG[it] != 0.0f;  // uniform over the block
  // prefetch: kOnePass this row's theta and m (read after the sum) and the next row's g;
  // kReduce the next row's g; kApply the next row's g, theta and m. Not for W1 (short rows).
  const bool ahead = W > 1 && sc.prefetch;
  // W256: the whole block walks the rows together, so every thread runs the same iterations
  for (int64_t r = item.row0 + group; r < item.row1; r += groups) {
    const Index off = static_cast<Index>(r) * static_cast<Index>(T.C);
    if (ahead) {
      const int64_t here = r * T.C, next = here + groups * T.C;
      const bool more = r + groups < item.row1;
      if (PHASE == kOnePass) {
        prefetch_l2(T.p, T.tp, here, T.C, lane, W);
        prefetch_l2(T.m, T.tm, here, T.C, lane, W);
      }
      if (more) prefetch_l2(G, T.tg, next, T.C, lane, W);
      if (PHASE == kApply && more) {
        prefetch_l2(T.p, T.tp, next, T.C, lane, W);
        prefetch_l2(T.m, T.tm, next, T.C, lane, W);
      }
    }
    if (PHASE == kApply) {
      if (recheck && guarded_slice(group_sum<W>(partial_sumsq<Index>(T, G, off, T.C, lane, W, vec, scale, h), smem)))
        continue;  // kReduce guarded it (and counted it)
      const float K = closed_slice_K(tAD[2 * item.tensor], inv_vhat(h, T.v[r], bc));
      apply_span<Index>(T, G, off, T.C, lane, W, vec, K, tAD[2 * item.tensor + 1], scale, h);
      continue;
    }
    float v = T.v[r], b = T.b[r];  // read before the group sum: the leader writes them after it
    const float S = group_sum<W>(partial_sumsq<Index>(T, G, off, T.C, lane, W, vec, scale, h), smem);
    if (guarded_slice(S)) {  // v, b (and theta, m) stay; no S_r * r_r
      nguard += lane == 0;
      continue;
    }
    const float rr = second_moment(h, S, C, bc, v);
    if (PHASE == kOnePass) {
      float K, D;
      amos_slice(h, at, S, C, rr, b, K, D);
      if (lane == 0) T.v[r] = v, T.b[r] = b;
      apply_span<Index>(T, G, off, T.C, lane, W, vec, K, D, scale, h);
    } else {
      if (lane == 0) T.v[r] = v, q += S * rr;
    }
  }
  if (PHASE == kReduce) {
    q = block_sum(q, smem);
    const bool any = __syncthreads_or(nguard != 0);
    if (threadIdx.x == 0) itemq[it] = q, itemG[it] = any ? 1.0f : 0.0f;
  }
  if (PHASE != kApply) count_guarded(nguard, sc);
}

// Long rows, stage 1: the sum of g*g over one piece.
template <typename Index>
__global__ void __launch_bounds__(kThreads) piece_sum_kernel(const TMeta* __restrict__ metas, Grads grads,
                                                             const Item* __restrict__ items, int64_t item0, Hyper h,
                                                             Scalars sc, float* __restrict__ pieceS,
                                                             float* __restrict__ itemq) {
  if (skipped(sc)) return;
  __shared__ float smem[kWarps];
  const int64_t it = item0 + blockIdx.x;
  const Item item = items[it];
  const TMeta& T = metas[item.tensor];
  const Index off = static_cast<Index>(item.row0) * static_cast<Index>(T.C) + static_cast<Index>(item.col0);
  const float S = block_sum(
      partial_sumsq<Index>(T, grads[item.tensor], off, item.col1 - item.col0, threadIdx.x, kThreads, T.vec,
                           read_scale(sc), h),
      smem);
  if (threadIdx.x == 0) {
    pieceS[it - item0] = S;
    itemq[it] = 0.0f;  // the row's first piece gets S_r * r_r from row_finalize_kernel
  }
}

// Long rows: one thread per row adds its pieces in order and finalizes the slice. Guard: a row
// whose S_r is not finite keeps v and b, sets rowG[L] (piece_apply_kernel then leaves all its
// pieces alone) and is counted; its itemq stays the 0 that piece_sum_kernel wrote.
__global__ void row_finalize_kernel(const TMeta* __restrict__ metas, const LongRow* __restrict__ rows, int64_t nrows,
                                    int64_t item0, Hyper h, Scalars sc, const float* __restrict__ pieceS,
                                    float* __restrict__ itemq, float* __restrict__ rowKD, float* __restrict__ rowG) {
  if (skipped(sc)) return;
  const int64_t L = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (L >= nrows) return;
  const LongRow lr = rows[L];
  const TMeta& T = metas[lr.tensor];
  const float bc = bias_correction(h, *T.step), C = static_cast<float>(T.C);
  const int64_t per_row = (T.C + kPiece - 1) / kPiece;
  float S = 0.0f;
  for (int64_t j = 0; j < per_row; ++j) S += pieceS[lr.item - item0 + j];
  const bool guard = guarded_slice(S);
  rowG[L] = guard ? 1.0f : 0.0f;
  if (guard) {
    if (sc.guarded_ptr) atomicAdd(sc.guarded_ptr, 1ull);  // rows here have over kPiece elements: few atomics
    return;
  }
  float v = T.v[lr.row];
  const float rr = second_moment(h, S, C, bc, v);
  T.v[lr.row] = v;
  if (h.schedule == kAmos) {
    float b = T.b[lr.row], K, D;
    amos_slice(h, amos_tensor(h, read_lr(sc), T.eta), S, C, rr, b, K, D);
    T.b[lr.row] = b;
    rowKD[2 * L] = K;
    rowKD[2 * L + 1] = D;
  } else {
    itemq[lr.item] = S * rr;
  }
}

// Closed forms: one block per tensor sums its items' S_r * r_r in order and sets A, D.
__global__ void __launch_bounds__(kThreads) tensor_finalize_kernel(const TMeta* __restrict__ metas, Hyper h,
                                                                   Scalars sc, const float* __restrict__ itemq,
                                                                   float* __restrict__ tAD) {
  if (skipped(sc)) return;
  __shared__ float smem[kWarps];
  const TMeta& T = metas[blockIdx.x];
  float acc = 0.0f;
  for (int64_t i = T.item_begin + threadIdx.x; i < T.item_end; i += kThreads) acc += itemq[i];
  const float unorm2 = block_sum(acc, smem);
  if (threadIdx.x == 0) closed_tensor(h, read_lr(sc), *T.step, T.eps0, unorm2, tAD[2 * blockIdx.x], tAD[2 * blockIdx.x + 1]);
}

// Long rows, stage 2: apply one piece (none of a row that row_finalize_kernel guarded).
template <typename Index>
__global__ void __launch_bounds__(kThreads) piece_apply_kernel(const TMeta* __restrict__ metas, Grads grads,
                                                               const Item* __restrict__ items, int64_t item0, Hyper h,
                                                               Scalars sc, const float* __restrict__ rowKD,
                                                               const float* __restrict__ rowG,
                                                               const float* __restrict__ tAD) {
  if (skipped(sc)) return;
  const Item item = items[item0 + blockIdx.x];
  const TMeta& T = metas[item.tensor];
  const void* G = grads[item.tensor];
  const int64_t L = T.long_row_base + item.row0;
  if (rowG[L] != 0.0f) return;  // guarded: theta and m stay
  float K, D;
  if (h.schedule == kAmos) {
    K = rowKD[2 * L], D = rowKD[2 * L + 1];
  } else {
    K = closed_slice_K(tAD[2 * item.tensor], inv_vhat(h, T.v[item.row0], bias_correction(h, *T.step)));
    D = tAD[2 * item.tensor + 1];
  }
  const Index off = static_cast<Index>(item.row0) * static_cast<Index>(T.C) + static_cast<Index>(item.col0);
  if (sc.prefetch) {  // the piece's later chunks: under way while the first ones are applied
    const int64_t at = item.row0 * T.C + item.col0, n = item.col1 - item.col0;
    prefetch_l2(G, T.tg, at, n, threadIdx.x, kThreads);
    prefetch_l2(T.p, T.tp, at, n, threadIdx.x, kThreads);
    prefetch_l2(T.m, T.tm, at, n, threadIdx.x, kThreads);
  }
  apply_span<Index>(T, G, off, item.col1 - item.col0, threadIdx.x, kThreads, T.vec, K, D, read_scale(sc), h);
}

// ---- host: plans (metadata on the device) and gradient tables, cached -------------------------
// A plan holds everything but the gradients' addresses, keyed by every pointer, shape and dtype
// it depends on and by each gradient's alignment; the gradients' addresses are a small table of
// their own, cached per plan and keyed by those addresses. Both caches follow plan_cache.h: a
// plan or table that a CUDA graph captured is never freed, and neither is built while capturing.
struct GradTable {
  at::Tensor dev;  // const void*[nt]
};

struct Plan {
  at::Tensor host, dev;  // metadata bytes: TMeta[nt], Item[ni], LongRow[nl]
  at::Tensor scratch;    // fp32: itemq[ni], pieceS[long items], rowKD[2 nl], tAD[2 nt], itemG[ni], rowG[nl]
  int64_t nt = 0, nl = 0;
  int64_t range[5] = {0, 0, 0, 0, 0};  // items of path k are [range[k], range[k + 1])
  bool idx64 = false;
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> tensors;  // of its key's tensors: gone = dead
  PlanCache<GradTable> gtables{kKeepGradTables};
  const TMeta* metas() const { return reinterpret_cast<const TMeta*>(dev.data_ptr<uint8_t>()); }
  const Item* items() const { return reinterpret_cast<const Item*>(metas() + nt); }
  const LongRow* rows() const { return reinterpret_cast<const LongRow*>(items() + range[4]); }
  float* itemq() const { return scratch.data_ptr<float>(); }
  float* pieceS() const { return itemq() + range[4]; }
  float* rowKD() const { return pieceS() + (range[4] - range[3]); }
  float* tAD() const { return rowKD() + 2 * nl; }
  float* itemG() const { return tAD() + 2 * nt; }  // 1: the item had a guarded row (closed forms)
  float* rowG() const { return itemG() + range[4]; }  // 1: the long row is guarded
  bool dead() const {
    for (const auto& t : tensors)
      if (t.expired()) return true;
    return false;
  }
};

Path path_of(int64_t C) { return C <= 8 ? kW1 : C <= 1024 ? kW32 : C <= kPiece ? kW256 : kLong; }

bool aligned4(const void* ptr, int32_t dt) {
  return reinterpret_cast<uintptr_t>(ptr) % (dt == kF32 ? 16 : 8) == 0;
}

std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages_of(const StepArgs& a) {
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> out;
  for (const auto* list : {&a.params, &a.vs, &a.bs, &a.ms, &a.steps})
    for (const at::Tensor& t : *list) out.emplace_back(t.storage().getWeakStorageImpl());
  return out;
}

// Host memory to the device: a stream-ordered copy from pinned memory, no host sync (the
// allocator keeps the pinned block until the copy has run).
at::Tensor to_device(const at::Tensor& host, const at::Device& device) {
  return host.to(at::TensorOptions().device(device).dtype(host.scalar_type()), /*non_blocking=*/true);
}

std::shared_ptr<Plan> build_plan(const StepArgs& a) {
  auto plan = std::make_shared<Plan>();
  plan->tensors = storages_of(a);
  const int64_t nt = static_cast<int64_t>(a.params.size());
  std::vector<TMeta> metas(nt);
  std::vector<Item> by_path[4];
  std::vector<LongRow> rows;
  int64_t max_numel = 0;
  for (int64_t i = 0; i < nt; ++i) {
    TMeta& T = metas[i];
    const at::Tensor& p = a.params[i];
    T.p = p.data_ptr();
    T.m = a.ms.empty() ? nullptr : a.ms[i].data_ptr();
    T.v = a.vs[i].data_ptr<float>();
    T.b = a.bs[i].data_ptr<float>();
    T.step = a.steps[i].data_ptr<float>();
    T.R = a.vs[i].numel();
    T.C = p.numel() / T.R;
    T.eta = static_cast<float>(a.etas[i]);
    T.eps0 = eps0_of(p, a.etas[i]);
    T.tp = dtype_of(p);
    T.tg = dtype_of(a.grads[i]);
    T.tm = a.ms.empty() ? kNone : dtype_of(a.ms[i]);
    T.vec = T.C % 4 == 0 && aligned4(T.p, T.tp) && aligned4(a.grads[i].data_ptr(), T.tg) && (T.m == nullptr || aligned4(T.m, T.tm));
    max_numel = std::max<int64_t>(max_numel, p.numel());
    const Path path = path_of(T.C);
    T.item_begin = static_cast<int64_t>(by_path[path].size());  // made global below
    if (path == kLong) {
      T.long_row_base = static_cast<int64_t>(rows.size());
      for (int64_t r = 0; r < T.R; ++r) {
        rows.push_back({static_cast<int32_t>(i), 0, r, static_cast<int64_t>(by_path[kLong].size())});
        for (int64_t c = 0; c < T.C; c += kPiece)
          by_path[kLong].push_back({static_cast<int32_t>(i), kLong, r, r + 1, c, std::min(T.C, c + kPiece)});
      }
    } else {
      // rows per item: W1 a few rows per thread, W32 whole rows for each of the 8 warps and
      // about 8K elements per block, W256 about 8K elements per block
      const int64_t per = path == kW1 ? kThreads * 4
                          : path == kW32 ? kWarps * std::max<int64_t>(1, 1024 / T.C)
                                         : std::max<int64_t>(1, kPiece / T.C);
      for (int64_t r = 0; r < T.R; r += per)
        by_path[path].push_back({static_cast<int32_t>(i), path, r, std::min(T.R, r + per), 0, T.C});
    }
    T.item_end = static_cast<int64_t>(by_path[path].size());
  }
  int64_t base[4];
  for (int k = 0; k < 4; ++k) {
    base[k] = plan->range[k];
    plan->range[k + 1] = plan->range[k] + static_cast<int64_t>(by_path[k].size());
  }
  for (auto& T : metas) {
    const int64_t b = base[path_of(T.C)];
    T.item_begin += b, T.item_end += b;
  }
  for (auto& L : rows) L.item += base[kLong];
  plan->nt = nt;
  plan->nl = static_cast<int64_t>(rows.size());
  plan->idx64 = max_numel >= (int64_t{1} << 31);

  const int64_t ni = plan->range[4];
  const size_t bytes = nt * sizeof(TMeta) + ni * sizeof(Item) + rows.size() * sizeof(LongRow);
  plan->host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* dst = plan->host.data_ptr<uint8_t>();
  std::memcpy(dst, metas.data(), nt * sizeof(TMeta));
  dst += nt * sizeof(TMeta);
  for (int k = 0; k < 4; ++k) {
    std::memcpy(dst, by_path[k].data(), by_path[k].size() * sizeof(Item));
    dst += by_path[k].size() * sizeof(Item);
  }
  std::memcpy(dst, rows.data(), rows.size() * sizeof(LongRow));
  plan->dev = to_device(plan->host, a.params[0].device());
  const int64_t nscratch = ni + (ni - plan->range[3]) + 2 * plan->nl + 2 * nt + ni + plan->nl;
  plan->scratch = at::empty({std::max<int64_t>(nscratch, 1)}, a.params[0].options().dtype(at::kFloat));
  return plan;
}


std::vector<int64_t> plan_key(const StepArgs& a) {
  std::vector<int64_t> key;
  key.reserve(1 + 13 * a.params.size());
  key.push_back(a.params[0].device().index());
  auto ptr = [](const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); };
  for (size_t i = 0; i < a.params.size(); ++i) {
    const float eta = static_cast<float>(a.etas[i]);
    int32_t eta_bits;
    std::memcpy(&eta_bits, &eta, sizeof eta_bits);
    const at::Tensor& g = a.grads[i];
    key.insert(key.end(), {ptr(a.params[i]), ptr(a.vs[i]), ptr(a.bs[i]), ptr(a.steps[i]),
                           a.ms.empty() ? 0 : ptr(a.ms[i]), a.params[i].numel(), a.vs[i].numel(),
                           a.params[i].dim(), static_cast<int64_t>(a.params[i].scalar_type()),
                           static_cast<int64_t>(g.scalar_type()), aligned4(g.data_ptr(), dtype_of(g)),
                           a.ms.empty() ? -1 : static_cast<int64_t>(a.ms[i].scalar_type()), eta_bits});
  }
  return key;
}

std::shared_ptr<GradTable> build_grad_table(const std::vector<int64_t>& addresses, const at::Device& device) {
  auto table = std::make_shared<GradTable>();
  const int64_t n = static_cast<int64_t>(addresses.size());
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), addresses.data(), n * sizeof(int64_t));
  table->dev = to_device(host, device);
  return table;
}

// The plan and gradient table of this step. Capturing: both must exist already (and are pinned).
// Plans are few (one per param group and device), so the cache keeps every plan of a realistic
// training loop; gradients in a loop take a few address sets at most (set_to_none=True).
std::pair<std::shared_ptr<Plan>, std::shared_ptr<GradTable>> get_plan(const StepArgs& a, bool capturing) {
  // never destroyed: freeing device memory from a static destructor at exit can run after CUDA
  // and the allocator are gone
  static std::mutex* mu = new std::mutex;
  static auto* cache = new PlanCache<Plan>(kKeepPlans);
  const std::vector<int64_t> key = plan_key(a);
  std::vector<int64_t> gkey;
  gkey.reserve(a.grads.size());
  for (const at::Tensor& g : a.grads) gkey.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(g.data_ptr())));
  const at::Device device = a.params[0].device();
  std::lock_guard<std::mutex> lock(*mu);
  auto plan = cache->get(key, capturing, [&] { return build_plan(a); }, [](const Plan& p) { return p.dead(); });
  TORCH_CHECK(plan != nullptr, capture_miss_message("launch plan"));
  auto table = plan->gtables.get(gkey, capturing, [&] { return build_grad_table(gkey, device); },
                               [](const GradTable&) { return false; });
  TORCH_CHECK(table != nullptr, capture_miss_message("gradient table"));
  return {plan, table};
}

dim3 blocks(int64_t n) {
  TORCH_CHECK(n < (int64_t{1} << 31), "amos_fused: too many blocks for one launch (", n, ")");
  return dim3(static_cast<unsigned>(n));
}

template <typename Index>
void launch(const Plan& P, Grads G, const Hyper& h, const Scalars& sc, cudaStream_t stream) {
  const bool amos = h.schedule == kAmos;
  auto rows = [&](auto phase) {
    constexpr int PH = decltype(phase)::value;
    const int64_t* R = P.range;
    if (R[1] > R[0])
      rows_kernel<Index, 1, PH><<<blocks(R[1] - R[0]), kThreads, 0, stream>>>(P.metas(), G, P.items(), R[0], h, sc, P.itemq(), P.itemG(), P.tAD());
    if (R[2] > R[1])
      rows_kernel<Index, 32, PH><<<blocks(R[2] - R[1]), kThreads, 0, stream>>>(P.metas(), G, P.items(), R[1], h, sc, P.itemq(), P.itemG(), P.tAD());
    if (R[3] > R[2])
      rows_kernel<Index, 256, PH><<<blocks(R[3] - R[2]), kThreads, 0, stream>>>(P.metas(), G, P.items(), R[2], h, sc, P.itemq(), P.itemG(), P.tAD());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const int64_t long0 = P.range[3], nlong = P.range[4] - P.range[3];
  if (amos) rows(std::integral_constant<int, kOnePass>());
  else rows(std::integral_constant<int, kReduce>());
  if (nlong) {
    piece_sum_kernel<Index><<<blocks(nlong), kThreads, 0, stream>>>(P.metas(), G, P.items(), long0, h, sc, P.pieceS(), P.itemq());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_finalize_kernel<<<blocks((P.nl + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        P.metas(), P.rows(), P.nl, long0, h, sc, P.pieceS(), P.itemq(), P.rowKD(), P.rowG());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!amos) {
    tensor_finalize_kernel<<<blocks(P.nt), kThreads, 0, stream>>>(P.metas(), h, sc, P.itemq(), P.tAD());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rows(std::integral_constant<int, kApply>());
  }
  if (nlong) {
    piece_apply_kernel<Index><<<blocks(nlong), kThreads, 0, stream>>>(P.metas(), G, P.items(), long0, h, sc, P.rowKD(), P.rowG(), P.tAD());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void step_cuda(const StepArgs& a) {
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;  // active, or invalidated
  auto [plan, table] = get_plan(a, capturing);
  Scalars sc;
  sc.lr = static_cast<float>(a.lr);
  sc.lr_ptr = nullptr;
  if (a.lr_tensor && a.lr_tensor->is_cuda()) {
    TORCH_CHECK(a.lr_tensor->device() == a.params[0].device(), "amos_fused: lr is on ", a.lr_tensor->device(),
                ", the parameters on ", a.params[0].device(), "; keep a tensor lr on the CPU or their device");
    sc.lr_ptr = a.lr_tensor->data_ptr<float>();  // read by the kernels: no host sync
  } else if (a.lr_tensor) {
    sc.lr = a.lr_tensor->item<float>();  // a CPU tensor: reading it does not wait for the GPU
  }
  sc.scale_ptr = a.grad_scale ? a.grad_scale->data_ptr<float>() : nullptr;
  sc.skip_ptr = a.skip ? a.skip->data_ptr<float>() : nullptr;
  // int64 counter: adding unsigned 64-bit counts gives the same bits
  sc.guarded_ptr = a.guarded ? reinterpret_cast<unsigned long long*>(a.guarded->data_ptr<int64_t>()) : nullptr;
  const char* prefetch = std::getenv("AMOS_FUSED_CUDA_PREFETCH");  // "0": off (an A/B switch for benchmarks)
  sc.prefetch = !(prefetch && std::strcmp(prefetch, "0") == 0);
  Grads G = reinterpret_cast<const void* const*>(table->dev.data_ptr<int64_t>());
  if (plan->idx64) launch<int64_t>(*plan, G, a.h, sc, stream.stream());
  else launch<int32_t>(*plan, G, a.h, sc, stream.stream());
  // A plan or table dropped from its cache frees its buffers: mark them used by this stream so
  // the allocator waits for these kernels. Not while capturing: the captured ones are pinned.
  if (!capturing) {
    plan->dev.record_stream(stream);
    plan->scratch.record_stream(stream);
    table->dev.record_stream(stream);
  }
}


// ---- the two-phase protocol of sharded tensors (two_phase.cpp, amos_fused/distributed.py) ------
// Work items are pieces of at most kPiece elements of one slice; a slice's S is its pieces' sums
// added in order (deterministic). Phase 3 finalizes each slice in a thread of its own (v, b, K_r,
// D_r from the complete S_r; the closed forms' A from the tensor's complete ||u||^2), then applies
// item by item. The tables are cached like the one-pass plans (plan_cache.h): a table holds all
// but the gradients' addresses, which are a small table of their own keyed by those addresses; a
// CUDA graph may capture a step whose tables an eager step built, and keeps them.
namespace {

struct TwoPhaseTensor {
  void* p;
  void* m;
  float* v;
  float* b;
  const float* step;
  int64_t C;       // local row length
  int64_t first;   // its first slice in the flat vectors
  float C_global;  // the slice length of the formulas
  float eta, eps0;
  int32_t tg, tp, tm;
};

struct TwoPhaseItem {
  int32_t tensor, pad;
  int64_t slice, off, n;
};

struct TwoPhasePlan {
  at::Tensor host, dev;
  int64_t nt = 0, ni = 0, ns = 0;
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> tensors;  // of its key's tensors: gone = dead
  PlanCache<GradTable> gtables{kKeepGradTables};
  const TwoPhaseTensor* tensors_meta() const {
    return reinterpret_cast<const TwoPhaseTensor*>(dev.data_ptr<uint8_t>());
  }
  const TwoPhaseItem* items() const { return reinterpret_cast<const TwoPhaseItem*>(tensors_meta() + nt); }
  const int64_t* first() const { return reinterpret_cast<const int64_t*>(items() + ni); }  // per slice, ns + 1
  const int32_t* owner() const { return reinterpret_cast<const int32_t*>(first() + ns + 1); }  // per slice
  bool dead() const {
    for (const auto& t : tensors)
      if (t.expired()) return true;
    return false;
  }
};

static_assert(sizeof(TwoPhaseTensor) % 8 == 0 && sizeof(TwoPhaseItem) % 8 == 0,
              "the int64 arrays packed after these structs must stay 8-byte aligned");

constexpr float kGuardedK = -1.0f;  // K of a guarded slice (K >= 0, or NaN, for every other slice)

std::shared_ptr<TwoPhasePlan> build_two_phase_plan(const TwoPhaseArgs& a, bool phase3) {
  auto plan = std::make_shared<TwoPhasePlan>();
  std::vector<TwoPhaseTensor> ts;
  std::vector<TwoPhaseItem> items;
  std::vector<int64_t> first;
  std::vector<int32_t> owner;
  for (size_t i = 0; i < a.grads.size(); ++i) {
    const int64_t n = a.grads[i].numel(), R = a.rows[i], C = n ? n / R : 0;
    TwoPhaseTensor t{};
    t.C = C;
    t.first = a.offsets[i];
    t.tg = dtype_of(a.grads[i]);
    if (phase3) {
      t.p = a.params[i].data_ptr();
      t.m = a.ms.empty() ? nullptr : a.ms[i].data_ptr();
      t.tp = dtype_of(a.params[i]);
      t.tm = a.ms.empty() ? kNone : dtype_of(a.ms[i]);
      t.v = a.vs[i].data_ptr<float>();
      t.b = a.bs[i].data_ptr<float>();
      t.step = a.steps[i].data_ptr<float>();
      t.C_global = static_cast<float>(a.slice_lens[i]);
      t.eta = static_cast<float>(a.etas[i]);
      t.eps0 = eps0_of(a.numels[i], a.params[i].dim(), a.etas[i]);
      for (const at::Tensor* x : {&a.params[i], &a.vs[i], &a.bs[i], &a.steps[i]})
        plan->tensors.emplace_back(x->storage().getWeakStorageImpl());
      if (!a.ms.empty()) plan->tensors.emplace_back(a.ms[i].storage().getWeakStorageImpl());
    }
    ts.push_back(t);
    for (int64_t r = 0; r < R; ++r) {
      first.push_back(static_cast<int64_t>(items.size()));
      owner.push_back(static_cast<int32_t>(i));
      for (int64_t c = 0; c < C; c += kPiece)
        items.push_back({static_cast<int32_t>(i), 0, a.offsets[i] + r, r * C + c, std::min(C - c, kPiece)});
    }
  }
  first.push_back(static_cast<int64_t>(items.size()));
  plan->nt = static_cast<int64_t>(ts.size());
  plan->ni = static_cast<int64_t>(items.size());
  plan->ns = static_cast<int64_t>(owner.size());
  // TwoPhaseTensor and TwoPhaseItem are multiples of 8 bytes: the int64 array after them is aligned
  const size_t bytes = ts.size() * sizeof(TwoPhaseTensor) + items.size() * sizeof(TwoPhaseItem) +
                       first.size() * sizeof(int64_t) + owner.size() * sizeof(int32_t);
  plan->host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* dst = plan->host.data_ptr<uint8_t>();
  std::memcpy(dst, ts.data(), ts.size() * sizeof(TwoPhaseTensor));
  dst += ts.size() * sizeof(TwoPhaseTensor);
  std::memcpy(dst, items.data(), items.size() * sizeof(TwoPhaseItem));
  dst += items.size() * sizeof(TwoPhaseItem);
  std::memcpy(dst, first.data(), first.size() * sizeof(int64_t));
  dst += first.size() * sizeof(int64_t);
  std::memcpy(dst, owner.data(), owner.size() * sizeof(int32_t));
  plan->dev = to_device(plan->host, a.grads[0].device());
  return plan;
}

std::vector<int64_t> two_phase_key(const TwoPhaseArgs& a, bool phase3) {
  auto ptr = [](const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); };
  std::vector<int64_t> key{phase3, a.grads[0].device().index()};
  for (size_t i = 0; i < a.grads.size(); ++i) {
    key.insert(key.end(), {a.rows[i], a.grads[i].numel(), static_cast<int64_t>(a.grads[i].scalar_type())});
    if (!phase3) continue;
    const float eta = static_cast<float>(a.etas[i]);
    int32_t eta_bits;
    std::memcpy(&eta_bits, &eta, sizeof eta_bits);
    key.insert(key.end(), {ptr(a.params[i]), ptr(a.vs[i]), ptr(a.bs[i]), ptr(a.steps[i]),
                           a.ms.empty() ? 0 : ptr(a.ms[i]), static_cast<int64_t>(a.params[i].scalar_type()),
                           a.ms.empty() ? -1 : static_cast<int64_t>(a.ms[i].scalar_type()), a.params[i].dim(),
                           a.slice_lens[i], a.numels[i], eta_bits});
  }
  return key;
}

// The plan and gradient table of this call; capturing, both must exist already (and are pinned).
std::pair<std::shared_ptr<TwoPhasePlan>, std::shared_ptr<GradTable>> get_two_phase(const TwoPhaseArgs& a,
                                                                                   bool phase3) {
  static std::mutex* mu = new std::mutex;  // never destroyed, like get_plan's cache
  static auto* cache = new PlanCache<TwoPhasePlan>(kKeepPlans);
  cudaStreamCaptureStatus capturing;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &capturing));
  const bool in_capture = capturing != cudaStreamCaptureStatusNone;
  const std::vector<int64_t> key = two_phase_key(a, phase3);
  std::vector<int64_t> gkey;
  for (const at::Tensor& g : a.grads) gkey.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(g.data_ptr())));
  std::lock_guard<std::mutex> lock(*mu);
  auto plan = cache->get(key, in_capture, [&] { return build_two_phase_plan(a, phase3); },
                         [](const TwoPhasePlan& p) { return p.dead(); });
  TORCH_CHECK(plan != nullptr, capture_miss_message("two-phase table"));
  auto table = plan->gtables.get(gkey, in_capture, [&] { return build_grad_table(gkey, a.grads[0].device()); },
                                 [](const GradTable&) { return false; });
  TORCH_CHECK(table != nullptr, capture_miss_message("gradient table"));
  return {plan, table};
}

__global__ void __launch_bounds__(kThreads) two_phase_piece_sum_kernel(const TwoPhaseTensor* __restrict__ ts,
                                                                       const TwoPhaseItem* __restrict__ items,
                                                                       Grads G, Hyper h,
                                                                       const float* __restrict__ scale_ptr,
                                                                       float* __restrict__ partial) {
  __shared__ float smem[kWarps];
  const TwoPhaseItem it = items[blockIdx.x];
  const TwoPhaseTensor& T = ts[it.tensor];
  const void* g = G[it.tensor];
  const float scale = scale_ptr ? *scale_ptr : 1.0f;
  float acc = 0.0f;
  for (int64_t k = threadIdx.x; k < it.n; k += kThreads) {
    const float x = prep_grad(ld1(g, T.tg, it.off + k), scale, h);
    acc += x * x;
  }
  const float S = block_sum(acc, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = S;
}

__global__ void two_phase_slice_sum_kernel(const int64_t* __restrict__ first, int64_t ns,
                                           const float* __restrict__ partial, float* __restrict__ S) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= ns) return;
  float total = 0.0f;
  for (int64_t k = first[j]; k < first[j + 1]; ++k) total += partial[k];
  S[j] = total;
}

// One thread per slice: v (and b), and K_r, D_r into KD; KD[2j] = kGuardedK marks a guarded slice.
__global__ void two_phase_finalize_kernel(const TwoPhaseTensor* __restrict__ ts, const int32_t* __restrict__ owner,
                                          int64_t ns, Hyper h, Scalars sc, const float* __restrict__ S,
                                          const float* __restrict__ norms, float* __restrict__ KD) {
  if (skipped(sc)) return;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= ns) return;
  const TwoPhaseTensor& T = ts[owner[j]];
  const int64_t r = j - T.first;
  const float Sj = S[j];
  if (guarded_slice(Sj)) {
    KD[2 * j] = kGuardedK;
    if (sc.guarded_ptr) atomicAdd(sc.guarded_ptr, 1ull);
    return;
  }
  const float xi = read_lr(sc), t = *T.step, bc = bias_correction(h, t);
  float v = T.v[r];
  const float rr = second_moment(h, Sj, T.C_global, bc, v);
  T.v[r] = v;
  float K, D;
  if (h.schedule == kAmos) {
    float b = T.b[r];
    amos_slice(h, amos_tensor(h, xi, T.eta), Sj, T.C_global, rr, b, K, D);
    T.b[r] = b;
  } else {
    float A;
    closed_tensor(h, xi, t, T.eps0, norms[owner[j]], A, D);
    K = closed_slice_K(A, rr);
  }
  KD[2 * j] = K;
  KD[2 * j + 1] = D;
}

__global__ void __launch_bounds__(kThreads) two_phase_apply_kernel(const TwoPhaseTensor* __restrict__ ts,
                                                                   const TwoPhaseItem* __restrict__ items, Grads G,
                                                                   Hyper h, Scalars sc, const float* __restrict__ KD) {
  if (skipped(sc)) return;
  const TwoPhaseItem it = items[blockIdx.x];
  const float k = KD[2 * it.slice], d = KD[2 * it.slice + 1];
  if (k == kGuardedK) return;  // theta and m keep their values
  const TwoPhaseTensor& T = ts[it.tensor];
  const void* g = G[it.tensor];
  const float scale = read_scale(sc);
  for (int64_t e = threadIdx.x; e < it.n; e += kThreads) {
    const int64_t i = it.off + e;
    const float theta = ld1(T.p, T.tp, i);
    float delta = update(theta, prep_grad(ld1(g, T.tg, i), scale, h), k, d);
    if (T.tm != kNone) {
      const float m = momentum_update(h, ld1(T.m, T.tm, i), delta);
      st1(T.m, T.tm, i, m);
      delta = m;  // theta moves by the unrounded m
    }
    st1(T.p, T.tp, i, theta + delta);
  }
}

}  // namespace

void two_phase_sums_cuda(const TwoPhaseArgs& a, const at::Tensor& S) {
  const c10::cuda::CUDAGuard guard(a.grads[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto [plan, table] = get_two_phase(a, false);
  S.zero_();  // slices of empty local shards have no items
  if (plan->ni) {
    at::Tensor partial = at::empty({plan->ni}, S.options());
    Grads G = reinterpret_cast<const void* const*>(table->dev.data_ptr<int64_t>());
    two_phase_piece_sum_kernel<<<blocks(plan->ni), kThreads, 0, stream>>>(
        plan->tensors_meta(), plan->items(), G, a.h, a.grad_scale ? a.grad_scale->data_ptr<float>() : nullptr,
        partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    two_phase_slice_sum_kernel<<<blocks((plan->ns + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        plan->first(), plan->ns, partial.data_ptr<float>(), S.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void two_phase_apply_cuda(const TwoPhaseArgs& a, const at::Tensor& S) {
  const c10::cuda::CUDAGuard guard(a.grads[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto [plan, table] = get_two_phase(a, true);
  Scalars sc{};
  sc.lr = static_cast<float>(a.lr);
  if (a.lr_tensor && a.lr_tensor->is_cuda()) sc.lr_ptr = a.lr_tensor->data_ptr<float>();
  else if (a.lr_tensor) sc.lr = a.lr_tensor->item<float>();  // a CPU tensor: reading it does not wait for the GPU
  sc.scale_ptr = a.grad_scale ? a.grad_scale->data_ptr<float>() : nullptr;
  sc.skip_ptr = a.skip ? a.skip->data_ptr<float>() : nullptr;
  sc.guarded_ptr = a.guarded ? reinterpret_cast<unsigned long long*>(a.guarded->data_ptr<int64_t>()) : nullptr;
  if (plan->ns) {
    at::Tensor KD = at::empty({2 * plan->ns}, S.options());
    two_phase_finalize_kernel<<<blocks((plan->ns + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        plan->tensors_meta(), plan->owner(), plan->ns, a.h, sc, S.data_ptr<float>(),
        a.norms ? a.norms->data_ptr<float>() : nullptr, KD.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan->ni) {
      Grads G = reinterpret_cast<const void* const*>(table->dev.data_ptr<int64_t>());
      two_phase_apply_kernel<<<blocks(plan->ni), kThreads, 0, stream>>>(plan->tensors_meta(), plan->items(), G, a.h,
                                                                      sc, KD.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

}  // namespace amos
