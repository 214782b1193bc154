// The two-phase protocol of sharded tensors (amos_fused/distributed.py), for tensors whose slices
// or per-tensor norm span ranks: phase 1 sums g*g over every local slice, the ranks complete the
// sums (an all-reduce, in Python), reference.py's finalize turns them into K_r, D_r, and phase 3
// applies them. The ops:
//   two_phase_sums(grads, rows, grad_scale, clip_value) -> S
//   two_phase_apply_(params, grads, ms, rows, S, K, D, grad_scale, skip, momentum, clip_value)
// Tensor i has rows[i] slices of numel / rows[i] contiguous elements; its slices sit at the sum
// of the earlier rows in the flat fp32 vectors S, K, D. The CPU loops are in amos_cpu.cpp, the
// CUDA kernels in two_phase_cuda.cu.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops.h"

namespace amos {
namespace {

bool is_16_or_32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

void check_scalar(const std::optional<at::Tensor>& t, const char* what, const at::Device& dev) {
  if (!t) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == dev, "amos_fused two-phase op: ",
              what, " must be a one-element fp32 tensor on ", dev, ", got ", t->scalar_type(), " of shape ",
              t->sizes(), " on ", t->device());
}

// Checks every tensor and the rows (a clear error beats a wrong pointer walk).
TwoPhaseArgs collect(at::TensorList params, at::TensorList grads, at::TensorList ms, at::IntArrayRef rows,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& skip,
                     double momentum, double clip_value) {
  const size_t n = grads.size();
  TORCH_CHECK(rows.size() == n && (params.empty() || params.size() == n) && (ms.empty() || ms.size() == n),
              "amos_fused two-phase op: grads, rows (and params, ms when given) need one entry per tensor");
  TORCH_CHECK(n > 0, "amos_fused two-phase op: no tensors");
  TwoPhaseArgs a;
  const at::Device dev = grads[0].device();
  int64_t at_slice = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.device() == dev && is_16_or_32(g) && g.is_contiguous(), "amos_fused two-phase op: grad ", i,
                " must be a contiguous fp32/bf16/fp16 tensor on ", dev);
    TORCH_CHECK(rows[i] >= 0 && (g.numel() == 0 || (rows[i] > 0 && g.numel() % rows[i] == 0)),
                "amos_fused two-phase op: tensor ", i, ": ", rows[i], " slices do not divide ", g.numel(),
                " elements");
    if (!params.empty()) {
      const at::Tensor& p = params[i];
      TORCH_CHECK(p.device() == dev && is_16_or_32(p) && p.is_contiguous() && p.numel() == g.numel(),
                  "amos_fused two-phase op: param ", i, " must be a contiguous fp32/bf16/fp16 tensor on ", dev,
                  " shaped like its gradient");
      a.params.push_back(p);
    } else {
      a.params.push_back(g);  // phase 1 reads only the gradients: their sizes stand for the params'
    }
    if (!ms.empty()) {
      TORCH_CHECK(ms[i].device() == dev && is_16_or_32(ms[i]) && ms[i].is_contiguous() &&
                      ms[i].numel() == g.numel(),
                  "amos_fused two-phase op: m ", i, " must be a contiguous fp32/bf16/fp16 tensor shaped like its "
                  "parameter");
      a.ms.push_back(ms[i]);
    }
    a.grads.push_back(g);
    a.rows.push_back(rows[i]);
    a.offsets.push_back(at_slice);
    at_slice += rows[i];
  }
  a.offsets.push_back(at_slice);
  check_scalar(grad_scale, "grad_scale", dev);
  check_scalar(skip, "skip", dev);
  a.grad_scale = grad_scale;
  a.skip = skip;
  a.h = Hyper{};
  a.h.momentum = static_cast<float>(momentum);
  a.h.one_minus_momentum = static_cast<float>(1.0 - momentum);
  a.h.has_clip = clip_value > 0;
  a.h.clip = static_cast<float>(clip_value);
  return a;
}

void check_vector(const at::Tensor& x, const char* what, const TwoPhaseArgs& a) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 1 && x.numel() == a.offsets.back() &&
                  x.device() == a.grads[0].device(),
              "amos_fused.two_phase_apply_: ", what, " must be a contiguous fp32 vector of ", a.offsets.back(),
              " entries (one per slice) on ", a.grads[0].device());
}

at::Tensor sums(at::TensorList grads, at::IntArrayRef rows, const std::optional<at::Tensor>& grad_scale,
                double clip_value) {
  TwoPhaseArgs a = collect({}, grads, {}, rows, grad_scale, std::nullopt, 0.0, clip_value);
  at::Tensor S = at::empty({a.offsets.back()}, grads[0].options().dtype(at::kFloat));
  if (grads[0].is_cuda()) {
#ifdef AMOS_WITH_CUDA
    two_phase_sums_cuda(a, S);
    return S;
#endif
  }
  two_phase_sums_cpu(a, S);
  return S;
}

void apply(at::TensorList params, at::TensorList grads, at::TensorList ms, at::IntArrayRef rows, const at::Tensor& S,
           const at::Tensor& K, const at::Tensor& D, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& skip, double momentum, double clip_value) {
  TORCH_CHECK(params.size() == grads.size(), "amos_fused.two_phase_apply_: params and grads differ in length");
  TORCH_CHECK((momentum > 0) == !ms.empty(), "amos_fused.two_phase_apply_: ms must be given exactly when momentum > 0");
  TwoPhaseArgs a = collect(params, grads, ms, rows, grad_scale, skip, momentum, clip_value);
  check_vector(S, "S", a);
  check_vector(K, "K", a);
  check_vector(D, "D", a);
  if (grads[0].is_cuda()) {
#ifdef AMOS_WITH_CUDA
    return two_phase_apply_cuda(a, S, K, D);
#endif
  }
  two_phase_apply_cpu(a, S, K, D);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amos_fused, m) {
  m.def("two_phase_sums(Tensor[] grads, int[] rows, Tensor? grad_scale, float clip_value) -> Tensor");
  m.def("two_phase_apply_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] ms, int[] rows, Tensor S, Tensor K, "
        "Tensor D, Tensor? grad_scale, Tensor? skip, float momentum, float clip_value) -> ()");
}

TORCH_LIBRARY_IMPL(amos_fused, CPU, m) {
  m.impl("two_phase_sums", &sums);
  m.impl("two_phase_apply_", &apply);
}

#ifdef AMOS_WITH_CUDA
TORCH_LIBRARY_IMPL(amos_fused, CUDA, m) {
  m.impl("two_phase_sums", &sums);
  m.impl("two_phase_apply_", &apply);
}
#endif

}  // namespace amos
