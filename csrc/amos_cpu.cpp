// backend="cpu": the fused Amos step over the rows (slices) of a group's tensors.
//
// Work is cut into pieces of fixed size, independent of the thread count: a piece is a run of
// whole rows (about kPiece elements) or, for rows longer than kLongRow, one block of a row. Every
// sum is taken piece by piece in a fixed order, so results are bitwise identical whatever the
// number of threads and whichever thread runs a piece (pieces.h shares them out). Passes
// (docs/algorithm.md, "Kernel phases"):
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
// Speed: the step is bound by memory traffic. So
//   - whole rows of "amos" are summed, finalized and applied one row at a time: the apply's
//     second read of the row's g comes from L1/L2, and the streams stay simple enough for the
//     hardware prefetchers (measured on 2 cores, two processes of one thread each: 1.4x faster
//     than applying row r while summing row r + 1 with software prefetch, and as fast with one
//     process of two threads);
//   - loops that only read (the closed forms' pass 1) sum four rows far apart at once;
//   - the loops are templates of the storage types (no call per element or per row), compiled
//     for any x86-64 (SSE2) and again for AVX2 + F16C, picked at run time: twice the lanes,
//     which the bf16/fp16 conversions need; with bf16 momentum a third time for AVX512-BF16,
//     whose one-instruction rounding to bf16 replaces 19 of the apply's 44 instructions per 16
//     elements (apply_span_bf16). All run the same operations in the same order (IEEE, no
//     contraction, no reassociation), so they give the same bits.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "ops.h"  // cpu_avx2, AMOS_CPU_AVX2, AMOS_CPU_BF16
#include "pieces.h"
#ifdef AMOS_CPU_BF16
#include <immintrin.h>
#endif
// the loops are inlined into each target's entry point, so each is compiled for that target
#define AMOS_CPU_INLINE inline __attribute__((always_inline))

namespace amos {
namespace {

constexpr int64_t kLongRow = 65536;  // rows up to this length are one piece's business (256 KiB fp32)
constexpr int64_t kPiece = 16384;    // target elements per piece of whole rows
constexpr int64_t kSerial = 32768;   // steps with fewer elements run on one thread
// Sums of x*x in a fixed order: element i goes to lane i % 16 (the lanes vectorise), then the
// lanes meet in a fixed tree. sumsq_rows follows this order exactly.
AMOS_CPU_INLINE float lanes_total(float* acc) {
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

AMOS_CPU_INLINE float sumsq(const float* __restrict__ x, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
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
// steps), and fp32 -> bf16. The fp16 pair below is branch-free and gives c10's bits for every one
// of the 2^16 halves and 2^32 floats (checked exhaustively against c10's conversions; NaN ->
// 0x7E00); so does float_to_bf16 for every float (NaN -> 0x7FC0).
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

// c10's bf16 rounding (to nearest even; NaN -> 0x7FC0) with a NaN replaced before rounding, so
// the select stays in the 32-bit lanes: c10's own form compiles to a select after packing to 16
// bits. The default step's AVX2 apply loop takes 44 instructions per 16 elements instead of 48
// (one pack and permute fewer); on the 50M-parameter default step, c10's form took 0.99-1.07x
// this one's time (median 1.04) in six A/B runs.
AMOS_CPU_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = pick(f != f, 0x7FC00000u, bits_of(f));  // f != f: NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
AMOS_CPU_INLINE float load(T x) {
  return to_f(x);
}
AMOS_CPU_INLINE float load(c10::Half x) { return half_to_float(x.x); }

template <typename T>
AMOS_CPU_INLINE T store(float x) {
  if constexpr (std::is_same<T, c10::Half>::value) return c10::Half(float_to_half(x), c10::Half::from_bits());
  else if constexpr (std::is_same<T, c10::BFloat16>::value) return c10::BFloat16(float_to_bf16(x), c10::BFloat16::from_bits());
  else return from_f<T>(x);
}

// g -> fp32 as the step sees it (unscaled, clipped), into out
template <typename TG>
AMOS_CPU_INLINE void prep_span(const void* g, float* __restrict__ out, int64_t n, float scale, Hyper h) {
  const TG* __restrict__ x = static_cast<const TG*>(g);
  for (int64_t i = 0; i < n; ++i) out[i] = prep_grad(load(x[i]), scale, h);
}

// §6 with momentum for element i: theta is stored; returns the new m before its rounding
template <typename TP>
AMOS_CPU_INLINE float theta_and_m(TP* __restrict__ p, float g, float m, int64_t i, float K, float D, const Hyper& h) {
  const float theta = load(p[i]);
  const float mm = momentum_update(h, m, update(theta, g, K, D));
  p[i] = store<TP>(theta + mm);  // theta moves by the unrounded m
  return mm;
}

// §6 for element i: theta (and m)
template <typename TP, typename TM>
AMOS_CPU_INLINE void apply_one(TP* __restrict__ p, float g, TM* __restrict__ m, int64_t i, float K, float D,
                               const Hyper& h) {
  if constexpr (!std::is_same<TM, void>::value) {
    m[i] = store<TM>(theta_and_m(p, g, load(m[i]), i, K, D, h));
  } else {
    const float theta = load(p[i]);
    p[i] = store<TP>(theta + update(theta, g, K, D));
  }
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

#ifdef AMOS_CPU_BF16
// apply_span with bf16 m where the processor converts fp32 to bf16 in one instruction
// (AVX512-BF16's vcvtneps2bf16, which rounds to nearest even as c10 does, but reads a subnormal
// as 0 and keeps a NaN's sign and payload): the step's math in chunks into a buffer of fp32 m,
// then 16 stores at a time by the instruction, and float_to_bf16 for any 16 holding a NaN or a
// subnormal. The same bits as apply_span.
#define AMOS_CPU_BF16_TARGET "avx2,f16c,avx512f,avx512vl,avx512dq,avx512bw,avx512bf16"
template <typename TP>
__attribute__((target(AMOS_CPU_BF16_TARGET))) void apply_span_bf16(TP* __restrict__ p, const float* __restrict__ g,
                                                                   c10::BFloat16* __restrict__ m, int64_t n, float K,
                                                                   float D, Hyper h) {
  constexpr int64_t kChunk = 512;
  alignas(64) float mm[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t nn = std::min(kChunk, n - i0);
    for (int64_t j = 0; j < nn; ++j) mm[j] = theta_and_m(p, g[i0 + j], load(m[i0 + j]), i0 + j, K, D, h);
    int64_t j = 0;
    for (; j + 16 <= nn; j += 16) {
      const __m512 x = _mm512_load_ps(mm + j);
      if (_mm512_fpclass_ps_mask(x, 0xA1) == 0)  // 0x01 | 0x80: quiet and signalling NaN; 0x20: subnormal
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(m + i0 + j), (__m256i)_mm512_cvtneps_pbh(x));
      else
        for (int k = 0; k < 16; ++k) m[i0 + j + k].x = float_to_bf16(mm[j + k]);
    }
    for (; j < nn; ++j) m[i0 + j].x = float_to_bf16(mm[j]);
  }
}
#endif

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

// Per-thread buffers of kLongRow floats, allocated on first use, uninitialised: 0 for g converted
// to fp32, kRowSums for a piece's S_r.
constexpr int kRowSums = 1;
struct Scratch {
  std::unique_ptr<float[]> mem;
  float* buf(int k) {
    if (!mem) mem.reset(new float[(kRowSums + 1) * kLongRow]);
    return mem.get() + k * kLongRow;
  }
};

// One piece for one (theta dtype, m dtype); TM = void without momentum.
// kBf16: the build for processors with AVX512-BF16, whose bf16 m takes apply_span_bf16
template <typename TP, typename TM, bool kBf16 = false>
struct Loops {
  // apply_span, or its form for this build
  static AMOS_CPU_INLINE void apply(TP* __restrict__ p, const float* __restrict__ g, TM* __restrict__ m, int64_t n,
                                    float K, float D, const Hyper& h) {
#ifdef AMOS_CPU_BF16
    if constexpr (kBf16 && std::is_same<TM, c10::BFloat16>::value) {
      apply_span_bf16(p, g, m, n, K, D, h);
      return;
    }
#endif
    apply_span(p, g, m, n, K, D, h);
  }

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

  // "amos" on a piece of whole rows, one row at a time: sum, finalize, apply. A guarded row (S not
  // finite) is neither finalized nor applied.
  static AMOS_CPU_INLINE void amos_rows(const Tensor& T, const Piece& pc, int64_t k, const Step& s, Scratch& sc,
                                        const Hyper h) {
    const int64_t C = T.C;
    const float Cf = static_cast<float>(C);
    int64_t guarded = 0;
    for (int64_t r = pc.row0; r < pc.row1; ++r) {
      const float* g = grad(T, r * C, C, s, sc.buf(0));
      const float S = sumsq(g, C);
      if (!finite_S(S)) {
        ++guarded;
        continue;
      }
      float K, D;
      const float rr = second_moment(h, S, Cf, T.bc, T.v[r]);
      amos_slice(h, T.at, S, Cf, rr, T.b[r], K, D);
      apply(p_at(T, r * C), g, m_at(T, r * C), C, K, D, h);
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
        apply(p_at(T, off), g, m_at(T, off), n, T.rowK[r], T.rowD[r], h);
      else
        apply(p_at(T, off), g, m_at(T, off), n, closed_slice_K(T.A, inv_vhat(h, T.v[r], T.bc)), T.D, h);
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

#ifdef AMOS_CPU_BF16
template <typename TP, typename TM>
__attribute__((target(AMOS_CPU_BF16_TARGET))) void piece_bf16(int pass, const Tensor& T, const Piece& pc, int64_t k,
                                                              const Step& s, Scratch& sc) {
  Loops<TP, TM, true>::run(pass, T, pc, k, s, sc);
}
#endif

template <typename TG>
__attribute__((target("avx2,f16c"))) void prep_avx2(const void* g, float* out, int64_t n, float scale,
                                                    const Hyper& h) {
  prep_span<TG>(g, out, n, scale, h);
}
#endif

template <typename TP, typename TM>
PieceFn piece_fn() {
#ifdef AMOS_CPU_AVX2
#ifdef AMOS_CPU_BF16
  if constexpr (std::is_same<TM, c10::BFloat16>::value)  // the third build exists for bf16 m only
    if (cpu_avx512_bf16()) return piece_bf16<TP, TM>;
#endif
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

// The two-phase protocol's apply (two_phase_apply_cpu): n elements of one slice with given K, D,
// one entry point per (theta dtype, m dtype) and target, like the pieces above.
using SpanFn = void (*)(char*, const float*, char*, int64_t, float, float, const Hyper&);

template <typename TP, typename TM>
void span_generic(char* p, const float* g, char* m, int64_t n, float K, float D, const Hyper& h) {
  apply_span<TP, TM>(reinterpret_cast<TP*>(p), g, static_cast<TM*>(static_cast<void*>(m)), n, K, D, h);
}

#ifdef AMOS_CPU_AVX2
template <typename TP, typename TM>
__attribute__((target("avx2,f16c"))) void span_avx2(char* p, const float* g, char* m, int64_t n, float K, float D,
                                                    const Hyper& h) {
  apply_span<TP, TM>(reinterpret_cast<TP*>(p), g, static_cast<TM*>(static_cast<void*>(m)), n, K, D, h);
}
#endif

#ifdef AMOS_CPU_BF16
template <typename TP>
__attribute__((target(AMOS_CPU_BF16_TARGET))) void span_bf16(char* p, const float* g, char* m, int64_t n, float K,
                                                             float D, const Hyper& h) {
  apply_span_bf16(reinterpret_cast<TP*>(p), g, reinterpret_cast<c10::BFloat16*>(m), n, K, D, h);
}
#endif

template <typename TP, typename TM>
SpanFn span_fn() {
#ifdef AMOS_CPU_BF16
  if constexpr (std::is_same<TM, c10::BFloat16>::value)
    if (cpu_avx512_bf16()) return span_bf16<TP>;
#endif
#ifdef AMOS_CPU_AVX2
  if (cpu_avx2()) return span_avx2<TP, TM>;
#endif
  return span_generic<TP, TM>;
}

template <typename TP>
SpanFn span_fn(Dtype tm) {
  switch (tm) {
    case kF32: return span_fn<TP, float>();
    case kBF16: return span_fn<TP, c10::BFloat16>();
    case kF16: return span_fn<TP, c10::Half>();
    default: return span_fn<TP, void>();
  }
}

SpanFn span_fn(Dtype tp, Dtype tm) {
  switch (tp) {
    case kF32: return span_fn<float>(tm);
    case kBF16: return span_fn<c10::BFloat16>(tm);
    default: return span_fn<c10::Half>(tm);
  }
}

int64_t elem_size(Dtype d) { return d == kF32 ? 4 : 2; }

// The pieces of a two-phase call: runs of whole rows of about kPiece elements, or one block of
// kLongRow elements of a longer row; fixed by the shapes, not by the thread count.
struct Span {
  int32_t tensor;
  int64_t row0, row1, col0, col1;
};

std::vector<Span> two_phase_pieces(const TwoPhaseArgs& a) {
  std::vector<Span> out;
  for (size_t i = 0; i < a.params.size(); ++i) {
    const int64_t n = a.params[i].numel(), R = a.rows[i];
    if (n == 0) continue;
    const int64_t C = n / R;
    if (C > kLongRow) {
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C; c += kLongRow)
          out.push_back({static_cast<int32_t>(i), r, r + 1, c, std::min(C, c + kLongRow)});
    } else {
      const int64_t per = std::max<int64_t>(1, kPiece / C);
      for (int64_t r = 0; r < R; r += per) out.push_back({static_cast<int32_t>(i), r, std::min(R, r + per), 0, C});
    }
  }
  return out;
}

// runs fn(piece index) over the pieces (for_pieces)
template <typename Fn>
void over_pieces(const TwoPhaseArgs& a, int64_t np, Fn fn) {
  int64_t total = 0;
  for (const auto& p : a.params) total += p.numel();
  for_pieces<Scratch>(np, total < kSerial, fn);
}

// g of elements [off, off + n) of tensor i as the step sees it (unscaled, clipped), in fp32
const float* prepared_grad(const TwoPhaseArgs& a, size_t i, int64_t off, int64_t n, float scale, float* buf) {
  const Dtype tg = dtype_of(a.grads[i]);
  const char* g = static_cast<const char*>(a.grads[i].data_ptr());
  if (tg == kF32 && scale == 1.0f && !a.h.has_clip) return reinterpret_cast<const float*>(g) + off;
  prep_fn(tg)(g + off * elem_size(tg), buf, n, scale, a.h);
  return buf;
}

}  // namespace

// Phase 1 of the two-phase protocol: S_r of every local slice into S (fp32, a.offsets[i] + r).
// A row's S is sumsq's sum over the row, or (rows over kLongRow) its blocks' sums added in order.
void two_phase_sums_cpu(const TwoPhaseArgs& a, const at::Tensor& S) {
  float* out = S.data_ptr<float>();
  std::fill(out, out + S.numel(), 0.0f);  // rows of empty local shards stay 0
  const float scale = a.grad_scale ? a.grad_scale->item<float>() : 1.0f;
  const std::vector<Span> pieces = two_phase_pieces(a);
  std::vector<float> partial(pieces.size(), 0.0f);
  over_pieces(a, static_cast<int64_t>(pieces.size()), [&](int64_t k, Scratch& sc) {
    const Span& pc = pieces[k];
    const int64_t C = a.params[pc.tensor].numel() / a.rows[pc.tensor];
    if (C > kLongRow) {
      const int64_t n = pc.col1 - pc.col0;
      partial[k] = sumsq(prepared_grad(a, pc.tensor, pc.row0 * C + pc.col0, n, scale, sc.buf(0)), n);
      return;
    }
    for (int64_t r = pc.row0; r < pc.row1; ++r)
      out[a.offsets[pc.tensor] + r] = sumsq(prepared_grad(a, pc.tensor, r * C, C, scale, sc.buf(0)), C);
  });
  for (size_t k = 0; k < pieces.size(); ++k) {
    const Span& pc = pieces[k];
    if (a.params[pc.tensor].numel() / a.rows[pc.tensor] > kLongRow) out[a.offsets[pc.tensor] + pc.row0] += partial[k];
  }
}

// Phase 3: finalize every slice from its complete S_r (v, b, K_r, D_r, as step_cpu does between
// its passes; the closed forms' A from the tensor's complete ||u||^2), then the apply of §6. A
// slice whose S_r is not finite keeps v, b, theta and m, and is counted.
void two_phase_apply_cpu(const TwoPhaseArgs& a, const at::Tensor& S) {
  if (a.skip && a.skip->item<float>() != 0.0f) return;
  const Hyper& h = a.h;
  const float xi = a.lr_tensor ? a.lr_tensor->item<float>() : static_cast<float>(a.lr);
  const float scale = a.grad_scale ? a.grad_scale->item<float>() : 1.0f;
  const float* s = S.data_ptr<float>();
  const int64_t ns = a.offsets.back();
  std::vector<float> K(ns), D(ns);
  std::vector<uint8_t> ok(ns);
  int64_t guarded = 0;
  for (size_t i = 0; i < a.params.size(); ++i) {  // finalize: sequential, O(slices)
    const float t = *a.steps[i].data_ptr<float>(), bc = bias_correction(h, t);
    const float C = static_cast<float>(a.slice_lens[i]);
    float* v = a.vs[i].data_ptr<float>();
    float* b = a.bs[i].data_ptr<float>();
    const AmosTensor at = amos_tensor(h, xi, static_cast<float>(a.etas[i]));
    float A = 0.0f, Dt = 0.0f;
    if (h.schedule != kAmos)
      closed_tensor(h, xi, t, eps0_of(a.numels[i], a.params[i].dim(), a.etas[i]), a.norms->data_ptr<float>()[i], A,
                    Dt);
    for (int64_t r = 0; r < a.rows[i]; ++r) {
      const int64_t j = a.offsets[i] + r;
      ok[j] = finite_S(s[j]);
      if (!ok[j]) {
        ++guarded;
        continue;
      }
      const float rr = second_moment(h, s[j], C, bc, v[r]);
      if (h.schedule == kAmos) {
        amos_slice(h, at, s[j], C, rr, b[r], K[j], D[j]);
      } else {
        K[j] = closed_slice_K(A, rr);
        D[j] = Dt;
      }
    }
  }
  if (a.guarded) *a.guarded->data_ptr<int64_t>() += guarded;
  const std::vector<Span> pieces = two_phase_pieces(a);
  std::vector<SpanFn> fns(a.params.size());
  for (size_t i = 0; i < a.params.size(); ++i)
    fns[i] = span_fn(dtype_of(a.params[i]), a.ms.empty() ? kNone : dtype_of(a.ms[i]));
  over_pieces(a, static_cast<int64_t>(pieces.size()), [&](int64_t k, Scratch& sc) {
    const Span& pc = pieces[k];
    const size_t i = pc.tensor;
    const int64_t C = a.params[i].numel() / a.rows[i], n = pc.col1 - pc.col0;
    const int64_t ep = elem_size(dtype_of(a.params[i])), em = a.ms.empty() ? 0 : elem_size(dtype_of(a.ms[i]));
    char* p = static_cast<char*>(a.params[i].data_ptr());
    char* m = a.ms.empty() ? nullptr : static_cast<char*>(a.ms[i].data_ptr());
    for (int64_t r = pc.row0; r < pc.row1; ++r) {
      const int64_t j = a.offsets[i] + r, off = r * C + pc.col0;
      if (!ok[j]) continue;  // guarded
      const float* g = prepared_grad(a, i, off, n, scale, sc.buf(0));
      fns[i](p + off * ep, g, m == nullptr ? nullptr : m + off * em, n, K[j], D[j], h);
    }
  });
}

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
  int64_t total = 0;
  for (const auto& p : a.params) total += p.numel();
  auto run_pass = [&](int pass) {
    for_pieces<Scratch>(np, total < kSerial, [&](int64_t k, Scratch& sc) {
      const Piece& pc = pieces[k];
      fns[pc.tensor](pass, ts[pc.tensor], pc, k, s, sc);
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
