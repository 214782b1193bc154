// The Amos math of docs/algorithm.md, written once for both targets: the CPU kernels
// (amos_cpu.cpp, compiled by g++) and the CUDA kernels (amos_cuda.cu, compiled by nvcc) call these
// functions, so the CPU tests in CI check the very formulas the GPU runs.
//
// Every formula follows amos_fused/reference.py operation by operation, in fp32, in the same order
// (the reference is the oracle; float rounding depends on the order). Only +, -, *, / and sqrt are
// used in per-element and per-slice code: they are correctly rounded on both targets (nvcc's
// defaults -prec-div and -prec-sqrt, --fmad=false; g++ with -ffp-contract=off, no fast-math), so
// host and device agree bit for bit given the same inputs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AMOS_HD __host__ __device__ __forceinline__
#else
#define AMOS_HD inline
#endif

namespace amos {

// Storage dtypes of theta, g and m (m: kNone when momentum == 0).
enum Dtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kNone = 3 };

// Schedules: the official rule and the closed forms (docs/algorithm.md: "The official rule", "Closed-form schedules").
enum Schedule : int32_t { kAmos = 0, kConstant = 1, kInverseTime = 2, kInverseSquare = 3 };

// The group's options as fp32, each rounded from the Python double exactly where the reference
// rounds it (a Python float meeting an fp32 tensor becomes fp32; `1.0 - beta` is formed in double).

struct Hyper {
  int32_t schedule;
  double beta_d;  // beta as given, for the bias correction
  float beta, one_minus_beta, eps;
  float c_coef, d_coef, extra_l2;      // "amos"
  float half_life, two_q;              // closed forms (half_life > 0 for the decaying ones)
  float momentum, one_minus_momentum;  // momentum == 0: no m
  float clip;                          // clip > 0: clamp g to [-clip, clip]
  int32_t has_clip;
};

// ---- storage <-> fp32 (downcasts round to nearest even: c10's conversions do) -------------
AMOS_HD float to_f(float x) { return x; }
AMOS_HD float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
AMOS_HD float to_f(c10::Half x) { return static_cast<float>(x); }

template <typename T>
AMOS_HD T from_f(float x) { return static_cast<T>(x); }

// ---- §3: the gradient and the second moment ------------------------------------------------
// g as the step sees it: unscaled first (GradScaler's scale; 1 without a scaler, and x / 1 == x
// exactly), then clipped.
AMOS_HD float prep_grad(float g, float scale, const Hyper& h) {
  if (scale != 1.0f) g = g / scale;
  if (h.has_clip) g = g < -h.clip ? -h.clip : (g > h.clip ? h.clip : g);  // torch.clamp: NaN stays NaN
  return g;
}

// bc = 1 - beta**t, shared by every slice at step t. It cancels (fp32(0.999) is off by 1.3e-5 of
// bc), so, as the reference does, it is formed in fp64 from the double beta and rounded once.
AMOS_HD float bias_correction(const Hyper& h, float t) {
  return static_cast<float>(1.0 - pow(h.beta_d, static_cast<double>(t)));
}

// r_r = 1 / v_hat = bc / max(v_r, eps) of the updated v_r
// (a compare and select like torch.clamp_min, rather than fmaxf: it vectorises and keeps NaN)
AMOS_HD float inv_vhat(const Hyper& h, float v, float bc) { return bc / (v < h.eps ? h.eps : v); }

// v_r from the slice's S_r = sum g*g over C elements; returns r_r
AMOS_HD float second_moment(const Hyper& h, float S, float C, float bc, float& v) {
  v = h.beta * v + (h.one_minus_beta * S) / C;
  return inv_vhat(h, v, bc);
}

// ---- §4: "amos", per slice, with the old b ------------------------------------------------
// Per-tensor constants of the official rule: alpha = xi * eta and the square roots.
struct AmosTensor {
  float xi2, c_sqrt_xi, alpha, d_sqrt_alpha;
};

AMOS_HD AmosTensor amos_tensor(const Hyper& h, float xi, float eta) {
  AmosTensor a;
  a.xi2 = xi * xi;
  a.c_sqrt_xi = h.c_coef * sqrtf(xi);
  a.alpha = xi * eta;
  a.d_sqrt_alpha = h.d_coef * sqrtf(a.alpha);
  return a;
}

// K (on g), D (on theta) of slice r; updates b in place.
AMOS_HD void amos_slice(const Hyper& h, const AmosTensor& a, float S, float C, float r, float& b,
                        float& K, float& D) {
  float c = 1.0f / sqrtf(1.0f + a.c_sqrt_xi * b);
  float gamma = c * a.xi2 * r * S / C;
  float d = 1.0f / (1.0f + a.d_sqrt_alpha * b);
  K = d * a.alpha * sqrtf(r);
  D = d * (gamma / 2.0f + h.extra_l2);
  b = b + gamma * (1.0f + b);
}

// ---- §5: closed forms, per tensor ---------------------------------------------------------
// s(t): 1 at t = 1, halving after half_life steps (schedules.py)
AMOS_HD float decay(const Hyper& h, float t) {
  if (h.schedule == kConstant) return 1.0f;
  float x = (t - 1.0f) / h.half_life;
  if (h.schedule == kInverseTime) return 1.0f / (1.0f + x);
  float y = 1.0f + 0.41421356237309515f * x;  // sqrt(2) - 1, rounded to fp32 as the reference does
  return 1.0f / (y * y);
}

// A (K_r = A * sqrt(r_r)) and D of a tensor from unorm2 = sum over slices of S_r * r_r.
// eps0 = ||theta_0 - theta*|| in fp32 (the caller rounds the double of docs/algorithm.md, "Closed-form schedules").
AMOS_HD void closed_tensor(const Hyper& h, float xi, float t, float eps0, float unorm2, float& A,
                           float& D) {
  float s = decay(h, t);
  float unorm = sqrtf(unorm2);
  A = unorm > 0.0f ? xi * eps0 * s / unorm : 0.0f;
  D = xi * xi / h.two_q * s;
}

// K_r of a slice of a closed-form tensor
AMOS_HD float closed_slice_K(float A, float r) { return A * sqrtf(r); }

// ---- §6: the element-wise apply -----------------------------------------------------------
// The update of one element; with momentum, m (fp32 in, fp32 out: the caller rounds what it
// stores) becomes the EMA and theta moves by the unrounded m.
AMOS_HD float update(float theta, float g, float K, float D) { return -K * g - D * theta; }

AMOS_HD float momentum_update(const Hyper& h, float m, float delta) {
  return h.momentum * m + h.one_minus_momentum * delta;
}

}  // namespace amos
