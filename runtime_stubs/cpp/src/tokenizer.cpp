#include "tokenizer.hpp"

#include <algorithm>
#include <map>
#include <mutex>
#include <queue>
#include <unordered_map>

#include "files.hpp"
#include "hm_runtime.hpp"
#include "unicode.hpp"

namespace hm {
namespace {

using unicode::has;

struct AddedToken {
  std::string content;
  int64_t id;
  bool special;
};

struct PairHash {
  size_t operator()(const std::pair<int, int>& p) const {
    return std::hash<uint64_t>()(static_cast<uint64_t>(p.first) << 32 | static_cast<uint32_t>(p.second));
  }
};

// The GPT-2 byte alphabet: printable bytes stand for themselves, the others map to U+0100 onwards.
const std::vector<char32_t>& byte_alphabet() {
  static const std::vector<char32_t> alphabet = [] {
    std::vector<char32_t> out(256);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      out[b] = printable ? static_cast<char32_t>(b) : next++;
    }
    return out;
  }();
  return alphabet;
}

bool is_contraction(const std::u32string& s, size_t i, size_t* length) {  // 's 't 're 've 'm 'll 'd
  if (s[i] != U'\'' || i + 1 >= s.size()) return false;
  const char32_t a = s[i + 1], b = i + 2 < s.size() ? s[i + 2] : 0;
  if (a == U's' || a == U't' || a == U'm' || a == U'd') return *length = 2, true;
  if ((a == U'r' && b == U'e') || (a == U'v' && b == U'e') || (a == U'l' && b == U'l')) return *length = 3, true;
  return false;
}

// The ByteLevel regex 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+, by hand.
void split_gpt2(const std::u32string& s, std::vector<std::u32string>& out) {
  auto cls = [&](size_t i) {
    const uint16_t f = unicode::flags(s[i]);
    return f & unicode::kLetter ? 'L' : f & unicode::kNumber ? 'N' : f & unicode::kSpace ? 'S' : 'O';
  };
  for (size_t i = 0; i < s.size();) {
    size_t length = 0, j = i;
    if (is_contraction(s, i, &length)) {
      j = i + length;
    } else {
      const size_t start = s[i] == U' ' && i + 1 < s.size() && cls(i + 1) != 'S' ? i + 1 : i;
      const char c = cls(start);
      if (c != 'S') {
        j = start;
        while (j < s.size() && cls(j) == c) ++j;
      } else {  // whitespace: all of it at the end of the text, else all but the last character (or one)
        while (j < s.size() && cls(j) == 'S') ++j;
        if (j < s.size() && j - i > 1) --j;
      }
    }
    out.push_back(s.substr(i, j - i));
    i = j;
  }
}

}  // namespace

struct Tokenizer::Impl {
  std::string path;
  std::string model;  // "BPE" or "WordPiece"
  std::unordered_map<std::string, int> vocab;
  std::vector<std::string> tokens;  // id -> token
  std::vector<AddedToken> added;
  std::vector<bool> special;  // id -> special added token
  // Normalizer (BertNormalizer) and pre-tokenizers.
  bool bert_normalizer = false, clean_text = false, chinese = false, strip_accents = false, lowercase = false;
  struct PreTokenizer {
    std::string type;
    bool add_prefix_space = false, individual_digits = false;
  };
  std::vector<PreTokenizer> pre_tokenizers;
  // BPE
  std::unordered_map<std::pair<int, int>, std::pair<int, int>, PairHash> merges;  // pair -> (rank, merged id)
  bool ignore_merges = false;
  int unk = -1;
  bool added_first_byte[256] = {};  // bytes an added token starts with
  std::unordered_map<char32_t, uint8_t> alphabet_bytes;  // alphabet character -> byte
  bool byte_level = false, byte_level_decoder = false;
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int>> cache;
  // WordPiece
  std::string prefix = "##";
  bool has_decoder = false;
  size_t max_chars = 100;
  // Post-processing: ids before and after the sequence; truncation of the whole encoding.
  std::vector<int64_t> before, after;
  size_t max_length = 0;  // 0: no truncation

  [[noreturn]] void refuse(const std::string& why) const { throw Error(path + ": " + why); }
  // An id, length or count from the file, in [0, kMaxId] (every table sized from one stays bounded).
  static constexpr int64_t kMaxId = 1 << 24;
  size_t bounded(const json::Value& value, const std::string& what) const {
    const int64_t v = value.as_int(what);
    if (v < 0 || v > kMaxId) refuse(what + " " + std::to_string(v) + " is outside [0, " + std::to_string(kMaxId) + "]");
    return static_cast<size_t>(v);
  }
  void read_added(const json::Value& root);
  void read_normalizer(const json::Value* normalizer);
  void read_pre_tokenizer(const json::Value* pre);
  void read_model(const json::Value& model);
  void read_post(const json::Value* post);
  int id_of(const std::string& token, const std::string& what) const {
    auto it = vocab.find(token);
    if (it == vocab.end()) refuse(what + " '" + token + "' is not in the vocabulary");
    return it->second;
  }
  std::u32string normalize(std::u32string text) const;
  std::vector<std::u32string> pre_tokenize(const std::u32string& text) const;
  void bpe(const std::u32string& piece, std::vector<int64_t>& out) const;
  void wordpiece(const std::u32string& word, std::vector<int64_t>& out) const;
  void encode_segment(const std::string& text, std::vector<int64_t>& out) const;
};

void Tokenizer::Impl::read_added(const json::Value& root) {
  if (const json::Value* list = root.find("added_tokens"); list && list->kind == json::Value::Kind::Array) {
    for (const json::Value& token : list->array) {
      AddedToken t{token.at("content", "added_tokens").as_string("added_tokens[].content"),
                   static_cast<int64_t>(bounded(token.at("id", "added_tokens"), "added_tokens[].id")),
                   token.find("special") && token.find("special")->boolean};
      for (const char* flag : {"lstrip", "rstrip", "single_word"})
        if (const json::Value* v = token.find(flag); v && v->boolean)
          refuse("added token '" + t.content + "' has " + flag + ", which this tokenizer does not implement");
      if (const json::Value* v = token.find("normalized"); v && v->boolean && bert_normalizer)
        refuse("added token '" + t.content + "' is matched after normalization, which this tokenizer does not implement");
      if (t.content.empty()) refuse("added token with empty content");
      added.push_back(std::move(t));
    }
  }
  // Leftmost-longest matching: at a position, the longest added token wins.
  std::stable_sort(added.begin(), added.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
}

void Tokenizer::Impl::read_normalizer(const json::Value* normalizer) {
  if (normalizer == nullptr || normalizer->kind == json::Value::Kind::Null) return;
  const std::string& type = normalizer->at("type", "normalizer").as_string("normalizer.type");
  if (type != "BertNormalizer") refuse("normalizer " + type + " is not supported (BertNormalizer or none)");
  bert_normalizer = true;
  auto flag = [&](const char* key, bool fallback) {
    const json::Value* v = normalizer->find(key);
    return v == nullptr || v->kind == json::Value::Kind::Null ? fallback : v->boolean;
  };
  clean_text = flag("clean_text", true);
  chinese = flag("handle_chinese_chars", true);
  lowercase = flag("lowercase", true);
  strip_accents = flag("strip_accents", lowercase);  // null: follows lowercase, as the library does
}

void Tokenizer::Impl::read_pre_tokenizer(const json::Value* pre) {
  if (pre == nullptr || pre->kind == json::Value::Kind::Null) return;
  const std::string& type = pre->at("type", "pre_tokenizer").as_string("pre_tokenizer.type");
  if (type == "Sequence") {
    for (const json::Value& step : pre->at("pretokenizers", "pre_tokenizer").as_array("pretokenizers"))
      read_pre_tokenizer(&step);
    return;
  }
  PreTokenizer step{type};
  if (type == "ByteLevel") {
    step.add_prefix_space = pre->find("add_prefix_space") && pre->find("add_prefix_space")->boolean;
    const json::Value* regex = pre->find("use_regex");
    if (regex && !regex->boolean) refuse("ByteLevel pre-tokenizer without its regex is not supported");
    byte_level = true;
  } else if (type == "Digits") {
    step.individual_digits = pre->find("individual_digits") && pre->find("individual_digits")->boolean;
  } else if (type != "BertPreTokenizer" && type != "Whitespace") {
    refuse("pre-tokenizer " + type + " is not supported (ByteLevel, Digits, BertPreTokenizer, Whitespace, Sequence)");
  }
  pre_tokenizers.push_back(step);
}

void Tokenizer::Impl::read_model(const json::Value& m) {
  model = m.at("type", "model").as_string("model.type");
  for (const auto& [token, id] : m.at("vocab", "model").object) {
    vocab[token] = static_cast<int>(bounded(id, "model.vocab id of '" + token + "'"));
  }
  if (const json::Value* u = m.find("unk_token"); u && u->kind == json::Value::Kind::String)
    unk = id_of(u->string, "unk_token");
  if (model == "BPE") {
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (const json::Value* v = m.find(key); v && v->kind == json::Value::Kind::String && !v->string.empty())
        refuse(std::string("BPE ") + key + " is not supported");
    if (const json::Value* v = m.find("dropout"); v && v->kind == json::Value::Kind::Number)
      refuse("BPE dropout is not supported (it is not deterministic)");
    for (const char* key : {"byte_fallback", "fuse_unk"})
      if (const json::Value* v = m.find(key); v && v->boolean) refuse(std::string("BPE ") + key + " is not supported");
    ignore_merges = m.find("ignore_merges") && m.find("ignore_merges")->boolean;
    int rank = 0;
    for (const json::Value& merge : m.at("merges", "model").as_array("model.merges")) {
      std::string left, right;
      if (merge.kind == json::Value::Kind::String) {  // "a b"
        const size_t space = merge.string.find(' ', 1);
        if (space == std::string::npos) refuse("merge '" + merge.string + "' is not two tokens");
        left = merge.string.substr(0, space), right = merge.string.substr(space + 1);
      } else {  // ["a", "b"]
        const auto& pair = merge.as_array("model.merges[]");
        if (pair.size() != 2) refuse("a merge is not two tokens");
        left = pair[0].as_string("merge"), right = pair[1].as_string("merge");
      }
      const int a = id_of(left, "merge token"), b = id_of(right, "merge token");
      merges.emplace(std::make_pair(a, b), std::make_pair(rank++, id_of(left + right, "merged token")));
    }
  } else if (model == "WordPiece") {
    if (const json::Value* p = m.find("continuing_subword_prefix"); p && p->kind == json::Value::Kind::String)
      prefix = p->string;
    if (const json::Value* n = m.find("max_input_chars_per_word"))
      max_chars = bounded(*n, "max_input_chars_per_word");
    if (unk < 0) refuse("WordPiece needs an unk_token");
  } else if (model == "WordLevel") {
    if (unk < 0) refuse("WordLevel needs an unk_token");
  } else {
    refuse("model " + model + " is not supported (BPE, WordPiece or WordLevel)");
  }
}

void Tokenizer::Impl::read_post(const json::Value* post) {
  if (post == nullptr || post->kind == json::Value::Kind::Null) return;
  const std::string& type = post->at("type", "post_processor").as_string("post_processor.type");
  if (type == "ByteLevel") return;  // offsets only
  if (type == "BertProcessing") {
    before = {static_cast<int64_t>(bounded(post->at("cls", "post_processor").as_array("cls").at(1), "cls id"))};
    after = {static_cast<int64_t>(bounded(post->at("sep", "post_processor").as_array("sep").at(1), "sep id"))};
    return;
  }
  if (type != "TemplateProcessing") refuse("post-processor " + type + " is not supported");
  const json::Value& specials = post->at("special_tokens", "post_processor");
  bool sequence = false;
  for (const json::Value& item : post->at("single", "post_processor").as_array("post_processor.single")) {
    if (item.find("Sequence")) {
      sequence = true;
      continue;
    }
    const std::string& name = item.at("SpecialToken", "single").at("id", "SpecialToken").as_string("SpecialToken.id");
    const json::Value& entry = specials.at(name, "post_processor.special_tokens");
    for (const json::Value& id : entry.at("ids", name).as_array(name + ".ids"))
      (sequence ? after : before).push_back(static_cast<int64_t>(bounded(id, name + ".ids[]")));
  }
}

std::u32string Tokenizer::Impl::normalize(std::u32string text) const {
  if (!bert_normalizer) return text;
  std::u32string out;
  out.reserve(text.size());
  for (char32_t c : text) {
    const uint16_t f = unicode::flags(c);
    if (clean_text && (f & unicode::kBertControl)) continue;
    if (clean_text && (f & unicode::kBertSpace)) c = U' ';
    if (chinese && (f & unicode::kCjk)) {
      out += U' ';
      out += c;
      out += U' ';
    } else {
      out += c;
    }
  }
  if (strip_accents) {
    std::u32string stripped;
    for (char32_t c : unicode::nfd(out))
      if (!has(c, unicode::kNonspacingMark)) stripped += c;
    out.swap(stripped);
  }
  if (lowercase) {
    std::u32string lowered;
    lowered.reserve(out.size());
    for (char32_t c : out) unicode::append_lowercase(lowered, c);
    out.swap(lowered);
  }
  return out;
}

std::vector<std::u32string> Tokenizer::Impl::pre_tokenize(const std::u32string& text) const {
  std::vector<std::u32string> pieces{text};
  for (const PreTokenizer& step : pre_tokenizers) {
    std::vector<std::u32string> next;
    for (const std::u32string& piece : pieces) {
      if (step.type == "ByteLevel") {
        std::u32string s = piece;
        if (step.add_prefix_space && (s.empty() || s[0] != U' ')) s.insert(s.begin(), U' ');
        split_gpt2(s, next);
      } else if (step.type == "Digits") {  // numbers isolated: each digit, or each run of digits
        size_t start = 0;
        for (size_t i = 1; i <= piece.size(); ++i) {
          const bool number = i < piece.size() && has(piece[i], unicode::kNumber);
          const bool previous = has(piece[i - 1], unicode::kNumber);
          if (i == piece.size() || number != previous || (number && step.individual_digits))
            next.push_back(piece.substr(start, i - start)), start = i;
        }
      } else if (step.type == "Whitespace") {  // \w+|[^\w\s]+ : word runs and symbol runs, spaces dropped
        for (size_t i = 0; i < piece.size();) {
          const bool word = has(piece[i], unicode::kWord);
          if (!word && has(piece[i], unicode::kSpace)) {
            ++i;
            continue;
          }
          size_t j = i + 1;
          while (j < piece.size() && (word ? has(piece[j], unicode::kWord)
                                           : !has(piece[j], unicode::kWord) && !has(piece[j], unicode::kSpace)))
            ++j;
          next.push_back(piece.substr(i, j - i));
          i = j;
        }
      } else {  // BertPreTokenizer: split on whitespace (dropped) and punctuation (isolated)
        std::u32string word;
        for (char32_t c : piece) {
          const uint16_t f = unicode::flags(c);
          if (f & (unicode::kBertSpace | unicode::kBertPunct)) {
            if (!word.empty()) next.push_back(word), word.clear();
            if (f & unicode::kBertPunct) next.emplace_back(1, c);
          } else {
            word += c;
          }
        }
        if (!word.empty()) next.push_back(word);
      }
    }
    pieces.swap(next);
  }
  return pieces;
}

// Merges by rank (lowest first, leftmost among equals), as the library's Word::merge_all.
void Tokenizer::Impl::bpe(const std::u32string& piece, std::vector<int64_t>& out) const {
  std::string bytes = unicode::to_utf8(piece);
  if (byte_level) {  // the piece's bytes, each as its alphabet character
    std::string mapped;
    for (unsigned char b : bytes) unicode::append_utf8(mapped, byte_alphabet()[b]);
    bytes.swap(mapped);
  }
  if (ignore_merges) {
    if (auto it = vocab.find(bytes); it != vocab.end()) return out.push_back(it->second);
  }
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (auto it = cache.find(bytes); it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  struct Symbol {
    int id, prev, next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  std::string character;
  for (char32_t c : unicode::decode_utf8(bytes, path)) {
    character.clear();
    unicode::append_utf8(character, c);
    auto it = vocab.find(character);
    const int id = it != vocab.end() ? it->second : unk;
    if (id < 0) continue;  // no unk: the character is dropped, as the library does
    symbols.push_back({id, static_cast<int>(symbols.size()) - 1, static_cast<int>(symbols.size()) + 1, true});
  }
  if (!symbols.empty()) symbols.back().next = -1;
  using Merge = std::tuple<int, int, int>;  // rank, position, merged id
  std::priority_queue<Merge, std::vector<Merge>, std::greater<Merge>> queue;
  auto push = [&](int pos) {
    const int next = symbols[pos].next;
    if (next < 0) return;
    auto it = merges.find({symbols[pos].id, symbols[next].id});
    if (it != merges.end()) queue.emplace(it->second.first, pos, it->second.second);
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) push(i);
  while (!queue.empty()) {
    auto [rank, pos, merged] = queue.top();
    queue.pop();
    Symbol& left = symbols[pos];
    if (!left.alive || left.next < 0) continue;
    auto it = merges.find({left.id, symbols[left.next].id});
    if (it == merges.end() || it->second.second != merged) continue;  // stale entry
    Symbol& right = symbols[left.next];
    right.alive = false;
    left.id = merged;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = pos;
    if (left.prev >= 0) push(left.prev);
    push(pos);
  }
  std::vector<int> ids;
  for (const Symbol& s : symbols)
    if (s.alive) ids.push_back(s.id);
  out.insert(out.end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (cache.size() > 50000) cache.clear();
  cache.emplace(std::move(bytes), std::move(ids));
}

// Greedy longest match from the left; a word with no match (or too long) is one unknown token.
void Tokenizer::Impl::wordpiece(const std::u32string& word, std::vector<int64_t>& out) const {
  if (word.size() > max_chars) return out.push_back(unk);
  std::vector<int64_t> pieces;
  for (size_t start = 0; start < word.size();) {
    int found = -1;
    size_t end = word.size();
    for (; end > start; --end) {
      std::string candidate = (start > 0 ? prefix : "") + unicode::to_utf8(word.substr(start, end - start));
      if (auto it = vocab.find(candidate); it != vocab.end()) {
        found = it->second;
        break;
      }
    }
    if (found < 0) return out.push_back(unk);
    pieces.push_back(found);
    start = end;
  }
  out.insert(out.end(), pieces.begin(), pieces.end());
}

void Tokenizer::Impl::encode_segment(const std::string& text, std::vector<int64_t>& out) const {
  if (text.empty()) return;
  for (const std::u32string& piece : pre_tokenize(normalize(unicode::decode_utf8(text, path + ": text")))) {
    if (piece.empty()) continue;
    if (model == "BPE") {
      bpe(piece, out);
    } else if (model == "WordPiece") {
      wordpiece(piece, out);
    } else {  // WordLevel: the whole piece or the unknown token
      auto it = vocab.find(unicode::to_utf8(piece));
      out.push_back(it != vocab.end() ? it->second : unk);
    }
  }
}

Tokenizer::Tokenizer(const std::string& json_text, const std::string& path) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.path = path;
  json::Value root = parse_json(json_text, path);
  try {
    m.read_normalizer(root.find("normalizer"));
    m.read_added(root);
    m.read_pre_tokenizer(root.find("pre_tokenizer"));
    m.read_model(root.at("model", "model"));
    m.read_post(root.find("post_processor"));
    if (const json::Value* t = root.find("truncation"); t && t->kind == json::Value::Kind::Object)
      m.max_length = m.bounded(t->at("max_length", "truncation"), "truncation.max_length");
    if (const json::Value* p = root.find("padding"); p && p->kind != json::Value::Kind::Null)
      m.refuse("padding is set: a runtime tokenizer must not pad (save the tokenizer with no_padding())");
    if (const json::Value* d = root.find("decoder"); d && d->kind == json::Value::Kind::Object) {
      m.has_decoder = true;
      m.byte_level_decoder = d->at("type", "decoder").as_string("decoder.type") == "ByteLevel";
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    m.refuse(e.what());
  }
  int size = 0;
  for (const auto& [token, id] : m.vocab) size = std::max(size, id + 1);
  for (const AddedToken& t : m.added) size = std::max<int>(size, static_cast<int>(t.id) + 1);
  for (const std::vector<int64_t>* ids : {&m.before, &m.after})
    for (int64_t id : *ids)  // every id encode() gives is below vocab_size()
      if (id >= size) m.refuse("post-processor id " + std::to_string(id) + " is not a token of the vocabulary");
  m.tokens.resize(size);
  m.special.assign(size, false);
  for (const auto& [token, id] : m.vocab) m.tokens[id] = token;
  for (const AddedToken& t : m.added) m.tokens[t.id] = t.content, m.special[t.id] = t.special;
  for (int b = 0; b < 256; ++b) m.alphabet_bytes[byte_alphabet()[b]] = static_cast<uint8_t>(b);
  for (const AddedToken& t : m.added) m.added_first_byte[static_cast<unsigned char>(t.content[0])] = true;
}

std::unique_ptr<Tokenizer> Tokenizer::from_file(const std::string& path) {
  return std::make_unique<Tokenizer>(read_file(path, kMaxBytes), path);
}

Tokenizer::~Tokenizer() = default;

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  const Impl& m = *impl_;
  std::vector<int64_t> ids;
  size_t done = 0;  // split on added tokens first (leftmost, longest), as the library does
  for (size_t i = 0; i < text.size();) {
    const AddedToken* match = nullptr;
    if (m.added_first_byte[static_cast<unsigned char>(text[i])])
      for (const AddedToken& t : m.added)
      if (text.compare(i, t.content.size(), t.content) == 0) {
        match = &t;
        break;
      }
    if (match == nullptr) {
      ++i;
      continue;
    }
    m.encode_segment(text.substr(done, i - done), ids);
    ids.push_back(match->id);
    i += match->content.size();
    done = i;
  }
  m.encode_segment(text.substr(done), ids);
  const size_t extra = m.before.size() + m.after.size();
  if (m.max_length > 0 && ids.size() + extra > m.max_length) ids.resize(m.max_length > extra ? m.max_length - extra : 0);
  ids.insert(ids.begin(), m.before.begin(), m.before.end());
  ids.insert(ids.end(), m.after.begin(), m.after.end());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  const Impl& m = *impl_;
  if (m.has_decoder && !m.byte_level_decoder) throw Error(m.path + ": decoding needs a ByteLevel decoder (or none)");
  std::string bytes;
  for (int64_t id : ids) {
    if (id < 0 || id >= static_cast<int64_t>(m.tokens.size()) || m.special[id]) continue;  // as the library
    const std::string& token = m.tokens[id];
    if (!m.has_decoder) {  // no decoder: the tokens joined by spaces, as the library does
      bytes += (bytes.empty() ? "" : " ") + token;
      continue;
    }
    std::string mapped;
    bool all_mapped = true;
    for (char32_t c : unicode::decode_utf8(token, m.path)) {
      auto it = m.alphabet_bytes.find(c);
      if (it == m.alphabet_bytes.end()) {
        all_mapped = false;
        break;
      }
      mapped += static_cast<char>(it->second);
    }
    bytes += all_mapped ? mapped : token;  // a token outside the byte alphabet stands for its own text
  }
  return unicode::lossy_utf8(bytes);
}

int Tokenizer::vocab_size() const { return static_cast<int>(impl_->tokens.size()); }

int Tokenizer::token_id(const std::string& token) const {
  auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? -1 : it->second;
}

}  // namespace hm
