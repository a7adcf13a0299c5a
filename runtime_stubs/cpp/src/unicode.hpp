// Character classes, decompositions and case mappings for the tokenizers, read off the Hugging Face
// `tokenizers` library (scripts/gen_unicode_tables.py writes unicode_data.inc), plus UTF-8 helpers.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace hm::unicode {

enum Flag : uint16_t {
  kLetter = 1 << 0,          // \p{L} of the ByteLevel pre-tokenizer's regex
  kNumber = 1 << 1,          // \p{N}
  kSpace = 1 << 2,           // \s
  kBertSpace = 1 << 3,       // BertNormalizer clean_text: becomes ' ' (BertPreTokenizer splits on it)
  kBertControl = 1 << 4,     // BertNormalizer clean_text: removed
  kBertPunct = 1 << 5,       // BertPreTokenizer: isolated
  kNonspacingMark = 1 << 6,  // StripAccents: removed
  kCjk = 1 << 7,             // BertNormalizer handle_chinese_chars: padded with spaces
  kWord = 1 << 8,            // \w (the Whitespace pre-tokenizer's regex)
};

uint16_t flags(char32_t c);
inline bool has(char32_t c, Flag flag) { return (flags(c) & flag) != 0; }

// Code points of valid UTF-8; throws hm::Error("{what}: not valid UTF-8 at byte N") otherwise.
std::u32string decode_utf8(std::string_view text, const std::string& what);
void append_utf8(std::string& out, char32_t c);
std::string to_utf8(std::u32string_view text);
// Bytes as UTF-8 with every maximal invalid subsequence replaced by U+FFFD (Rust's from_utf8_lossy).
std::string lossy_utf8(std::string_view bytes);

// Canonical decomposition (NFD) of a string: every character fully decomposed, marks reordered by class.
std::u32string nfd(std::u32string_view text);
// Appends the lower-case mapping of c (one or more characters).
void append_lowercase(std::u32string& out, char32_t c);

}  // namespace hm::unicode
