// hm_export::memory_swiglu.out for the ExecuTorch runtime: the memory SwiGLU of one memory layer with the
// slot held quantized, read directly from its codes (no float copy of the block is ever materialised).
//
//   hidden = qmatmul(q8(x), gate_up);  h = silu(hidden[:, :R]) * hidden[:, R:];  out = qmatmul(q8(h), down)
//
// q8 quantizes activations per token to int8 (symmetric, scale max|x| / 127); qmatmul (qmatmul.h) sums each
// scale group exactly in int32 and applies the float16 scales per group and column. Layouts (kernels/__init__.py
// holds the reference implementation, which computes the same sums):
//   x            float32 [B, T, d]
//   gate_up      int8 [1, d, 2R] codes, or uint8 [1, d, R]: int4 codes + 8, columns 2c (low nibble) and
//                2c + 1 (high nibble) in one byte
//   gate_up_scales float16 [1, d / g_gu, 2R]: one scale per g_gu consecutive rows of a column
//   down         int8 [1, R, d], or uint8 [1, R, d / 2] (int4 as above)
//   down_scales  float16 [1, R / g_d, d]

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "qmatmul.h"

namespace {

using executorch::aten::Half;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;
using hm_kernels::QMatrix;

// The codes/scales pair as a QMatrix, or an error message when shapes or dtypes disagree.
const char* make_matrix(const Tensor& codes, const Tensor& scales, int64_t rows, int64_t cols, QMatrix& m) {
  const bool int4 = codes.scalar_type() == ScalarType::Byte;
  if (!int4 && codes.scalar_type() != ScalarType::Char) return "codes must be int8 or uint8 (packed int4)";
  if (scales.scalar_type() != ScalarType::Half) return "scales must be float16";
  if (codes.dim() != 3 || scales.dim() != 3 || codes.size(0) != 1 || scales.size(0) != 1) {
    return "codes and scales must be [1, rows, cols]";
  }
  if (codes.size(1) != rows || codes.size(2) != (int4 ? cols / 2 : cols)) return "codes shape does not match x";
  if (scales.size(2) != cols || scales.size(1) < 1 || rows % scales.size(1) != 0) {
    return "scales must be [1, rows / group, cols]";
  }
  m = QMatrix{codes.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.const_data_ptr<Half>()),
              rows, cols, rows / scales.size(1), int4};
  return nullptr;
}

Tensor& memory_swiglu_out(
    KernelRuntimeContext& ctx,
    const Tensor& x,
    const Tensor& gate_up,
    const Tensor& gate_up_scales,
    const Tensor& down,
    const Tensor& down_scales,
    Tensor& out) {
  ET_KERNEL_CHECK_MSG(
      ctx, x.scalar_type() == ScalarType::Float && x.dim() == 3, InvalidArgument, out, "x must be float32 [B, T, d]");
  const int64_t d = x.size(2);
  const int64_t width = down.size(1);  // R
  QMatrix gu{}, dn{};
  const char* problem = make_matrix(gate_up, gate_up_scales, d, 2 * width, gu);
  ET_KERNEL_CHECK_MSG(ctx, problem == nullptr, InvalidArgument, out, "gate_up: %s", problem);
  problem = make_matrix(down, down_scales, width, d, dn);
  ET_KERNEL_CHECK_MSG(ctx, problem == nullptr, InvalidArgument, out, "down: %s", problem);
  ET_KERNEL_CHECK_MSG(ctx, gu.int4 == dn.int4 && (!gu.int4 || (width % 2 == 0 && d % 2 == 0)), InvalidArgument, out,
                      "gate_up and down must both be int8 or both int4 (even widths)");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument, out);

  const int64_t tokens = x.size(0) * x.size(1);
  const int64_t d_pad = d + d % 2, r_pad = width + width % 2;
  // Per-thread scratch reused across calls: quantized activations, their scales, hidden [T, 2R], h [T, R].
  thread_local std::vector<int8_t> xq, hq;
  thread_local std::vector<float> xs, hs, hidden, h;
  xq.resize(tokens * d_pad);
  hq.resize(tokens * r_pad);
  xs.resize(tokens);
  hs.resize(tokens);
  hidden.resize(tokens * 2 * width);
  h.resize(tokens * width);
  hm_kernels::quantize_rows(x.const_data_ptr<float>(), tokens, d, d, xq.data(), d_pad, xs.data());
  hm_kernels::qmatmul(gu, xq.data(), d_pad, xs.data(), tokens, hidden.data(), 2 * width);
  for (int64_t t = 0; t < tokens; ++t) {  // h = silu(gate) * up
    const float* hid = hidden.data() + t * 2 * width;
    float* row = h.data() + t * width;
    for (int64_t r = 0; r < width; ++r) {
      const float g = hid[r];
      row[r] = g / (1.0f + std::exp(-g)) * hid[width + r];
    }
  }
  hm_kernels::quantize_rows(h.data(), tokens, width, width, hq.data(), r_pad, hs.data());
  hm_kernels::qmatmul(dn, hq.data(), r_pad, hs.data(), tokens, out.mutable_data_ptr<float>(), d);
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(hm_export, "memory_swiglu.out", memory_swiglu_out);

// For tests (ctypes): one quantized matrix product on a chosen path (0 scalar, 1 AVX2, 2 NEON, 3 AVX-512, 4 AVX-512
// VNNI); `mins` null, or the float16 mins of asymmetric int4 (qmatmul.h); `tiled`: int4 or int8 codes in the tiled
// layout (a group of a multiple of 4 rows); xq in -127..127, as the quantizers write it; `group_scales`: xs holds
// one scale per token and row group; `split`: a tiled product's columns split over every thread of ExecuTorch's
// threadpool whatever the product's size (parallel.h), else computed on the caller; returns the path used,
// -1 when the requested one is not compiled in or not supported here (or the tiled group is not a multiple of 4).
extern "C" int hm_kernels_qmatmul(const uint8_t* codes, const uint16_t* scales, const uint16_t* mins, int64_t rows,
                                  int64_t cols, int64_t group, int int4, int tiled, const int8_t* xq,
                                  int64_t xq_stride, const float* xs, int group_scales, int64_t tokens, float* out,
                                  int isa, int split) {
  const auto wanted = static_cast<hm_kernels::Isa>(isa);
  if (!hm_kernels::supports(wanted) || (tiled != 0 && group % 4 != 0)) return -1;
  const QMatrix w{codes, scales, rows, cols, group, int4 != 0, mins, group_scales != 0, tiled != 0};
  if (split != 0) {
    hm_kernels::qmatmul_parallel(w, xq, xq_stride, xs, tokens, out, cols, wanted, hm_kernels::pool_threads());
  } else {
    hm_kernels::qmatmul(w, xq, xq_stride, xs, tokens, out, cols, wanted);
  }
  return isa;
}

// The path memory_swiglu runs on this CPU (HM_KERNELS_ISA=scalar forces the scalar one).
extern "C" const char* hm_kernels_isa() { return hm_kernels::isa_name(hm_kernels::active_isa()); }
