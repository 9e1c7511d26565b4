// balanced_for: at::parallel_for's split, with the chunks of a slow thread taken over by the
// others.
//
// at::parallel_for gives each thread one equal block, so a call takes as long as its slowest
// thread. On the 2-vCPU machines we develop on, one thread now and then runs a list of small
// tensors 2-2.5x slower than the other, for seconds at a time, and the call then costs more
// than one thread would. Here each thread still owns the same block, which it walks chunk by
// chunk in order (so while the threads keep pace the split, and each thread's data staying in
// its own cache from step to step, are those of at::parallel_for); a thread that has finished
// its block claims the chunks of another that the owner has not reached yet.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace sslk {

// Calls f(lo, hi) on disjoint ranges that cover [0, n) exactly once, each at most `chunk` long,
// on up to min(threads, n / grain) threads; ranges of one call are never merged, so f may rely
// on lo and hi being multiples of `chunk` (or n).
template <typename F>
void balanced_for(int64_t n, int64_t chunk, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = at::in_parallel_region()
      ? 1
      : std::min({static_cast<int64_t>(at::get_num_threads()), (n + grain - 1) / grain, chunks});
  auto run = [&](int64_t c) { f(c * chunk, std::min(n, (c + 1) * chunk)); };
  if (threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) run(c);
    return;
  }
  // One cache line per thread: an owner's claims do not contend with the others' until they
  // steal.
  struct alignas(64) Block {
    std::atomic<int64_t> next;
    int64_t end;
  };
  std::unique_ptr<Block[]> blocks(new Block[threads]);
  for (int64_t i = 0; i < threads; ++i) {
    blocks[i].next.store(i * chunks / threads, std::memory_order_relaxed);
    blocks[i].end = (i + 1) * chunks / threads;
  }
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t me = lo; me < hi; ++me) {
      for (int64_t k = 0; k < threads; ++k) {
        Block& b = blocks[(me + k) % threads];
        for (int64_t c; (c = b.next.fetch_add(1, std::memory_order_relaxed)) < b.end;) run(c);
      }
    }
  });
}

}  // namespace sslk
