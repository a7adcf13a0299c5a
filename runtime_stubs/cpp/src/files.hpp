// File helpers shared by the bundle and bank readers: whole-file reads, safe relative paths, sha256,
// and safetensors tensors (router centroids, expected logits).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "json.hpp"

namespace hm {

std::string read_text(const std::string& path);
// Parses a JSON file; a parse error is an hm::Error naming the file.
json::Value read_json(const std::string& path);
// root + "/" + relative, refusing absolute paths and '', '.' or '..' components (error names `where`).
std::string safe_join(const std::string& root, const std::string& relative, const std::string& where);
// Lowercase hex sha256 of a file's bytes and its size.
std::string sha256_file(const std::string& path, uint64_t* size);

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> f32;    // float32 tensors
  std::vector<int64_t> i64;  // int64 tensors
};
// All tensors of a safetensors file (F32 and I64 only: what bundles use); errors name the file.
std::map<std::string, Tensor> read_safetensors(const std::string& path);

}  // namespace hm
