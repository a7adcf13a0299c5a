#include "json.hpp"

#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <unordered_set>

namespace hm::json {
namespace {

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  Value document() {
    Value value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("trailing characters");
    return value;
  }

 private:
  static constexpr int kMaxDepth = 64;  // manifests nest a few levels; refuse pathological input
  std::string_view text_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("malformed JSON: " + why + " at byte " + std::to_string(pos_));
  }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' ||
                                   text_[pos_] == '\t'))
      ++pos_;
  }
  bool consume(char c) {
    skip_space();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!consume(c)) fail(std::string("expected '") + c + "'");
  }
  bool literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting too deep");
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end");
    Value value;
    char c = text_[pos_];
    if (c == '{') {
      value.kind = Value::Kind::Object;
      ++pos_;
      if (consume('}')) return value;
      std::unordered_set<std::string> keys;  // a duplicate key would mean one thing here, another in Python
      do {
        skip_space();
        std::string key = parse_string();
        if (!keys.insert(key).second) fail("duplicate key '" + key.substr(0, 80) + "'");
        expect(':');
        value.object.emplace_back(std::move(key), parse_value(depth + 1));
      } while (consume(','));
      expect('}');
    } else if (c == '[') {
      value.kind = Value::Kind::Array;
      ++pos_;
      if (consume(']')) return value;
      do value.array.push_back(parse_value(depth + 1));
      while (consume(','));
      expect(']');
    } else if (c == '"') {
      value.kind = Value::Kind::String;
      value.string = parse_string();
    } else if (literal("true")) {
      value.kind = Value::Kind::Bool;
      value.boolean = true;
    } else if (literal("false")) {
      value.kind = Value::Kind::Bool;
    } else if (literal("null")) {
      value.kind = Value::Kind::Null;
    } else if (literal("NaN") || literal("Infinity") || literal("-Infinity")) {
      fail("non-finite number");
    } else {
      value.kind = Value::Kind::Number;
      value.number = parse_number();
    }
    return value;
  }

  double parse_number() {
    size_t start = pos_;
    if (pos_ < text_.size() && text_[pos_] == '-') ++pos_;
    while (pos_ < text_.size() && std::string_view("0123456789.eE+-").find(text_[pos_]) != std::string_view::npos)
      ++pos_;
    std::string digits(text_.substr(start, pos_ - start));
    char* end = nullptr;
    double number = std::strtod(digits.c_str(), &end);
    if (digits.empty() || end != digits.c_str() + digits.size()) fail("bad number");
    if (!std::isfinite(number)) fail("number out of range");
    return number;
  }

  std::string parse_string() {
    if (pos_ >= text_.size() || text_[pos_] != '"') fail("expected a string");
    ++pos_;
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) fail("unterminated string");
      char c = text_[pos_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) fail("unterminated escape");
      char e = text_[pos_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': append_utf8(out, parse_codepoint()); break;
        default: fail("bad escape");
      }
    }
  }

  unsigned hex4() {
    if (pos_ + 4 > text_.size()) fail("short \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      char h = text_[pos_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= h - '0';
      else if (h >= 'a' && h <= 'f') code |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') code |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return code;
  }

  unsigned parse_codepoint() {
    unsigned code = hex4();
    if (code >= 0xD800 && code < 0xDC00 && literal("\\u")) {  // surrogate pair (Python escapes non-BMP so)
      unsigned low = hex4();
      code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }
};

[[noreturn]] void type_error(std::string_view what, const char* wanted) {
  throw std::runtime_error(std::string(what) + ": expected " + wanted);
}

}  // namespace

Value parse(std::string_view text) { return Parser(text).document(); }

const Value* Value::find(std::string_view key) const {
  if (kind != Kind::Object) return nullptr;
  for (const auto& [name, value] : object)
    if (name == key) return &value;
  return nullptr;
}

const Value& Value::at(std::string_view key, std::string_view what) const {
  const Value* value = find(key);
  if (value == nullptr) throw std::runtime_error(std::string(what) + ": missing field '" + std::string(key) + "'");
  return *value;
}

double Value::as_number(std::string_view what) const {
  if (kind != Kind::Number) type_error(what, "a number");
  return number;
}

int64_t Value::as_int(std::string_view what) const {
  double value = as_number(what);
  if (std::floor(value) != value || std::fabs(value) > 9007199254740992.0) type_error(what, "an integer");
  return static_cast<int64_t>(value);
}

const std::string& Value::as_string(std::string_view what) const {
  if (kind != Kind::String) type_error(what, "a string");
  return string;
}

const std::vector<Value>& Value::as_array(std::string_view what) const {
  if (kind != Kind::Array) type_error(what, "an array");
  return array;
}

std::vector<int64_t> Value::as_int_list(std::string_view what) const {
  std::vector<int64_t> out;
  for (const Value& item : as_array(what)) out.push_back(item.as_int(what));
  return out;
}

}  // namespace hm::json
