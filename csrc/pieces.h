// for_pieces: the CPU kernels' parallel loop (amos_cpu.cpp, checks_cpu.cpp). The work is cut into
// pieces whose results are kept per piece and combined in a fixed order afterwards, so which
// thread runs a piece changes no bit; this file only decides who runs what.
//
// Each thread owns a contiguous run of pieces (what a static split gives it, so its reads stay
// sequential streams) and, when its run is done, takes pieces from the back of the other runs. A
// thread that shares its core with another process (or a vCPU the host preempts) then holds the
// step for the piece it is on, not for its whole share. On the 2-core machine (50M fp32, 2
// threads, eight processes each, per-round medians) the static split took 1.00-1.24x this one's
// time for the default step (median 1.05) and 1.02-1.26x without momentum (median 1.12).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace amos {

// one thread's run [lo, hi), packed in one word so its owner and a thief never take the same piece
struct alignas(64) PieceRun {
  std::atomic<uint64_t> v;
  static uint64_t pack(uint64_t lo, uint64_t hi) { return lo | hi << 32; }
  // the run's first piece (its owner) or last piece (a thief) into k; false when the run is empty
  bool take(bool front, int64_t& k) {
    uint64_t cur = v.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = cur & 0xffffffffu, hi = cur >> 32;
      if (lo >= hi) return false;
      if (v.compare_exchange_weak(cur, front ? pack(lo + 1, hi) : pack(lo, hi - 1), std::memory_order_relaxed)) {
        k = static_cast<int64_t>(front ? lo : hi - 1);
        return true;
      }
    }
  }
};

// fn(k, local) for every piece k in [0, np); `local` is a Local per thread (scratch buffers).
// `serial`: the caller's work is too small to be worth waking the pool.
template <typename Local, typename Fn>
void for_pieces(int64_t np, bool serial, Fn&& fn) {
  const int64_t threads = serial ? 1 : std::min<int64_t>(at::get_num_threads(), np);
  if (threads <= 1 || np >= (int64_t{1} << 32)) {
    at::parallel_for(0, np, threads <= 1 ? std::max<int64_t>(np, 1) : 1, [&](int64_t begin, int64_t end) {
      Local local;
      for (int64_t k = begin; k < end; ++k) fn(k, local);
    });
    return;
  }
  std::unique_ptr<PieceRun[]> runs(new PieceRun[threads]);
  for (int64_t t = 0; t < threads; ++t)
    runs[t].v.store(PieceRun::pack(np * t / threads, np * (t + 1) / threads), std::memory_order_relaxed);
  // one index per thread; a nested call runs every index on one thread, which still covers all
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    Local local;
    int64_t k;
    for (int64_t t = begin; t < end; ++t)
      while (runs[t].take(true, k)) fn(k, local);
    for (int64_t u = 1; u <= threads; ++u)
      while (runs[(begin + u) % threads].take(false, k)) fn(k, local);
  });
}

}  // namespace amos
