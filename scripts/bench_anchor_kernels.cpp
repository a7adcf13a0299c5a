// Microbenchmark of the qlinear kernels over SmolLM2-135M's whole -asym-e8 anchor: 30 layers x 7 tiled asymmetric
// int4 g32 linears (576x576 q/o, 576x192 k/v, 576x1536 gate/up, 1536x576 down) and the 576 x 49152 Q8_0 head, one
// pass per token block (each product quantizes its activations per group of 32, as qlinear does), on ExecuTorch's
// threadpool (kernels/parallel.h). Interleaved per pass: 1 thread, 2 threads with qlinear's size rule, 2 threads
// with every product split. Prints min / p25 / median ms per pass and whether the three agree bit for bit, after
// the host's own scaling: a compute-only loop on the same pool at 1 and at THREADS threads (on a busy shared host it
// is near 1x, and then no thread count can speed the kernels up either).
//   E=$(python -c "import executorch, os; print(os.path.dirname(executorch.__file__))")
//   g++ -std=c++17 -O3 -ffp-contract=off -mf16c -Ikernels -I$E/include scripts/bench_anchor_kernels.cpp
//       -o /tmp/bench_anchor_kernels -L$E/lib -lexecutorch_threadpool -lexecutorch -Wl,-rpath,$E/lib -lpthread
//   /tmp/bench_anchor_kernels TOKENS PASSES [THREADS=2]      (e.g. 1 200, then 64 20)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "parallel.h"
#include "qmatmul.h"

using namespace hm_kernels;

struct Table {
  std::vector<uint8_t> codes;
  std::vector<uint16_t> scales, mins;
  QMatrix m;
};

int main(int argc, char** argv) {
  const int tokens = argc > 1 ? std::atoi(argv[1]) : 1, passes = argc > 2 ? std::atoi(argv[2]) : 40;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 2;
  std::mt19937 rng(1);
  std::vector<Table> tables;
  tables.reserve(30 * 7 + 1);  // QMatrix points into the vectors: no reallocation
  auto add = [&](int64_t in, int64_t out, bool int4) {
    Table& t = tables.emplace_back();
    const int64_t g = 32, width = int4 ? 32 : 16, chunks = (out + width - 1) / width;
    t.codes.resize(in / g * chunks * g * 16);
    for (auto& b : t.codes) b = static_cast<uint8_t>(rng());
    t.scales.resize(in / g * out);
    for (auto& s : t.scales) s = _cvtss_sh(0.001f + (rng() % 1000) * 1e-5f, 0);
    if (int4) {
      t.mins.resize(in / g * out);
      for (auto& s : t.mins) s = _cvtss_sh(-0.01f + (rng() % 1000) * 2e-5f, 0);
    }
    t.m = QMatrix{t.codes.data(), t.scales.data(), in, out, g, int4, int4 ? t.mins.data() : nullptr, true, true};
  };
  for (int layer = 0; layer < 30; ++layer) {
    for (auto [in, out] : {std::pair<int64_t, int64_t>{576, 576}, {576, 192}, {576, 192}, {576, 576}, {576, 1536},
                           {576, 1536}, {1536, 576}}) {
      add(in, out, true);
    }
  }
  add(576, 49152, false);
  executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  auto spin = [](int64_t most) {  // 64 ranges of pure arithmetic, on at most `most` threads
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(64, most, [](int64_t begin, int64_t end) {
      volatile double sum = 0;
      for (int64_t i = 0; i < (end - begin) * 2000000; ++i) sum = sum + static_cast<double>(i);
    });
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  const double alone = spin(1), shared = spin(threads);
  std::printf("host: compute loop %.0f ms on 1 thread, %.0f ms on %d (%.2fx)\n", alone, shared, threads, alone / shared);
  std::vector<float> x(tokens * 1536), out(tokens * 49152), first(tokens * 49152);
  for (auto& v : x) v = (rng() % 2000) / 1000.0f - 1;
  std::vector<int8_t> xq(tokens * 1536);
  std::vector<float> xs(tokens * 48);
  std::vector<double> times[3];
  bool same = true;
  for (int p = 0; p < 3 * passes; ++p) {
    const int mode = p % 3;  // 1 thread, 2 threads (qlinear's rule), 2 threads (every product split)
    const auto t0 = std::chrono::steady_clock::now();
    for (auto& t : tables) {
      quantize_groups(x.data(), tokens, t.m.rows, t.m.rows, 32, xq.data(), t.m.rows, xs.data());
      qmatmul_parallel(t.m, xq.data(), t.m.rows, xs.data(), tokens, out.data(), t.m.cols, active_isa(),
                       mode == 0 ? 1 : mode == 1 ? 0 : threads);
    }
    times[mode].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (mode == 0 && p == 0) first = out;  // the head's output, the last product of a pass
    if (mode != 0 && p < 3) same = same && std::memcmp(first.data(), out.data(), 4 * out.size()) == 0;
  }
  const char* names[3] = {"1 thread", "threads (size rule)", "threads (all split)"};
  for (int m = 0; m < 3; ++m) {
    auto& t = times[m];
    std::sort(t.begin(), t.end());
    std::printf("tokens %d, %d %-20s: min %.2f ms  p25 %.2f  median %.2f\n", tokens, m == 0 ? 1 : threads, names[m],
                t[0], t[t.size() / 4], t[t.size() / 2]);
  }
  std::printf("bits equal across modes: %s; path %s\n", same ? "yes" : "NO", isa_name(active_isa()));
  return same ? 0 : 1;
}
