// Quantized matrix products of the hm-export kernels: int8 activations (one symmetric scale per token) times
// int4 / int8 weights whose rows are the reduction axis, with float16 scales per group of rows and column.
// No ExecuTorch dependency: the ops in memory_swiglu.cpp call these, and so can a test harness.
//
//   W [rows, cols]: int4 codes + 8 packed two columns per byte (column 2c in the low nibble, 2c + 1 in the
//                   high nibble), or int8 codes; scales float16 [rows / group, cols]
//   x [tokens, rows] float32 -> xq int8, xs float32 per token: xs = max|x| / 127, xq = round(x * (127 / max|x|));
//   or (QMatrix::group_scales, quantize_groups) one such scale per token and group of rows: xs [tokens, rows / group]
//   out[t, c] = sum over row groups g, in order, of float(sum_{i in g} xq[t, i] * code[i, c]) * (scale[g, c] * xs[t])
//
// Asymmetric int4 (``mins`` set, llama.cpp's Q4_1 grid: w = scale * q + min, q = the nibble in 0..15, one float16
// scale and one float16 min per group and column): per group the term is
//   float(sum_{i in g} xq[t, i] * q[i, c]) * (scale[g, c] * xs[t]) + min[g, c] * (xs[t] * float(sum_{i in g} xq[t, i]))
// (the min's integer factor, the token's group sum, is computed once per token and group), then out = out + term.
// With QMatrix::group_scales, xs[t] above is the token's scale for group g (activations quantized per group).
//
// Every path (scalar, AVX2, AVX-512, NEON) accumulates each group exactly in int32 and then adds the group's float
// term with one multiply and one add (no fused multiply-add), in the same order: all paths give the same
// bits. The SIMD paths unpack a tile of (two rows x 32 columns) once and apply it to every token, so a
// prefill of T tokens unpacks the matrix once, not T times.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HM_KERNELS_X86 1
#endif
#if defined(__ARM_NEON) || defined(__ARM_NEON__)
#include <arm_neon.h>
#define HM_KERNELS_NEON 1
#endif

namespace hm_kernels {

// IEEE half -> float (exact), for the scalar path and the scale conversion of every path.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int shift = 0;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        ++shift;
      }
      bits = sign | static_cast<uint32_t>(113 - shift) << 23 | (mantissa & 0x3ffu) << 13;
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | mantissa << 13;
  } else {
    bits = sign | (exponent + 112) << 23 | mantissa << 13;
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

enum class Isa { Scalar = 0, Avx2 = 1, Neon = 2, Avx512 = 3, Avx512Vnni = 4 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx2:
      return "avx2";
    case Isa::Neon:
      return "neon";
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx512Vnni:
      return "avx512vnni";
    default:
      return "scalar";
  }
}

// The best path this CPU supports.
inline Isa best_isa() {
#if defined(HM_KERNELS_X86) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c")) {
    return __builtin_cpu_supports("avx512vnni") ? Isa::Avx512Vnni : Isa::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::Avx2;
#endif
#if defined(HM_KERNELS_NEON)
  return Isa::Neon;
#endif
  return Isa::Scalar;
}

// Whether this CPU runs path `isa` (AVX-512 machines also run the AVX2 path, VNNI ones the plain AVX-512 path).
inline bool supports(Isa isa) {
  const Isa best = best_isa();
  if (isa == Isa::Scalar || isa == best) return true;
  if (isa == Isa::Avx2) return best == Isa::Avx512 || best == Isa::Avx512Vnni;
  return isa == Isa::Avx512 && best == Isa::Avx512Vnni;
}

// The path the ops run: the best one, unless HM_KERNELS_ISA names another this CPU supports ("scalar" forces the
// portable loop, "avx2" the 256-bit path on an AVX-512 machine); read once.
inline Isa active_isa() {
  static const Isa isa = [] {
    const char* forced = std::getenv("HM_KERNELS_ISA");
    if (forced != nullptr) {
      for (Isa candidate : {Isa::Scalar, Isa::Avx2, Isa::Neon, Isa::Avx512, Isa::Avx512Vnni}) {
        if (std::strcmp(forced, isa_name(candidate)) == 0 && supports(candidate)) return candidate;
      }
    }
    return best_isa();
  }();
  return isa;
}

// Per-token symmetric int8 quantization of x [tokens, n] (row stride `stride`): returns scales (0 for an all-zero
// row). q = round-half-even(x * (127 / max|x|)), written to xq [tokens, n_padded] (zero padded to an even n).
inline void quantize_rows_scalar(const float* x, int64_t tokens, int64_t n, int64_t stride, int8_t* xq,
                                 int64_t xq_stride, float* xs) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = x + t * stride;
    float amax = 0.0f;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(row[i]));
    int8_t* q = xq + t * xq_stride;
    std::memset(q, 0, static_cast<size_t>(xq_stride));
    if (amax == 0.0f) {
      xs[t] = 0.0f;
      continue;
    }
    const float inv = 127.0f / amax;
    for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(std::nearbyint(row[i] * inv));
    xs[t] = amax / 127.0f;
  }
}

struct QMatrix {
  const uint8_t* codes;    // int4 packed (uint8 [rows, cols / 2]) or int8 ([rows, cols])
  const uint16_t* scales;  // float16 bits [rows / group, cols]
  int64_t rows;
  int64_t cols;
  int64_t group;
  bool int4;
  const uint16_t* mins = nullptr;  // asymmetric int4 only: float16 bits [rows / group, cols] (see the header)
  // Activations carry one scale per token and row group (xs [tokens, rows / group]) instead of one per token.
  bool group_scales = false;

  // The integer factor of row i, column c: int4 code - 8 (symmetric), the nibble (asymmetric), or the int8 code.
  int code(int64_t i, int64_t c) const {
    if (int4) {
      const uint8_t byte = codes[i * (cols / 2) + c / 2];
      return (c % 2 ? byte >> 4 : byte & 15) - (mins != nullptr ? 0 : 8);
    }
    return static_cast<int8_t>(codes[i * cols + c]);
  }

  // What the integer sums of a group lose to the stored +8 (symmetric int4: 8 * the token's group sum), else 0.
  int32_t offset(int32_t group_sum) const { return int4 && mins == nullptr ? 8 * group_sum : 0; }
};

// The activation scale of token t in row group g: xs[t], or xs[t, g] with group_scales.
inline float act_scale(const QMatrix& w, const float* xs, int64_t t, int64_t g) {
  return w.group_scales ? xs[t * (w.rows / w.group) + g] : xs[t];
}

// xs * float(the token's group sum): the min term's factor (0 when there are no mins).
inline float min_factor(const QMatrix& w, float xs, int32_t group_sum) {
  return w.mins != nullptr ? xs * static_cast<float>(group_sum) : 0.0f;
}

// What the float step of token t, row group g, columns from c0 needs: the integer sums' offset, the group's scales
// and mins there, the activation scale, the min term's factor, and where the columns go.
struct BlockFinish {
  int32_t offset;
  const uint16_t* scales;
  const uint16_t* mins;
  float xs;
  float xg;
  float* out;
};

inline BlockFinish block_finish(const QMatrix& w, const float* xs, int32_t group_sum, int64_t t, int64_t g, int64_t c0,
                                float* out, int64_t out_stride) {
  const float xs_tg = act_scale(w, xs, t, g);
  return {w.offset(group_sum), w.scales + g * w.cols + c0, w.mins != nullptr ? w.mins + g * w.cols + c0 : nullptr,
          xs_tg, min_factor(w, xs_tg, group_sum), out + t * out_stride + c0};
}

// out = out + (float(sum) * (scale * xs) [+ min * xg]): one column's group term, the scalar form of every path.
inline void finish1(int32_t sum, uint16_t scale, const uint16_t* min, float xs, float xg, float* out) {
  float term = static_cast<float>(sum) * (half_to_float(scale) * xs);
  if (min != nullptr) term = term + half_to_float(*min) * xg;
  *out = *out + term;
}

// out [tokens, cols] (stride out_stride) = xq [tokens, rows] (stride xq_stride, even-padded) @ W, see the header.
inline void qmatmul_scalar(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs, int64_t tokens,
                           float* out, int64_t out_stride) {
  std::vector<int32_t> acc(static_cast<size_t>(w.cols));
  for (int64_t t = 0; t < tokens; ++t) {
    float* o = out + t * out_stride;
    std::fill(o, o + w.cols, 0.0f);
    const int8_t* q = xq + t * xq_stride;
    for (int64_t g = 0; g < w.rows / w.group; ++g) {
      std::fill(acc.begin(), acc.end(), 0);
      int32_t group_sum = 0;
      for (int64_t i = g * w.group; i < (g + 1) * w.group; ++i) {
        const int32_t a = q[i];
        group_sum += a;
        if (a == 0) continue;
        for (int64_t c = 0; c < w.cols; ++c) acc[c] += a * w.code(i, c);
      }
      const float xs_tg = act_scale(w, xs, t, g);
      const float xg = min_factor(w, xs_tg, group_sum);
      const uint16_t* mins = w.mins != nullptr ? w.mins + g * w.cols : nullptr;
      for (int64_t c = 0; c < w.cols; ++c) {
        finish1(acc[c], w.scales[g * w.cols + c], mins != nullptr ? mins + c : nullptr, xs_tg, xg, o + c);
      }
    }
  }
}

#if defined(HM_KERNELS_X86) && (defined(__GNUC__) || defined(__clang__))
#define HM_AVX2 __attribute__((target("avx2,f16c")))

// finish1 for 8 columns (acc int32 x8, scales and mins 8 float16 at `scales` / `mins`; mins may be null).
HM_AVX2 inline void finish8(__m256i acc, const uint16_t* scales, const uint16_t* mins, float xs, float xg, float* out) {
  const __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales))),
                                     _mm256_set1_ps(xs));
  __m256 term = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale);
  if (mins != nullptr) {
    const __m256 low = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins)));
    term = _mm256_add_ps(term, _mm256_mul_ps(low, _mm256_set1_ps(xg)));
  }
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), term));
}

// int4 blocks of 64 columns (32 bytes per row). A row pair (i, i + 1) becomes four registers of interleaved
// unsigned bytes [code_i[c] + 8, code_i+1[c] + 8] (unpack works per 128-bit half, so each register holds two runs
// of 8 columns): e0 = even columns 0..14 | 32..46, e1 = 16..30 | 48..62, o0 = odd 1..15 | 33..47, o1 = 17..31 |
// 49..63. maddubs with the token's (x_i, x_i+1) byte pair gives 16 int16 sums per register; at most 8 pairs are
// summed in int16 (8 * 2 * 15 * 127 < 32767) before widening into int32. The +8 offset is removed per group:
// sum -= 8 * sum_{i in g} x_i.
// Per token: the sum of the group's activation codes (8 times it is the +8 offset to remove; asymmetric weights
// multiply it by the min), and the group's (x_i, x_i+1) byte pairs as int16 (a missing partner is 0), which the
// inner loops broadcast.
inline void group_pairs(const int8_t* xq, int64_t xq_stride, int64_t tokens, int64_t r0, int64_t group,
                        int32_t* xsum, int16_t* xpairs) {
  const int64_t pairs = (group + 1) / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const int8_t* q = xq + t * xq_stride + r0;
    int32_t sum = 0;
    for (int64_t i = 0; i < group; ++i) sum += q[i];
    xsum[t] = sum;
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t second = (2 * p + 1 < group) ? q[2 * p + 1] : 0;
      xpairs[t * pairs + p] = static_cast<int16_t>(static_cast<uint8_t>(q[2 * p]) |
                                                   (static_cast<uint16_t>(static_cast<uint8_t>(second)) << 8));
    }
  }
}

struct Int4Pair {
  __m256i e0, e1, o0, o1;
};

HM_AVX2 inline Int4Pair int4_pair64(const uint8_t* row_a, const uint8_t* row_b) {
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_a));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_b));
  // Interleave the rows' bytes first: [a_k, b_k] then holds both rows' even codes in its low nibbles and both
  // odd codes in its high nibbles.
  const __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);
  return {_mm256_and_si256(lo, low), _mm256_and_si256(hi, low), _mm256_and_si256(_mm256_srli_epi16(lo, 4), low),
          _mm256_and_si256(_mm256_srli_epi16(hi, 4), low)};
}

// int32 sums of a 64-column block in the block order: [e0 lo, e0 hi, e1 lo, e1 hi, o0 lo, o0 hi, o1 lo, o1 hi].
struct Int4Sums {
  __m256i v[8];
};

HM_AVX2 inline void widen_add(const __m256i e0, const __m256i e1, const __m256i o0, const __m256i o1, Int4Sums& s) {
  const __m256i parts[4] = {e0, e1, o0, o1};
  for (int k = 0; k < 4; ++k) {
    s.v[2 * k] = _mm256_add_epi32(s.v[2 * k], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(parts[k])));
    s.v[2 * k + 1] = _mm256_add_epi32(s.v[2 * k + 1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(parts[k], 1)));
  }
}

// Adds a block's sums (minus the offset) times the group's scales (plus mins * xg) to out, columns c0 .. c0 + width
// - 1 (`scales` and `mins` point at column c0; mins may be null).
HM_AVX2 inline void finish_block64(const Int4Sums& s, int32_t offset, const uint16_t* scales, const uint16_t* mins,
                                   float xs, float xg, float* out, int64_t width) {
  alignas(32) int32_t lanes[64];
  const __m256i off = _mm256_set1_epi32(offset);
  // Even/odd runs of the same 8 columns interleave back into column order (unpack per half, then fix halves).
  const int runs[4][2] = {{0, 4}, {2, 6}, {1, 5}, {3, 7}};  // e0 lo + o0 lo: 0..15; e1 lo + o1 lo: 16..31; ...
  for (int k = 0; k < 4; ++k) {
    const __m256i even = _mm256_sub_epi32(s.v[runs[k][0]], off), odd = _mm256_sub_epi32(s.v[runs[k][1]], off);
    const __m256i lo = _mm256_unpacklo_epi32(even, odd), hi = _mm256_unpackhi_epi32(even, odd);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 16 * k), _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 16 * k + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
  }
  int64_t c = 0;
  for (; c + 8 <= width; c += 8) {
    finish8(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes + c)), scales + c,
            mins != nullptr ? mins + c : nullptr, xs, xg, out + c);
  }
  for (; c < width; ++c) finish1(lanes[c], scales[c], mins != nullptr ? mins + c : nullptr, xs, xg, out + c);
}

// Columns [c_begin, c_end) (c_begin a multiple of 64) in 64-column blocks; out's other columns are not touched.
HM_AVX2 inline void qmatmul_int4_avx2(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                      int64_t tokens, float* out, int64_t out_stride, int64_t c_begin = 0,
                                      int64_t c_end = -1) {
  if (c_end < 0) c_end = w.cols;
  const int64_t pairs = (w.group + 1) / 2;
  const int64_t row_bytes = w.cols / 2;
  alignas(32) static const uint8_t zero_codes[32] = {0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88,
                                                     0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88,
                                                     0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88};
  std::vector<uint8_t> padded(static_cast<size_t>(2 * pairs * 32));  // a narrow last block's rows, zero padded
  std::vector<uint8_t> tile_bytes(tokens > 1 ? static_cast<size_t>(pairs * 4 * 32) : 0);
  __m256i* tile = reinterpret_cast<__m256i*>(tile_bytes.data());  // unaligned loads/stores only
  std::vector<int32_t> xsum(static_cast<size_t>(tokens));
  // Per token, the group's (x_i, x_i+1) byte pairs as int16 (broadcast per pair in the inner loop).
  std::vector<int16_t> xpairs(static_cast<size_t>(tokens * pairs));
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride + c_begin, out + t * out_stride + c_end, 0.0f);
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    const int64_t r0 = g * w.group;
    group_pairs(xq, xq_stride, tokens, r0, w.group, xsum.data(), xpairs.data());
    for (int64_t c0 = c_begin; c0 < c_end; c0 += 64) {
      const int64_t width = std::min<int64_t>(64, c_end - c0);
      // The rows of pair p: a pointer into the matrix, or (a narrow block) into the zero-padded copy.
      auto row = [&](int64_t p, int k) -> const uint8_t* {
        const int64_t i = r0 + 2 * p + k;
        if (i >= r0 + w.group) return zero_codes;
        if (width == 64) return w.codes + i * row_bytes + c0 / 2;
        uint8_t* copy = padded.data() + (2 * p + k) * 32;
        std::memset(copy, 0x88, 32);
        std::memcpy(copy, w.codes + i * row_bytes + c0 / 2, static_cast<size_t>(width / 2));
        return copy;
      };
      if (tokens > 1) {  // unpack the block once, apply it to every token
        for (int64_t p = 0; p < pairs; ++p) {
          const Int4Pair u = int4_pair64(row(p, 0), row(p, 1));
          _mm256_storeu_si256(tile + 4 * p, u.e0);
          _mm256_storeu_si256(tile + 4 * p + 1, u.e1);
          _mm256_storeu_si256(tile + 4 * p + 2, u.o0);
          _mm256_storeu_si256(tile + 4 * p + 3, u.o1);
        }
      }
      for (int64_t t = 0; t < tokens; ++t) {
        const int16_t* x_pairs = xpairs.data() + t * pairs;
        Int4Sums sums;
        for (auto& v : sums.v) v = _mm256_setzero_si256();
        for (int64_t p0 = 0; p0 < pairs; p0 += 8) {
          __m256i e0 = _mm256_setzero_si256(), e1 = e0, o0 = e0, o1 = e0;
          for (int64_t p = p0; p < std::min(pairs, p0 + 8); ++p) {
            const __m256i x = _mm256_set1_epi16(x_pairs[p]);
            Int4Pair u;
            if (tokens > 1) {
              u = {_mm256_loadu_si256(tile + 4 * p), _mm256_loadu_si256(tile + 4 * p + 1),
                   _mm256_loadu_si256(tile + 4 * p + 2), _mm256_loadu_si256(tile + 4 * p + 3)};
            } else {
              u = int4_pair64(row(p, 0), row(p, 1));
            }
            e0 = _mm256_add_epi16(e0, _mm256_maddubs_epi16(u.e0, x));
            e1 = _mm256_add_epi16(e1, _mm256_maddubs_epi16(u.e1, x));
            o0 = _mm256_add_epi16(o0, _mm256_maddubs_epi16(u.o0, x));
            o1 = _mm256_add_epi16(o1, _mm256_maddubs_epi16(u.o1, x));
          }
          widen_add(e0, e1, o0, o1, sums);
        }
        const float xs_tg = act_scale(w, xs, t, g);
        finish_block64(sums, w.offset(xsum[t]), w.scales + g * w.cols + c0,
                       w.mins != nullptr ? w.mins + g * w.cols + c0 : nullptr, xs_tg, min_factor(w, xs_tg, xsum[t]),
                       out + t * out_stride + c0, width);
      }
    }
  }
}

#define HM_AVX512 __attribute__((target("avx512f,avx512bw,f16c")))

// int4 blocks of 128 columns (64 bytes per row) with 512-bit registers: the AVX2 scheme above, each register
// holding four 128-bit lanes of it (lane L covers columns 32L .. 32L + 31 of the block). Full blocks only; the
// last columns (fewer than 128) go to the AVX2 path. Same integer sums, same float finish: the same bits.
HM_AVX512 inline void finish16(__m512i sums, const uint16_t* scales, const uint16_t* mins, float xs, float xg,
                               float* out) {
  const __m512 scale = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales))),
                                     _mm512_set1_ps(xs));
  __m512 term = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), scale);
  if (mins != nullptr) {
    const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins)));
    term = _mm512_add_ps(term, _mm512_mul_ps(low, _mm512_set1_ps(xg)));
  }
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), term));
}

// A row pair of a 128-column block as the four registers e0, e1, o0, o1 (int4_pair64's scheme per 128-bit lane),
// stored to `u` (unaligned).
HM_AVX512 inline void int4_pair128(const uint8_t* row_a, const uint8_t* row_b, __m512i* u) {
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i a = _mm512_loadu_si512(row_a), b = _mm512_loadu_si512(row_b);
  const __m512i lo = _mm512_unpacklo_epi8(a, b), hi = _mm512_unpackhi_epi8(a, b);
  _mm512_storeu_si512(u, _mm512_and_si512(lo, low));
  _mm512_storeu_si512(u + 1, _mm512_and_si512(hi, low));
  _mm512_storeu_si512(u + 2, _mm512_and_si512(_mm512_srli_epi16(lo, 4), low));
  _mm512_storeu_si512(u + 3, _mm512_and_si512(_mm512_srli_epi16(hi, 4), low));
}

HM_AVX512 inline void qmatmul_int4_avx512(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                          int64_t tokens, float* out, int64_t out_stride) {
  const int64_t full = w.cols / 128 * 128;
  if (full < w.cols) qmatmul_int4_avx2(w, xq, xq_stride, xs, tokens, out, out_stride, full, w.cols);
  if (full == 0) return;
  const int64_t pairs = (w.group + 1) / 2;
  const int64_t row_bytes = w.cols / 2;
  alignas(64) static const uint8_t zero_codes[64] = {
      0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88,
      0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88,
      0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88,
      0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88};
  std::vector<uint8_t> tile_bytes(tokens > 1 ? static_cast<size_t>(pairs * 4 * 64) : 0);
  __m512i* tile = reinterpret_cast<__m512i*>(tile_bytes.data());  // unaligned loads/stores only
  std::vector<int32_t> xsum(static_cast<size_t>(tokens));
  std::vector<int16_t> xpairs(static_cast<size_t>(tokens * pairs));
  // Element indices of permutex2var that put (lo, hi) = unpack(even, odd) back in column order: the first 16
  // columns of the pair of lanes, then the next 16 (see the comment in the loop).
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride, out + t * out_stride + full, 0.0f);
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    const int64_t r0 = g * w.group;
    group_pairs(xq, xq_stride, tokens, r0, w.group, xsum.data(), xpairs.data());
    for (int64_t c0 = 0; c0 < full; c0 += 128) {
      auto rows = [&](int64_t p, const uint8_t** a, const uint8_t** b) {
        *a = w.codes + (r0 + 2 * p) * row_bytes + c0 / 2;
        *b = 2 * p + 1 < w.group ? *a + row_bytes : zero_codes;
      };
      if (tokens > 1) {
        for (int64_t p = 0; p < pairs; ++p) {
          const uint8_t *a, *b;
          rows(p, &a, &b);
          int4_pair128(a, b, tile + 4 * p);
        }
      }
      for (int64_t t = 0; t < tokens; ++t) {
        const int16_t* x_pairs = xpairs.data() + t * pairs;
        __m512i sums[8];  // [e0 lanes 0-1, e0 lanes 2-3, e1 .., o0 .., o1 ..] widened to int32
        for (auto& v : sums) v = _mm512_setzero_si512();
        for (int64_t p0 = 0; p0 < pairs; p0 += 8) {
          __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                            _mm512_setzero_si512()};
          for (int64_t p = p0; p < std::min(pairs, p0 + 8); ++p) {
            const __m512i x = _mm512_set1_epi16(x_pairs[p]);
            __m512i u[4];
            if (tokens > 1) {
              for (int k = 0; k < 4; ++k) u[k] = _mm512_loadu_si512(tile + 4 * p + k);
            } else {
              const uint8_t *a, *b;
              rows(p, &a, &b);
              int4_pair128(a, b, u);
            }
            for (int k = 0; k < 4; ++k) acc[k] = _mm512_add_epi16(acc[k], _mm512_maddubs_epi16(u[k], x));
          }
          for (int k = 0; k < 4; ++k) {
            sums[2 * k] = _mm512_add_epi32(sums[2 * k], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(acc[k])));
            sums[2 * k + 1] =
                _mm512_add_epi32(sums[2 * k + 1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(acc[k], 1)));
          }
        }
        const auto [off, sc, mn, xs_tg, xg, o] = block_finish(w, xs, xsum[t], t, g, c0, out, out_stride);
        const __m512i offset = _mm512_set1_epi32(off);
        // sums[2k + h] holds lanes 2h, 2h + 1 of e0 (k = 0), e1 (1), o0 (2), o1 (3): per 128-bit sublane four
        // columns; unpacking even (e) with odd (o) and permuting gives 16 consecutive columns per pair of lanes.
        for (int h = 0; h < 2; ++h) {
          for (int k = 0; k < 2; ++k) {  // e0/o0 cover columns 0..15 of each lane, e1/o1 columns 16..31
            const __m512i even = _mm512_sub_epi32(sums[2 * k + h], offset);
            const __m512i odd = _mm512_sub_epi32(sums[2 * (k + 2) + h], offset);
            const __m512i lo = _mm512_unpacklo_epi32(even, odd), hi = _mm512_unpackhi_epi32(even, odd);
            const int64_t lane0 = 2 * h;  // this register's first lane: columns 32 * lane0 ..
            const int64_t at0 = 32 * lane0 + 16 * k, at1 = 32 * (lane0 + 1) + 16 * k;
            finish16(_mm512_permutex2var_epi32(lo, first, hi), sc + at0, mn != nullptr ? mn + at0 : nullptr, xs_tg,
                     xg, o + at0);
            finish16(_mm512_permutex2var_epi32(lo, second, hi), sc + at1, mn != nullptr ? mn + at1 : nullptr, xs_tg,
                     xg, o + at1);
          }
        }
      }
    }
  }
}

#define HM_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,f16c")))

// AVX-512 VNNI (vpdpbusd: four unsigned x signed byte products summed into each int32 lane): int4 blocks of 128
// columns, groups of a multiple of 4 rows. Four rows a..d of a block interleave into quads [a_j, b_j, c_j, d_j] of
// byte j (columns 2j and 2j + 1 of the block's lane); masking and shifting give the even and the odd columns' quads,
// four registers each (k = 0..3: bytes 4k .. 4k + 3 of every 128-bit lane), applied to the token's broadcast quad
// of int8 activations. Each group's sums are exact in int32 (no int16 stage), then the same finish as the other
// paths: the same bits.
HM_VNNI inline void int4_quad128(const uint8_t* a, const uint8_t* b, const uint8_t* c, const uint8_t* d,
                                 __m512i* u) {
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i ra = _mm512_loadu_si512(a), rb = _mm512_loadu_si512(b);
  const __m512i rc = _mm512_loadu_si512(c), rd = _mm512_loadu_si512(d);
  const __m512i ab_lo = _mm512_unpacklo_epi8(ra, rb), ab_hi = _mm512_unpackhi_epi8(ra, rb);
  const __m512i cd_lo = _mm512_unpacklo_epi8(rc, rd), cd_hi = _mm512_unpackhi_epi8(rc, rd);
  const __m512i quads[4] = {_mm512_unpacklo_epi16(ab_lo, cd_lo), _mm512_unpackhi_epi16(ab_lo, cd_lo),
                            _mm512_unpacklo_epi16(ab_hi, cd_hi), _mm512_unpackhi_epi16(ab_hi, cd_hi)};
  for (int k = 0; k < 4; ++k) {
    _mm512_storeu_si512(u + k, _mm512_and_si512(quads[k], low));                             // even columns
    _mm512_storeu_si512(u + 4 + k, _mm512_and_si512(_mm512_srli_epi16(quads[k], 4), low));  // odd columns
  }
}

HM_VNNI inline void qmatmul_int4_vnni(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                      int64_t tokens, float* out, int64_t out_stride) {
  const int64_t full = w.cols / 128 * 128;
  if (full < w.cols) qmatmul_int4_avx2(w, xq, xq_stride, xs, tokens, out, out_stride, full, w.cols);
  if (full == 0) return;
  const int64_t quads = w.group / 4;
  const int64_t row_bytes = w.cols / 2;
  std::vector<uint8_t> tile_bytes(tokens > 1 ? static_cast<size_t>(quads * 8 * 64) : 0);
  __m512i* tile = reinterpret_cast<__m512i*>(tile_bytes.data());  // unaligned loads/stores only
  std::vector<int32_t> xsum(static_cast<size_t>(tokens));
  // Element indices: (lo, hi) = unpack(even, odd) of register k hold, per 128-bit lane L, columns 32L + 8k + 0..3
  // (lo) and + 4..7 (hi). `pair01` / `pair23` gather lanes 0-1 / 2-3 (8 columns each), `first` / `second` then
  // join k and k + 1 into 16 consecutive columns of the first / second lane of the pair.
  const __m512i pair01 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i pair23 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride, out + t * out_stride + full, 0.0f);
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    const int64_t r0 = g * w.group;
    for (int64_t t = 0; t < tokens; ++t) {
      int32_t sum = 0;
      for (int64_t i = 0; i < w.group; ++i) sum += xq[t * xq_stride + r0 + i];
      xsum[t] = sum;
    }
    for (int64_t c0 = 0; c0 < full; c0 += 128) {
      const uint8_t* base = w.codes + r0 * row_bytes + c0 / 2;
      if (tokens > 1) {
        for (int64_t k = 0; k < quads; ++k) {
          const uint8_t* a = base + 4 * k * row_bytes;
          int4_quad128(a, a + row_bytes, a + 2 * row_bytes, a + 3 * row_bytes, tile + 8 * k);
        }
      }
      for (int64_t t = 0; t < tokens; ++t) {
        const int8_t* q = xq + t * xq_stride + r0;
        __m512i acc[8];
        for (auto& v : acc) v = _mm512_setzero_si512();
        for (int64_t k = 0; k < quads; ++k) {
          int32_t packed;
          std::memcpy(&packed, q + 4 * k, sizeof(packed));
          const __m512i x = _mm512_set1_epi32(packed);
          __m512i u[8];
          if (tokens > 1) {
            for (int r = 0; r < 8; ++r) u[r] = _mm512_loadu_si512(tile + 8 * k + r);
          } else {
            const uint8_t* a = base + 4 * k * row_bytes;
            int4_quad128(a, a + row_bytes, a + 2 * row_bytes, a + 3 * row_bytes, u);
          }
          for (int r = 0; r < 8; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], u[r], x);
        }
        const auto [off, sc, mn, xs_tg, xg, o] = block_finish(w, xs, xsum[t], t, g, c0, out, out_stride);
        const __m512i offset = _mm512_set1_epi32(off);
        __m512i low_lanes[4], high_lanes[4];  // per k: columns of lanes 0-1, of lanes 2-3 (8 + 8 each)
        for (int k = 0; k < 4; ++k) {
          const __m512i even = _mm512_sub_epi32(acc[k], offset), odd = _mm512_sub_epi32(acc[4 + k], offset);
          const __m512i lo = _mm512_unpacklo_epi32(even, odd), hi = _mm512_unpackhi_epi32(even, odd);
          low_lanes[k] = _mm512_permutex2var_epi32(lo, pair01, hi);
          high_lanes[k] = _mm512_permutex2var_epi32(lo, pair23, hi);
        }
        for (int half = 0; half < 2; ++half) {  // k = 0, 1: columns 0..15 of a lane; k = 2, 3: 16..31
          const int k = 2 * half;
          const __m512i* pairs[2] = {low_lanes, high_lanes};
          for (int p = 0; p < 2; ++p) {  // lanes 0-1, lanes 2-3
            const int64_t lane = 2 * p;
            const int64_t at0 = 32 * lane + 16 * half, at1 = 32 * (lane + 1) + 16 * half;
            finish16(_mm512_permutex2var_epi32(pairs[p][k], first, pairs[p][k + 1]), sc + at0,
                     mn != nullptr ? mn + at0 : nullptr, xs_tg, xg, o + at0);
            finish16(_mm512_permutex2var_epi32(pairs[p][k], second, pairs[p][k + 1]), sc + at1,
                     mn != nullptr ? mn + at1 : nullptr, xs_tg, xg, o + at1);
          }
        }
      }
    }
  }
}

// int8: per group and block of 8 columns, a tile of int16 pairs [code_i[c], code_i+1[c]]; madd with the token's
// (x_i, x_i+1) pair gives 8 int32 sums directly.
HM_AVX2 inline void qmatmul_int8_avx2(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                      int64_t tokens, float* out, int64_t out_stride) {
  const int64_t pairs = (w.group + 1) / 2;
  std::vector<uint8_t> tile_bytes(static_cast<size_t>(pairs * 32));  // unaligned loads/stores only
  __m256i* tile = reinterpret_cast<__m256i*>(tile_bytes.data());
  alignas(32) int32_t lanes[8];
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride, out + t * out_stride + w.cols, 0.0f);
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    const int64_t r0 = g * w.group;
    for (int64_t c0 = 0; c0 < w.cols; c0 += 8) {
      const int64_t width = std::min<int64_t>(8, w.cols - c0);
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t i = r0 + 2 * p;
        alignas(16) int8_t a[16] = {0}, b[16] = {0};
        std::memcpy(a, w.codes + i * w.cols + c0, static_cast<size_t>(width));
        if (i + 1 < r0 + w.group) std::memcpy(b, w.codes + (i + 1) * w.cols + c0, static_cast<size_t>(width));
        const __m128i pair = _mm_unpacklo_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(a)),
                                               _mm_load_si128(reinterpret_cast<const __m128i*>(b)));
        _mm256_storeu_si256(tile + p, _mm256_cvtepi8_epi16(pair));
      }
      for (int64_t t = 0; t < tokens; ++t) {
        const int8_t* q = xq + t * xq_stride + r0;
        __m256i acc = _mm256_setzero_si256();
        for (int64_t p = 0; p < pairs; ++p) {
          const int32_t second = (2 * p + 1 < w.group) ? q[2 * p + 1] : 0;
          const __m256i x = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(q[2 * p]))) |
                                              static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(second)) << 16));
          acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_loadu_si256(tile + p), x));
        }
        float* o = out + t * out_stride + c0;
        const uint16_t* sc = w.scales + g * w.cols + c0;
        const float xs_tg = act_scale(w, xs, t, g);
        if (width == 8) {
          finish8(acc, sc, nullptr, xs_tg, 0.0f, o);
        } else {
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
          for (int64_t c = 0; c < width; ++c) finish1(lanes[c], sc[c], nullptr, xs_tg, 0.0f, o + c);
        }
      }
    }
  }
}
#endif  // x86

#if defined(HM_KERNELS_NEON)
// 16 codes of row `i`, columns c0 .. c0 + 15, as int8 (the integer factors of QMatrix::code); zeros past `width`.
inline int8x16_t load_codes16(const QMatrix& w, int64_t i, int64_t c0, int64_t width) {
  if (width == 16) {
    if (!w.int4) return vld1q_s8(reinterpret_cast<const int8_t*>(w.codes + i * w.cols + c0));
    const uint8x8_t bytes = vld1_u8(w.codes + i * (w.cols / 2) + c0 / 2);
    const uint8x8x2_t zipped = vzip_u8(vand_u8(bytes, vdup_n_u8(15)), vshr_n_u8(bytes, 4));  // column order
    const int8x16_t nibbles = vreinterpretq_s8_u8(vcombine_u8(zipped.val[0], zipped.val[1]));
    return w.mins != nullptr ? nibbles : vsubq_s8(nibbles, vdupq_n_s8(8));
  }
  alignas(16) int8_t codes[16] = {0};
  for (int64_t c = 0; c < width; ++c) codes[c] = static_cast<int8_t>(w.code(i, c0 + c));
  return vld1q_s8(codes);
}

// NEON (AArch64): per group and block of 16 columns, a tile of the group's codes as int8, built once and applied
// to every token; per row pair vmull_s8 / vmlal_s8 widen to int16 (2 * 127 * 127 < 32767) and vaddw adds into
// int32. Same sums, same float finish as the scalar path.
inline void qmatmul_neon(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs, int64_t tokens,
                         float* out, int64_t out_stride) {
  const int64_t pairs = (w.group + 1) / 2;
  std::vector<int8_t> tile_bytes(static_cast<size_t>(2 * pairs * 16));
  int8_t* tile = tile_bytes.data();
  alignas(16) int32_t lanes[16];
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride, out + t * out_stride + w.cols, 0.0f);
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    const int64_t r0 = g * w.group;
    for (int64_t c0 = 0; c0 < w.cols; c0 += 16) {
      const int64_t width = std::min<int64_t>(16, w.cols - c0);
      for (int64_t p = 0; p < pairs; ++p) {
        vst1q_s8(tile + 32 * p, load_codes16(w, r0 + 2 * p, c0, width));
        vst1q_s8(tile + 32 * p + 16, 2 * p + 1 < w.group ? load_codes16(w, r0 + 2 * p + 1, c0, width) : vdupq_n_s8(0));
      }
      for (int64_t t = 0; t < tokens; ++t) {
        const int8_t* q = xq + t * xq_stride + r0;
        int32x4_t acc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
        for (int64_t p = 0; p < pairs; ++p) {
          const int8x16_t a = vld1q_s8(tile + 32 * p), b = vld1q_s8(tile + 32 * p + 16);
          const int8x8_t xa = vdup_n_s8(q[2 * p]), xb = vdup_n_s8(2 * p + 1 < w.group ? q[2 * p + 1] : 0);
          const int16x8_t lo = vmlal_s8(vmull_s8(vget_low_s8(a), xa), vget_low_s8(b), xb);
          const int16x8_t hi = vmlal_s8(vmull_s8(vget_high_s8(a), xa), vget_high_s8(b), xb);
          acc[0] = vaddw_s16(acc[0], vget_low_s16(lo));
          acc[1] = vaddw_s16(acc[1], vget_high_s16(lo));
          acc[2] = vaddw_s16(acc[2], vget_low_s16(hi));
          acc[3] = vaddw_s16(acc[3], vget_high_s16(hi));
        }
        for (int k = 0; k < 4; ++k) vst1q_s32(lanes + 4 * k, acc[k]);
        float* o = out + t * out_stride + c0;
        const uint16_t* sc = w.scales + g * w.cols + c0;
        const uint16_t* mn = w.mins != nullptr ? w.mins + g * w.cols + c0 : nullptr;
        int32_t group_sum = 0;
        for (int64_t i = 0; i < w.group; ++i) group_sum += q[i];
        const float xs_tg = act_scale(w, xs, t, g);
        const float xg = min_factor(w, xs_tg, group_sum);
        for (int64_t c = 0; c < width; ++c) finish1(lanes[c], sc[c], mn != nullptr ? mn + c : nullptr, xs_tg, xg, o + c);
      }
    }
  }
}
#endif  // NEON

#if defined(HM_KERNELS_X86) && (defined(__GNUC__) || defined(__clang__))
// quantize_rows with 8 lanes: the same float operations; cvtps rounds half to even like nearbyint.
HM_AVX2 inline void quantize_rows_avx2(const float* x, int64_t tokens, int64_t n, int64_t stride, int8_t* xq,
                                       int64_t xq_stride, float* xs) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = x + t * stride;
    __m256 top = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(row + i)));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, top);
    float amax = 0.0f;
    for (float lane : lanes) amax = std::max(amax, lane);
    for (; i < n; ++i) amax = std::max(amax, std::fabs(row[i]));
    int8_t* q = xq + t * xq_stride;
    std::memset(q, 0, static_cast<size_t>(xq_stride));
    if (amax == 0.0f) {
      xs[t] = 0.0f;
      continue;
    }
    const float inv = 127.0f / amax;
    const __m256 scale = _mm256_set1_ps(inv);
    i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256i codes = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + i), scale));
      const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(words, words));
    }
    for (; i < n; ++i) q[i] = static_cast<int8_t>(std::nearbyint(row[i] * inv));
    xs[t] = amax / 127.0f;
  }
}
#endif

// Per-token int8 quantization (see quantize_rows_scalar) on the active path.
inline void quantize_rows(const float* x, int64_t tokens, int64_t n, int64_t stride, int8_t* xq, int64_t xq_stride,
                          float* xs, Isa isa = active_isa()) {
#if defined(HM_KERNELS_X86) && (defined(__GNUC__) || defined(__clang__))
  if (isa == Isa::Avx2 || isa == Isa::Avx512 || isa == Isa::Avx512Vnni) {
    quantize_rows_avx2(x, tokens, n, stride, xq, xq_stride, xs);
    return;
  }
#endif
  quantize_rows_scalar(x, tokens, n, stride, xq, xq_stride, xs);
}

// quantize_rows per token and group of `group` values (n a multiple of it): xs [tokens, n / group], the same float
// operations per group as per row (the scalar loop: a group is short).
inline void quantize_groups(const float* x, int64_t tokens, int64_t n, int64_t stride, int64_t group, int8_t* xq,
                            int64_t xq_stride, float* xs) {
  const int64_t groups = n / group;
  for (int64_t t = 0; t < tokens; ++t) {
    int8_t* q = xq + t * xq_stride;
    std::memset(q, 0, static_cast<size_t>(xq_stride));
    for (int64_t g = 0; g < groups; ++g) {
      quantize_rows_scalar(x + t * stride + g * group, 1, group, group, q + g * group, group, xs + t * groups + g);
    }
  }
}

// Dispatch to `isa` (default: the active path).
inline void qmatmul(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs, int64_t tokens, float* out,
                    int64_t out_stride, Isa isa = active_isa()) {
#if defined(HM_KERNELS_X86) && (defined(__GNUC__) || defined(__clang__))
  if (isa == Isa::Avx512Vnni && w.int4 && w.group % 4 == 0) {
    qmatmul_int4_vnni(w, xq, xq_stride, xs, tokens, out, out_stride);
    return;
  }
  if ((isa == Isa::Avx512 || isa == Isa::Avx512Vnni) && w.int4) {
    qmatmul_int4_avx512(w, xq, xq_stride, xs, tokens, out, out_stride);
    return;
  }
  if (isa == Isa::Avx2 || isa == Isa::Avx512 || isa == Isa::Avx512Vnni) {  // int8 has no 512-bit variant: the AVX2 one
    if (w.int4) {
      qmatmul_int4_avx2(w, xq, xq_stride, xs, tokens, out, out_stride);
    } else {
      qmatmul_int8_avx2(w, xq, xq_stride, xs, tokens, out, out_stride);
    }
    return;
  }
#endif
#if defined(HM_KERNELS_NEON)
  if (isa == Isa::Neon) {
    qmatmul_neon(w, xq, xq_stride, xs, tokens, out, out_stride);
    return;
  }
#endif
  qmatmul_scalar(w, xq, xq_stride, xs, tokens, out, out_stride);
}

}  // namespace hm_kernels
