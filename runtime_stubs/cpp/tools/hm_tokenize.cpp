// hm_tokenize: the native tokenizers on JSON lines, for comparing them with the `tokenizers` library.
//
//   hm_tokenize TOKENIZER_JSON [--decode] < IN > OUT
//
// Encode (default): each input line is a JSON string; each output line the JSON list of its ids.
// --decode: each input line is a JSON list of ids; each output line the JSON string of their text.
// Exit code 2 on bad input (message on stderr).
#include <iostream>
#include <memory>
#include <string>

#include "files.hpp"
#include "hm_runtime.hpp"
#include "json.hpp"
#include "tokenizer.hpp"

namespace {

std::string quote(const std::string& text) {
  static const char* hex = "0123456789abcdef";
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') out += '\\', out += static_cast<char>(c);
    else if (c < 0x20) out += "\\u00", out += hex[c >> 4], out += hex[c & 15];
    else out += static_cast<char>(c);
  }
  return out + "\"";
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2 || argc > 3 || (argc == 3 && std::string(argv[2]) != "--decode"))
      throw hm::Error("usage: hm_tokenize TOKENIZER_JSON [--decode] < lines");
    const std::unique_ptr<hm::Tokenizer> tokenizer = hm::Tokenizer::from_file(argv[1]);
    const bool decode = argc == 3;
    std::string line;
    for (size_t number = 1; std::getline(std::cin, line); ++number) {
      const hm::json::Value value = hm::json::parse(line);
      if (decode) {
        std::cout << quote(tokenizer->decode(value.as_int_list("ids"))) << "\n";
        continue;
      }
      std::string out = "[";
      for (int64_t id : tokenizer->encode(value.as_string("line " + std::to_string(number))))
        out += (out.size() > 1 ? "," : "") + std::to_string(id);
      std::cout << out << "]\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
