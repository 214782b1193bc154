// backend="cpu": the fused Amos step over the rows (slices) of a group's tensors.
//
// Work is cut into pieces of fixed size, independent of the thread count: a piece is a run of
// whole rows (about kPiece elements) or, for rows longer than kLongRow, one block of a row. Every
// sum is taken piece by piece in a fixed order, so results are bitwise identical whatever the
// number of threads. Passes (ALGORITHM.md §8):
//   "amos", whole rows: one pass. Each row is reduced, finalized and applied while it is in
//       cache, so g is read once from DRAM. Element granularity (C = 1) runs a piece of rows as
//       one element-wise loop.
//   closed forms, long rows: pass 1 reduces (S_r, then v_r and S_r * r_r per row); between the
//       passes each tensor gets unorm and its coefficients A, D (and long rows their K_r, D_r);
//       pass 2 applies.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops.h"

namespace amos {
namespace {

constexpr int64_t kLongRow = 65536;  // rows up to this length are one piece's business (256 KiB fp32)
constexpr int64_t kPiece = 16384;    // target elements per piece of whole rows
constexpr int64_t kSerial = 32768;   // steps with fewer elements run on one thread

// sum of x*x in a fixed order: 16 running lanes (vectorised), then a fixed tree.
float sumsq(const float* __restrict__ x, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += x[i] * x[i];
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// g -> fp32 as the step sees it (unscaled, clipped), into out
template <typename TG>
void prep_span(const TG* __restrict__ g, float* __restrict__ out, int64_t n, float scale, Hyper h) {
  for (int64_t i = 0; i < n; ++i) out[i] = prep_grad(to_f(g[i]), scale, h);
}

using PrepFn = void (*)(const void*, float*, int64_t, float, Hyper);
template <typename TG>
void prep_erased(const void* g, float* out, int64_t n, float scale, Hyper h) {
  prep_span(static_cast<const TG*>(g), out, n, scale, h);
}
const PrepFn kPrep[3] = {prep_erased<float>, prep_erased<c10::BFloat16>, prep_erased<c10::Half>};

// §6 for element i: theta (and m)
template <typename TP, typename TM>
inline void apply_one(TP* __restrict__ p, float g, TM* __restrict__ m, int64_t i, float K, float D, const Hyper& h) {
  float theta = to_f(p[i]);
  float delta = update(theta, g, K, D);
  if constexpr (!std::is_same<TM, void>::value) {
    float mm = momentum_update(h, to_f(m[i]), delta);
    m[i] = from_f<TM>(mm);
    delta = mm;  // theta moves by the unrounded m
  }
  p[i] = from_f<TP>(theta + delta);
}

// n elements sharing K and D
template <typename TP, typename TM>
void apply_span(TP* __restrict__ p, const float* __restrict__ g, TM* __restrict__ m, int64_t n, float K, float D,
                Hyper h) {
  for (int64_t i = 0; i < n; ++i) apply_one(p, g[i], m, i, K, D, h);
}

// Element granularity (C = 1), n consecutive slices: S = g*g, and the slice math per element.
// "amos": all of it, in one pass.
template <typename TP, typename TM>
void amos_elements(TP* __restrict__ p, const float* __restrict__ g, TM* __restrict__ m, float* __restrict__ v,
                   float* __restrict__ b, int64_t n, float bc, AmosTensor at, Hyper h) {
  for (int64_t i = 0; i < n; ++i) {
    const float S = g[i] * g[i];
    const float r = second_moment(h, S, 1.0f, bc, v[i]);
    float K, D;
    amos_slice(h, at, S, 1.0f, r, b[i], K, D);
    apply_one(p, g[i], m, i, K, D, h);
  }
}

// closed forms, pass 2: K_i = A * sqrt(r_i) from the updated v
template <typename TP, typename TM>
void closed_elements(TP* __restrict__ p, const float* __restrict__ g, TM* __restrict__ m, const float* __restrict__ v,
                     int64_t n, float bc, float A, float D, Hyper h) {
  for (int64_t i = 0; i < n; ++i) apply_one(p, g[i], m, i, closed_slice_K(A, inv_vhat(h, v[i], bc)), D, h);
}

// The loops above for each (theta dtype, m dtype), behind plain function pointers.
struct Loops {
  void (*apply)(void*, const float*, void*, int64_t, float, float, Hyper);
  void (*amos_elements)(void*, const float*, void*, float*, float*, int64_t, float, AmosTensor, Hyper);
  void (*closed_elements)(void*, const float*, void*, const float*, int64_t, float, float, float, Hyper);
};

template <typename TP, typename TM>
Loops loops_for() {
  using M = typename std::conditional<std::is_same<TM, void>::value, char, TM>::type;  // void* -> TM*
  Loops l;
  l.apply = [](void* p, const float* g, void* m, int64_t n, float K, float D, Hyper h) {
    apply_span<TP, TM>(static_cast<TP*>(p), g, reinterpret_cast<TM*>(static_cast<M*>(m)), n, K, D, h);
  };
  l.amos_elements = [](void* p, const float* g, void* m, float* v, float* b, int64_t n, float bc, AmosTensor at,
                       Hyper h) {
    amos_elements<TP, TM>(static_cast<TP*>(p), g, reinterpret_cast<TM*>(static_cast<M*>(m)), v, b, n, bc, at, h);
  };
  l.closed_elements = [](void* p, const float* g, void* m, const float* v, int64_t n, float bc, float A, float D,
                         Hyper h) {
    closed_elements<TP, TM>(static_cast<TP*>(p), g, reinterpret_cast<TM*>(static_cast<M*>(m)), v, n, bc, A, D, h);
  };
  return l;
}

template <typename TP>
Loops loops_for(Dtype tm) {
  switch (tm) {
    case kF32: return loops_for<TP, float>();
    case kBF16: return loops_for<TP, c10::BFloat16>();
    case kF16: return loops_for<TP, c10::Half>();
    default: return loops_for<TP, void>();
  }
}

Loops loops_for(Dtype tp, Dtype tm) {
  switch (tp) {
    case kF32: return loops_for<float>(tm);
    case kBF16: return loops_for<c10::BFloat16>(tm);
    default: return loops_for<c10::Half>(tm);
  }
}

int64_t elem_size(Dtype d) { return d == kF32 ? 4 : 2; }

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
  AmosTensor at;                // "amos"
  float A, D;                   // closed forms
  std::vector<float> rowK, rowD;  // long rows ("amos"): K_r, D_r between the passes
  int64_t first_piece, end_piece;
  Loops loops;
  PrepFn prep;
};

struct Piece {
  int32_t tensor;
  int64_t row0, row1;  // whole rows [row0, row1), or one row (row1 = row0 + 1) ...
  int64_t col0, col1;  // ... and its columns [col0, col1) when the row is long
};

// g of one span as fp32: the tensor's own memory when it is fp32 and needs no unscaling or
// clipping, else converted into scratch.
const float* grad_span(const Tensor& T, int64_t off, int64_t n, float scale, const Hyper& h, float* scratch) {
  if (T.tg == kF32 && scale == 1.0f && !h.has_clip) return reinterpret_cast<const float*>(T.g) + off;
  T.prep(T.g + off * elem_size(T.tg), scratch, n, scale, h);
  return scratch;
}

// element off of a tensor's p or m (null stays null)
char* at_elem(char* base, Dtype d, int64_t off) {
  return base ? base + off * elem_size(d) : nullptr;
}

void apply_range(const Tensor& T, int64_t off, const float* g, int64_t n, float K, float D, const Hyper& h) {
  T.loops.apply(at_elem(T.p, T.tp, off), g, at_elem(T.m, T.tm, off), n, K, D, h);
}

}  // namespace

void step_cpu(const StepArgs& a) {
  const Hyper& h = a.h;
  const bool amos = h.schedule == kAmos;
  const float xi = a.lr_tensor ? a.lr_tensor->item<float>() : static_cast<float>(a.lr);
  const float scale = a.grad_scale ? a.grad_scale->item<float>() : 1.0f;
  const size_t nt = a.params.size();

  std::vector<Tensor> ts(nt);
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
    T.loops = loops_for(T.tp, T.tm);
    T.prep = kPrep[T.tg];
    T.first_piece = static_cast<int64_t>(pieces.size());
    if (T.C > kLongRow) {
      for (int64_t r = 0; r < T.R; ++r)
        for (int64_t c = 0; c < T.C; c += kLongRow)
          pieces.push_back({static_cast<int32_t>(i), r, r + 1, c, std::min(T.C, c + kLongRow)});
      if (amos) {
        T.rowK.resize(T.R);
        T.rowD.resize(T.R);
      }
    } else {
      const int64_t rows = std::max<int64_t>(1, kPiece / T.C);
      for (int64_t r = 0; r < T.R; r += rows)
        pieces.push_back({static_cast<int32_t>(i), r, std::min(T.R, r + rows), 0, T.C});
    }
    T.end_piece = static_cast<int64_t>(pieces.size());
  }
  const int64_t np = static_cast<int64_t>(pieces.size());
  std::vector<float> partial(np);  // per piece: S (long rows) or sum of S_r * r_r (closed forms)
  // a small step runs on the calling thread: waking the pool would cost more than the work
  int64_t total = 0;
  for (const auto& p : a.params) total += p.numel();
  const int64_t grain = total < kSerial ? std::max<int64_t>(np, 1) : 1;

  // Pass 1: reduce; for "amos" on whole rows also finalize and apply.
  at::parallel_for(0, np, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kLongRow);
    for (int64_t k = begin; k < end; ++k) {
      const Piece& pc = pieces[k];
      const Tensor& T = ts[pc.tensor];
      if (T.C > kLongRow) {  // one block of a long row
        const int64_t off = pc.row0 * T.C + pc.col0, n = pc.col1 - pc.col0;
        partial[k] = sumsq(grad_span(T, off, n, scale, h, scratch.data()), n);
        continue;
      }
      const float C = static_cast<float>(T.C);
      float unorm2 = 0.0f;
      if (T.C == 1) {  // element granularity: whole pieces at once
        const int64_t n = pc.row1 - pc.row0;
        const float* g = grad_span(T, pc.row0, n, scale, h, scratch.data());
        if (amos)
          T.loops.amos_elements(at_elem(T.p, T.tp, pc.row0), g, at_elem(T.m, T.tm, pc.row0), T.v + pc.row0,
                                T.b + pc.row0, n, T.bc, T.at, h);
        else
          for (int64_t i = 0; i < n; ++i) {  // closed forms: v_i and the sum of S_i * r_i, in order
            const float S = g[i] * g[i];
            unorm2 += S * second_moment(h, S, 1.0f, T.bc, T.v[pc.row0 + i]);
          }
        partial[k] = unorm2;
        continue;
      }
      for (int64_t r = pc.row0; r < pc.row1; ++r) {
        const float* g = grad_span(T, r * T.C, T.C, scale, h, scratch.data());
        const float S = sumsq(g, T.C);
        const float rr = second_moment(h, S, C, T.bc, T.v[r]);
        if (amos) {
          float K, D;
          amos_slice(h, T.at, S, C, rr, T.b[r], K, D);
          apply_range(T, r * T.C, g, T.C, K, D, h);
        } else {
          unorm2 += S * rr;
        }
      }
      partial[k] = unorm2;
    }
  });

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
  if (!second_pass) return;

  // Pass 2: apply where pass 1 could not.
  at::parallel_for(0, np, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kLongRow);
    for (int64_t k = begin; k < end; ++k) {
      const Piece& pc = pieces[k];
      const Tensor& T = ts[pc.tensor];
      const bool long_row = T.C > kLongRow;
      if (amos && !long_row) continue;  // done in pass 1
      if (T.C == 1) {  // element granularity
        const int64_t n = pc.row1 - pc.row0;
        const float* g = grad_span(T, pc.row0, n, scale, h, scratch.data());
        T.loops.closed_elements(at_elem(T.p, T.tp, pc.row0), g, at_elem(T.m, T.tm, pc.row0), T.v + pc.row0, n,
                                T.bc, T.A, T.D, h);
        continue;
      }
      const int64_t n = pc.col1 - pc.col0;
      for (int64_t r = pc.row0; r < pc.row1; ++r) {
        const int64_t off = r * T.C + pc.col0;
        const float* g = grad_span(T, off, n, scale, h, scratch.data());
        if (amos)
          apply_range(T, off, g, n, T.rowK[r], T.rowD[r], h);
        else
          apply_range(T, off, g, n, closed_slice_K(T.A, inv_vhat(h, T.v[r], T.bc)), T.D, h);
      }
    }
  });
}

}  // namespace amos
