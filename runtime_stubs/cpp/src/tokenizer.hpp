// Tokenizers from a Hugging Face tokenizer.json, giving the ids the `tokenizers` library gives:
//  - the LM's byte-level BPE (ByteLevel / Digits pre-tokenizers, merges by rank, added tokens, ByteLevel decoder);
//  - the router's WordPiece (BertNormalizer: clean text, CJK spacing, accent stripping, lower-casing;
//    BertPreTokenizer; greedy longest-match WordPiece; [CLS] ... [SEP]; truncation).
// Anything else in the file (another model, normalizer, pre-tokenizer or option) is refused at load with an
// error naming the file and the component, rather than tokenized differently.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace hm {

class Tokenizer {
 public:
  static constexpr uint64_t kMaxBytes = 256ull << 20;  // the Python loader's MAX_TOKENIZER_BYTES

  // Parses and checks a tokenizer.json held in memory (a bundle's, read through its Tree with the listed
  // size); throws hm::Error naming `path` and what it cannot handle.
  Tokenizer(const std::string& json_text, const std::string& path);
  // A tokenizer.json a user named (hm_tokenize): followed if a symlink, a regular file of at most kMaxBytes.
  static std::unique_ptr<Tokenizer> from_file(const std::string& path);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of UTF-8 `text`, with the file's post-processor (e.g. [CLS] ... [SEP]) and truncation.
  std::vector<int64_t> encode(const std::string& text) const;
  // UTF-8 text of `ids` (invalid byte sequences become U+FFFD); special added tokens and ids outside the
  // vocabulary are skipped, as the library does (a model's vocabulary may be larger than its tokenizer's).
  std::string decode(const std::vector<int64_t>& ids) const;
  int vocab_size() const;
  int token_id(const std::string& token) const;  // -1 when not in the vocabulary

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace hm
