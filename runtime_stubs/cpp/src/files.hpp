// File helpers shared by the bundle and bank readers: opening files inside a directory without leaving it,
// bounded reads, sha256, safetensors tensors (router centroids, expected logits), the bundle seal.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "json.hpp"

namespace hm {

// Refuses absolute paths and '', '.' or '..' components (error names `where`); returns root + "/" + relative.
std::string safe_join(const std::string& root, const std::string& relative, const std::string& where);

// Opens files below a root directory by relative path without ever leaving it: each directory component is
// opened with openat(O_NOFOLLOW | O_DIRECTORY) (and kept open for the next file), the file with
// O_NOFOLLOW | O_NONBLOCK (a FIFO cannot block the open), then fstat must say "regular file". A symlink,
// FIFO, device or socket anywhere on the way is refused with an Error naming the path. Thread-safe.
class Tree {
 public:
  explicit Tree(const std::string& root, const std::string& what);
  // The directory `relative` below `parent` (reached through no symlink) as a tree of its own.
  Tree(const Tree& parent, const std::string& relative, const std::string& what);
  ~Tree();
  Tree(const Tree&) = delete;
  Tree& operator=(const Tree&) = delete;

  const std::string& root() const { return root_; }
  // A descriptor of the regular file `relative` (the caller closes it); `what` describes it in errors.
  int open(const std::string& relative, const std::string& what) const;
  // The whole file, refused unless it has exactly `exact` bytes (when >= 0) and at most `limit`.
  std::string read(const std::string& relative, const std::string& what, uint64_t limit, int64_t exact = -1) const;

 private:
  int directory(const std::vector<std::string>& parts, size_t count) const;
  std::string root_, what_;
  mutable std::mutex mutex_;
  mutable std::map<std::string, int> dirs_;  // joined directory path -> descriptor ("" is the root)
};

// A path for libraries that open by name (ExecuTorch's loaders) naming exactly the file behind `fd`:
// /proc/self/fd/N on Linux and Android, /dev/fd/N on Apple systems.
std::string fd_path(int fd);

// A file the user named (not a bundle file): followed if a symlink, but regular and at most `limit` bytes.
std::string read_file(const std::string& path, uint64_t limit);

// The whole regular file behind `fd`, at most `limit` bytes (exactly `exact` when >= 0); errors name `path`.
std::string read_fd(int fd, const std::string& path, uint64_t limit, int64_t exact = -1);
// Lowercase hex sha256 of the `size` bytes behind `fd` (reads exactly that many; errors name `path`).
std::string sha256_fd(int fd, const std::string& path, uint64_t size);
std::string sha256_hex(const std::string& bytes);
std::string sha256_hex(const uint8_t* data, size_t size);

// Parses a JSON document held in memory; a parse error is an hm::Error naming `path`.
json::Value parse_json(const std::string& text, const std::string& path);

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> f32;    // float32 tensors
  std::vector<int64_t> i64;  // int64 tensors
};
// All tensors of a safetensors file held in memory (F32 and I64 only: what bundles use); every offset, shape
// and count is range-checked against the bytes; errors name `path`.
std::map<std::string, Tensor> parse_safetensors(const std::string& bytes, const std::string& path);

}  // namespace hm
