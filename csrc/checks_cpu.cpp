// amos_fused::max_abs(Tensor[] xs) -> Tensor: max|x| of each CPU tensor, in one read of each.
// The optimizer's non-finite gradient check on CPU: the result is NaN for a tensor holding a NaN
// and inf for one holding +-Inf (and no NaN), so one look at a few floats tells whether the
// step must be skipped. (On CUDA the optimizer uses torch._foreach_norm(ord=inf).)
//
// Work is cut into pieces of at most kPiece elements, shared out by pieces.h; a max is exact
// whatever the order, so the result does not depend on the threads.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.h"  // cpu_avx2, AMOS_CPU_AVX2
#include "pieces.h"

// the loops are inlined into each target's entry point, so each is compiled for that target
#define CHECKS_INLINE inline __attribute__((always_inline))

namespace amos {
namespace {

constexpr int64_t kPiece = 1 << 16;   // elements per piece (256 KiB of fp32)
constexpr int64_t kSerial = 1 << 16;  // fewer elements in all: the calling thread does it

// The largest magnitude among n floats given as their bit patterns (Bits: uint32_t for fp32,
// uint16_t for bf16 and fp16). With the sign bit cleared, IEEE floats order like their bits as
// integers, +0 < finite < +Inf < NaN, so an integer max is exact, keeps a NaN wherever it sits
// and vectorises with SSE2 (whose float max drops NaN depending on the operand order). The
// magnitudes fit in the signed range, so signed compares (pcmpgtd, pmaxsw) do.
// The span is read as kStreams sub-spans in lockstep: one core keeps more reads in flight with
// several streams than with one.
template <typename Bits, typename Signed>
CHECKS_INLINE Signed max_magnitude(const Bits* __restrict__ x, int64_t n) {
  constexpr Bits kMagnitude = std::numeric_limits<Signed>::max();  // all bits but the sign
  constexpr int kLanes = 64 / sizeof(Bits);                         // one cache line
  constexpr int kStreams = 4;
  const int64_t q = n / (kStreams * kLanes) * kLanes;  // elements per stream, whole lines
  Signed acc[kStreams][kLanes] = {};
  for (int64_t i = 0; i < q; i += kLanes)
    for (int s = 0; s < kStreams; ++s)
      for (int j = 0; j < kLanes; ++j) {
        const Signed a = static_cast<Signed>(x[s * q + i + j] & kMagnitude);
        acc[s][j] = acc[s][j] > a ? acc[s][j] : a;
      }
  Signed m = 0;
  for (int64_t i = kStreams * q; i < n; ++i) {
    const Signed a = static_cast<Signed>(x[i] & kMagnitude);
    m = m > a ? m : a;
  }
  for (int s = 0; s < kStreams; ++s)
    for (int j = 0; j < kLanes; ++j) m = m > acc[s][j] ? m : acc[s][j];
  return m;
}

// max|x| over x[begin, end) as the bit pattern of a non-negative fp32 (NaN stays NaN: widening
// bf16 and fp16 to fp32 keeps the order, Inf and NaN).
CHECKS_INLINE uint32_t piece_max_bits(const void* data, at::ScalarType dtype, int64_t begin, int64_t end) {
  const int64_t n = end - begin;
  float f;
  switch (dtype) {
    case at::kFloat:
      return static_cast<uint32_t>(max_magnitude<uint32_t, int32_t>(static_cast<const uint32_t*>(data) + begin, n));
    case at::kBFloat16: {
      const auto m = max_magnitude<uint16_t, int16_t>(static_cast<const uint16_t*>(data) + begin, n);
      f = static_cast<float>(c10::BFloat16(static_cast<uint16_t>(m), c10::BFloat16::from_bits()));
      break;
    }
    default: {  // kHalf (checked by the caller)
      const auto m = max_magnitude<uint16_t, int16_t>(static_cast<const uint16_t*>(data) + begin, n);
      f = static_cast<float>(c10::Half(static_cast<uint16_t>(m), c10::Half::from_bits()));
    }
  }
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits & 0x7FFFFFFFu;
}

// The loop compiled for any x86-64 (SSE2) and for AVX2 (twice the lanes, and a one-instruction
// 32-bit max), picked at run time.
using PieceFn = uint32_t (*)(const void*, at::ScalarType, int64_t, int64_t);

uint32_t piece_generic(const void* data, at::ScalarType dtype, int64_t begin, int64_t end) {
  return piece_max_bits(data, dtype, begin, end);
}

#ifdef AMOS_CPU_AVX2
__attribute__((target("avx2"))) uint32_t piece_avx2(const void* data, at::ScalarType dtype, int64_t begin,
                                                    int64_t end) {
  return piece_max_bits(data, dtype, begin, end);
}
#endif

PieceFn piece_fn() {
#ifdef AMOS_CPU_AVX2
  if (cpu_avx2()) return piece_avx2;
#endif
  return piece_generic;
}

struct Piece {
  int64_t tensor, begin, end;
};

at::Tensor max_abs_cpu(at::TensorList xs) {
  const int64_t nt = static_cast<int64_t>(xs.size());
  std::vector<at::Tensor> flat(nt);  // contiguous (a copy only for a non-contiguous tensor)
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (int64_t i = 0; i < nt; ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK(x.device().is_cpu(), "amos_fused.max_abs: xs[", i, "] is on ", x.device(),
                "; this op takes CPU tensors (for CUDA tensors use torch._foreach_norm(xs, float('inf')))");
    const auto dt = x.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "amos_fused.max_abs: xs[", i,
                "] is ", dt, "; this op takes fp32, bf16 or fp16 tensors (for others use x.abs().amax())");
    flat[i] = x.contiguous();
    const int64_t n = x.numel();
    for (int64_t b = 0; b < n; b += kPiece) pieces.push_back({i, b, std::min(n, b + kPiece)});
    total += n;
  }
  const int64_t np = static_cast<int64_t>(pieces.size());
  std::vector<uint32_t> partial(np);
  const PieceFn run = piece_fn();
  struct NoScratch {};
  // a small call stays on this thread: waking the pool would cost more
  for_pieces<NoScratch>(np, total < kSerial, [&](int64_t k, NoScratch&) {
    const at::Tensor& x = flat[pieces[k].tensor];
    partial[k] = run(x.const_data_ptr(), x.scalar_type(), pieces[k].begin, pieces[k].end);
  });
  std::vector<uint32_t> bits(nt, 0);  // +0.0f: the max of an empty tensor
  for (int64_t k = 0; k < np; ++k) bits[pieces[k].tensor] = std::max(bits[pieces[k].tensor], partial[k]);
  at::Tensor out = at::empty({nt}, at::TensorOptions().dtype(at::kFloat));
  std::memcpy(out.data_ptr<float>(), bits.data(), nt * sizeof(float));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amos_fused, m) { m.def("max_abs(Tensor[] xs) -> Tensor"); }

// CompositeExplicitAutograd, not CPU: an empty list (no tensor to dispatch on) gets its empty
// result, and tensors of other devices get the clear error above rather than "not implemented".
TORCH_LIBRARY_IMPL(amos_fused, CompositeExplicitAutograd, m) { m.impl("max_abs", &max_abs_cpu); }

}  // namespace amos
