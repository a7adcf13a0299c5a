// hm_export::tied_head.out for the ExecuTorch runtime: the output head of a model whose head is tied to its
// token embedding, reading the embedding's own float32 table, so the program stores that table once (an
// XNNPACK linear would keep a second, packed copy of it inside the delegate).
//
//   h       float32 [B, T, d]
//   weight  float32 [V, d]   (the embedding table: row v is token v's embedding and the head's output row v)
//   out     float32 [B, T, V] = h @ weight^T
//
// Row v is read once per call and applied to every token (a decode step streams the table once, like a GEMV).
// The reference implementation is in kernels/__init__.py.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>

#include <cstdint>

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define HM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HM_CLONES
#endif

// out[t * vocab + v] = dot(h[t], weight[v]) for rows v in [v0, v1), with 8 partial sums (vectorizable).
HM_CLONES void head_rows(const float* h, int64_t tokens, const float* weight, int64_t dim, int64_t vocab, int64_t v0,
                         int64_t v1, float* out) {
  for (int64_t v = v0; v < v1; ++v) {
    const float* row = weight + v * dim;
    for (int64_t t = 0; t < tokens; ++t) {
      const float* x = h + t * dim;
      float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      int64_t e = 0;
      for (; e + 8 <= dim; e += 8) {
        for (int l = 0; l < 8; ++l) lanes[l] += x[e + l] * row[e + l];
      }
      float dot = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
      for (; e < dim; ++e) dot += x[e] * row[e];
      out[t * vocab + v] = dot;
    }
  }
}

Tensor& tied_head_out(KernelRuntimeContext& ctx, const Tensor& h, const Tensor& weight, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, h.scalar_type() == ScalarType::Float && weight.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "tied_head: h and weight must be float32");
  ET_KERNEL_CHECK_MSG(ctx, h.dim() == 3 && weight.dim() == 2 && h.size(2) == weight.size(1), InvalidArgument, out,
                      "tied_head: h must be [B, T, d] and weight [V, d]");
  const int64_t tokens = h.size(0) * h.size(1), dim = h.size(2), vocab = weight.size(0);
  const executorch::aten::SizesType sizes[3] = {static_cast<executorch::aten::SizesType>(h.size(0)),
                                                static_cast<executorch::aten::SizesType>(h.size(1)),
                                                static_cast<executorch::aten::SizesType>(vocab)};
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, {sizes, 3}) == Error::Ok, InvalidArgument, out);
  // Blocks of 64 rows: each block's rows stay in cache while every token reads them.
  for (int64_t v0 = 0; v0 < vocab; v0 += 64) {
    const int64_t v1 = v0 + 64 < vocab ? v0 + 64 : vocab;
    head_rows(h.const_data_ptr<float>(), tokens, weight.const_data_ptr<float>(), dim, vocab, v0, v1,
              out.mutable_data_ptr<float>());
  }
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(hm_export, "tied_head.out", tied_head_out);
