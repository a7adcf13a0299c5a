// hm_export::qlinear.out and hm_export::qembedding.out for the ExecuTorch runtime: the anchor of the
// `8da4w-g32-asym` presets (hm_export/anchor_quant.py), in llama.cpp's grids: asymmetric int4 (Q4_1: w = scale * q
// + min, q in 0..15) or symmetric int8 (Q8_0: w = scale * q), one float16 scale (and min) per group of input rows
// and column.
//
//   codes   uint8 [in / g, ceil(out / 32), g * 16]: int4 q in the tiled layout of qmatmul.h (per group of g input
//           rows and chunk of 32 columns, quads of rows interleaved byte by byte, columns c and c + 16 of a chunk in
//           one byte; g a multiple of 4); or int8 [in / g, ceil(out / 16), g * 16], tiled with chunks of 16
//   scales  float16 [in / g, out]
//   mins    float16 [in / g, out] (int4), or empty [0] (int8)
//
// qlinear: x float32 [..., in] -> out float32 [..., out] = qmatmul(q8(x), W) (qmatmul.h: activations int8 with one
// scale per token and group of g inputs, the weights' groups, as llama.cpp's Q8_1 / Q8_0 activation blocks; each
// group's sums exact in int32, scaled by the weight's and the activation's scale, the min term from the token's
// group sum).
// qembedding: tokens int64 [...] -> out float32 [..., in]: column v of the same table, out[..., i] =
// float(scale[i / g, v]) * q[i, v] (+ float(min[i / g, v]) for int4). A tied embedding and its output head read one table:
// the head is qlinear over [d, V], the lookup is qembedding over the same tensors.
// A table that only lookups read (qembedding's, the screened head's exact table) may instead be stored by column:
// codes int8 [out, in] or uint8 [out, in / 2] (two int4 codes per byte, input 2i in the low nibble), scales and
// mins float16 [out, in / g], so a column is one contiguous run; qlinear takes tiled tables only.
// The reference implementations are in kernels/__init__.py (qlinear_reference, qembedding_reference).
// screened_head: x float32 [..., in] -> out float32 [..., out]: a head read mostly from a small table and exactly
// where it matters. out = qlinear(x, codes, scales, mins) (the screen, e.g. asymmetric int4), then, per token, the
// `top` columns with the largest screen values (ties: the lower column) are recomputed from the exact table
// (exact_codes, exact_scales, exact_mins, e.g. the tied embedding's int8 table) with float activations: out[v] =
// sum_i x[i] * (scale * q (+ min)), summed in double and rounded once. A decode step reads the screen whole and `top`
// columns of the exact table, which a tied embedding's lookup reads anyway.
// qlinear splits its columns over ExecuTorch's threadpool (parallel.h; the threads XNNPACK uses): the same bits for
// any thread count.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "qmatmul.h"

namespace {

using executorch::aten::Half;
using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;
using hm_kernels::QMatrix;

// The table as a QMatrix (rows = in, cols = out), or an error message when shapes or dtypes disagree.
const char* table_matrix(const Tensor& codes, const Tensor& scales, const Tensor& mins, QMatrix& m) {
  const bool int4 = codes.scalar_type() == ScalarType::Byte;
  if ((!int4 && codes.scalar_type() != ScalarType::Char) || codes.dim() != 3) {
    return "codes must be tiled: uint8 [in / group, ceil(out / 32), group * 16] (int4) or int8 [in / group, "
           "ceil(out / 16), group * 16]";
  }
  if (scales.scalar_type() != ScalarType::Half || mins.scalar_type() != ScalarType::Half) {
    return "scales and mins must be float16";
  }
  const int64_t width = int4 ? 32 : 16;
  if (codes.size(0) < 1) return "codes must hold at least one row group";
  if (scales.dim() != 2 || scales.size(0) != codes.size(0) || codes.size(2) % 64 != 0 || codes.size(2) == 0 ||
      codes.size(1) != (scales.size(1) + width - 1) / width) {
    return "codes [in / group, chunks, group * 16] and scales [in / group, out] disagree (group: a multiple of 4)";
  }
  if (int4 && (mins.dim() != 2 || mins.size(0) != scales.size(0) || mins.size(1) != scales.size(1))) {
    return "mins must match scales";
  }
  if (!int4 && mins.numel() != 0) return "int8 codes take no mins (an empty tensor)";
  const int64_t group = codes.size(2) / 16;
  m = QMatrix{codes.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.const_data_ptr<Half>()),
              codes.size(0) * group, scales.size(1), group, int4,
              int4 ? reinterpret_cast<const uint16_t*>(mins.const_data_ptr<Half>()) : nullptr,
              /*group_scales=*/false, /*tiled=*/true};
  return nullptr;
}

// A table read one column at a time: tiled (`w` as qlinear reads it) or by column (`w.codes` [out, in] int8 or
// [out, in / 2] packed int4, `w.scales` / `w.mins` [out, in / group]; `w.tiled` false).
struct LookupTable {
  QMatrix w{};  // rows = in, cols = out
  bool by_column = false;
};

// The table a lookup reads (either layout), or an error message when shapes or dtypes disagree.
const char* lookup_table(const Tensor& codes, const Tensor& scales, const Tensor& mins, LookupTable& t) {
  t.by_column = codes.dim() == 2;
  if (!t.by_column) return table_matrix(codes, scales, mins, t.w);
  const bool int4 = codes.scalar_type() == ScalarType::Byte;
  if (!int4 && codes.scalar_type() != ScalarType::Char) {
    return "codes by column must be int8 [out, in] or uint8 [out, in / 2]";
  }
  if (scales.scalar_type() != ScalarType::Half || mins.scalar_type() != ScalarType::Half) {
    return "scales and mins must be float16";
  }
  const int64_t cols = codes.size(0), rows = codes.size(1) * (int4 ? 2 : 1);
  if (scales.dim() != 2 || scales.size(0) != cols || scales.size(1) < 1 || rows < 1 || rows % scales.size(1) != 0) {
    return "codes by column [out, in] and scales [out, in / group] disagree";
  }
  if (int4 && (mins.dim() != 2 || mins.size(0) != scales.size(0) || mins.size(1) != scales.size(1))) {
    return "mins must match scales";
  }
  if (!int4 && mins.numel() != 0) return "int8 codes take no mins (an empty tensor)";
  t.w = QMatrix{codes.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.const_data_ptr<Half>()),
                rows, cols, rows / scales.size(1), int4,
                int4 ? reinterpret_cast<const uint16_t*>(mins.const_data_ptr<Half>()) : nullptr};
  return nullptr;
}

// `out` resized to `in`'s sizes with the last one replaced by `last` (or appended when `append`).
bool resize_like(const Tensor& in, int64_t last, bool append, Tensor& out) {
  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  const int64_t dims = in.dim();
  if (dims + (append ? 1 : 0) > static_cast<int64_t>(executorch::runtime::kTensorDimensionLimit)) return false;
  for (int64_t k = 0; k < dims; ++k) sizes[k] = static_cast<SizesType>(in.size(k));
  const int64_t out_dims = append ? dims + 1 : dims;
  sizes[out_dims - 1] = static_cast<SizesType>(last);
  return executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(out_dims)}) == Error::Ok;
}

// out [tokens, w.cols] = qmatmul(q8(x), w) for x float32 [tokens, w.rows].
void qlinear_rows(QMatrix w, const float* x, int64_t tokens, float* out) {
  const int64_t pad = w.rows + w.rows % 2;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs;
  xq.resize(tokens * pad);
  xs.resize(tokens * (w.rows / w.group));
  w.group_scales = true;
  hm_kernels::quantize_groups(x, tokens, w.rows, w.rows, w.group, xq.data(), pad, xs.data());
  hm_kernels::qmatmul_parallel(w, xq.data(), pad, xs.data(), tokens, out, w.cols);
}

// Column v of a table, dequantized: column[i] = scale * q (+ min), i in [0, w.rows).
void table_column(const LookupTable& t, int64_t v, float* column) {
  const QMatrix& w = t.w;
  if (t.by_column) {
    const int64_t groups = w.rows / w.group;
    const uint8_t* codes = w.codes + v * (w.int4 ? w.rows / 2 : w.rows);
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = hm_kernels::half_to_float(w.scales[v * groups + g]);
      const float low = w.int4 ? hm_kernels::half_to_float(w.mins[v * groups + g]) : 0.0f;
      for (int64_t i = g * w.group; i < (g + 1) * w.group; ++i) {
        if (w.int4) {
          const uint8_t byte = codes[i / 2];
          column[i] = scale * static_cast<float>(i % 2 ? byte >> 4 : byte & 15) + low;
        } else {
          column[i] = scale * static_cast<float>(static_cast<int8_t>(codes[i]));
        }
      }
    }
    return;
  }
  const int64_t lane = v % w.chunk_width(), at = 4 * (lane % 16);
  const bool high = lane >= 16;
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    const uint8_t* tile = w.tile(g, v / w.chunk_width()) + at;
    const float scale = hm_kernels::half_to_float(w.scales[g * w.cols + v]);
    const float low = w.int4 ? hm_kernels::half_to_float(w.mins[g * w.cols + v]) : 0.0f;
    float* out = column + g * w.group;
    for (int64_t r = 0; r < w.group; ++r) {
      const uint8_t byte = tile[r / 4 * 64 + r % 4];
      if (w.int4) {  // the nibble itself: no offset in the asymmetric grid
        out[r] = scale * static_cast<float>(high ? byte >> 4 : byte & 15) + low;
      } else {
        out[r] = scale * static_cast<float>(static_cast<int8_t>(byte));
      }
    }
  }
}

// The `top` columns of row [cols] with the largest values (larger first, then the lower column), in no order:
// a heap of the columns kept, the last-ranked in front; a later column enters only when strictly larger than it (it
// ranks after an equal one), so almost every value costs one comparison with a register.
void top_columns(const float* row, int64_t cols, int64_t top, std::vector<int32_t>& kept) {
  const auto ranks_before = [row](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); };
  kept.clear();
  int32_t v = 0;
  for (; v < cols && static_cast<int64_t>(kept.size()) < top; ++v) {
    kept.push_back(v);
    std::push_heap(kept.begin(), kept.end(), ranks_before);
  }
  float floor = row[kept.front()];
  for (; v < cols; ++v) {
    if (row[v] > floor) {
      std::pop_heap(kept.begin(), kept.end(), ranks_before);
      kept.back() = v;
      std::push_heap(kept.begin(), kept.end(), ranks_before);
      floor = row[kept.front()];
    }
  }
}

// sum_i a[i] * b[i] in float64 (four partial sums: float64 keeps the order's effect far below float32's last bit),
// rounded once to float32.
float dot_in_double(const float* a, const float* b, int64_t n) {
  double sums[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int k = 0; k < 4; ++k) sums[k] += static_cast<double>(a[i + k]) * static_cast<double>(b[i + k]);
  }
  for (; i < n; ++i) sums[0] += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return static_cast<float>((sums[0] + sums[1]) + (sums[2] + sums[3]));
}

Tensor& qlinear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& scales,
                    const Tensor& mins, Tensor& out) {
  QMatrix w{};
  const char* problem = table_matrix(codes, scales, mins, w);
  ET_KERNEL_CHECK_MSG(ctx, problem == nullptr, InvalidArgument, out, "qlinear: %s", problem);
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && x.dim() >= 1 && x.size(x.dim() - 1) == w.rows,
                      InvalidArgument, out, "qlinear: x must be float32 [..., in]");
  ET_KERNEL_CHECK(ctx, resize_like(x, w.cols, false, out), InvalidArgument, out);
  qlinear_rows(w, x.const_data_ptr<float>(), x.numel() / w.rows, out.mutable_data_ptr<float>());
  return out;
}

Tensor& screened_head_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& scales,
                          const Tensor& mins, const Tensor& exact_codes, const Tensor& exact_scales,
                          const Tensor& exact_mins, int64_t top, Tensor& out) {
  QMatrix screen{};
  LookupTable exact{};
  const char* problem = table_matrix(codes, scales, mins, screen);
  ET_KERNEL_CHECK_MSG(ctx, problem == nullptr, InvalidArgument, out, "screened_head: screen: %s", problem);
  problem = lookup_table(exact_codes, exact_scales, exact_mins, exact);
  ET_KERNEL_CHECK_MSG(ctx, problem == nullptr, InvalidArgument, out, "screened_head: exact table: %s", problem);
  ET_KERNEL_CHECK_MSG(ctx, exact.w.rows == screen.rows && exact.w.cols == screen.cols, InvalidArgument, out,
                      "screened_head: the screen and the exact table must have one shape");
  ET_KERNEL_CHECK_MSG(ctx, top >= 1 && top <= screen.cols, InvalidArgument, out,
                      "screened_head: top must be in [1, out]");
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && x.dim() >= 1 && x.size(x.dim() - 1) == screen.rows,
                      InvalidArgument, out, "screened_head: x must be float32 [..., in]");
  ET_KERNEL_CHECK(ctx, resize_like(x, screen.cols, false, out), InvalidArgument, out);
  const int64_t tokens = x.numel() / screen.rows;
  float* logits = out.mutable_data_ptr<float>();
  qlinear_rows(screen, x.const_data_ptr<float>(), tokens, logits);
  thread_local std::vector<int32_t> kept;
  thread_local std::vector<float> column;
  column.resize(screen.rows);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* h = x.const_data_ptr<float>() + t * screen.rows;
    float* row = logits + t * screen.cols;
    top_columns(row, screen.cols, top, kept);
    for (const int32_t v : kept) {
      table_column(exact, v, column.data());
      row[v] = dot_in_double(h, column.data(), screen.rows);
    }
  }
  return out;
}

Tensor& qembedding_out(KernelRuntimeContext& ctx, const Tensor& tokens, const Tensor& codes, const Tensor& scales,
                       const Tensor& mins, Tensor& out) {
  LookupTable table{};
  const char* problem = lookup_table(codes, scales, mins, table);
  ET_KERNEL_CHECK_MSG(ctx, problem == nullptr, InvalidArgument, out, "qembedding: %s", problem);
  ET_KERNEL_CHECK_MSG(ctx, tokens.scalar_type() == ScalarType::Long, InvalidArgument, out,
                      "qembedding: tokens must be int64");
  const QMatrix& w = table.w;
  ET_KERNEL_CHECK(ctx, resize_like(tokens, w.rows, true, out), InvalidArgument, out);
  const int64_t* ids = tokens.const_data_ptr<int64_t>();
  float* o = out.mutable_data_ptr<float>();
  for (int64_t t = 0; t < tokens.numel(); ++t) {
    const int64_t v = ids[t];
    ET_KERNEL_CHECK_MSG(ctx, v >= 0 && v < w.cols, InvalidArgument, out, "qembedding: token %lld outside [0, %lld)",
                        static_cast<long long>(v), static_cast<long long>(w.cols));
    table_column(table, v, o + t * w.rows);
  }
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(hm_export, "qlinear.out", qlinear_out);
EXECUTORCH_LIBRARY(hm_export, "qembedding.out", qembedding_out);
EXECUTORCH_LIBRARY(hm_export, "screened_head.out", screened_head_out);

