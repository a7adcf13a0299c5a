// The hm-export kernels' threads: ExecuTorch's own threadpool, the one XNNPACK runs on (no pool of our own, so the
// two never compete for cores, and the thread count is the runtime's: hm_runner --threads, Options::threads,
// hm_export.bench.set_threads).
//
//   hm_kernels::parallel_for(items, most, fn);   // fn(begin, end) over contiguous ranges of [0, items)
//   hm_kernels::qmatmul_parallel(w, ...);        // qmatmul with a tiled matrix's columns split over the pool
//
// parallel_for cuts [0, items) into contiguous ranges (up to 4 per thread, over at most min(items, most, pool's
// threads) threads) and hands them to the pool, which runs each range once on some thread (the caller included;
// pthreadpool steals ranges from a thread that is late) and returns when all are done. A pool of 1 thread, or
// ExecuTorch's NoThreadPoolGuard, runs them in order on the caller.
// qmatmul_parallel splits the columns in blocks of 128 (4 int4 chunks or 8 int8 ones, the widest inner calls of the
// VNNI path): each column is computed whole by one thread, with the operations of the single-threaded product, so
// the result has its bits for any thread count.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "et_threadpool.h"
#include "qmatmul.h"

namespace hm_kernels {

// The pool's threads (the caller included); 1 when there is no pool.
inline int64_t pool_threads() {
  const auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool != nullptr ? static_cast<int64_t>(pool->get_thread_count()) : 1;
}

// fn(begin, end) over contiguous ranges of [0, items) on at most `most` threads, see the header.
template <typename Fn>
inline void parallel_for(int64_t items, int64_t most, Fn fn) {
  const int64_t threads = std::min<int64_t>({items, most, pool_threads()});
  if (threads <= 1) {
    if (items > 0) fn(int64_t{0}, items);
    return;
  }
  const int64_t parts = std::min(items, 4 * threads);
  executorch::extension::threadpool::get_threadpool()->run(
      [&](size_t part) {
        const auto p = static_cast<int64_t>(part);
        fn(items * p / parts, items * (p + 1) / parts);
      },
      static_cast<size_t>(parts));
}

// Columns per block of a split product, and the least work (weights x tokens) given to a thread: 65,536 int4
// weights are about 40 KB of codes, scales and mins, some 3 us of one core's reads, against the microsecond or so
// a hand-off to a spinning pthreadpool worker costs (a sizing by arithmetic, not tuned on a quiet machine).
// SmolLM2's 576 x 192 k/v projections stay on one thread at T = 1.
constexpr int64_t kSplitColumns = 128;
constexpr int64_t kMinPartWork = int64_t{1} << 16;

// qmatmul with a tiled matrix's columns split over the pool (see the header) on at most `most` threads (default:
// as many as the product's size is worth); other matrices run whole on the caller.
inline void qmatmul_parallel(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs, int64_t tokens,
                             float* out, int64_t out_stride, Isa isa = active_isa(), int64_t most = 0) {
  if (!w.tiled) {
    qmatmul(w, xq, xq_stride, xs, tokens, out, out_stride, isa);
    return;
  }
  if (most <= 0) most = w.rows * w.cols * tokens / kMinPartWork;
  parallel_for((w.cols + kSplitColumns - 1) / kSplitColumns, most, [&](int64_t begin, int64_t end) {
    qmatmul(w, xq, xq_stride, xs, tokens, out, out_stride, isa, Columns{begin * kSplitColumns, end * kSplitColumns});
  });
}

}  // namespace hm_kernels
