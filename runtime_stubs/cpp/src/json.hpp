// A tiny JSON reader (RFC 8259; numbers as double, exact for integers up to 2^53).
// Enough for manifest.json, index.json, checks.json and safetensors headers; not a general library.
// Strict like hm_export.formats.parse_json: nesting deeper than 64, non-finite numbers and duplicate keys
// are refused, so a file cannot mean one thing to this reader and another to Python's.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hm::json {

class Value {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;  // in file order

  // Member lookup; nullptr when this is not an object or has no such key.
  const Value* find(std::string_view key) const;
  // Typed accessors: throw std::runtime_error naming `what` (e.g. "slot.tensors[2].shape") on a type mismatch.
  const Value& at(std::string_view key, std::string_view what) const;
  int64_t as_int(std::string_view what) const;
  double as_number(std::string_view what) const;
  const std::string& as_string(std::string_view what) const;
  const std::vector<Value>& as_array(std::string_view what) const;
  std::vector<int64_t> as_int_list(std::string_view what) const;
};

// Parses a whole document; throws std::runtime_error("... at byte N") on malformed input.
Value parse(std::string_view text);

}  // namespace hm::json
