// CRC-32 of bank blocks (zlib's polynomial and values): carry-less multiply folding on x86 (VPCLMULQDQ with
// AVX-512 or PCLMULQDQ, chosen at run time) and the
// CRC32 instructions on arm64 where the CPU has them, zlib's crc32 otherwise and for the tails.
#include <zlib.h>

#include <cstdint>
#include <cstring>

#include "bank.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HM_CRC_X86 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#define HM_CRC_ARM 1
#endif

namespace hm {
namespace {

#if HM_CRC_X86
// Folds 64-byte blocks four lanes at a time, then 16-byte blocks, then Barrett-reduces to 32 bits (Gopal et al.,
// "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ", bit-reflected constants of the CRC-32
// polynomial). `crc` is the running value without zlib's final inversion; len >= 64 and a multiple of 16.
// Folds the four 128-bit lanes x1..x4 (consecutive 16-byte chunks) into one, then the remaining 16-byte blocks,
// then Barrett-reduces to 32 bits. len: the bytes left at buf, a multiple of 16.
__attribute__((target("sse4.1,pclmul"))) uint32_t fold_tail(__m128i x1, __m128i x2, __m128i x3, __m128i x4,
                                                            const uint8_t* buf, size_t len) {
  alignas(16) static const uint64_t k3k4[] = {0x01751997d0, 0x00ccaa009e};
  alignas(16) static const uint64_t k5k0[] = {0x0163cd6124, 0x0000000000};
  alignas(16) static const uint64_t poly[] = {0x01db710641, 0x01f7011641};
  __m128i x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(k3k4)), x5;
  for (__m128i next : {x2, x3, x4}) {
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, next), x5);
  }
  while (len >= 16) {
    x2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf));
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    buf += 16;
    len -= 16;
  }
  x2 = _mm_clmulepi64_si128(x1, x0, 0x10);  // 128 -> 64 bits
  x3 = _mm_setr_epi32(~0, 0, ~0, 0);
  x1 = _mm_srli_si128(x1, 8);
  x1 = _mm_xor_si128(x1, x2);
  x0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(k5k0));
  x2 = _mm_srli_si128(x1, 4);
  x1 = _mm_and_si128(x1, x3);
  x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
  x1 = _mm_xor_si128(x1, x2);
  x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(poly));  // Barrett reduction to 32 bits
  x2 = _mm_and_si128(x1, x3);
  x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
  x2 = _mm_and_si128(x2, x3);
  x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
  x1 = _mm_xor_si128(x1, x2);
  return static_cast<uint32_t>(_mm_extract_epi32(x1, 1));
}

// Folds 64-byte blocks four lanes at a time (Gopal et al., "Fast CRC Computation for Generic Polynomials Using
// PCLMULQDQ", bit-reflected constants x^(512+-32) mod P of the CRC-32 polynomial). `crc` is the running value
// without zlib's final inversion; len >= 64 and a multiple of 16.
__attribute__((target("sse4.1,pclmul"))) uint32_t crc32_fold(const uint8_t* buf, size_t len, uint32_t crc) {
  alignas(16) static const uint64_t k1k2[] = {0x0154442bd4, 0x01c6e41596};
  const __m128i x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(k1k2));
  __m128i x[4];
  for (int i = 0; i < 4; ++i) x[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 16 * i));
  x[0] = _mm_xor_si128(x[0], _mm_cvtsi32_si128(static_cast<int>(crc)));
  for (buf += 64, len -= 64; len >= 64; buf += 64, len -= 64)
    for (int i = 0; i < 4; ++i)
      x[i] = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x[i], x0, 0x00), _mm_clmulepi64_si128(x[i], x0, 0x11)),
                           _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 16 * i)));
  return fold_tail(x[0], x[1], x[2], x[3], buf, len);
}

#define HM_AVX512 __attribute__((target("avx512f,vpclmulqdq,sse4.1,pclmul")))
HM_AVX512 inline __m512i fold(__m512i acc, __m512i k, __m512i next) {  // acc.lo * k.lo ^ acc.hi * k.hi ^ next
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(acc, k, 0x00), _mm512_clmulepi64_epi128(acc, k, 0x11),
                                   next, 0x96);
}

// The same with VPCLMULQDQ on four 512-bit accumulators (256 bytes per step; constants x^(2048+-32) mod P), the
// accumulators folded into one by 512 bits, its four lanes finished by fold_tail. len >= 256, multiple of 16.
HM_AVX512 uint32_t crc32_fold512(const uint8_t* buf, size_t len, uint32_t crc) {
  const __m512i k2048 = _mm512_set_epi64(0x1322d1430, 0x11542778a, 0x1322d1430, 0x11542778a, 0x1322d1430,
                                         0x11542778a, 0x1322d1430, 0x11542778a);
  const __m512i k512 = _mm512_set_epi64(0x1c6e41596, 0x154442bd4, 0x1c6e41596, 0x154442bd4, 0x1c6e41596,
                                        0x154442bd4, 0x1c6e41596, 0x154442bd4);
  __m512i x[4];
  for (int i = 0; i < 4; ++i) x[i] = _mm512_loadu_si512(buf + 64 * i);
  x[0] = _mm512_xor_si512(x[0], _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc))));
  for (buf += 256, len -= 256; len >= 256; buf += 256, len -= 256)
    for (int i = 0; i < 4; ++i) x[i] = fold(x[i], k2048, _mm512_loadu_si512(buf + 64 * i));
  for (int i = 1; i < 4; ++i) x[i] = fold(x[i - 1], k512, x[i]);
  alignas(64) __m128i lanes[4];  // (a store: GCC 12 warns spuriously about _mm512_extracti32x4_epi32)
  _mm512_store_si512(lanes, x[3]);
  return fold_tail(lanes[0], lanes[1], lanes[2], lanes[3], buf, len);
}

bool cpu_has_fold() {
  static const bool has = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return has;
}

bool cpu_has_fold512() {
  static const bool has = cpu_has_fold() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
  return has;
}
#endif

}  // namespace

const char* crc32_method() {
#if HM_CRC_X86
  return cpu_has_fold512() ? "vpclmulqdq-avx512" : cpu_has_fold() ? "pclmulqdq" : "zlib";
#elif HM_CRC_ARM
  return "armv8-crc32";
#else
  return "zlib";
#endif
}

uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc) {
#if HM_CRC_X86
  if (size >= 64 && cpu_has_fold()) {
    const size_t chunk = size & ~static_cast<size_t>(15);
    crc = ~(chunk >= 256 && cpu_has_fold512() ? crc32_fold512(data, chunk, ~crc) : crc32_fold(data, chunk, ~crc));
    data += chunk;
    size -= chunk;
  }
#elif HM_CRC_ARM
  uint32_t state = ~crc;
  for (; size >= 8; data += 8, size -= 8) {
    uint64_t word;
    std::memcpy(&word, data, 8);
    state = __crc32d(state, word);
  }
  crc = ~state;
#endif
  while (size > 0) {  // zlib takes at most UINT_MAX bytes per call
    const uInt step = static_cast<uInt>(size > (1u << 30) ? (1u << 30) : size);
    crc = static_cast<uint32_t>(::crc32(crc, data, step));
    data += step;
    size -= step;
  }
  return crc;
}

}  // namespace hm
