// The two-phase protocol of sharded tensors (amos_fused/distributed.py), for tensors whose slices
// or per-tensor norm span ranks: phase 1 sums g*g over every local slice, the ranks complete the
// sums (all-reduces, in Python), and phase 3 finalizes every slice from the complete sums and
// applies, like amos_step_ with S_r (and ||u||^2) handed in. The ops:
//   two_phase_sums(grads, rows, grad_scale, clip_value) -> S
//   two_phase_apply_(params, grads, vs, bs, ms, steps, etas, rows, slice_lens, numels, S, norms, lr, ...)
// Tensor i has rows[i] slices of numel / rows[i] contiguous local elements; its slices sit at the
// sum of the earlier rows in the flat fp32 S. The CPU loops are in amos_cpu.cpp, the CUDA kernels
// in amos_cuda.cu.
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

void apply(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList bs, at::TensorList ms,
           at::TensorList steps, at::ArrayRef<double> etas, at::IntArrayRef rows, at::IntArrayRef slice_lens,
           at::IntArrayRef numels, const at::Tensor& S, const std::optional<at::Tensor>& norms, double lr,
           const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& guarded, int64_t schedule,
           double beta, double eps, double momentum, double clip_value, double d_coef, double c_coef,
           double extra_l2, double q, double half_life) {
  const size_t n = grads.size();
  TORCH_CHECK(params.size() == n && vs.size() == n && bs.size() == n && steps.size() == n && etas.size() == n &&
                  slice_lens.size() == n && numels.size() == n,
              "amos_fused.two_phase_apply_: params, grads, vs, bs, steps, etas, rows, slice_lens and numels need "
              "one entry per tensor");
  TORCH_CHECK((momentum > 0) == !ms.empty(), "amos_fused.two_phase_apply_: ms must be given exactly when momentum > 0");
  TwoPhaseArgs a = collect(params, grads, ms, rows, grad_scale, skip, momentum, clip_value);
  a.h = make_hyper(schedule, beta, eps, momentum, clip_value, d_coef, c_coef, extra_l2, q, half_life);
  const at::Device dev = grads[0].device();
  TORCH_CHECK(S.scalar_type() == at::kFloat && S.is_contiguous() && S.dim() == 1 && S.numel() == a.offsets.back() &&
                  S.device() == dev,
              "amos_fused.two_phase_apply_: S must be a contiguous fp32 vector of ", a.offsets.back(),
              " entries (one per slice) on ", dev);
  const bool closed = schedule != kAmos;
  TORCH_CHECK(!closed || (norms && norms->scalar_type() == at::kFloat && norms->is_contiguous() &&
                          norms->numel() == static_cast<int64_t>(n) && norms->device() == dev),
              "amos_fused.two_phase_apply_: the closed forms need norms, a contiguous fp32 vector of ", n,
              " entries (||u||^2 per tensor) on ", dev);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &v = vs[i], &b = bs[i], &st = steps[i];
    TORCH_CHECK(v.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && v.is_contiguous() &&
                    b.is_contiguous() && v.numel() == a.rows[i] && b.numel() == a.rows[i] && v.device() == dev &&
                    b.device() == dev,
                "amos_fused.two_phase_apply_: tensor ", i, ": v and b must be contiguous fp32 of ", a.rows[i],
                " entries on ", dev);
    TORCH_CHECK(st.scalar_type() == at::kFloat && st.numel() == 1 && st.device() == dev,
                "amos_fused.two_phase_apply_: steps[", i, "] must be a one-element fp32 tensor on ", dev);
    TORCH_CHECK(slice_lens[i] > 0 && numels[i] >= params[i].numel(), "amos_fused.two_phase_apply_: tensor ", i,
                ": slice_lens and numels must be its global slice length and element count");
  }
  a.vs = vs.vec();
  a.bs = bs.vec();
  a.steps = steps.vec();
  a.etas = etas.vec();
  a.slice_lens = slice_lens.vec();
  a.numels = numels.vec();
  a.lr = lr;
  if (lr_tensor) {
    TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->scalar_type() == at::kFloat &&
                    (lr_tensor->is_cpu() || lr_tensor->device() == dev),
                "amos_fused.two_phase_apply_: lr_tensor must be a one-element fp32 tensor on the CPU or on ", dev);
    a.lr_tensor = lr_tensor;
  }
  if (guarded) {
    TORCH_CHECK(guarded->numel() == 1 && guarded->scalar_type() == at::kLong && guarded->device() == dev,
                "amos_fused.two_phase_apply_: guarded must be a one-element int64 tensor on ", dev);
    a.guarded = guarded;
  }
  if (closed) a.norms = norms;
  if (grads[0].is_cuda()) {
#ifdef AMOS_WITH_CUDA
    return two_phase_apply_cuda(a, S);
#endif
  }
  two_phase_apply_cpu(a, S);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amos_fused, m) {
  m.def("two_phase_sums(Tensor[] grads, int[] rows, Tensor? grad_scale, float clip_value) -> Tensor");
  m.def("two_phase_apply_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] vs, Tensor(c!)[] bs, Tensor(d!)[] ms, "
        "Tensor[] steps, float[] etas, int[] rows, int[] slice_lens, int[] numels, Tensor S, Tensor? norms, float lr, "
        "Tensor? lr_tensor, Tensor? grad_scale, Tensor? skip, Tensor(e!)? guarded, int schedule, float beta, "
        "float eps, float momentum, float clip_value, float d_coef, float c_coef, float extra_l2, float q, "
        "float half_life) -> ()");
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
