// The torch.library op amos_fused::amos_step_ (CPU and CUDA implementations) and the module init.
// amos_fused/cpp_backend.py calls it and registers its fake implementation for torch.compile.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace amos {

Hyper make_hyper(int64_t schedule, double beta, double eps, double momentum, double clip_value,
                 double d_coef, double c_coef, double extra_l2, double q, double half_life) {
  TORCH_CHECK(schedule >= kAmos && schedule <= kInverseSquare, "amos_fused: schedule code ", schedule,
              " is unknown");
  TORCH_CHECK(schedule == kAmos || schedule == kConstant || half_life > 0,
              "amos_fused: a decaying schedule needs half_life > 0");
  Hyper h;
  h.schedule = static_cast<int32_t>(schedule);
  h.beta_d = beta;
  h.beta = static_cast<float>(beta);
  h.one_minus_beta = static_cast<float>(1.0 - beta);
  h.eps = static_cast<float>(eps);
  h.c_coef = static_cast<float>(c_coef);
  h.d_coef = static_cast<float>(d_coef);
  h.extra_l2 = static_cast<float>(extra_l2);
  h.half_life = static_cast<float>(half_life);
  h.two_q = static_cast<float>(2.0 * q);
  h.momentum = static_cast<float>(momentum);
  h.one_minus_momentum = static_cast<float>(1.0 - momentum);
  h.has_clip = clip_value > 0;
  h.clip = static_cast<float>(clip_value);
  return h;
}

namespace {

constexpr const char* kSchema =
    "amos_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] vs, Tensor(c!)[] bs, "
    "Tensor(d!)[] ms, Tensor[] steps, float[] etas, float lr, Tensor? lr_tensor, Tensor? grad_scale, Tensor? skip, "
    "Tensor(e!)? guarded, "
    "int schedule, float beta, float eps, float momentum, float clip_value, float d_coef, "
    "float c_coef, float extra_l2, float q, float half_life) -> ()";

bool is_16_or_32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// Checks every tensor (a clear error beats a wrong pointer walk) and drops numel-0 tensors,
// which the reference leaves untouched.
StepArgs collect(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList bs,
                 at::TensorList ms, at::TensorList steps, at::ArrayRef<double> etas, double lr,
                 const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& guarded,
                 const Hyper& h) {
  const size_t n = params.size();
  const bool has_m = h.momentum > 0;
  TORCH_CHECK(grads.size() == n && vs.size() == n && bs.size() == n && steps.size() == n &&
                  etas.size() == n && ms.size() == (has_m ? n : 0),
              "amos_fused.amos_step_: params, grads, vs, bs, steps, etas (and ms when momentum > 0) "
              "must have one entry per parameter");
  StepArgs a;
  a.lr = lr;
  a.h = h;
  const at::Device dev = n ? params[0].device() : at::Device(at::kCPU);
  auto check_scalar = [&](const at::Tensor& t, const char* what, bool same_device) {
    TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, "amos_fused.amos_step_: ", what,
                " must be a one-element fp32 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
    TORCH_CHECK(!same_device || t.device() == dev, "amos_fused.amos_step_: ", what, " is on ", t.device(),
                ", the parameters on ", dev, "; move it to the parameters' device");
  };
  if (lr_tensor) {
    check_scalar(*lr_tensor, "lr_tensor", false);
    a.lr_tensor = lr_tensor;
  }
  if (grad_scale) {
    check_scalar(*grad_scale, "grad_scale", true);
    a.grad_scale = grad_scale;
  }
  if (skip) {
    check_scalar(*skip, "skip", true);
    a.skip = skip;
  }
  if (guarded) {
    TORCH_CHECK(guarded->numel() == 1 && guarded->scalar_type() == at::kLong && guarded->device() == dev,
                "amos_fused.amos_step_: guarded must be a one-element int64 tensor on ", dev, ", got ",
                guarded->scalar_type(), " of shape ", guarded->sizes(), " on ", guarded->device());
    a.guarded = guarded;
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &v = vs[i], &b = bs[i], &st = steps[i];
    TORCH_CHECK(p.device() == dev && g.device() == dev && v.device() == dev && b.device() == dev,
                "amos_fused.amos_step_: tensor ", i, ": params, grads and state must all be on ", dev);
    TORCH_CHECK(is_16_or_32(p) && is_16_or_32(g), "amos_fused.amos_step_: tensor ", i,
                ": params and grads must be fp32, bf16 or fp16 (got ", p.scalar_type(), ", ",
                g.scalar_type(), "); fp64 parameters take the reference path");
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "amos_fused.amos_step_: tensor ", i,
                ": params and grads must be contiguous");
    TORCH_CHECK(g.numel() == p.numel(), "amos_fused.amos_step_: tensor ", i, ": grad has ", g.numel(),
                " elements, param ", p.numel());
    TORCH_CHECK(v.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && v.is_contiguous() &&
                    b.is_contiguous() && v.numel() == b.numel(),
                "amos_fused.amos_step_: tensor ", i, ": v and b must be contiguous fp32 of equal size");
    check_scalar(st, "steps[i]", true);
    if (p.numel() == 0) continue;
    TORCH_CHECK(v.numel() > 0 && p.numel() % v.numel() == 0, "amos_fused.amos_step_: tensor ", i, ": ",
                v.numel(), " slices do not divide ", p.numel(), " elements");
    if (has_m) {
      const at::Tensor& m = ms[i];
      TORCH_CHECK(m.device() == dev && is_16_or_32(m) && m.is_contiguous() && m.numel() == p.numel(),
                  "amos_fused.amos_step_: tensor ", i,
                  ": m must be a contiguous fp32/bf16/fp16 tensor shaped like its parameter");
      a.ms.push_back(m);
    }
    a.params.push_back(p);
    a.grads.push_back(g);
    a.vs.push_back(v);
    a.bs.push_back(b);
    a.steps.push_back(st);
    a.etas.push_back(etas[i]);
  }
  return a;
}

void amos_step(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList bs,
               at::TensorList ms, at::TensorList steps, at::ArrayRef<double> etas, double lr,
               const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& guarded, int64_t schedule, double beta, double eps, double momentum, double clip_value, double d_coef,
               double c_coef, double extra_l2, double q, double half_life, bool cuda) {
  Hyper h = make_hyper(schedule, beta, eps, momentum, clip_value, d_coef, c_coef, extra_l2, q, half_life);
  StepArgs a = collect(params, grads, vs, bs, ms, steps, etas, lr, lr_tensor, grad_scale, skip, guarded, h);
  if (a.params.empty()) return;
  if (!cuda) {
    if (a.skip && a.skip->item<float>() != 0.0f) return;  // a CPU tensor: no wait
    return step_cpu(a);
  }
#ifdef AMOS_WITH_CUDA
  step_cuda(a);
#else
  TORCH_CHECK(false, "amos_fused._C was built without CUDA kernels; rebuild with a CUDA toolkit "
                     "(AMOS_FUSED_CUDA=1 pip install --no-build-isolation -e .)");
#endif
}

void amos_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList bs,
                   at::TensorList ms, at::TensorList steps, at::ArrayRef<double> etas, double lr,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& guarded, int64_t schedule, double beta, double eps, double momentum, double clip_value,
                   double d_coef, double c_coef, double extra_l2, double q, double half_life) {
  amos_step(params, grads, vs, bs, ms, steps, etas, lr, lr_tensor, grad_scale, skip, guarded, schedule, beta, eps, momentum,
            clip_value, d_coef, c_coef, extra_l2, q, half_life, false);
}

#ifdef AMOS_WITH_CUDA
void amos_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList bs,
                    at::TensorList ms, at::TensorList steps, at::ArrayRef<double> etas, double lr,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& guarded, int64_t schedule, double beta, double eps, double momentum, double clip_value,
                    double d_coef, double c_coef, double extra_l2, double q, double half_life) {
  amos_step(params, grads, vs, bs, ms, steps, etas, lr, lr_tensor, grad_scale, skip, guarded, schedule, beta, eps, momentum,
            clip_value, d_coef, c_coef, extra_l2, q, half_life, true);
}
#endif

}  // namespace

TORCH_LIBRARY(amos_fused, m) { m.def(kSchema); }

TORCH_LIBRARY_IMPL(amos_fused, CPU, m) { m.impl("amos_step_", &amos_step_cpu); }

#ifdef AMOS_WITH_CUDA
TORCH_LIBRARY_IMPL(amos_fused, CUDA, m) { m.impl("amos_step_", &amos_step_cuda); }
#endif

}  // namespace amos

// A plain Python module, so `import amos_fused._C` loads the library (and registers the op);
// `with_cuda` tells the Python side whether the CUDA kernels were compiled in.
static PyMethodDef kMethods[] = {{nullptr, nullptr, 0, nullptr}};
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "amos_fused kernels (torch.ops.amos_fused)", -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&kModule);
  if (mod == nullptr) return nullptr;
#ifdef AMOS_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  return mod;
}
