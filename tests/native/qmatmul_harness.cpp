// Runs kernels/qmatmul.h on one problem read from stdin and writes the result to stdout, for tests that check a
// SIMD path this machine cannot run natively (NEON under qemu-aarch64) against the reference.
//   stdin: int64 rows, cols, group, int4, tokens, isa (0 scalar, 1 AVX2, 2 NEON), asymmetric (0 or 1), group scales
//   (0 or 1), tiled (0 or 1); then the codes (rows * cols / (int4 ? 2 : 1) bytes; tiled: rows * ceil(cols / 32) * 16
//   for int4, rows * ceil(cols / 16) * 16 for int8), the float16 scales (rows / group * cols uint16),
//   the float16 mins when asymmetric (as many), xq (tokens * rows int8, rows rounded up to even), xs (tokens float32,
//   times rows / group with group scales)
//   stdout: int64 path used (-1: not compiled in), then out (tokens * cols float32)
// A tiled product is also computed in ranges of 128 columns (the blocks qlinear's threads take, last one first): the
// harness exits with 3 unless that gives the whole product's bits.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "qmatmul.h"

int main() {
  int64_t head[9];
  if (std::fread(head, sizeof(int64_t), 9, stdin) != 9) return 2;
  const int64_t rows = head[0], cols = head[1], group = head[2], int4 = head[3], tokens = head[4], isa = head[5];
  const bool asymmetric = head[6] != 0, group_scales = head[7] != 0, tiled = head[8] != 0;
  const int64_t stride = rows + rows % 2;
  const int64_t chunk = int4 ? 32 : 16;  // tiled: columns per chunk
  std::vector<uint8_t> codes(static_cast<size_t>(tiled ? rows * ((cols + chunk - 1) / chunk) * 16 : rows * cols / (int4 ? 2 : 1)));
  std::vector<uint16_t> scales(static_cast<size_t>(rows / group * cols));
  std::vector<uint16_t> mins(asymmetric ? scales.size() : 0);
  std::vector<int8_t> xq(static_cast<size_t>(tokens * stride));
  std::vector<float> xs(static_cast<size_t>(tokens * (group_scales ? rows / group : 1)));
  std::vector<float> out(static_cast<size_t>(tokens * cols));
  if (std::fread(codes.data(), 1, codes.size(), stdin) != codes.size() ||
      std::fread(scales.data(), 2, scales.size(), stdin) != scales.size() ||
      std::fread(mins.data(), 2, mins.size(), stdin) != mins.size() ||
      std::fread(xq.data(), 1, xq.size(), stdin) != xq.size() || std::fread(xs.data(), 4, xs.size(), stdin) != xs.size()) {
    return 2;
  }
  int64_t used = isa;
  const auto wanted = static_cast<hm_kernels::Isa>(isa);
  if (!hm_kernels::supports(wanted)) used = -1;
  if (used >= 0) {
    const hm_kernels::QMatrix w{codes.data(), scales.data(), rows, cols, group, int4 != 0,
                                asymmetric ? mins.data() : nullptr, group_scales, tiled};
    hm_kernels::qmatmul(w, xq.data(), stride, xs.data(), tokens, out.data(), cols, wanted);
    if (tiled) {
      std::vector<float> ranges(out.size(), NAN);
      for (int64_t c0 = (cols - 1) / 128 * 128; c0 >= 0; c0 -= 128) {
        hm_kernels::qmatmul(w, xq.data(), stride, xs.data(), tokens, ranges.data(), cols, wanted, {c0, c0 + 128});
      }
      if (std::memcmp(ranges.data(), out.data(), 4 * out.size()) != 0) return 3;
    }
  }
  std::fwrite(&used, sizeof(used), 1, stdout);
  std::fwrite(out.data(), 4, out.size(), stdout);
  return 0;
}
