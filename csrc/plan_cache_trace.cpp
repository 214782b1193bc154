// amos_fused::_plan_cache_trace(int keep, int[] script) -> int[]: a test hook that runs the
// CUDA backend's plan cache (plan_cache.h, the same template) on a script, with the capture state
// given per lookup, so its rules are tested on machines without a GPU (tests/test_plan_cache.py).
//
// script: one int per operation, key * 4 + mode, mode 0: lookup, 1: lookup while capturing,
// 2: the tensors of key's entry are gone (it becomes dead). Returns one int per operation
// (0: found, 1: built, 2: refused (a miss while capturing), 3: marked dead), then the number of
// entries and of pinned entries.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <map>

#include "plan_cache.h"

namespace amos {
namespace {

struct Fake {
  bool dead = false;
};

std::vector<int64_t> plan_cache_trace(int64_t keep, at::IntArrayRef script) {
  TORCH_CHECK(keep >= 1, "_plan_cache_trace: keep must be >= 1");
  PlanCache<Fake> cache(static_cast<size_t>(keep));
  std::map<int64_t, std::weak_ptr<Fake>> made;  // key -> the value built for it last
  std::vector<int64_t> out;
  for (int64_t op : script) {
    TORCH_CHECK(op >= 0 && op % 4 <= 2, "_plan_cache_trace: bad operation ", op);
    const int64_t key = op / 4, mode = op % 4;
    if (mode == 2) {
      if (auto v = made[key].lock()) v->dead = true;
      out.push_back(3);
      continue;
    }
    bool built = false;
    auto value = cache.get(
        {key}, mode == 1, [] { return std::make_shared<Fake>(); }, [](const Fake& f) { return f.dead; }, &built);
    if (built) made[key] = value;
    out.push_back(value == nullptr ? 2 : built ? 1 : 0);
  }
  out.push_back(static_cast<int64_t>(cache.size()));
  out.push_back(static_cast<int64_t>(cache.pinned()));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amos_fused, m) {
  m.def("_plan_cache_trace(int keep, int[] script) -> int[]", &plan_cache_trace);
}

}  // namespace amos
