// hm_export::memory_swiglu.out for the ExecuTorch runtime: the memory SwiGLU of one memory layer with the
// slot held quantized, dequantized inside the matmul (no float copy of the block is ever materialised).
//
//   out[t] = (silu(x[t] @ Wg) * (x[t] @ Wu)) @ Wd,  [Wg | Wu] = dequant(gate_up), Wd = dequant(down)
//
// Layouts (see kernels/__init__.py, the reference implementation):
//   x            float32 [B, T, d]
//   gate_up      int8 [1, d, 2R] codes, or uint8 [1, d, R]: int4 codes + 8, columns 2c (low nibble) and
//                2c + 1 (high nibble) in one byte
//   gate_up_scales float16 [1, d / g_gu, 2R]: one scale per g_gu consecutive rows of a column
//   down         int8 [1, R, d], or uint8 [1, R, d / 2] (int4 as above)
//   down_scales  float16 [1, R / g_d, d]
// Rows are the reduction axis: each row is dequantized once per call into a float buffer and applied to
// every token (a rank-1 update), so decode (T = 1) and prefill share one loop.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using executorch::aten::Half;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

// One quantized [rows, cols] matrix: its codes, scales and group size.
struct QuantMatrix {
  const void* codes;
  const Half* scales;
  int64_t rows;
  int64_t cols;
  int64_t group;
  bool int4;

  // The float scales of row group `g` (converted once per group, not once per element).
  void group_scales(int64_t g, float* scale) const {
    const Half* half = scales + g * cols;
    for (int64_t c = 0; c < cols; ++c) scale[c] = static_cast<float>(half[c]);
  }

  // Row `i` as floats: code * scale.
  void dequantize_row(int64_t i, const float* scale, float* row) const {
    if (int4) {
      const uint8_t* bytes = static_cast<const uint8_t*>(codes) + i * (cols / 2);
      for (int64_t b = 0; b < cols / 2; ++b) {
        row[2 * b] = static_cast<float>(static_cast<int>(bytes[b] & 15) - 8) * scale[2 * b];
        row[2 * b + 1] = static_cast<float>(static_cast<int>(bytes[b] >> 4) - 8) * scale[2 * b + 1];
      }
    } else {
      const int8_t* values = static_cast<const int8_t*>(codes) + i * cols;
      for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<float>(values[c]) * scale[c];
    }
  }

  // out[t, :] += in[t * in_stride + i] * W[i, :] over all rows i, for `tokens` tokens (out stride `cols`).
  // `scratch` holds 2 * cols floats: the group's scales and one dequantized row.
  void accumulate(const float* in, int64_t in_stride, float* out, int64_t tokens, float* scratch) const {
    float* scale = scratch;
    float* row = scratch + cols;
    for (int64_t i = 0; i < rows; ++i) {
      if (i % group == 0) group_scales(i / group, scale);
      dequantize_row(i, scale, row);
      for (int64_t t = 0; t < tokens; ++t) {
        const float a = in[t * in_stride + i];
        float* o = out + t * cols;
        for (int64_t c = 0; c < cols; ++c) o[c] += a * row[c];
      }
    }
  }
};

// The codes/scales pair as a QuantMatrix, or an error message when shapes or dtypes disagree.
const char* make_matrix(const Tensor& codes, const Tensor& scales, int64_t rows, int64_t cols, QuantMatrix& m) {
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
  m = QuantMatrix{codes.const_data_ptr(), scales.const_data_ptr<Half>(), rows, cols, rows / scales.size(1), int4};
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
  QuantMatrix gu{}, dn{};
  const char* problem = make_matrix(gate_up, gate_up_scales, d, 2 * width, gu);
  ET_KERNEL_CHECK_MSG(ctx, problem == nullptr, InvalidArgument, out, "gate_up: %s", problem);
  problem = make_matrix(down, down_scales, width, d, dn);
  ET_KERNEL_CHECK_MSG(ctx, problem == nullptr, InvalidArgument, out, "down: %s", problem);
  ET_KERNEL_CHECK_MSG(ctx, gu.int4 == dn.int4 && (!gu.int4 || (width % 2 == 0 && d % 2 == 0)), InvalidArgument, out,
                      "gate_up and down must both be int8 or both int4 (even widths)");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument, out);

  const int64_t tokens = x.size(0) * x.size(1);
  // Per-thread scratch reused across calls: hidden [T, 2R], and scales + one row of the wider matrix.
  thread_local std::vector<float> hidden, scratch;
  hidden.assign(tokens * 2 * width, 0.0f);
  scratch.resize(2 * (2 * width > d ? 2 * width : d));
  gu.accumulate(x.const_data_ptr<float>(), d, hidden.data(), tokens, scratch.data());
  for (int64_t t = 0; t < tokens; ++t) {  // h = silu(gate) * up, written over the gate half
    float* hid = hidden.data() + t * 2 * width;
    for (int64_t r = 0; r < width; ++r) {
      const float g = hid[r];
      hid[r] = g / (1.0f + std::exp(-g)) * hid[width + r];
    }
  }
  float* result = out.mutable_data_ptr<float>();
  std::fill(result, result + tokens * d, 0.0f);
  dn.accumulate(hidden.data(), 2 * width, result, tokens, scratch.data());  // reads h at stride 2R
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(hm_export, "memory_swiglu.out", memory_swiglu_out);
