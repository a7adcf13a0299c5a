#include "files.hpp"

#include <array>
#include <cstring>
#include <fstream>
#include <sstream>

#include "hm_runtime.hpp"

namespace hm {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open");
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

json::Value read_json(const std::string& path) {
  std::string text = read_text(path);
  try {
    return json::parse(text);
  } catch (const std::runtime_error& e) {
    throw Error(path + ": " + e.what());
  }
}

std::string safe_join(const std::string& root, const std::string& relative, const std::string& where) {
  if (relative.empty() || relative[0] == '/' || relative[0] == '\\')
    throw Error(where + ": path '" + relative + "' is not relative");
  size_t start = 0;
  while (start <= relative.size()) {
    size_t end = relative.find('/', start);
    if (end == std::string::npos) end = relative.size();
    std::string part = relative.substr(start, end - start);
    if (part.empty() || part == "." || part == "..")
      throw Error(where + ": path '" + relative + "' leaves the bundle or has an empty, '.' or '..' component");
    start = end + 1;
  }
  return root + "/" + relative;
}

namespace {

// FIPS 180-4 SHA-256, enough to check the manifest's file hashes.
class Sha256 {
 public:
  void update(const uint8_t* data, size_t size) {
    for (size_t i = 0; i < size; ++i) {
      block_[fill_++] = data[i];
      if (fill_ == 64) {
        compress();
        fill_ = 0;
      }
    }
    bits_ += static_cast<uint64_t>(size) * 8;
  }
  std::string hex() {
    uint64_t bits = bits_;
    const uint8_t one = 0x80, zero = 0;
    update(&one, 1);
    while (fill_ != 56) update(&zero, 1);
    for (int i = 7; i >= 0; --i) {
      uint8_t byte = static_cast<uint8_t>(bits >> (i * 8));
      update(&byte, 1);
    }
    std::string out;
    static const char* digits = "0123456789abcdef";
    for (uint32_t word : state_)
      for (int i = 28; i >= 0; i -= 4) out += digits[(word >> i) & 15];
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return x >> n | x << (32 - n); }
  void compress() {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = static_cast<uint32_t>(block_[i * 4]) << 24 | block_[i * 4 + 1] << 16 | block_[i * 4 + 2] << 8 |
             block_[i * 4 + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state_[0], b = state_[1], c = state_[2], d = state_[3];
    uint32_t e = state_[4], f = state_[5], g = state_[6], h = state_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    state_[0] += a, state_[1] += b, state_[2] += c, state_[3] += d;
    state_[4] += e, state_[5] += f, state_[6] += g, state_[7] += h;
  }
  std::array<uint32_t, 8> state_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::array<uint8_t, 64> block_{};
  size_t fill_ = 0;
  uint64_t bits_ = 0;
};

}  // namespace

std::string sha256_file(const std::string& path, uint64_t* size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": missing");
  Sha256 hash;
  std::vector<char> chunk(1 << 16);
  *size = 0;
  while (in) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    hash.update(reinterpret_cast<const uint8_t*>(chunk.data()), static_cast<size_t>(in.gcount()));
    *size += static_cast<uint64_t>(in.gcount());
  }
  return hash.hex();
}

std::map<std::string, Tensor> read_safetensors(const std::string& path) {
  std::string bytes = read_text(path);
  std::map<std::string, Tensor> out;
  try {
    if (bytes.size() < 8) throw Error("shorter than its header length");
    uint64_t header_length = 0;
    for (int i = 7; i >= 0; --i) header_length = header_length << 8 | static_cast<uint8_t>(bytes[i]);
    if (header_length > bytes.size() - 8) throw Error("header runs past the end of the file");
    json::Value header = json::parse(std::string_view(bytes).substr(8, header_length));
    const size_t data = 8 + header_length;
    for (const auto& [name, info] : header.object) {
      if (name == "__metadata__") continue;
      const std::string& dtype = info.at("dtype", name).as_string(name + ".dtype");
      std::vector<int64_t> offsets = info.at("data_offsets", name).as_int_list(name + ".data_offsets");
      Tensor tensor;
      tensor.shape = info.at("shape", name).as_int_list(name + ".shape");
      int64_t count = 1;
      for (int64_t dim : tensor.shape) count *= dim;
      if (offsets.size() != 2 || offsets[1] - offsets[0] != count * 4 * (dtype == "I64" ? 2 : 1) ||
          data + static_cast<uint64_t>(offsets[1]) > bytes.size())
        throw Error(name + ": data offsets do not match its shape or the file size");
      const char* start = bytes.data() + data + offsets[0];
      if (dtype == "F32") {
        tensor.f32.resize(count);
        std::memcpy(tensor.f32.data(), start, count * 4);
      } else if (dtype == "I64") {
        tensor.i64.resize(count);
        std::memcpy(tensor.i64.data(), start, count * 8);
      } else {
        throw Error(name + ": dtype " + dtype + " is not read by the native runtime (F32 and I64 are)");
      }
      out.emplace(name, std::move(tensor));
    }
  } catch (const std::runtime_error& e) {
    throw Error(path + ": " + e.what());
  }
  return out;
}

}  // namespace hm
