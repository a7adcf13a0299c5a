// ExecuTorch's threadpool (the one XNNPACK runs on), as libexecutorch_threadpool.so exports it: the executorch wheel
// ships the library but not threadpool.h, so these are the declarations of the functions the hm-export kernels
// (parallel.h) and the native runtime (runtime_stubs/cpp/src/runtime.cpp) call.
#pragma once

#include <executorch/runtime/core/function_ref.h>

#include <cstddef>
#include <cstdint>

namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  // fn(i) for i in [0, range), on the pool's threads and the caller; returns when all are done.
  void run(executorch::runtime::FunctionRef<void(size_t)> fn, size_t range);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool
