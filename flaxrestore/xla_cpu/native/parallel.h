// flaxrestore native kernels: a parallel loop over XLA's intra-op thread pool (shared by the
// kernels in this directory; see flaxrestore/native.py).
#ifndef FLAXRESTORE_NATIVE_PARALLEL_H_
#define FLAXRESTORE_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace flaxrestore {

// Runs body(chunk, begin, end) over [0, n) split into `chunks` contiguous ranges (chunk k covers
// [n*k/chunks, n*(k+1)/chunks)), on the calling thread and the XLA thread pool's threads; returns
// when all are done. Returns the number of chunks used.
template <typename Body>
int64_t ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunks, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  chunks = std::max<int64_t>(1, std::min(chunks, n));
  auto state = std::make_shared<State>();
  auto work = [state, n, chunks, body]() {
    for (;;) {
      const int64_t k = state->next.fetch_add(1);
      if (k >= chunks) return;
      body(k, n * k / chunks, n * (k + 1) / chunks);
      if (state->finished.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->finished.load() == chunks; });
  return chunks;
}

}  // namespace flaxrestore

#endif  // FLAXRESTORE_NATIVE_PARALLEL_H_
