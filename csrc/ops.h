// What ops.cpp hands to the CPU and CUDA implementations of amos_fused::amos_step_.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "amos_math.h"

namespace amos {

// One param group's tensors on one device, checked by ops.cpp: params, grads and ms are
// contiguous fp32/bf16/fp16 (ms empty when momentum == 0); vs, bs are contiguous fp32 of R
// entries; steps are fp32 0-d tensors holding t; numel-0 tensors are already dropped.
struct StepArgs {
  std::vector<at::Tensor> params, grads, vs, bs, ms, steps;
  std::vector<double> etas;
  double lr;                              // used when lr_tensor is empty
  std::optional<at::Tensor> lr_tensor;    // fp32 0-d
  std::optional<at::Tensor> grad_scale;   // fp32 0-d (GradScaler's scale) or empty
  std::optional<at::Tensor> skip;         // fp32 one element on the params' device: != 0 skips the step
  std::optional<at::Tensor> guarded;      // int64 one element on the params' device, or empty: the
                                          // kernels add the number of slices they guarded (left unchanged
                                          // because their S_r is not finite; docs/reliability.md, "guard")
  Hyper h;
};

inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "amos_fused: unsupported dtype ", t.scalar_type());
  }
}

// ||theta_0 - theta*|| of docs/algorithm.md ("Closed-form schedules"), in double as the reference forms it, then fp32
inline float eps0_of(const at::Tensor& p, double eta) {
  double e = std::sqrt(static_cast<double>(p.numel())) * eta * (p.dim() >= 2 ? std::sqrt(2.0) : 1.0);
  return static_cast<float>(e);
}

// The CPU kernels (amos_cpu.cpp, checks_cpu.cpp) are built twice where GCC targets x86-64: plain
// and AVX2+F16C; amos_cpu.cpp's loops with bf16 momentum a third time, for AVX512-BF16. This
// picks the build once, at first use: the most the processor has, unless AMOS_FUSED_CPU_ISA is
// "generic" (the plain build) or "avx2" (no AVX512-BF16). Tests check that all give the same bits.
#if defined(__x86_64__) && defined(__GNUC__)
#define AMOS_CPU_AVX2 1
// the most AMOS_FUSED_CPU_ISA lets the kernels use: 0 the plain build, 1 AVX2, 2 anything
inline int cpu_isa_ceiling() {
  const char* isa = std::getenv("AMOS_FUSED_CPU_ISA");
  if (isa == nullptr) return 2;
  return std::strcmp(isa, "generic") == 0 ? 0 : std::strcmp(isa, "avx2") == 0 ? 1 : 2;
}
inline bool cpu_avx2() {
  static const bool yes = cpu_isa_ceiling() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}
#if defined(__clang__) || __GNUC__ >= 11  // compilers with the AVX512-BF16 intrinsics
#define AMOS_CPU_BF16 1
#endif
inline bool cpu_avx512_bf16() {
#ifdef AMOS_CPU_BF16
  static const bool yes = cpu_avx2() && cpu_isa_ceiling() >= 2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}
#endif

// The two-phase protocol of sharded tensors (amos_fused/distributed.py), checked by two_phase.cpp.
// Phase 1 writes S_r of every local slice; phase 3 takes the complete S_r (and, for the closed
// forms, each tensor's complete ||u||^2), finalizes every slice (v, b, K_r, D_r: amos_math.h) and
// applies. Tensor i has rows[i] slices of numel / rows[i] contiguous local elements, at offsets[i]
// in the flat fp32 S; its global slice length and element count are slice_lens[i], numels[i].
struct TwoPhaseArgs {
  std::vector<at::Tensor> params, grads, ms;  // contiguous fp32/bf16/fp16; ms empty without momentum
  std::vector<at::Tensor> vs, bs, steps;      // phase 3: fp32 (rows[i],) v and b, fp32 one-element t
  std::vector<int64_t> rows, offsets, slice_lens, numels;
  std::vector<double> etas;
  double lr = 0.0;
  std::optional<at::Tensor> lr_tensor;   // fp32 one element
  std::optional<at::Tensor> grad_scale;  // fp32 one element on the tensors' device, or empty
  std::optional<at::Tensor> skip;        // fp32 one element: != 0 makes phase 3 change nothing
  std::optional<at::Tensor> guarded;     // int64 one element: += the slices guarded (S_r not finite)
  std::optional<at::Tensor> norms;       // closed forms: fp32 ||u||^2 per tensor
  Hyper h;
};

Hyper make_hyper(int64_t schedule, double beta, double eps, double momentum, double clip_value, double d_coef,
                 double c_coef, double extra_l2, double q, double half_life);

// eps0 of a tensor from its global element count and its number of dimensions
inline float eps0_of(int64_t numel, int64_t dim, double eta) {
  double e = std::sqrt(static_cast<double>(numel)) * eta * (dim >= 2 ? std::sqrt(2.0) : 1.0);
  return static_cast<float>(e);
}

void step_cpu(const StepArgs& a);
void two_phase_sums_cpu(const TwoPhaseArgs& a, const at::Tensor& S);
void two_phase_apply_cpu(const TwoPhaseArgs& a, const at::Tensor& S);
#ifdef AMOS_WITH_CUDA
void step_cuda(const StepArgs& a);
void two_phase_sums_cuda(const TwoPhaseArgs& a, const at::Tensor& S);
void two_phase_apply_cuda(const TwoPhaseArgs& a, const at::Tensor& S);
#endif

}  // namespace amos
