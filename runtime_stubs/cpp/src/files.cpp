#include "files.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <limits>

#include "hm_runtime.hpp"

#ifdef HM_WITH_OPENSSL
#include <openssl/evp.h>
#endif

namespace hm {
namespace {

std::string kind_of(mode_t mode) {
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return S_ISREG(mode) ? "a regular file" : "not a regular file";
}

std::vector<std::string> split(const std::string& relative) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= relative.size()) {
    size_t end = relative.find('/', start);
    if (end == std::string::npos) end = relative.size();
    parts.push_back(relative.substr(start, end - start));
    start = end + 1;
  }
  return parts;
}

// After a failed openat: what is there (for the message), without following it.
std::string what_is(int dir, const std::string& name) {
  struct stat info {};
  if (::fstatat(dir, name.c_str(), &info, AT_SYMLINK_NOFOLLOW) != 0) return std::strerror(errno);
  return "is " + kind_of(info.st_mode);
}

// Regular file check on an open descriptor (closes it and throws otherwise).
int require_regular(int fd, const std::string& path, const std::string& what) {
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    const std::string kind = kind_of(info.st_mode);
    ::close(fd);
    throw Error(path + ": is " + kind + ", expected a regular file (" + what + ")");
  }
  return fd;
}

#ifdef HM_WITH_OPENSSL
// SHA-256 by OpenSSL's libcrypto (linked for the Ed25519 checks anyway): its SHA-NI / ARMv8 / AVX2 code hashes
// the bundle's files at open several times faster than the portable compression function below.
class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new()) {
    if (ctx_ == nullptr || EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr) != 1) fail();
  }
  ~Sha256() { EVP_MD_CTX_free(ctx_); }
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const uint8_t* data, size_t size) {
    if (size != 0 && EVP_DigestUpdate(ctx_, data, size) != 1) fail();
  }
  std::string hex() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    if (EVP_DigestFinal_ex(ctx_, digest, &length) != 1 || length != 32) fail();
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < length; ++i) out += digits[digest[i] >> 4], out += digits[digest[i] & 15];
    return out;
  }

 private:
  [[noreturn]] static void fail() { throw Error("OpenSSL's SHA-256 failed"); }
  EVP_MD_CTX* ctx_;
};
#else
// FIPS 180-4 SHA-256 (builds without OpenSSL): whole 64-byte blocks are compressed straight from the input.
class Sha256 {
 public:
  void update(const uint8_t* data, size_t size) {
    bits_ += static_cast<uint64_t>(size) * 8;
    if (fill_ != 0) {  // top up a partial block first
      const size_t take = std::min(size, block_.size() - fill_);
      std::memcpy(block_.data() + fill_, data, take);
      fill_ += take, data += take, size -= take;
      if (fill_ < block_.size()) return;
      compress(block_.data());
      fill_ = 0;
    }
    for (; size >= 64; data += 64, size -= 64) compress(data);
    std::memcpy(block_.data(), data, size);
    fill_ = size;
  }
  std::string hex() {
    const uint64_t bits = bits_;
    block_[fill_++] = 0x80;
    if (fill_ > 56) {
      std::fill(block_.begin() + fill_, block_.end(), 0);
      compress(block_.data());
      fill_ = 0;
    }
    std::fill(block_.begin() + fill_, block_.begin() + 56, 0);
    for (int i = 0; i < 8; ++i) block_[56 + i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
    compress(block_.data());
    std::string out;
    static const char* digits = "0123456789abcdef";
    for (uint32_t word : state_)
      for (int i = 28; i >= 0; i -= 4) out += digits[(word >> i) & 15];
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return x >> n | x << (32 - n); }
  void compress(const uint8_t* block) {
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
      w[i] = static_cast<uint32_t>(block[i * 4]) << 24 | block[i * 4 + 1] << 16 | block[i * 4 + 2] << 8 |
             block[i * 4 + 3];
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
#endif

}  // namespace

std::string safe_join(const std::string& root, const std::string& relative, const std::string& where) {
  if (relative.empty() || relative[0] == '/' || relative.find('\\') != std::string::npos ||
      relative.find('\0') != std::string::npos)
    throw Error(where + ": path '" + relative + "' is not a relative '/'-separated path");
  for (const std::string& part : split(relative))
    if (part.empty() || part == "." || part == "..")
      throw Error(where + ": path '" + relative + "' leaves the bundle or has an empty, '.' or '..' component");
  return root + "/" + relative;
}

Tree::Tree(const std::string& root, const std::string& what) : root_(root), what_(what) {
  int fd = ::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw Error(root + ": cannot open the " + what + " directory: " + std::strerror(errno));
  dirs_[""] = fd;
}

Tree::Tree(const Tree& parent, const std::string& relative, const std::string& what)
    : root_(safe_join(parent.root(), relative, what)), what_(what) {
  int fd = ::fcntl(parent.directory(split(relative), split(relative).size()), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) throw Error(root_ + ": cannot open the " + what + " directory: " + std::strerror(errno));
  dirs_[""] = fd;
}

Tree::~Tree() {
  for (const auto& [name, fd] : dirs_) ::close(fd);
}

int Tree::directory(const std::vector<std::string>& parts, size_t count) const {
  std::string key;
  int parent = -1;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    parent = dirs_.at("");
  }
  for (size_t i = 0; i < count; ++i) {
    key += (i ? "/" : "") + parts[i];
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = dirs_.find(key);
    if (it != dirs_.end()) {
      parent = it->second;
      continue;
    }
    int fd = ::openat(parent, parts[i].c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
      throw Error(root_ + "/" + key + ": " + (errno == ENOENT ? std::string("missing") : what_is(parent, parts[i])) +
                  ", expected a directory inside the " + what_);
    dirs_[key] = fd;
    parent = fd;
  }
  return parent;
}

int Tree::open(const std::string& relative, const std::string& what) const {
  safe_join(root_, relative, what);
  const std::vector<std::string> parts = split(relative);
  const int dir = directory(parts, parts.size() - 1);
  const std::string path = root_ + "/" + relative;
  int fd = ::openat(dir, parts.back().c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) throw Error(path + ": missing (" + what + ")");
    throw Error(path + ": " + what_is(dir, parts.back()) + ", expected a regular file (" + what + ")");
  }
  return require_regular(fd, path, what);
}

std::string Tree::read(const std::string& relative, const std::string& what, uint64_t limit, int64_t exact) const {
  int fd = open(relative, what);
  try {
    std::string bytes = read_fd(fd, root_ + "/" + relative, limit, exact);
    ::close(fd);
    return bytes;
  } catch (...) {
    ::close(fd);
    throw;
  }
}

std::string fd_path(int fd) {
#ifdef __APPLE__
  return "/dev/fd/" + std::to_string(fd);
#else
  return "/proc/self/fd/" + std::to_string(fd);
#endif
}

std::string read_file(const std::string& path, uint64_t limit) {
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  require_regular(fd, path, "input file");
  try {
    std::string bytes = read_fd(fd, path, limit);
    ::close(fd);
    return bytes;
  } catch (...) {
    ::close(fd);
    throw;
  }
}

std::string read_fd(int fd, const std::string& path, uint64_t limit, int64_t exact) {
  struct stat info {};
  if (::fstat(fd, &info) != 0) throw Error(path + ": cannot stat: " + std::strerror(errno));
  const uint64_t size = static_cast<uint64_t>(info.st_size);
  if (exact >= 0 && size != static_cast<uint64_t>(exact))
    throw Error(path + ": " + std::to_string(size) + " bytes, the manifest records " + std::to_string(exact));
  if (size > limit) throw Error(path + ": " + std::to_string(size) + " bytes, more than the " +
                                std::to_string(limit) + " this reader accepts");
  std::string bytes(size, '\0');
  uint64_t done = 0;
  while (done < size) {
    ssize_t got = ::pread(fd, bytes.data() + done, size - done, static_cast<off_t>(done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) throw Error(path + ": cannot read: " + (got < 0 ? std::strerror(errno) : "file shrank"));
    done += static_cast<uint64_t>(got);
  }
  return bytes;
}

std::string sha256_fd(int fd, const std::string& path, uint64_t size) {
  Sha256 hash;
  std::vector<char> chunk(1 << 16);
  uint64_t done = 0;
  while (done < size) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(chunk.size(), size - done));
    ssize_t got = ::pread(fd, chunk.data(), want, static_cast<off_t>(done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) throw Error(path + ": cannot read: " + (got < 0 ? std::strerror(errno) : "file shrank"));
    hash.update(reinterpret_cast<const uint8_t*>(chunk.data()), static_cast<size_t>(got));
    done += static_cast<uint64_t>(got);
  }
  return hash.hex();
}

std::string sha256_hex(const uint8_t* data, size_t size) {
  Sha256 hash;
  hash.update(data, size);
  return hash.hex();
}

std::string sha256_hex(const std::string& bytes) {
  return sha256_hex(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

json::Value parse_json(const std::string& text, const std::string& path) {
  try {
    return json::parse(text);
  } catch (const std::runtime_error& e) {
    throw Error(path + ": " + e.what());
  }
}

std::map<std::string, Tensor> parse_safetensors(const std::string& bytes, const std::string& path) {
  std::map<std::string, Tensor> out;
  try {
    if (bytes.size() < 8) throw Error("shorter than its header length");
    uint64_t header_length = 0;
    for (int i = 7; i >= 0; --i) header_length = header_length << 8 | static_cast<uint8_t>(bytes[i]);
    if (header_length > bytes.size() - 8) throw Error("header runs past the end of the file");
    json::Value header = json::parse(std::string_view(bytes).substr(8, header_length));
    if (header.kind != json::Value::Kind::Object) throw Error("header is not a JSON object");
    const uint64_t data = 8 + header_length, available = bytes.size() - data;
    for (const auto& [name, info] : header.object) {
      if (name == "__metadata__") continue;
      const std::string& dtype = info.at("dtype", name).as_string(name + ".dtype");
      const uint64_t element = dtype == "F32" ? 4 : dtype == "I64" ? 8 : 0;
      if (element == 0) throw Error(name + ": dtype " + dtype + " is not read by the native runtime (F32 and I64 are)");
      std::vector<int64_t> offsets = info.at("data_offsets", name).as_int_list(name + ".data_offsets");
      Tensor tensor;
      tensor.shape = info.at("shape", name).as_int_list(name + ".shape");
      uint64_t count = 1;
      for (int64_t dim : tensor.shape) {  // every product stays below the file size, so none overflows
        if (dim < 0 || (dim > 0 && count > available / element / static_cast<uint64_t>(dim)))
          throw Error(name + ": shape does not fit the file");
        count *= static_cast<uint64_t>(dim);
      }
      if (offsets.size() != 2 || offsets[0] < 0 || offsets[1] < offsets[0] ||
          static_cast<uint64_t>(offsets[1]) > available ||
          static_cast<uint64_t>(offsets[1] - offsets[0]) != count * element)
        throw Error(name + ": data offsets do not match its shape or the file size");
      const char* start = bytes.data() + data + offsets[0];
      if (element == 4) {
        tensor.f32.resize(count);
        std::memcpy(tensor.f32.data(), start, count * 4);
      } else {
        tensor.i64.resize(count);
        std::memcpy(tensor.i64.data(), start, count * 8);
      }
      out.emplace(name, std::move(tensor));
    }
  } catch (const std::runtime_error& e) {
    throw Error(path + ": " + e.what());
  }
  return out;
}

}  // namespace hm
