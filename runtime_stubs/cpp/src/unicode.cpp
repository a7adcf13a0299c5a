#include "unicode.hpp"

#include <algorithm>
#include <iterator>

#include "hm_runtime.hpp"

namespace hm::unicode {
namespace {

struct ClassRange {
  char32_t first, last;
  uint16_t flags;
};
struct Mapping {
  char32_t code;
  uint32_t offset, length;  // into the pool
};
struct CombiningClass {
  char32_t code;
  uint8_t ccc;
};

#include "unicode_data.inc"

template <typename Row, size_t N>
const Row* find(const Row (&rows)[N], char32_t c) {
  const Row* it = std::lower_bound(std::begin(rows), std::end(rows), c,
                                   [](const Row& row, char32_t value) { return row.code < value; });
  return it != std::end(rows) && it->code == c ? it : nullptr;
}

constexpr char32_t kHangulBase = 0xAC00, kHangulCount = 11172;

int combining_class(char32_t c) {
  const CombiningClass* row = find(kCombining, c);
  return row ? row->ccc : 0;
}

}  // namespace

uint16_t flags(char32_t c) {
  const ClassRange* it = std::upper_bound(std::begin(kClasses), std::end(kClasses), c,
                                          [](char32_t value, const ClassRange& range) { return value < range.first; });
  if (it == std::begin(kClasses)) return 0;
  --it;
  return c <= it->last ? it->flags : 0;
}

std::u32string decode_utf8(std::string_view text, const std::string& what) {
  std::u32string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const auto byte = static_cast<unsigned char>(text[i]);
    int length = byte < 0x80 ? 1 : (byte >> 5) == 0x6 ? 2 : (byte >> 4) == 0xE ? 3 : (byte >> 3) == 0x1E ? 4 : 0;
    char32_t c = length == 1 ? byte : length == 2 ? byte & 0x1F : length == 3 ? byte & 0x0F : byte & 0x07;
    bool ok = length > 0 && i + length <= text.size();
    for (int k = 1; ok && k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      ok = (next & 0xC0) == 0x80;
      c = c << 6 | (next & 0x3F);
    }
    static const char32_t kMinimum[] = {0, 0, 0x80, 0x800, 0x10000};
    if (!ok || c < kMinimum[length] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
      throw Error(what + ": not valid UTF-8 at byte " + std::to_string(i));
    out.push_back(c);
    i += length;
  }
  return out;
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | c >> 6);
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | c >> 12);
    out += static_cast<char>(0x80 | (c >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | c >> 18);
    out += static_cast<char>(0x80 | (c >> 12 & 0x3F));
    out += static_cast<char>(0x80 | (c >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

std::string to_utf8(std::u32string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t c : text) append_utf8(out, c);
  return out;
}

std::string lossy_utf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  const auto at = [&](size_t i) { return static_cast<unsigned char>(bytes[i]); };
  for (size_t i = 0; i < bytes.size();) {
    const unsigned char b = at(i);
    if (b < 0x80) {
      out += static_cast<char>(b);
      ++i;
      continue;
    }
    // Unicode 3.9 Table 3-7: the valid second-byte range depends on the lead byte.
    int length = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) length = 2;
    else if (b >= 0xE0 && b <= 0xEF) length = 3, lo = b == 0xE0 ? 0xA0 : 0x80, hi = b == 0xED ? 0x9F : 0xBF;
    else if (b >= 0xF0 && b <= 0xF4) length = 4, lo = b == 0xF0 ? 0x90 : 0x80, hi = b == 0xF4 ? 0x8F : 0xBF;
    size_t k = 1;
    if (length > 0) {
      for (; k < static_cast<size_t>(length) && i + k < bytes.size(); ++k) {
        const unsigned char next = at(i + k);
        if (k == 1 ? (next < lo || next > hi) : (next & 0xC0) != 0x80) break;
      }
    }
    if (length > 0 && k == static_cast<size_t>(length)) {
      out.append(bytes.substr(i, length));
      i += length;
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD for the maximal subpart
      i += length > 0 ? k : 1;
    }
  }
  return out;
}

std::u32string nfd(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  for (char32_t c : text) {
    if (c >= kHangulBase && c < kHangulBase + kHangulCount) {  // algorithmic: L V (T)
      const char32_t index = c - kHangulBase;
      out.push_back(0x1100 + index / 588);
      out.push_back(0x1161 + index % 588 / 28);
      if (index % 28) out.push_back(0x11A7 + index % 28);
    } else if (const Mapping* row = find(kDecompositions, c)) {
      out.append(kDecompositionsPool + row->offset, row->length);
    } else {
      out.push_back(c);
    }
  }
  // Canonical ordering: a stable sort of every run of non-starters by combining class.
  for (size_t i = 0; i < out.size();) {
    if (combining_class(out[i]) == 0) {
      ++i;
      continue;
    }
    size_t end = i;
    while (end < out.size() && combining_class(out[end]) != 0) ++end;
    std::stable_sort(out.begin() + i, out.begin() + end,
                     [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = end;
  }
  return out;
}

void append_lowercase(std::u32string& out, char32_t c) {
  if (const Mapping* row = find(kLowercase, c)) out.append(kLowercasePool + row->offset, row->length);
  else out.push_back(c);
}

}  // namespace hm::unicode
