// Deterministic parallel-for over independent items: `threads` std::threads pull item indices from an atomic
// counter; each item writes only its own output slot, so the result does not depend on the thread count.
// parallel_for_worker also passes the worker index w ∈ [0, resolve_threads(threads, items)) for per-worker scratch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace xt {

// Threads used for `items` items: threads <= 0 means one per hardware thread; never more than the items, nor more
// than kThreadsPerCore per hardware thread (more cannot speed up CPU-bound work, and each costs a stack).
constexpr int64_t kThreadsPerCore = 4;

inline int64_t resolve_threads(int64_t threads, int64_t items) {
  const int64_t hw = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  if (threads <= 0) threads = hw;
  return std::max<int64_t>(1, std::min({threads, items, kThreadsPerCore * hw}));
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
  try {
    pool.reserve(static_cast<size_t>(threads - 1));
    for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
  } catch (const std::exception& e) {
    // A thread that cannot start (resource limits) must not leave the started ones joinable (std::terminate):
    // stop handing out items, join them, report it. The caller's outputs are then incomplete, hence an error.
    next.store(items);
    for (auto& th : pool) th.join();
    throw std::runtime_error("could not start thread " + std::to_string(pool.size() + 1) + " of " +
                             std::to_string(threads) + " (" + e.what() + "); pass fewer threads");
  }
  work(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

template <class F>
void parallel_for(int64_t items, int64_t threads, F&& f) {
  parallel_for_worker(items, threads, [&f](int64_t k, int64_t) { f(k); });
}

}  // namespace xt
