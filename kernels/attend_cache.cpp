// hm_export::attend_cache.out for the ExecuTorch runtime: one attention layer of a KV-cache decode step or
// prefill. Writes this call's keys/values into the static cache at positions input_pos .. input_pos + S - 1,
// then attends every query only over the filled positions it may see (causal, optionally a sliding window),
// reading the cache in place: no mask tensor, no repeat of K/V for grouped heads, nothing past the last
// written position is touched.
//
//   q        float32 [1, Hq, S, D]    (after RoPE)
//   k, v     float32 [1, Hkv, S, D]   (k after RoPE)
//   k_cache, v_cache float32 [Hkv, L, D] (mutated; the decode program's state buffers)
//   input_pos int64 [1]
//   scale    softmax scale;  window: keys with position > query position - window (0: no window)
//   out      float32 [1, S, Hq, D]
// Query head h reads KV head h / (Hq / Hkv). The reference implementation is in kernels/__init__.py.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// One query row against keys [lo, hi] of one KV head: softmax(scale * q.k) . v into out (D floats).
HM_CLONES void attend_row(const float* q, const float* keys, const float* values, int64_t lo, int64_t hi, int64_t dim,
                          float scale, float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t j = lo; j <= hi; ++j) {
    const float* k = keys + j * dim;
    float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // 8 partial sums: vectorizable
    int64_t e = 0;
    for (; e + 8 <= dim; e += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += q[e + l] * k[e + l];
    }
    float dot = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (; e < dim; ++e) dot += q[e] * k[e];
    scores[j - lo] = dot * scale;
    top = std::max(top, scores[j - lo]);
  }
  float total = 0.0f;
  for (int64_t j = lo; j <= hi; ++j) {
    scores[j - lo] = std::exp(scores[j - lo] - top);
    total += scores[j - lo];
  }
  std::fill(out, out + dim, 0.0f);
  for (int64_t j = lo; j <= hi; ++j) {
    const float weight = scores[j - lo] / total;
    const float* v = values + j * dim;
    for (int64_t e = 0; e < dim; ++e) out[e] += weight * v[e];
  }
}

Tensor& attend_cache_out(
    KernelRuntimeContext& ctx,
    const Tensor& q,
    const Tensor& k,
    const Tensor& v,
    Tensor& k_cache,
    Tensor& v_cache,
    const Tensor& input_pos,
    double scale,
    int64_t window,
    Tensor& out) {
  const bool floats = q.scalar_type() == ScalarType::Float && k.scalar_type() == ScalarType::Float &&
                      v.scalar_type() == ScalarType::Float && k_cache.scalar_type() == ScalarType::Float &&
                      v_cache.scalar_type() == ScalarType::Float;
  ET_KERNEL_CHECK_MSG(ctx, floats, InvalidArgument, out, "attend_cache: q, k, v and the caches must be float32");
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k_cache.dim() == 3 && v_cache.dim() == 3,
                      InvalidArgument, out, "attend_cache: q, k, v must be [1, H, S, D], the caches [Hkv, L, D]");
  const int64_t heads = q.size(1), seq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), length = k_cache.size(1);
  const bool shapes = q.size(0) == 1 && k.size(0) == 1 && v.size(0) == 1 && k.size(2) == seq && k.size(3) == dim &&
                      v.size(1) == kv_heads && v.size(2) == seq && v.size(3) == dim && kv_heads > 0 &&
                      heads % kv_heads == 0 && k_cache.size(0) == kv_heads && k_cache.size(2) == dim &&
                      v_cache.size(0) == kv_heads && v_cache.size(1) == length && v_cache.size(2) == dim;
  ET_KERNEL_CHECK_MSG(ctx, shapes, InvalidArgument, out, "attend_cache: q, k, v and cache shapes disagree");
  ET_KERNEL_CHECK_MSG(ctx, input_pos.scalar_type() == ScalarType::Long && input_pos.numel() == 1, InvalidArgument,
                      out, "attend_cache: input_pos must be int64 [1]");
  const int64_t pos = input_pos.const_data_ptr<int64_t>()[0];
  ET_KERNEL_CHECK_MSG(ctx, pos >= 0 && pos + seq <= length, InvalidArgument, out,
                      "attend_cache: positions %lld .. %lld are outside the cache of %lld", static_cast<long long>(pos),
                      static_cast<long long>(pos + seq - 1), static_cast<long long>(length));
  const executorch::aten::SizesType sizes[4] = {1, static_cast<executorch::aten::SizesType>(seq),
                                                static_cast<executorch::aten::SizesType>(heads),
                                                static_cast<executorch::aten::SizesType>(dim)};
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, {sizes, 4}) == Error::Ok, InvalidArgument, out);

  float* keys = k_cache.mutable_data_ptr<float>();
  float* values = v_cache.mutable_data_ptr<float>();
  for (int64_t h = 0; h < kv_heads; ++h) {  // write this call's rows: [h, pos + s, :]
    std::memcpy(keys + (h * length + pos) * dim, k.const_data_ptr<float>() + h * seq * dim, sizeof(float) * seq * dim);
    std::memcpy(values + (h * length + pos) * dim, v.const_data_ptr<float>() + h * seq * dim,
                sizeof(float) * seq * dim);
  }
  thread_local std::vector<float> scores;
  scores.resize(static_cast<size_t>(pos + seq));
  const int64_t group = heads / kv_heads;
  const float* query = q.const_data_ptr<float>();
  float* result = out.mutable_data_ptr<float>();
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t kv = h / group;
    for (int64_t s = 0; s < seq; ++s) {
      const int64_t hi = pos + s;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, hi - window + 1) : 0;
      attend_row(query + (h * seq + s) * dim, keys + kv * length * dim, values + kv * length * dim, lo, hi, dim,
                 static_cast<float>(scale), scores.data(), result + (s * heads + h) * dim);
    }
  }
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(hm_export, "attend_cache.out", attend_cache_out);
