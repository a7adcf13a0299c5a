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
// Tiled int4 (QMatrix::tiled, the anchor tables of hm_export::qlinear): the codes of row group g and chunk ch of 32
// columns are one contiguous run of group * 16 bytes, chunks in order within a group and groups in order, so a
// product reads the matrix as one sequential stream. Within a chunk, quad k (rows 4k .. 4k + 3 of the group) takes
// 64 bytes: byte 4j + r holds row 4k + r's code of column 32ch + j in its low nibble and of column 32ch + 16 + j in
// its high nibble (j = 0..15); columns past `cols` hold code 0. Four rows of one column are four consecutive bytes:
// one lane of VNNI's vpdpbusd (or ARM's sdot), so the SIMD paths mask nibbles and multiply without shuffles, and
// their int32 lanes come out in column order. The group is a multiple of 4 rows.
// Tiled int8 is the same with chunks of 16 columns (still group * 16 bytes): byte 4j + r of quad k is row 4k + r's
// code of column 16ch + j.
//
// Every path (scalar, AVX2, AVX-512, NEON) accumulates each group exactly in int32 and then adds the group's float
// term with one multiply and one add (no fused multiply-add), in the same order: all paths give the same
// bits. The row-major SIMD paths unpack a tile of (two rows x 32 columns) once and apply it to every token, so a
// prefill of T tokens unpacks the matrix once, not T times; the tiled ones need no unpacking (VNNI loads each
// chunk once per 4 tokens, AVX2 and NEON once per token from L1).
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
  const uint8_t* codes;    // int4 packed (uint8 [rows, cols / 2]) or int8 ([rows, cols]), or either tiled
  const uint16_t* scales;  // float16 bits [rows / group, cols]
  int64_t rows;
  int64_t cols;
  int64_t group;
  bool int4;
  const uint16_t* mins = nullptr;  // asymmetric int4 only: float16 bits [rows / group, cols] (see the header)
  // Activations carry one scale per token and row group (xs [tokens, rows / group]) instead of one per token.
  bool group_scales = false;
  // Codes in the tiled layout (see the header) instead of rows.
  bool tiled = false;

  // Tiled layout: the columns of a chunk (32 int4, 16 int8), chunks per row group, where group g's chunk ch starts.
  int64_t chunk_width() const { return int4 ? 32 : 16; }
  int64_t chunks() const { return (cols + chunk_width() - 1) / chunk_width(); }
  const uint8_t* tile(int64_t g, int64_t ch) const { return codes + (g * chunks() + ch) * group * 16; }

  // The integer factor of row i, column c: int4 code - 8 (symmetric), the nibble (asymmetric), or the int8 code.
  int code(int64_t i, int64_t c) const {
    if (tiled) {
      const int64_t r = i % group, j = c % chunk_width();
      const uint8_t byte = tile(i / group, c / chunk_width())[r / 4 * 64 + 4 * (j % 16) + r % 4];
      if (!int4) return static_cast<int8_t>(byte);
      return (j < 16 ? byte & 15 : byte >> 4) - (mins != nullptr ? 0 : 8);
    }
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

// Per token, the sum of its activation codes in rows r0 .. r0 + group - 1 (the offset's and the min term's factor).
inline void group_sums(const int8_t* xq, int64_t xq_stride, int64_t tokens, int64_t r0, int64_t group, int32_t* xsum) {
  for (int64_t t = 0; t < tokens; ++t) {
    int32_t sum = 0;
    for (int64_t i = 0; i < group; ++i) sum += xq[t * xq_stride + r0 + i];
    xsum[t] = sum;
  }
}

// The columns [begin, end) of a product; end < 0: up to the last (both clamped to the matrix). A tiled product
// takes ranges that start on a chunk boundary (32 int4 columns, 16 int8 ones) and end on one or at the last column.
struct Columns {
  int64_t begin = 0;
  int64_t end = -1;
  int64_t stop(const QMatrix& w) const { return end < 0 ? w.cols : std::min(end, w.cols); }
  int64_t start(const QMatrix& w) const { return std::min(begin, stop(w)); }
};

// A tiled product's frame for the chunks of `columns`: their columns of out zeroed, then row group after row group
// (each token's group sum in `xsum`), chunk runs from the range's first on: `chunks(g, ch, left, xsum)` computes
// chunks ch .. (at most `left` of them, those the range has left) for every token and returns how many it took.
template <typename Chunks>
inline void tiled_groups(const QMatrix& w, const int8_t* xq, int64_t xq_stride, int64_t tokens, float* out,
                         int64_t out_stride, Columns columns, Chunks chunks) {
  const int64_t start = columns.start(w), stop = columns.stop(w);
  const int64_t first = start / w.chunk_width(), last = (stop + w.chunk_width() - 1) / w.chunk_width();
  std::vector<int32_t> xsum(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride + start, out + t * out_stride + stop, 0.0f);
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    group_sums(xq, xq_stride, tokens, g * w.group, w.group, xsum.data());
    for (int64_t ch = first; ch < last;) ch += chunks(g, ch, last - ch, xsum.data());
  }
}

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

// finish1 for the first `width` columns of a block from c0 (sums with any offset removed), column by column: the
// NEON paths, and a last block narrower than a SIMD path's.
inline void finish_lanes(const int32_t* sums, const BlockFinish& f, int64_t width) {
  for (int64_t c = 0; c < width; ++c) {
    finish1(sums[c], f.scales[c], f.mins != nullptr ? f.mins + c : nullptr, f.xs, f.xg, f.out + c);
  }
}

// The tiled x86 paths read ahead of the hardware prefetcher by this many bytes of the code stream: alone, it leaves
// one core streaming the matrix at about half of its read bandwidth (measured on SmolLM2's linears).
constexpr int64_t kTiledPrefetchBytes = 2048;

#if defined(HM_KERNELS_X86)
// Prefetch the `lines` cache lines kTiledPrefetchBytes after `from` (an address, not a pointer: it may lie past the
// codes' end, where a prefetch is a no-op).
inline void prefetch_ahead(const uint8_t* from, int64_t lines) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(from) + kTiledPrefetchBytes;
  for (int64_t b = 0; b < lines; ++b) _mm_prefetch(reinterpret_cast<const char*>(start + 64 * b), _MM_HINT_T0);
}
#endif

#if defined(HM_KERNELS_X86)
// The row-major VNNI path reads one column block of a row group as `group` strided runs of `bytes` (a row's share
// of the block), too short for the hardware prefetcher to follow; it prefetches the same block of the next row group
// while it works on this one (`block`: this group's first row at the block; past the codes' end, a no-op).
inline void prefetch_next_group(const uint8_t* block, int64_t group, int64_t row_bytes, int64_t bytes) {
  const uintptr_t next = reinterpret_cast<uintptr_t>(block) + group * row_bytes;
  for (int64_t r = 0; r < group; ++r) {
    const uintptr_t row = next + r * row_bytes;
    _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row + bytes - 1), _MM_HINT_T0);
  }
}
#endif

// out [tokens, cols] (stride out_stride) = xq [tokens, rows] (stride xq_stride, even-padded) @ W, see the header.
inline void qmatmul_scalar(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs, int64_t tokens,
                           float* out, int64_t out_stride, Columns columns = {}) {
  const int64_t c_begin = columns.start(w), c_end = columns.stop(w);
  std::vector<int32_t> acc(static_cast<size_t>(w.cols));
  for (int64_t t = 0; t < tokens; ++t) {
    float* o = out + t * out_stride;
    std::fill(o + c_begin, o + c_end, 0.0f);
    const int8_t* q = xq + t * xq_stride;
    for (int64_t g = 0; g < w.rows / w.group; ++g) {
      std::fill(acc.begin(), acc.end(), 0);
      int32_t group_sum = 0;
      for (int64_t i = g * w.group; i < (g + 1) * w.group; ++i) {
        const int32_t a = q[i];
        group_sum += a;
        if (a == 0) continue;
        for (int64_t c = c_begin; c < c_end; ++c) acc[c] += a * w.code(i, c);
      }
      const float xs_tg = act_scale(w, xs, t, g);
      const float xg = min_factor(w, xs_tg, group_sum);
      const uint16_t* mins = w.mins != nullptr ? w.mins + g * w.cols : nullptr;
      for (int64_t c = c_begin; c < c_end; ++c) {
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

// Tiled int4 on AVX2 (AVX-512 machines without VNNI run it too): chunk ch of row group g, every token. Per quad of
// rows each 32-byte half of the chunk's 64 bytes holds 8 columns' four codes in its low nibbles (columns 8h ..) and
// 8 in its high nibbles (16 + 8h ..); maddubs with the token's four int8 activations gives int16 sums of two rows
// (at most 2 * 15 * 127). Eight quads of those still fit in int16 (8 * 3810 < 32767), so madd with ones widens to
// int32 once per eight quads, in column order.
HM_AVX2 inline void tiled_chunk_avx2(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                     int64_t tokens, const int32_t* xsum, int64_t g, int64_t ch, float* out,
                                     int64_t out_stride) {
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const int64_t quads = w.group / 4;
  const uint8_t* base = w.tile(g, ch);
  prefetch_ahead(base, quads);
  for (int64_t t = 0; t < tokens; ++t) {
    const int8_t* q = xq + t * xq_stride + g * w.group;
    __m256i acc[4];  // columns 0-7, 8-15, 16-23, 24-31
    for (auto& v : acc) v = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < quads; k0 += 8) {
      __m256i part[4];  // the same columns' int16 pair sums over up to eight quads
      for (auto& v : part) v = _mm256_setzero_si256();
      for (int64_t k = k0; k < std::min<int64_t>(quads, k0 + 8); ++k) {
        int32_t four;
        std::memcpy(&four, q + 4 * k, sizeof(four));
        const __m256i x = _mm256_set1_epi32(four);
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + k * 64 + 32 * h));
          const __m256i even = _mm256_and_si256(v, low), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          part[h] = _mm256_add_epi16(part[h], _mm256_maddubs_epi16(even, x));
          part[2 + h] = _mm256_add_epi16(part[2 + h], _mm256_maddubs_epi16(odd, x));
        }
      }
      for (int m = 0; m < 4; ++m) acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(part[m], ones));
    }
    const int64_t c0 = ch * 32, width = std::min<int64_t>(32, w.cols - c0);
    const BlockFinish f = block_finish(w, xs, xsum[t], t, g, c0, out, out_stride);
    const __m256i offset = _mm256_set1_epi32(f.offset);
    alignas(32) int32_t sums[32];
    for (int m = 0; m < 4; ++m) {
      const __m256i part = _mm256_sub_epi32(acc[m], offset);
      if (width == 32) {
        finish8(part, f.scales + 8 * m, f.mins != nullptr ? f.mins + 8 * m : nullptr, f.xs, f.xg, f.out + 8 * m);
      } else {
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8 * m), part);
      }
    }
    if (width < 32) finish_lanes(sums, f, width);
  }
}

// Tiled int8 on AVX2: chunks ch .. ch + N - 1 (16 columns each) of row group g, every token. Each 32-byte half of
// a quad's 64 bytes holds 8 columns' four codes; maddubs takes |code| (unsigned) times the activation with the
// code's sign (at most 2 * 127 * 127 in int16), madd with ones sums four rows in int32, in column order.
template <int N>
HM_AVX2 inline void tiled8_chunks_avx2(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                       int64_t tokens, const int32_t* xsum, int64_t g, int64_t ch, float* out,
                                       int64_t out_stride) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t quads = w.group / 4;
  const uint8_t* base = w.tile(g, ch);
  prefetch_ahead(base, N * quads);
  for (int64_t t = 0; t < tokens; ++t) {
    const int8_t* q = xq + t * xq_stride + g * w.group;
    __m256i acc[2 * N];  // per chunk: columns 0-7, 8-15
    for (auto& v : acc) v = _mm256_setzero_si256();
    for (int64_t k = 0; k < quads; ++k) {
      int32_t four;
      std::memcpy(&four, q + 4 * k, sizeof(four));
      const __m256i x = _mm256_set1_epi32(four);
      for (int c = 0; c < 2 * N; ++c) {
        const uint8_t* at = base + (c / 2 * quads + k) * 64 + 32 * (c % 2);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(x, v));
        acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int c = 0; c < N; ++c) {
      const int64_t c0 = (ch + c) * 16, width = std::min<int64_t>(16, w.cols - c0);
      const BlockFinish f = block_finish(w, xs, xsum[t], t, g, c0, out, out_stride);
      if (width == 16) {
        finish8(acc[2 * c], f.scales, nullptr, f.xs, f.xg, f.out);
        finish8(acc[2 * c + 1], f.scales + 8, nullptr, f.xs, f.xg, f.out + 8);
      } else {
        alignas(32) int32_t sums[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums), acc[2 * c]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8), acc[2 * c + 1]);
        finish_lanes(sums, f, width);
      }
    }
  }
}

// Tiled int4 / int8 on AVX2: one (int4) or four (int8) chunks at a time.
HM_AVX2 inline void qmatmul_tiled_avx2(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                       int64_t tokens, float* out, int64_t out_stride, Columns columns) {
  tiled_groups(w, xq, xq_stride, tokens, out, out_stride, columns,
               [&](int64_t g, int64_t ch, int64_t left, const int32_t* xsum) -> int64_t {
    if (w.int4) {
      tiled_chunk_avx2(w, xq, xq_stride, xs, tokens, xsum, g, ch, out, out_stride);
      return 1;
    }
    if (left >= 4) {
      tiled8_chunks_avx2<4>(w, xq, xq_stride, xs, tokens, xsum, g, ch, out, out_stride);
      return 4;
    }
    tiled8_chunks_avx2<1>(w, xq, xq_stride, xs, tokens, xsum, g, ch, out, out_stride);
    return 1;
  });
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
// paths: the same bits. A last block narrower than 128 columns reads only its rows' bytes (a masked load; the rest
// count as code 0 in columns that are never written) and finishes column by column.
// `bytes`: which of each row's 64 bytes to read.
HM_VNNI inline void int4_quad128(const uint8_t* a, const uint8_t* b, const uint8_t* c, const uint8_t* d,
                                 __m512i* u, __mmask64 bytes) {
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i ra = _mm512_maskz_loadu_epi8(bytes, a), rb = _mm512_maskz_loadu_epi8(bytes, b);
  const __m512i rc = _mm512_maskz_loadu_epi8(bytes, c), rd = _mm512_maskz_loadu_epi8(bytes, d);
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
  alignas(64) int32_t lanes[128];  // a narrow last block's sums, in column order
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride, out + t * out_stride + w.cols, 0.0f);
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    const int64_t r0 = g * w.group;
    group_sums(xq, xq_stride, tokens, r0, w.group, xsum.data());
    for (int64_t c0 = 0; c0 < w.cols; c0 += 128) {
      const int64_t width = std::min<int64_t>(128, w.cols - c0);
      const __mmask64 bytes = width == 128 ? ~__mmask64{0} : (__mmask64{1} << (width / 2)) - 1;
      const uint8_t* base = w.codes + r0 * row_bytes + c0 / 2;
      prefetch_next_group(base, w.group, row_bytes, (width + 1) / 2);
      if (tokens > 1) {
        for (int64_t k = 0; k < quads; ++k) {
          const uint8_t* a = base + 4 * k * row_bytes;
          int4_quad128(a, a + row_bytes, a + 2 * row_bytes, a + 3 * row_bytes, tile + 8 * k, bytes);
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
            int4_quad128(a, a + row_bytes, a + 2 * row_bytes, a + 3 * row_bytes, u, bytes);
          }
          for (int r = 0; r < 8; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], u[r], x);
        }
        const BlockFinish f = block_finish(w, xs, xsum[t], t, g, c0, out, out_stride);
        const __m512i offset = _mm512_set1_epi32(f.offset);
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
            const __m512i cols0 = _mm512_permutex2var_epi32(pairs[p][k], first, pairs[p][k + 1]);
            const __m512i cols1 = _mm512_permutex2var_epi32(pairs[p][k], second, pairs[p][k + 1]);
            if (width == 128) {
              finish16(cols0, f.scales + at0, f.mins != nullptr ? f.mins + at0 : nullptr, f.xs, f.xg, f.out + at0);
              finish16(cols1, f.scales + at1, f.mins != nullptr ? f.mins + at1 : nullptr, f.xs, f.xg, f.out + at1);
            } else {
              _mm512_store_si512(lanes + at0, cols0);
              _mm512_store_si512(lanes + at1, cols1);
            }
          }
        }
        if (width < 128) finish_lanes(lanes, f, width);
      }
    }
  }
}

// Tiled int4 on AVX-512 VNNI: tokens t0 .. t0 + T - 1 over chunks ch .. ch + N - 1 of row group g. Per quad of rows
// one 64-byte load per chunk: its low nibbles are columns 0..15, its high nibbles masked in place (16 times columns
// 16..31's codes, divided out exactly after the sum); vpdpbusd multiplies each by every token's four int8
// activations, so a prefill loads each chunk once per T tokens.
template <int N, int T>
HM_VNNI inline void tiled_tokens_vnni(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                      const int32_t* xsum, int64_t g, int64_t ch, int64_t t0, float* out,
                                      int64_t out_stride) {
  const __m512i low = _mm512_set1_epi8(15), high = _mm512_set1_epi8(static_cast<char>(0xf0));
  const int64_t quads = w.group / 4;
  const uint8_t* base = w.tile(g, ch);
  const int8_t* q = xq + t0 * xq_stride + g * w.group;
  __m512i acc[T][2 * N];  // per token and chunk: columns 0-15, 16 times columns 16-31
  for (auto& row : acc) {
    for (auto& v : row) v = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < quads; ++k) {
    __m512i lo[N], hi[N];
    for (int c = 0; c < N; ++c) {
      const __m512i v = _mm512_loadu_si512(base + (c * quads + k) * 64);
      lo[c] = _mm512_and_si512(v, low);
      hi[c] = _mm512_and_si512(v, high);
    }
    for (int u = 0; u < T; ++u) {
      int32_t four;
      std::memcpy(&four, q + u * xq_stride + 4 * k, sizeof(four));
      const __m512i x = _mm512_set1_epi32(four);
      for (int c = 0; c < N; ++c) {
        acc[u][2 * c] = _mm512_dpbusd_epi32(acc[u][2 * c], lo[c], x);
        acc[u][2 * c + 1] = _mm512_dpbusd_epi32(acc[u][2 * c + 1], hi[c], x);
      }
    }
  }
  for (int u = 0; u < T; ++u) {
    for (int c = 0; c < N; ++c) {
      const int64_t c0 = (ch + c) * 32, width = std::min<int64_t>(32, w.cols - c0);
      const BlockFinish f = block_finish(w, xs, xsum[t0 + u], t0 + u, g, c0, out, out_stride);
      const __m512i offset = _mm512_set1_epi32(f.offset);
      const __m512i first = _mm512_sub_epi32(acc[u][2 * c], offset);
      const __m512i second = _mm512_sub_epi32(_mm512_srai_epi32(acc[u][2 * c + 1], 4), offset);
      if (width == 32) {
        finish16(first, f.scales, f.mins, f.xs, f.xg, f.out);
        finish16(second, f.scales + 16, f.mins != nullptr ? f.mins + 16 : nullptr, f.xs, f.xg, f.out + 16);
      } else {
        alignas(64) int32_t sums[32];
        _mm512_store_si512(sums, first);
        _mm512_store_si512(sums + 16, second);
        finish_lanes(sums, f, width);
      }
    }
  }
}

// Tiled int8 on AVX-512 VNNI: tokens t0 .. t0 + T - 1 over chunks ch .. ch + N - 1 (16 columns each) of row group
// g. vpdpbusd wants one unsigned operand: the codes with their sign bit flipped (code + 128), so each sum carries 128
// times the token's group sum, removed exactly before the finish.
template <int N, int T>
HM_VNNI inline void tiled8_tokens_vnni(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                       const int32_t* xsum, int64_t g, int64_t ch, int64_t t0, float* out,
                                       int64_t out_stride) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t quads = w.group / 4;
  const uint8_t* base = w.tile(g, ch);
  const int8_t* q = xq + t0 * xq_stride + g * w.group;
  __m512i acc[T][N];
  for (auto& row : acc) {
    for (auto& v : row) v = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < quads; ++k) {
    __m512i codes[N];
    for (int c = 0; c < N; ++c) codes[c] = _mm512_xor_si512(_mm512_loadu_si512(base + (c * quads + k) * 64), flip);
    for (int u = 0; u < T; ++u) {
      int32_t four;
      std::memcpy(&four, q + u * xq_stride + 4 * k, sizeof(four));
      const __m512i x = _mm512_set1_epi32(four);
      for (int c = 0; c < N; ++c) acc[u][c] = _mm512_dpbusd_epi32(acc[u][c], codes[c], x);
    }
  }
  for (int u = 0; u < T; ++u) {
    const __m512i offset = _mm512_set1_epi32(128 * xsum[t0 + u]);
    for (int c = 0; c < N; ++c) {
      const int64_t c0 = (ch + c) * 16, width = std::min<int64_t>(16, w.cols - c0);
      const BlockFinish f = block_finish(w, xs, xsum[t0 + u], t0 + u, g, c0, out, out_stride);
      const __m512i sums = _mm512_sub_epi32(acc[u][c], offset);
      if (width == 16) {
        finish16(sums, f.scales, nullptr, f.xs, f.xg, f.out);
      } else {
        alignas(64) int32_t lanes[16];
        _mm512_store_si512(lanes, sums);
        finish_lanes(lanes, f, width);
      }
    }
  }
}

// Chunks ch .. ch + N - 1 of row group g (int4, or int8 when Int8) for every token: four tokens at a time over two
// int4 chunks or four int8 ones (16 accumulators), then one token at a time over all N.
template <int N, bool Int8>
HM_VNNI inline void tiled_chunks_vnni(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                      int64_t tokens, const int32_t* xsum, int64_t g, int64_t ch, float* out,
                                      int64_t out_stride) {
  prefetch_ahead(w.tile(g, ch), N * (w.group / 4));
  constexpr int M = Int8 ? (N >= 4 ? 4 : 1) : (N >= 2 ? 2 : 1);
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4) {
    for (int c = 0; c < N; c += M) {
      if constexpr (Int8) {
        tiled8_tokens_vnni<M, 4>(w, xq, xq_stride, xs, xsum, g, ch + c, t, out, out_stride);
      } else {
        tiled_tokens_vnni<M, 4>(w, xq, xq_stride, xs, xsum, g, ch + c, t, out, out_stride);
      }
    }
  }
  for (; t < tokens; ++t) {
    if constexpr (Int8) {
      tiled8_tokens_vnni<N, 1>(w, xq, xq_stride, xs, xsum, g, ch, t, out, out_stride);
    } else {
      tiled_tokens_vnni<N, 1>(w, xq, xq_stride, xs, xsum, g, ch, t, out, out_stride);
    }
  }
}

// Tiled int4 / int8 on AVX-512 VNNI: four (int4) or eight (int8) chunks at a time.
HM_VNNI inline void qmatmul_tiled_vnni(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                       int64_t tokens, float* out, int64_t out_stride, Columns columns) {
  tiled_groups(w, xq, xq_stride, tokens, out, out_stride, columns,
               [&](int64_t g, int64_t ch, int64_t left, const int32_t* xsum) -> int64_t {
    if (w.int4 && left >= 4) {
      tiled_chunks_vnni<4, false>(w, xq, xq_stride, xs, tokens, xsum, g, ch, out, out_stride);
      return 4;
    }
    if (!w.int4 && left >= 8) {
      tiled_chunks_vnni<8, true>(w, xq, xq_stride, xs, tokens, xsum, g, ch, out, out_stride);
      return 8;
    }
    if (w.int4) {
      tiled_chunks_vnni<1, false>(w, xq, xq_stride, xs, tokens, xsum, g, ch, out, out_stride);
    } else {
      tiled_chunks_vnni<1, true>(w, xq, xq_stride, xs, tokens, xsum, g, ch, out, out_stride);
    }
    return 1;
  });
}

// int8: per group and block of 8 columns, a tile of int16 pairs [code_i[c], code_i+1[c]]; madd with the token's
// (x_i, x_i+1) pair gives 8 int32 sums directly. Columns [c_begin, c_end) (c_end < 0: all); full blocks load their
// rows directly, a narrower last block through a zero-padded copy.
HM_AVX2 inline void qmatmul_int8_avx2(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                      int64_t tokens, float* out, int64_t out_stride, int64_t c_begin = 0,
                                      int64_t c_end = -1) {
  if (c_end < 0) c_end = w.cols;
  const int64_t pairs = (w.group + 1) / 2;
  std::vector<uint8_t> tile_bytes(static_cast<size_t>(pairs * 32));  // unaligned loads/stores only
  __m256i* tile = reinterpret_cast<__m256i*>(tile_bytes.data());
  alignas(32) int32_t lanes[8];
  auto row8 = [&](int64_t i, int64_t c0, int64_t width) -> __m128i {
    if (width == 8) return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.codes + i * w.cols + c0));
    alignas(16) int8_t padded[16] = {0};
    std::memcpy(padded, w.codes + i * w.cols + c0, static_cast<size_t>(width));
    return _mm_load_si128(reinterpret_cast<const __m128i*>(padded));
  };
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride + c_begin, out + t * out_stride + c_end, 0.0f);
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    const int64_t r0 = g * w.group;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += 8) {
      const int64_t width = std::min<int64_t>(8, c_end - c0);
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t i = r0 + 2 * p;
        const __m128i b = i + 1 < r0 + w.group ? row8(i + 1, c0, width) : _mm_setzero_si128();
        _mm256_storeu_si256(tile + p, _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(row8(i, c0, width), b)));
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

// Rows a and b of a 32-column int8 block as int16 pairs [a_c, b_c]: u[0] columns 0-3 of each 8, u[1] columns 4-7.
HM_AVX512 inline void int8_pair32(const int8_t* a, const int8_t* b, __m512i* u) {
  const __m512i wa = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  const __m512i wb = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  u[0] = _mm512_unpacklo_epi16(wa, wb);
  u[1] = _mm512_unpackhi_epi16(wa, wb);
}

// int8 on AVX-512BW: blocks of 32 columns (a narrower tail goes to the AVX2 path). A row pair widens to int16 and
// unpacks into [code_i[c], code_i+1[c]] pairs, columns in lane order (lo: 0-3 of each 8, hi: 4-7); madd with the
// token's (x_i, x_i+1) pair gives exact int32 sums, permuted back to column order before the common finish.
HM_AVX512 inline void qmatmul_int8_avx512(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                                          int64_t tokens, float* out, int64_t out_stride) {
  const int64_t full = w.cols / 32 * 32;
  if (full < w.cols) qmatmul_int8_avx2(w, xq, xq_stride, xs, tokens, out, out_stride, full, w.cols);
  if (full == 0) return;
  const int64_t pairs = (w.group + 1) / 2;
  alignas(32) static const int8_t zero_row[32] = {0};
  std::vector<uint8_t> tile_bytes(tokens > 1 ? static_cast<size_t>(pairs * 2 * 64) : 0);
  __m512i* tile = reinterpret_cast<__m512i*>(tile_bytes.data());  // unaligned loads/stores only
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);  // columns 0-15 from (lo, hi)
  const __m512i second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);  // columns 16-31
  const int8_t* codes = reinterpret_cast<const int8_t*>(w.codes);
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride, out + t * out_stride + full, 0.0f);
  for (int64_t g = 0; g < w.rows / w.group; ++g) {
    const int64_t r0 = g * w.group;
    for (int64_t c0 = 0; c0 < full; c0 += 32) {
      auto rows = [&](int64_t p, const int8_t** a, const int8_t** b) {  // no intrinsics: lambdas lose the target
        *a = codes + (r0 + 2 * p) * w.cols + c0;
        *b = 2 * p + 1 < w.group ? *a + w.cols : zero_row;
      };
      if (tokens > 1) {
        for (int64_t p = 0; p < pairs; ++p) {
          const int8_t *a, *b;
          rows(p, &a, &b);
          __m512i u[2];
          int8_pair32(a, b, u);
          _mm512_storeu_si512(tile + 2 * p, u[0]);
          _mm512_storeu_si512(tile + 2 * p + 1, u[1]);
        }
      }
      for (int64_t t = 0; t < tokens; ++t) {
        const int8_t* q = xq + t * xq_stride + r0;
        __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
        for (int64_t p = 0; p < pairs; ++p) {
          const int32_t second_x = (2 * p + 1 < w.group) ? q[2 * p + 1] : 0;
          const __m512i x = _mm512_set1_epi32(
              static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(q[2 * p]))) |
              static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(second_x)) << 16));
          __m512i u[2];
          if (tokens > 1) {
            u[0] = _mm512_loadu_si512(tile + 2 * p);
            u[1] = _mm512_loadu_si512(tile + 2 * p + 1);
          } else {
            const int8_t *a, *b;
            rows(p, &a, &b);
            int8_pair32(a, b, u);
          }
          lo = _mm512_add_epi32(lo, _mm512_madd_epi16(u[0], x));
          hi = _mm512_add_epi32(hi, _mm512_madd_epi16(u[1], x));
        }
        float* o = out + t * out_stride + c0;
        const uint16_t* sc = w.scales + g * w.cols + c0;
        const float xs_tg = act_scale(w, xs, t, g);
        finish16(_mm512_permutex2var_epi64(lo, first, hi), sc, nullptr, xs_tg, 0.0f, o);
        finish16(_mm512_permutex2var_epi64(lo, second, hi), sc + 16, nullptr, xs_tg, 0.0f, o + 16);
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
        int32_t group_sum = 0;
        for (int64_t i = 0; i < w.group; ++i) group_sum += q[i];
        finish_lanes(lanes, block_finish(w, xs, group_sum, t, g, c0, out, out_stride), width);
      }
    }
  }
}

// Tiled codes on NEON: per quad of rows each 16 bytes of a chunk hold four columns' four codes, summed per column
// into int32 against the token's four activations by dot4: SDOT where the CPU has it (ARMv8.2 dot product; build
// with -march=armv8.2-a+dotprod or later), else widening multiplies and pairwise adds (the same integers).
inline int32x4_t dot4(int32x4_t acc, int8x16_t codes, int8x16_t x) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, codes, x);
#else
  const int32x4_t low = vpaddlq_s16(vmull_s8(vget_low_s8(codes), vget_low_s8(x)));    // columns 0, 1 in pairs
  const int32x4_t high = vpaddlq_s16(vmull_s8(vget_high_s8(codes), vget_high_s8(x)));  // columns 2, 3
  // 64-bit pairwise adds (ARMv7 has no vpaddq_s32): columns 0, 1 then 2, 3
  const int32x2_t first = vpadd_s32(vget_low_s32(low), vget_high_s32(low));
  const int32x2_t second = vpadd_s32(vget_low_s32(high), vget_high_s32(high));
  return vaddq_s32(acc, vcombine_s32(first, second));
#endif
}

// Tokens t0 .. t0 + T - 1 over chunk ch of row group g: each 16 bytes of codes are loaded (and split into nibbles)
// once for the T tokens.
template <int T>
inline void tiled_tokens_neon(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                              const int32_t* xsum, int64_t g, int64_t ch, int64_t t0, float* out, int64_t out_stride) {
  const int64_t quads = w.group / 4, width = w.chunk_width();
  const uint8_t* base = w.tile(g, ch);
  // int4: columns 4m .. 4m + 3 (low nibbles, m < 4) and 16 + 4(m - 4) .. (high, m >= 4); int8: 4m .., m < 4
  int32x4_t acc[T][8];
  for (auto& row : acc) {
    for (auto& v : row) v = vdupq_n_s32(0);
  }
  for (int64_t k = 0; k < quads; ++k) {
    int8x16_t x[T];
    for (int u = 0; u < T; ++u) {
      int32_t four;
      std::memcpy(&four, xq + (t0 + u) * xq_stride + g * w.group + 4 * k, sizeof(four));
      x[u] = vreinterpretq_s8_s32(vdupq_n_s32(four));
    }
    for (int m = 0; m < 4; ++m) {
      const uint8x16_t v = vld1q_u8(base + 64 * k + 16 * m);
      if (w.int4) {
        const int8x16_t low = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15)));
        const int8x16_t high = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        for (int u = 0; u < T; ++u) {
          acc[u][m] = dot4(acc[u][m], low, x[u]);
          acc[u][4 + m] = dot4(acc[u][4 + m], high, x[u]);
        }
      } else {
        for (int u = 0; u < T; ++u) acc[u][m] = dot4(acc[u][m], vreinterpretq_s8_u8(v), x[u]);
      }
    }
  }
  alignas(16) int32_t sums[32];
  for (int u = 0; u < T; ++u) {
    const BlockFinish f = block_finish(w, xs, xsum[t0 + u], t0 + u, g, ch * width, out, out_stride);
    for (int m = 0; m < (w.int4 ? 8 : 4); ++m) vst1q_s32(sums + 4 * m, vsubq_s32(acc[u][m], vdupq_n_s32(f.offset)));
    finish_lanes(sums, f, std::min<int64_t>(width, w.cols - ch * width));
  }
}

// Tiled codes on NEON: chunk after chunk, three tokens at a time (24 of the 32 registers accumulate), then one by one.
inline void qmatmul_tiled_neon(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs,
                               int64_t tokens, float* out, int64_t out_stride, Columns columns) {
  tiled_groups(w, xq, xq_stride, tokens, out, out_stride, columns,
               [&](int64_t g, int64_t ch, int64_t, const int32_t* xsum) -> int64_t {
    int64_t t = 0;
    for (; t + 3 <= tokens; t += 3) tiled_tokens_neon<3>(w, xq, xq_stride, xs, xsum, g, ch, t, out, out_stride);
    for (; t < tokens; ++t) tiled_tokens_neon<1>(w, xq, xq_stride, xs, xsum, g, ch, t, out, out_stride);
    return 1;
  });
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
// operations per group as per row, on the active path.
inline void quantize_groups(const float* x, int64_t tokens, int64_t n, int64_t stride, int64_t group, int8_t* xq,
                            int64_t xq_stride, float* xs) {
  const int64_t groups = n / group;
  for (int64_t t = 0; t < tokens; ++t) {
    int8_t* q = xq + t * xq_stride;
    std::memset(q, 0, static_cast<size_t>(xq_stride));
    for (int64_t g = 0; g < groups; ++g) {
      quantize_rows(x + t * stride + g * group, 1, group, group, q + g * group, group, xs + t * groups + g);
    }
  }
}

// Dispatch to `isa` (default: the active path). A tiled matrix may be given a range of `columns` (see Columns):
// only those columns of out are written, each with the bits of the whole product; other matrices take all.
inline void qmatmul(const QMatrix& w, const int8_t* xq, int64_t xq_stride, const float* xs, int64_t tokens, float* out,
                    int64_t out_stride, Isa isa = active_isa(), Columns columns = {}) {
#if defined(HM_KERNELS_X86) && (defined(__GNUC__) || defined(__clang__))
  if (w.tiled && isa == Isa::Avx512Vnni) {
    qmatmul_tiled_vnni(w, xq, xq_stride, xs, tokens, out, out_stride, columns);
    return;
  }
  if (w.tiled && (isa == Isa::Avx2 || isa == Isa::Avx512)) {
    qmatmul_tiled_avx2(w, xq, xq_stride, xs, tokens, out, out_stride, columns);
    return;
  }
  if (isa == Isa::Avx512Vnni && w.int4 && w.group % 4 == 0) {
    qmatmul_int4_vnni(w, xq, xq_stride, xs, tokens, out, out_stride);
    return;
  }
  if ((isa == Isa::Avx512 || isa == Isa::Avx512Vnni) && w.int4) {
    qmatmul_int4_avx512(w, xq, xq_stride, xs, tokens, out, out_stride);
    return;
  }
  if ((isa == Isa::Avx512 || isa == Isa::Avx512Vnni) && !w.int4) {
    qmatmul_int8_avx512(w, xq, xq_stride, xs, tokens, out, out_stride);
    return;
  }
  if (isa == Isa::Avx2 || isa == Isa::Avx512 || isa == Isa::Avx512Vnni) {
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
    if (w.tiled) {
      qmatmul_tiled_neon(w, xq, xq_stride, xs, tokens, out, out_stride, columns);
    } else {
      qmatmul_neon(w, xq, xq_stride, xs, tokens, out, out_stride);
    }
    return;
  }
#endif
  qmatmul_scalar(w, xq, xq_stride, xs, tokens, out, out_stride, w.tiled ? columns : Columns{});
}

}  // namespace hm_kernels
