// The cache of launch plans (and of each plan's gradient tables) of backend="cuda"
// (amos_cuda.cu). Torch- and CUDA-free, so its rules are tested on any machine through the op
// amos_fused::_plan_cache_trace (plan_cache_trace.cpp).
//
// - Entries are keyed by everything their device data depend on; most recently used first.
// - At most `keep` entries that are not pinned: past that, the least recently used unpinned one
//   is dropped (the cache is sized so a training loop's plans all stay: one per param group).
// - An entry found while a CUDA graph is being captured is pinned: the graph replays with its
//   device addresses, so it is never dropped (for the life of the process).
// - A miss while capturing builds nothing and returns null: building copies host memory to the
//   device, which a graph would replay from a buffer that is reused; the caller raises
//   `capture_miss_message` instead of recording a wrong graph.
// - On a miss, unpinned entries whose tensors are gone (`dead`) are dropped first: a process that
//   builds many models or reloads state does not keep their plans. (A key found is used as is:
//   the same key means tensors at the same addresses with the same layout, which it fits.)
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace amos {

template <typename V>
class PlanCache {
 public:
  using Key = std::vector<int64_t>;

  explicit PlanCache(size_t keep) : keep_(keep) {}

  // The entry for key: found (and pinned when capturing), else built by build() (a
  // std::shared_ptr<V>) unless capturing, when it is null. *built tells whether it was built.
  template <typename Build, typename Dead>
  std::shared_ptr<V> get(const Key& key, bool capturing, Build&& build, Dead&& dead, bool* built = nullptr) {
    if (built) *built = false;
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key.size() == key.size() && it->key == key) {
        it->pinned = it->pinned || capturing;
        entries_.splice(entries_.begin(), entries_, it);
        return entries_.front().value;
      }
    }
    if (capturing) return nullptr;
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = !it->pinned && dead(*it->value) ? entries_.erase(it) : std::next(it);
    }
    std::shared_ptr<V> value = build();
    entries_.push_front(Entry{key, value, false});
    size_t unpinned = 0;
    for (const Entry& e : entries_) unpinned += !e.pinned;
    for (auto it = entries_.end(); unpinned > keep_ && it != entries_.begin();) {
      --it;
      if (!it->pinned) {
        it = entries_.erase(it);
        --unpinned;
      }
    }
    if (built) *built = true;
    return value;
  }

  size_t size() const { return entries_.size(); }

  size_t pinned() const {
    size_t n = 0;
    for (const Entry& e : entries_) n += e.pinned;
    return n;
  }

 private:
  struct Entry {
    Key key;
    std::shared_ptr<V> value;
    bool pinned;
  };
  std::list<Entry> entries_;
  size_t keep_;
};

// The error for a miss while capturing (`what`: "launch plan" or "gradient table").
inline std::string capture_miss_message(const char* what) {
  return std::string("amos_fused (backend='cuda'): a CUDA graph is being captured, but the ") + what +
         " of this step was never built: it is built from host memory, which a graph cannot replay. "
         "Run one eager step first (e.g. torch's warm-up iterations on a side stream) with the same "
         "parameters, optimizer state and gradient tensors, and keep the gradients in place between that "
         "step and the capture (optimizer.zero_grad(set_to_none=False), not set_to_none=True, which makes "
         "the backward inside the capture allocate new gradients).";
}

}  // namespace amos
