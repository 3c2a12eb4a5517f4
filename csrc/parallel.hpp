// Deterministic parallel-for over independent items: `threads` std::threads pull item indices from an atomic
// counter; each item writes only its own output slot, so the result does not depend on the thread count.
// parallel_for_worker also passes the worker index w ∈ [0, resolve_threads(threads, items)) for per-worker scratch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace xt {

inline int64_t resolve_threads(int64_t threads, int64_t items) {
  if (threads <= 0) threads = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  return std::max<int64_t>(1, std::min(threads, items));
}

template <class F>
void parallel_for_worker(int64_t items, int64_t threads, F&& f) {
  threads = resolve_threads(threads, items);
  if (threads == 1) {
    for (int64_t k = 0; k < items; ++k) f(k, int64_t{0});
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  auto work = [&](int64_t w) {
    for (int64_t k; (k = next.fetch_add(1)) < items;) {
      try {
        f(k, w);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

template <class F>
void parallel_for(int64_t items, int64_t threads, F&& f) {
  parallel_for_worker(items, threads, [&f](int64_t k, int64_t) { f(k); });
}

}  // namespace xt
