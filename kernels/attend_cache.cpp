// hm_export::attend_cache.out for the ExecuTorch runtime: one attention layer of a KV-cache decode step or
// prefill. Writes this call's keys/values into the static cache at positions input_pos .. input_pos + S - 1,
// then attends every query only over the filled positions it may see (causal, optionally a sliding window),
// reading the cache in place: no mask tensor, no repeat of K/V for grouped heads, nothing past the last
// written position is touched.
//
//   q        float32 [1, Hq, S, D]    (after RoPE)
//   k, v     float32 [1, Hkv, S, D]   (k after RoPE)
//   k_cache, v_cache float16 or float32 [Hkv, L, D], both the same (mutated; the decode program's state buffers);
//                    a float16 cache stores k, v rounded to nearest even and is read back exactly
//   input_pos int64 [1]
//   scale    softmax scale;  window: keys with position > query position - window (0: no window)
//   out      float32 [1, S, Hq, D]
// Query head h reads KV head h / (Hq / Hkv). The reference implementation is in kernels/__init__.py.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

using executorch::aten::Half;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

// Scores, softmax and weighted sum of values for the `group` query rows q[g] (stride q_stride) that share one
// KV head, over its keys [lo, hi]; out[g] (stride out_stride) gets each row's result. `scores` holds
// group * (hi - lo + 1) floats; the cache rows are `T` (float or Half). The portable version; attend_group_avx2
// below computes the same on x86.
template <typename T>
void attend_group(const float* q, int64_t q_stride, int64_t group, const T* keys, const T* values, int64_t lo,
                  int64_t hi, int64_t dim, float scale, float* scores, float* out, int64_t out_stride) {
  const int64_t count = hi - lo + 1;
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * q_stride;
    float* sg = scores + g * count;
    float top = -INFINITY;
    for (int64_t j = 0; j < count; ++j) {
      const T* k = keys + (lo + j) * dim;
      float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // 8 partial sums: vectorizable
      int64_t e = 0;
      for (; e + 8 <= dim; e += 8) {
        for (int l = 0; l < 8; ++l) lanes[l] += qg[e + l] * static_cast<float>(k[e + l]);
      }
      float dot = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
      for (; e < dim; ++e) dot += qg[e] * static_cast<float>(k[e]);
      sg[j] = dot * scale;
      top = std::max(top, sg[j]);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < count; ++j) {
      sg[j] = std::exp(sg[j] - top);
      total += sg[j];
    }
    float* o = out + g * out_stride;
    std::fill(o, o + dim, 0.0f);
    for (int64_t j = 0; j < count; ++j) {
      const float weight = sg[j] / total;
      const T* v = values + (lo + j) * dim;
      for (int64_t e = 0; e < dim; ++e) o[e] += weight * static_cast<float>(v[e]);
    }
  }
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define HM_AVX2_FMA __attribute__((target("avx2,fma,f16c")))

HM_AVX2_FMA inline float hsum(__m256 v) {
  const __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
  return _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)));
}

// exp(x) for x <= 0 (softmax arguments), 8 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial
// (relative error ~2e-7); below -87 the result is 0.
HM_AVX2_FMA inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// 8 cache values from `row` as floats (a float16 cache converts exactly).
HM_AVX2_FMA inline __m256 load8(const float* row) { return _mm256_loadu_ps(row); }
HM_AVX2_FMA inline __m256 load8(const Half* row) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
}

// Key rows this far ahead of the one being read are prefetched: each KV head's keys (and values) are a short
// stream of `count` rows that the hardware prefetcher only catches up with near its end.
constexpr int64_t kAttendPrefetchRows = 8;

// attend_group on x86 for G query rows per KV head (dim a multiple of 8): each key row is loaded once for the whole
// group, the exponentials are vectorized, and the value rows are accumulated with FMAs in 32-column blocks whose
// accumulators stay in registers (G is a template argument for the same reason). Keys are prefetched a few rows
// ahead and the values while the scores are computed, so the value pass reads them from cache.
template <int G, typename T>
HM_AVX2_FMA void attend_group_avx2(const float* q, int64_t q_stride, const T* keys, const T* values,
                                   int64_t lo, int64_t hi, int64_t dim, float scale, float* scores, float* out,
                                   int64_t out_stride) {
  const int64_t count = hi - lo + 1;
  float top[G];
  for (int g = 0; g < G; ++g) top[g] = -INFINITY;
  for (int64_t j = 0; j < count; ++j) {
    const T* k = keys + (lo + j) * dim;
    // An address, not a pointer: it may lie past the cache, where a prefetch is a no-op.
    const uintptr_t k_ahead = reinterpret_cast<uintptr_t>(k + dim) + (kAttendPrefetchRows - 1) * dim * sizeof(T);
    const T* v_row = values + (lo + j) * dim;
    for (int64_t e = 0; e < dim; e += 64 / sizeof(T)) {  // one prefetch per 64-byte line
      _mm_prefetch(reinterpret_cast<const char*>(k_ahead + e * sizeof(T)), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v_row + e), _MM_HINT_T1);
    }
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t e = 0; e < dim; e += 8) {
      const __m256 kv = load8(k + e);
      for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * q_stride + e), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) {
      const float score = hsum(acc[g]) * scale;
      scores[g * count + j] = score;
      top[g] = std::max(top[g], score);
    }
  }
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * count;
    const __m256 shift = _mm256_set1_ps(top[g]);
    __m256 sum8 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= count; j += 8) {
      const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sg + j), shift));
      _mm256_storeu_ps(sg + j, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    float total = hsum(sum8);
    for (; j < count; ++j) {
      sg[j] = std::exp(sg[j] - top[g]);
      total += sg[j];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (j = 0; j + 8 <= count; j += 8) _mm256_storeu_ps(sg + j, _mm256_mul_ps(_mm256_loadu_ps(sg + j), inv));
    for (; j < count; ++j) sg[j] /= total;
  }
  int64_t e0 = 0;
  for (; e0 + 32 <= dim; e0 += 32) {  // 32 columns of one row: four accumulators in registers
    for (int g = 0; g < G; ++g) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      const float* sg = scores + g * count;
      const T* v = values + lo * dim + e0;
      for (int64_t j = 0; j < count; ++j, v += dim) {
        const __m256 w = _mm256_set1_ps(sg[j]);
        for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(w, load8(v + 8 * c), acc[c]);
      }
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + g * out_stride + e0 + 8 * c, acc[c]);
    }
  }
  for (; e0 < dim; e0 += 8) {  // the last 8, 16 or 24 columns
    for (int g = 0; g < G; ++g) {
      __m256 acc = _mm256_setzero_ps();
      const float* sg = scores + g * count;
      const T* v = values + lo * dim + e0;
      for (int64_t j = 0; j < count; ++j, v += dim) acc = _mm256_fmadd_ps(_mm256_set1_ps(sg[j]), load8(v), acc);
      _mm256_storeu_ps(out + g * out_stride + e0, acc);
    }
  }
}

// attend_group_avx2 for a run-time group of 1..8 rows.
template <typename T>
using AttendGroupAvx2 = void (*)(const float*, int64_t, const T*, const T*, int64_t, int64_t, int64_t, float, float*,
                                 float*, int64_t);
template <typename T>
constexpr AttendGroupAvx2<T> kAttendGroupAvx2[8] = {
    attend_group_avx2<1, T>, attend_group_avx2<2, T>, attend_group_avx2<3, T>, attend_group_avx2<4, T>,
    attend_group_avx2<5, T>, attend_group_avx2<6, T>, attend_group_avx2<7, T>, attend_group_avx2<8, T>};

bool use_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// Writes this call's rows into the caches (of `T`), then attends; the arguments are checked by attend_cache_out.
template <typename T>
void attend(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache, int64_t pos,
            float scale, int64_t window, Tensor& out) {
  const int64_t heads = q.size(1), seq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), length = k_cache.size(1);
  T* keys = k_cache.mutable_data_ptr<T>();
  T* values = v_cache.mutable_data_ptr<T>();
  const float* k_new = k.const_data_ptr<float>();
  const float* v_new = v.const_data_ptr<float>();
  for (int64_t h = 0; h < kv_heads; ++h) {  // write this call's rows: [h, pos + s, :]
    T* k_rows = keys + (h * length + pos) * dim;
    T* v_rows = values + (h * length + pos) * dim;
    for (int64_t e = 0; e < seq * dim; ++e) {  // a float16 cache: rounded to nearest even, as torch's .half()
      k_rows[e] = static_cast<T>(k_new[h * seq * dim + e]);
      v_rows[e] = static_cast<T>(v_new[h * seq * dim + e]);
    }
  }
  const int64_t group = heads / kv_heads;
  thread_local std::vector<float> scores;
  scores.resize(static_cast<size_t>(group * (pos + seq)));
  const float* query = q.const_data_ptr<float>();
  float* result = out.mutable_data_ptr<float>();
  for (int64_t kv = 0; kv < kv_heads; ++kv) {
    for (int64_t s = 0; s < seq; ++s) {
      const int64_t hi = pos + s;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, hi - window + 1) : 0;
      // The group's query rows: heads kv * group .. (kv + 1) * group - 1 at position s (q is [1, Hq, S, D]).
      const float* rows = query + (kv * group * seq + s) * dim;
      float* outs = result + (s * heads + kv * group) * dim;
      const T* k_head = keys + kv * length * dim;
      const T* v_head = values + kv * length * dim;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
      if (use_avx2() && dim % 8 == 0 && group <= 8) {
        kAttendGroupAvx2<T>[group - 1](rows, seq * dim, k_head, v_head, lo, hi, dim, scale, scores.data(), outs, dim);
        continue;
      }
#endif
      attend_group(rows, seq * dim, group, k_head, v_head, lo, hi, dim, scale, scores.data(), outs, dim);
    }
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
                      v.scalar_type() == ScalarType::Float;
  const bool caches = (k_cache.scalar_type() == ScalarType::Float || k_cache.scalar_type() == ScalarType::Half) &&
                      v_cache.scalar_type() == k_cache.scalar_type();
  ET_KERNEL_CHECK_MSG(ctx, floats && caches, InvalidArgument, out,
                      "attend_cache: q, k, v must be float32, the caches both float16 or both float32");
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

  if (k_cache.scalar_type() == ScalarType::Half) {
    attend<Half>(q, k, v, k_cache, v_cache, pos, static_cast<float>(scale), window, out);
  } else {
    attend<float>(q, k, v, k_cache, v_cache, pos, static_cast<float>(scale), window, out);
  }
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(hm_export, "attend_cache.out", attend_cache_out);
