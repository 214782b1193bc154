// backend="cpu": the fused Amos step over the rows (slices) of a group's tensors.
//
// Work is cut into pieces of fixed size, independent of the thread count: a piece is a run of
// whole rows (about kPiece elements) or, for rows longer than kLongRow, one block of a row. Every
// sum is taken piece by piece in a fixed order, so results are bitwise identical whatever the
// number of threads. Passes (docs/algorithm.md, "Kernel phases"):
//   "amos", whole rows: one pass. Each row is reduced, finalized and applied while it is in
//       cache, so g is read once from DRAM. Element granularity (C = 1) runs a piece of rows as
//       one element-wise loop.
//   closed forms, long rows: pass 1 reduces (S_r, then v_r and S_r * r_r per row); between the
//       passes each tensor gets unorm and its coefficients A, D (and long rows their K_r, D_r);
//       pass 2 applies.
// The guard (Amos(guard="slice")): a slice whose S_r is not finite (NaN, Inf, or a sum of finite
// squares past fp32) is left as it was: no v, b, m or theta update, and ||u||^2 leaves it out. The
// kernels count such slices into StepArgs::guarded. Rows and long rows decide once per row (pass 2
// reads pass 1's verdict from a per-row flag); element granularity selects per element, so its
// loops stay branch-free.
//
// Speed: the step is bound by memory traffic, and one core of the small machines this targets
// reaches its share of DRAM bandwidth only with several streams in flight. So
//   - whole rows of "amos" are software-pipelined: the loop that applies row r also sums g*g of
//     row r + 1 (g and theta read at once, like a += b, not one stream at a time), and asks for
//     its streams a few cache lines ahead (software prefetch: the hardware's stops at each page);
//   - loops that only read (the closed forms' pass 1) sum four rows far apart at once;
//   - the loops are templates of the storage types (no call per element or per row), compiled
//     for any x86-64 (SSE2) and again for AVX2 + F16C, picked at run time: twice the lanes,
//     which the bf16/fp16 conversions need. Both run the same operations in the same order
//     (IEEE, no contraction, no reassociation), so they give the same bits.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "ops.h"  // cpu_avx2, AMOS_CPU_AVX2
// the loops are inlined into each target's entry point, so each is compiled for that target
#define AMOS_CPU_INLINE inline __attribute__((always_inline))

namespace amos {
namespace {

constexpr int64_t kLongRow = 65536;  // rows up to this length are one piece's business (256 KiB fp32)
constexpr int64_t kPiece = 16384;    // target elements per piece of whole rows
constexpr int64_t kSerial = 32768;   // steps with fewer elements run on one thread
constexpr uintptr_t kAhead = 1024;   // bytes a read-only stream is prefetched ahead

AMOS_CPU_INLINE void prefetch(const void* x) {  // a hint: never faults, even past the end
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(x) + kAhead), 0, 3);
}

// Sums of x*x in a fixed order: element i goes to lane i % 16 (the lanes vectorise), then the
// lanes meet in a fixed tree. sumsq and apply_and_sumsq follow this order exactly.
AMOS_CPU_INLINE float lanes_total(float* acc) {
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

AMOS_CPU_INLINE float sumsq(const float* __restrict__ x, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch(x + i);
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] += x[i] * x[i];
  return lanes_total(acc);
}

// S of n rows of length C at x (row r at x + r * C) into S: four rows far apart in lockstep, as
// four streams (one core keeps more reads in flight than with one); each row's sum in sumsq's order
AMOS_CPU_INLINE void sumsq_rows(const float* __restrict__ x, int64_t C, int64_t n, float* __restrict__ S) {
  constexpr int kStreams = 4;
  const int64_t q = n / kStreams, C16 = C / 16 * 16;
  for (int64_t r = 0; r < q; ++r) {
    float acc[kStreams][16] = {};
    const float* row[kStreams];
    for (int k = 0; k < kStreams; ++k) row[k] = x + (r + k * q) * C;
    for (int64_t i = 0; i < C16; i += 16)
      for (int k = 0; k < kStreams; ++k)
        for (int j = 0; j < 16; ++j) acc[k][j] += row[k][i + j] * row[k][i + j];
    for (int k = 0; k < kStreams; ++k) {
      for (int64_t i = C16, j = 0; i < C; ++i, ++j) acc[k][j] += row[k][i] * row[k][i];
      S[r + k * q] = lanes_total(acc[k]);
    }
  }
  for (int64_t r = kStreams * q; r < n; ++r) S[r] = sumsq(x + r * C, C);
}

// Storage <-> fp32 in these loops: amos_math.h's to_f/from_f, except for fp16, which c10 converts
// by a call per element when the compiler may not assume F16C (no vectorising: 10x slower
// steps). The fp16 pair below is branch-free and gives c10's bits for every one of the 2^16
// halves and 2^32 floats (checked exhaustively against c10's conversions; NaN -> 0x7E00).
AMOS_CPU_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
AMOS_CPU_INLINE float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// a if c else b, as bit operations: a ?: between float results stays a branch (the float ops
// could trap), which keeps the loop scalar
AMOS_CPU_INLINE uint32_t pick(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// S_r is finite: the guard's test, as bit operations (vectorises; S_r >= 0 or NaN)
AMOS_CPU_INLINE bool finite_S(float S) { return (bits_of(S) & 0x7F800000u) != 0x7F800000u; }

// the new value where ok, else the old one bit for bit (a guarded slice keeps its storage)
AMOS_CPU_INLINE float keep_or(bool ok, float a, float b) { return float_of(pick(ok, bits_of(a), bits_of(b))); }
template <typename T>  // bf16, fp16: their bits
AMOS_CPU_INLINE T keep_or(bool ok, T a, T b) {
  T r;
  r.x = static_cast<uint16_t>(pick(ok, a.x, b.x));
  return r;
}

AMOS_CPU_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;                        // exponent and mantissa
  uint32_t normal = (em << 13) + (112u << 23);            // exponent bias 15 -> 127
  normal += pick(em >= 0x7C00u, (128u - 16u) << 23, 0);   // Inf and NaN: exponent all ones
  normal |= pick(em > 0x7C00u, 0x00400000u, 0);           // a NaN comes out quiet
  const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;  // em * 2^-24, exact
  return float_of(sign | pick(em < 0x0400u, bits_of(sub), normal));
}

AMOS_CPU_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // normal halves: drop 13 mantissa bits, rounding to nearest even; from 65520 on, Inf
  uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  normal = pick(normal < 0x7C00u, normal, 0x7C00u);
  // below 2^-14: |f| + 0.5 rounds |f| to a multiple of 2^-24 (the adder rounds to nearest even)
  const uint32_t sub = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
  uint32_t r = pick(a < 0x38800000u, sub, normal);
  r = pick(a > 0x7F800000u, 0x7E00u, r);  // NaN
  return static_cast<uint16_t>(sign | r);
}

template <typename T>
AMOS_CPU_INLINE float load(T x) {
  return to_f(x);
}
AMOS_CPU_INLINE float load(c10::Half x) { return half_to_float(x.x); }

template <typename T>
AMOS_CPU_INLINE T store(float x) {
  if constexpr (std::is_same<T, c10::Half>::value) return c10::Half(float_to_half(x), c10::Half::from_bits());
  else return from_f<T>(x);
}

// g -> fp32 as the step sees it (unscaled, clipped), into out
template <typename TG>
AMOS_CPU_INLINE void prep_span(const void* g, float* __restrict__ out, int64_t n, float scale, Hyper h) {
  const TG* __restrict__ x = static_cast<const TG*>(g);
  for (int64_t i = 0; i < n; ++i) out[i] = prep_grad(load(x[i]), scale, h);
}

// §6 for element i: theta (and m)
template <typename TP, typename TM>
AMOS_CPU_INLINE void apply_one(TP* __restrict__ p, float g, TM* __restrict__ m, int64_t i, float K, float D,
                               const Hyper& h) {
  float theta = load(p[i]);
  float delta = update(theta, g, K, D);
  if constexpr (!std::is_same<TM, void>::value) {
    float mm = momentum_update(h, load(m[i]), delta);
    m[i] = store<TM>(mm);
    delta = mm;  // theta moves by the unrounded m
  }
  p[i] = store<TP>(theta + delta);
}

// apply_one where ok; where not, theta and m keep their bits
template <typename TP, typename TM>
AMOS_CPU_INLINE void apply_one_if(bool ok, TP* __restrict__ p, float g, TM* __restrict__ m, int64_t i, float K,
                                  float D, const Hyper& h) {
  const TP p_old = p[i];
  const float theta = load(p_old);
  float delta = update(theta, g, K, D);
  if constexpr (!std::is_same<TM, void>::value) {
    const TM m_old = m[i];
    float mm = momentum_update(h, load(m_old), delta);
    m[i] = keep_or(ok, store<TM>(mm), m_old);
    delta = mm;  // theta moves by the unrounded m
  }
  p[i] = keep_or(ok, store<TP>(theta + delta), p_old);
}

// n elements sharing K and D
template <typename TP, typename TM>
AMOS_CPU_INLINE void apply_span(TP* __restrict__ p, const float* __restrict__ g, TM* __restrict__ m, int64_t n,
                                float K, float D, Hyper h) {
  for (int64_t i = 0; i < n; ++i) apply_one(p, g[i], m, i, K, D, h);
}

// Element granularity (C = 1), n consecutive slices: S = g*g and the slice math per element
// (separate functions: __restrict__ on every pointer lets these loops vectorise). Every element is
// computed and a guarded one (S not finite) keeps its old values: selects, no branches. Each
// counts the guarded elements in 32 bits, the lanes' width (n <= kPiece).
// "amos": all of it, in one pass.
template <typename TP, typename TM>
AMOS_CPU_INLINE int64_t amos_elements(TP* __restrict__ p, const float* __restrict__ g, TM* __restrict__ m,
                                      float* __restrict__ v, float* __restrict__ b, int64_t n, float bc,
                                      AmosTensor at, Hyper h) {
  int32_t guarded = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float S = g[i] * g[i];
    const bool ok = finite_S(S);
    const float v_old = v[i], b_old = b[i];
    float vi = v_old, bi = b_old;
    const float r = second_moment(h, S, 1.0f, bc, vi);
    float K, D;
    amos_slice(h, at, S, 1.0f, r, bi, K, D);
    v[i] = keep_or(ok, vi, v_old);
    b[i] = keep_or(ok, bi, b_old);
    apply_one_if(ok, p, g[i], m, i, K, D, h);
    guarded += !ok;
  }
  return guarded;
}

// closed forms, pass 1: v_i and the sum of S_i * r_i, in order (a guarded element adds +0, which
// changes no bit of the sum: it starts at +0 and adds values >= 0)
AMOS_CPU_INLINE float closed_elements_reduce(const float* __restrict__ g, float* __restrict__ v, int64_t n, float bc,
                                             Hyper h, int64_t& guarded) {
  float unorm2 = 0.0f;
  int32_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float S = g[i] * g[i];
    const bool ok = finite_S(S);
    const float v_old = v[i];
    float vi = v_old;
    const float Sr = S * second_moment(h, S, 1.0f, bc, vi);
    v[i] = keep_or(ok, vi, v_old);
    unorm2 += keep_or(ok, Sr, 0.0f);
    count += !ok;
  }
  guarded = count;
  return unorm2;
}

// closed forms, pass 2: K_i = A * sqrt(r_i) from the updated v; pass 1's verdict is S = g*g of
// the same g again
template <typename TP, typename TM>
AMOS_CPU_INLINE void closed_elements_apply(TP* __restrict__ p, const float* __restrict__ g, TM* __restrict__ m,
                                           const float* __restrict__ v, int64_t n, float bc, float A, float D,
                                           Hyper h) {
  for (int64_t i = 0; i < n; ++i)
    apply_one_if(finite_S(g[i] * g[i]), p, g[i], m, i, closed_slice_K(A, inv_vhat(h, v[i], bc)), D, h);
}

// m + i; m stays null without momentum (TM = void)
template <typename TM>
AMOS_CPU_INLINE TM* advance(TM* m, int64_t i) {
  if constexpr (std::is_same<TM, void>::value) return m;
  else return m + i;
}

// A row being applied (p, m from g with K, D) while the next row, gn, is summed.
template <typename TP, typename TM>
struct RowWork {
  TP* p;
  const float* g;
  TM* m;
  float K, D;
  const float* gn;
};

// The pipeline's loop asks for its streams (gn read; theta and, with momentum, m read, then
// written) kPrefetch elements ahead, a cache line at a time: the hardware's prefetch stops at
// each 4 KiB page, and five streams cross one every 1024 elements (measured: bf16 m 10% faster,
// m = 0 7%).
constexpr int64_t kPrefetch = 256;
template <typename TP, typename TM>
AMOS_CPU_INLINE void prefetch_block(const RowWork<TP, TM>& w, int64_t i, int64_t n) {
  for (int64_t k = 0; k < n; k += 16) {  // 16 fp32: one 64-byte line; 16-bit types every other step
    __builtin_prefetch(w.gn + i + k + kPrefetch, 0, 3);
    if (k * sizeof(TP) % 64 == 0) __builtin_prefetch(w.p + i + k + kPrefetch, 1, 3);
    if constexpr (!std::is_same<TM, void>::value)
      if (k * sizeof(TM) % 64 == 0) __builtin_prefetch(w.m + i + k + kPrefetch, 1, 3);
  }
}

// The pipeline's loop: applies row w and returns sum gn*gn of its next row, all of n elements.
// Blocks of kBlock elements, each a vectorised loop; the sum in sumsq's order.
constexpr int64_t kBlock = 64;
template <typename TP, typename TM>
AMOS_CPU_INLINE float apply_and_sumsq(const RowWork<TP, TM>& w, int64_t n, Hyper h) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    const float* __restrict__ gn = w.gn + i;
    prefetch_block(w, i, kBlock);
    for (int64_t k = 0; k < kBlock; k += 16)
      for (int j = 0; j < 16; ++j) acc[j] += gn[k + j] * gn[k + j];
    apply_span(w.p + i, w.g + i, advance(w.m, i), kBlock, w.K, w.D, h);
  }
  const int64_t rest = n - i;  // < kBlock: lane j of the tail still takes elements j, j + 16, ...
  for (int64_t k = 0; k < rest; ++k) acc[k % 16] += w.gn[i + k] * w.gn[i + k];
  apply_span(w.p + i, w.g + i, advance(w.m, i), rest, w.K, w.D, h);
  return lanes_total(acc);
}

// called once per span through a pointer: inlined at every use it would multiply the code
using PrepFn = void (*)(const void*, float*, int64_t, float, const Hyper&);

// One tensor of the group with its per-step scalars.
struct Tensor {
  char* p;
  const char* g;
  char* m;
  float* v;
  float* b;
  Dtype tp, tg, tm;
  int64_t R, C;
  float t, bc, eps0;
  AmosTensor at;                  // "amos"
  float A, D;                     // closed forms
  std::vector<float> rowK, rowD;  // long rows ("amos"): K_r, D_r between the passes
  std::unique_ptr<uint8_t[]> guarded_row;  // rows that pass 2 applies: 1 where pass 1 guarded the row
  int64_t first_piece, end_piece;
  bool g_as_is;  // fp32 g that needs no unscaling or clipping: read in place, not converted
  PrepFn prep;   // else this converts it
};

struct Piece {
  int32_t tensor;
  int64_t row0, row1;  // whole rows [row0, row1), or one row (row1 = row0 + 1) ...
  int64_t col0, col1;  // ... and its columns [col0, col1) when the row is long
};

// What every piece of one step shares.
struct Step {
  Hyper h;
  bool amos;
  float scale;
  float* partial;     // per piece: S (long rows) or sum of S_r * r_r (closed forms)
  int64_t* guarded;   // per piece: slices it guarded (long rows: counted between the passes)
};

// Per-thread buffers of kLongRow floats, allocated on first use, uninitialised: 0 and 1 for g
// converted to fp32 (the row pipeline holds rows r and r + 1), kRowSums for a piece's S_r.
constexpr int kRowSums = 2;
struct Scratch {
  std::unique_ptr<float[]> mem;
  float* buf(int k) {
    if (!mem) mem.reset(new float[(kRowSums + 1) * kLongRow]);
    return mem.get() + k * kLongRow;
  }
};

// One piece for one (theta dtype, m dtype); TM = void without momentum.
template <typename TP, typename TM>
struct Loops {
  static TP* p_at(const Tensor& T, int64_t off) { return reinterpret_cast<TP*>(T.p) + off; }
  static TM* m_at(const Tensor& T, int64_t off) { return advance(reinterpret_cast<TM*>(T.m), off); }

  // g of one span as fp32: the tensor's own memory, or converted into out
  static AMOS_CPU_INLINE const float* grad(const Tensor& T, int64_t off, int64_t n, const Step& s, float* out) {
    if (T.g_as_is) return reinterpret_cast<const float*>(T.g) + off;
    T.prep(T.g + off * (T.tg == kF32 ? 4 : 2), out, n, s.scale, s.h);
    return out;
  }

  // Pass 1: reduce; for "amos" on whole rows also finalize and apply.
  static AMOS_CPU_INLINE void pass1(const Tensor& T, const Piece& pc, int64_t k, const Step& s, Scratch& sc) {
    const Hyper h = s.h;  // a local copy: no store can alias it, so the loops vectorise
    if (T.C > kLongRow) {  // one block of a long row
      const int64_t off = pc.row0 * T.C + pc.col0, n = pc.col1 - pc.col0;
      s.partial[k] = sumsq(grad(T, off, n, s, sc.buf(0)), n);
      return;
    }
    float unorm2 = 0.0f;
    if (T.C == 1) {  // element granularity: whole pieces at once
      const int64_t n = pc.row1 - pc.row0;
      const float* g = grad(T, pc.row0, n, s, sc.buf(0));
      if (s.amos)
        s.guarded[k] =
            amos_elements(p_at(T, pc.row0), g, m_at(T, pc.row0), T.v + pc.row0, T.b + pc.row0, n, T.bc, T.at, h);
      else
        unorm2 = closed_elements_reduce(g, T.v + pc.row0, n, T.bc, h, s.guarded[k]);
      s.partial[k] = unorm2;
      return;
    }
    const int64_t C = T.C;
    const float Cf = static_cast<float>(C);
    if (!s.amos) {  // the piece's S_r, then v_r and the sum of S_r * r_r in row order
      const int64_t rows = pc.row1 - pc.row0;
      float* S = sc.buf(kRowSums);
      sumsq_rows(grad(T, pc.row0 * C, rows * C, s, sc.buf(0)), C, rows, S);
      int64_t guarded = 0;
      for (int64_t r = 0; r < rows; ++r) {
        if (!finite_S(S[r])) {  // guarded: v kept, left out of ||u||, not applied by pass 2
          T.guarded_row[pc.row0 + r] = 1;
          ++guarded;
          continue;
        }
        unorm2 += S[r] * second_moment(h, S[r], Cf, T.bc, T.v[pc.row0 + r]);
      }
      s.partial[k] = unorm2;
      s.guarded[k] = guarded;
      return;
    }
    amos_rows(T, pc, k, s, sc, h);
  }

  // "amos" on a piece of whole rows: S of row r is known when row r is applied, and that loop
  // sums row r + 1 (g and theta read at once) and prefetches its streams. One such pipeline per
  // piece keeps DRAM busier than two or four in lockstep (measured: with momentum two and four
  // are slower; without, one with prefetch is ~7% faster than two without).
  // A guarded row (S not finite) is neither finalized nor applied; the pipeline only sums the
  // next row (sumsq: the same order, so the same S).
  static AMOS_CPU_INLINE void amos_rows(const Tensor& T, const Piece& pc, int64_t k, const Step& s, Scratch& sc,
                                        const Hyper h) {
    const int64_t C = T.C;
    const float Cf = static_cast<float>(C);
    int cur = 0;  // which of the two buffers holds row r
    int64_t guarded = 0;
    const float* g = grad(T, pc.row0 * C, C, s, sc.buf(cur));
    float S = sumsq(g, C);
    for (int64_t r = pc.row0; r < pc.row1; ++r) {
      const bool ok = finite_S(S);
      RowWork<TP, TM> x{};  // zeroed: a guarded row leaves K, D, p, g, m unset (and GCC warns)
      if (ok) {
        const float rr = second_moment(h, S, Cf, T.bc, T.v[r]);
        amos_slice(h, T.at, S, Cf, rr, T.b[r], x.K, x.D);
        x.p = p_at(T, r * C);
        x.g = g;
        x.m = m_at(T, r * C);
      } else {
        ++guarded;
      }
      if (r + 1 < pc.row1) {
        cur = 1 - cur;
        x.gn = g = grad(T, (r + 1) * C, C, s, sc.buf(cur));
        S = ok ? apply_and_sumsq(x, C, h) : sumsq(x.gn, C);
      } else if (ok) {
        apply_span(x.p, x.g, x.m, C, x.K, x.D, h);
      }
    }
    s.partial[k] = 0.0f;
    s.guarded[k] = guarded;
  }

  // Pass 2: apply where pass 1 could not.
  static AMOS_CPU_INLINE void pass2(const Tensor& T, const Piece& pc, const Step& s, Scratch& sc) {
    const Hyper h = s.h;  // a local copy: no store can alias it, so the loops vectorise
    const bool long_row = T.C > kLongRow;
    if (s.amos && !long_row) return;  // done in pass 1
    if (T.C == 1) {  // element granularity, closed forms: K_i = A * sqrt(r_i) from the updated v
      const int64_t n = pc.row1 - pc.row0;
      const float* g = grad(T, pc.row0, n, s, sc.buf(0));
      closed_elements_apply(p_at(T, pc.row0), g, m_at(T, pc.row0), T.v + pc.row0, n, T.bc, T.A, T.D, h);
      return;
    }
    const int64_t n = pc.col1 - pc.col0;
    for (int64_t r = pc.row0; r < pc.row1; ++r) {
      if (T.guarded_row[r]) continue;  // pass 1 (or between the passes) kept it
      const int64_t off = r * T.C + pc.col0;
      const float* g = grad(T, off, n, s, sc.buf(0));
      if (s.amos)
        apply_span(p_at(T, off), g, m_at(T, off), n, T.rowK[r], T.rowD[r], h);
      else
        apply_span(p_at(T, off), g, m_at(T, off), n, closed_slice_K(T.A, inv_vhat(h, T.v[r], T.bc)), T.D, h);
    }
  }

  static AMOS_CPU_INLINE void run(int pass, const Tensor& T, const Piece& pc, int64_t k, const Step& s,
                                  Scratch& sc) {
    if (pass == 1)
      pass1(T, pc, k, s, sc);
    else
      pass2(T, pc, s, sc);
  }
};

// Entry points, one per (theta dtype, m dtype) and target.
using PieceFn = void (*)(int, const Tensor&, const Piece&, int64_t, const Step&, Scratch&);

template <typename TG>
void prep_generic(const void* g, float* out, int64_t n, float scale, const Hyper& h) {
  prep_span<TG>(g, out, n, scale, h);
}

template <typename TP, typename TM>
void piece_generic(int pass, const Tensor& T, const Piece& pc, int64_t k, const Step& s, Scratch& sc) {
  Loops<TP, TM>::run(pass, T, pc, k, s, sc);
}

#ifdef AMOS_CPU_AVX2
template <typename TP, typename TM>
__attribute__((target("avx2,f16c"))) void piece_avx2(int pass, const Tensor& T, const Piece& pc, int64_t k,
                                                     const Step& s, Scratch& sc) {
  Loops<TP, TM>::run(pass, T, pc, k, s, sc);
}

template <typename TG>
__attribute__((target("avx2,f16c"))) void prep_avx2(const void* g, float* out, int64_t n, float scale,
                                                    const Hyper& h) {
  prep_span<TG>(g, out, n, scale, h);
}
#endif

template <typename TP, typename TM>
PieceFn piece_fn() {
#ifdef AMOS_CPU_AVX2
  if (cpu_avx2()) return piece_avx2<TP, TM>;
#endif
  return piece_generic<TP, TM>;
}

template <typename TG>
PrepFn prep_fn() {
#ifdef AMOS_CPU_AVX2
  if (cpu_avx2()) return prep_avx2<TG>;
#endif
  return prep_generic<TG>;
}

PrepFn prep_fn(Dtype tg) {
  switch (tg) {
    case kF32: return prep_fn<float>();
    case kBF16: return prep_fn<c10::BFloat16>();
    default: return prep_fn<c10::Half>();
  }
}

template <typename TP>
PieceFn piece_fn(Dtype tm) {
  switch (tm) {
    case kF32: return piece_fn<TP, float>();
    case kBF16: return piece_fn<TP, c10::BFloat16>();
    case kF16: return piece_fn<TP, c10::Half>();
    default: return piece_fn<TP, void>();
  }
}

PieceFn piece_fn(Dtype tp, Dtype tm) {
  switch (tp) {
    case kF32: return piece_fn<float>(tm);
    case kBF16: return piece_fn<c10::BFloat16>(tm);
    default: return piece_fn<c10::Half>(tm);
  }
}

}  // namespace

void step_cpu(const StepArgs& a) {
  const Hyper& h = a.h;
  const bool amos = h.schedule == kAmos;
  const float xi = a.lr_tensor ? a.lr_tensor->item<float>() : static_cast<float>(a.lr);
  const float scale = a.grad_scale ? a.grad_scale->item<float>() : 1.0f;
  const size_t nt = a.params.size();

  std::vector<Tensor> ts(nt);
  std::vector<PieceFn> fns(nt);
  std::vector<Piece> pieces;
  for (size_t i = 0; i < nt; ++i) {
    Tensor& T = ts[i];
    const at::Tensor& p = a.params[i];
    T.p = static_cast<char*>(p.data_ptr());
    T.g = static_cast<const char*>(a.grads[i].data_ptr());
    T.v = a.vs[i].data_ptr<float>();
    T.b = a.bs[i].data_ptr<float>();
    T.tp = dtype_of(p);
    T.tg = dtype_of(a.grads[i]);
    T.tm = a.ms.empty() ? kNone : dtype_of(a.ms[i]);
    T.m = a.ms.empty() ? nullptr : static_cast<char*>(a.ms[i].data_ptr());
    T.R = a.vs[i].numel();
    T.C = p.numel() / T.R;
    T.t = *a.steps[i].data_ptr<float>();  // a CPU fp32 scalar (checked by ops.cpp); item() costs a dispatch
    T.bc = bias_correction(h, T.t);
    T.eps0 = eps0_of(p, a.etas[i]);
    T.at = amos_tensor(h, xi, static_cast<float>(a.etas[i]));
    T.g_as_is = T.tg == kF32 && scale == 1.0f && !h.has_clip;
    T.prep = prep_fn(T.tg);
    fns[i] = piece_fn(T.tp, T.tm);
    T.first_piece = static_cast<int64_t>(pieces.size());
    if (T.C > kLongRow) {
      for (int64_t r = 0; r < T.R; ++r)
        for (int64_t c = 0; c < T.C; c += kLongRow)
          pieces.push_back({static_cast<int32_t>(i), r, r + 1, c, std::min(T.C, c + kLongRow)});
      if (amos) {
        T.rowK.resize(T.R);
        T.rowD.resize(T.R);
      }
    }
    if (T.C > kLongRow || (!amos && T.C > 1)) T.guarded_row.reset(new uint8_t[T.R]());  // zeroed
    if (T.C <= kLongRow) {
      const int64_t rows = std::max<int64_t>(1, kPiece / T.C);
      for (int64_t r = 0; r < T.R; r += rows)
        pieces.push_back({static_cast<int32_t>(i), r, std::min(T.R, r + rows), 0, T.C});
    }
    T.end_piece = static_cast<int64_t>(pieces.size());
  }
  const int64_t np = static_cast<int64_t>(pieces.size());
  std::vector<float> partial(np);
  std::vector<int64_t> guarded(np, 0);
  const Step s{h, amos, scale, partial.data(), guarded.data()};
  // a small step runs on the calling thread: waking the pool would cost more than the work
  int64_t total = 0;
  for (const auto& p : a.params) total += p.numel();
  const int64_t grain = total < kSerial ? std::max<int64_t>(np, 1) : 1;
  auto run_pass = [&](int pass) {
    at::parallel_for(0, np, grain, [&](int64_t begin, int64_t end) {
      Scratch sc;
      for (int64_t k = begin; k < end; ++k) {
        const Piece& pc = pieces[k];
        fns[pc.tensor](pass, ts[pc.tensor], pc, k, s, sc);
      }
    });
  };

  run_pass(1);

  // Between the passes (sequential, cheap): long rows' slices and the closed forms' per-tensor A, D.
  bool second_pass = !amos;
  for (Tensor& T : ts) {
    float unorm2 = 0.0f;
    if (T.C > kLongRow) {
      second_pass = true;
      const int64_t per_row = (T.C + kLongRow - 1) / kLongRow;
      const float C = static_cast<float>(T.C);
      for (int64_t r = 0; r < T.R; ++r) {
        float S = 0.0f;
        for (int64_t j = 0; j < per_row; ++j) S += partial[T.first_piece + r * per_row + j];
        if (!finite_S(S)) {  // guarded: v, b kept, left out of ||u||, not applied by pass 2
          T.guarded_row[r] = 1;
          ++guarded[T.first_piece + r * per_row];
          continue;
        }
        const float rr = second_moment(h, S, C, T.bc, T.v[r]);
        if (amos)
          amos_slice(h, T.at, S, C, rr, T.b[r], T.rowK[r], T.rowD[r]);
        else
          unorm2 += S * rr;
      }
    } else if (!amos) {
      for (int64_t k = T.first_piece; k < T.end_piece; ++k) unorm2 += partial[k];
    }
    if (!amos) closed_tensor(h, xi, T.t, T.eps0, unorm2, T.A, T.D);
  }
  if (second_pass) run_pass(2);
  if (a.guarded) {  // integers: the total does not depend on the order
    int64_t total_guarded = 0;
    for (int64_t c : guarded) total_guarded += c;
    *a.guarded->data_ptr<int64_t>() += total_guarded;
  }
}

}  // namespace amos
