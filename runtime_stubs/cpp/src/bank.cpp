#include "bank.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <executorch/runtime/core/portable_type/half.h>

#include "files.hpp"
#include "json.hpp"

namespace hm {
namespace {

constexpr uint16_t kBlockVersion = 3;  // the bank format version (3: per-block sha256 in the index)
constexpr uint16_t kHeaderLength = 52;
constexpr uint64_t kSectionAlignment = 16;
constexpr uint64_t kVerifyChunk = 1 << 20;  // verified reads: bytes per pread, checksummed while cache-hot
constexpr uint64_t kMaxIndexBytes = 256 << 20;

uint64_t pad16(uint64_t n) { return (n + kSectionAlignment - 1) / kSectionAlignment * kSectionAlignment; }

// Little-endian loads: the format is little-endian whatever the host is.
uint16_t load_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
uint32_t load_u32(const uint8_t* p) { return load_u16(p) | static_cast<uint32_t>(load_u16(p + 2)) << 16; }
uint64_t load_u64(const uint8_t* p) { return load_u32(p) | static_cast<uint64_t>(load_u32(p + 4)) << 32; }

// (scheme name) -> (id, group size); every other name or pair is refused.
bool known_scheme(const std::string& name, int id, int group) {
  static const std::map<std::string, std::pair<int, int>> schemes = {
      {"float32", {1, 0}}, {"float16", {2, 0}}, {"bfloat16", {3, 0}}, {"int8", {4, 0}},
      {"int4-g32", {5, 32}}, {"int4-g64", {5, 64}}, {"int4-g128", {5, 128}}};
  auto it = schemes.find(name);
  return it != schemes.end() && it->second == std::make_pair(id, group);
}

}  // namespace

int MemoryDims::nodes_at(int level) const {
  int nodes = 1;
  for (int l = 0; l <= level; ++l) nodes *= branching[l];
  return nodes;
}

int MemoryDims::offset(int level) const {
  int offset = 0;
  for (int l = 0; l < level; ++l) offset += widths[l];
  return offset;
}

AlignedBuffer::AlignedBuffer(size_t size) : size_(size) {
  void* memory = nullptr;
  if (posix_memalign(&memory, kPageSize, size == 0 ? kPageSize : size) != 0) throw Error("out of memory");
  std::memset(memory, 0, size);
  data_.reset(static_cast<uint8_t*>(memory));
}

void AlignedBuffer::Free::operator()(uint8_t* p) const { std::free(p); }

// ExecuTorch's (c10's) IEEE half -> float, exact for every half including subnormals: the runtime links
// ExecuTorch anyway. (The kernels keep their own in kernels/qmatmul.h: they build without ExecuTorch too.)
float half_to_float(uint16_t h) { return executorch::runtime::etensor::internal::fp16_ieee_to_fp32_value(h); }

Bank::Bank(std::unique_ptr<Tree> tree, const MemoryDims& dims, const std::string& expected_schema_hash,
           int64_t index_bytes, const std::string& index_sha256)
    : tree_(std::move(tree)), dir_(tree_->root()), dims_(dims), authenticated_(!index_sha256.empty()) {
  const std::string index_path = dir_ + "/index.json";
  const std::string index_bytes_read = tree_->read("index.json", "bank index", kMaxIndexBytes, index_bytes);
  if (authenticated_ && sha256_hex(index_bytes_read) != index_sha256)
    throw Error(index_path + ": sha256 differs from the signed manifest's: the index was edited after export");
  json::Value index = parse_json(index_bytes_read, index_path);
  try {
    if (index.at("format", "format").as_string("format") != "hm-export-bank" ||
        index.at("format_version", "format_version").as_int("format_version") != kBlockVersion)
      throw Error("not an hm-export-bank version 3 index (a version 2 bank has no per-block sha256: re-create it "
                  "with `hm-export bank quantize`, or re-export the bundle)");
    const json::Value& model = index.at("model", "model");
    MemoryDims bank_dims;
    bank_dims.d_model = static_cast<int>(model.at("d_model", "model.d_model").as_int("model.d_model"));
    auto ints = [&](const char* key) {
      std::vector<int> out;
      for (int64_t v : model.at(key, key).as_int_list(key)) out.push_back(static_cast<int>(v));
      return out;
    };
    bank_dims.branching = ints("branching");
    bank_dims.widths = ints("widths");
    bank_dims.layers = ints("memory_layers");
    if (bank_dims.d_model != dims.d_model || bank_dims.branching != dims.branching ||
        bank_dims.widths != dims.widths || bank_dims.layers != dims.layers)
      throw Error("bank dimensions (d_model, branching, widths, memory_layers) do not match the slot contract");
    const std::string& hash = index.at("schema_hash", "schema_hash").as_string("schema_hash");
    if (hash != expected_schema_hash)
      throw Error("bank schema hash " + hash + " does not match the manifest's " + expected_schema_hash +
                  " (bank written for another model or scheme)");
    const std::string& layout = index.at("layout", "layout").as_string("layout");
    if (layout != "per-block" && layout != "per-level") throw Error("unknown layout '" + layout + "'");
    packed_ = layout == "per-level";
    const auto& levels = index.at("levels", "levels").as_array("levels");
    if (static_cast<int>(levels.size()) != dims.num_levels()) throw Error("levels: one entry per tree level expected");
    for (const json::Value& level : levels) {
      Level out;
      out.scheme = level.at("scheme", "levels[].scheme").as_string("levels[].scheme");
      out.scheme_id = static_cast<int>(level.at("scheme_id", "levels[]").as_int("levels[].scheme_id"));
      out.group_size = static_cast<int>(level.at("group_size", "levels[]").as_int("levels[].group_size"));
      if (!known_scheme(out.scheme, out.scheme_id, out.group_size))
        throw Error("unknown scheme '" + out.scheme + "' (id " + std::to_string(out.scheme_id) + ", group " +
                    std::to_string(out.group_size) + ")");
      levels_.push_back(out);
    }
    for (int level = 0; level < dims.num_levels(); ++level) {
      int d = dims.d_model, r = dims.widths[level];
      levels_[level].payload_length =
          dims.layers.size() * (2 * section_bytes(level, d, r) + section_bytes(level, r, d));
    }
    const auto& blocks = index.at("blocks", "blocks").as_array("blocks");
    size_t position = 0;
    entries_.resize(dims.num_levels());
    for (int level = 0; level < dims.num_levels(); ++level) {
      for (int node = 0; node < dims.nodes_at(level); ++node, ++position) {
        std::string where = "blocks[" + std::to_string(position) + "]";
        if (position >= blocks.size()) throw Error(where + ": missing (every (level, node) is listed once)");
        const json::Value& block = blocks[position];
        if (block.at("level", where).as_int(where) != level || block.at("node", where).as_int(where) != node)
          throw Error(where + ": expected level " + std::to_string(level) + " node " + std::to_string(node));
        Entry entry;
        entry.file = block.at("file", where).as_string(where + ".file");
        safe_join(dir_, entry.file, index_path + ": " + where + ".file");
        const int64_t offset = block.at("offset", where).as_int(where + ".offset");
        const int64_t crc = block.at("crc32", where).as_int(where + ".crc32");
        const int64_t length = block.at("length", where).as_int(where + ".length");
        if (offset < static_cast<int64_t>(kPageSize) || offset % kPageSize != 0 || offset > (1ll << 50))
          throw Error(where + ": offset " + std::to_string(offset) + " is not a positive multiple of 4096");
        if (crc < 0 || crc > 0xFFFFFFFFll) throw Error(where + ": crc32 is not a 32-bit unsigned integer");
        entry.offset = static_cast<uint64_t>(offset);
        entry.crc32 = static_cast<uint32_t>(crc);
        entry.sha256 = block.at("sha256", where).as_string(where + ".sha256");
        if (entry.sha256.size() != 64 ||
            entry.sha256.find_first_not_of("0123456789abcdef") != std::string::npos)
          throw Error(where + ".sha256: not 64 lowercase hex digits");
        if (length < 0 || static_cast<uint64_t>(length) != levels_[level].payload_length)
          throw Error(where + ": length " + std::to_string(length) + ", the level's scheme and dims give " +
                      std::to_string(levels_[level].payload_length));
        if (block.at("scheme", where).as_string(where) != levels_[level].scheme)
          throw Error(where + ": scheme differs from levels[" + std::to_string(level) + "]");
        entries_[level].push_back(entry);
      }
    }
    if (position != blocks.size()) throw Error("blocks: more entries than the tree has nodes");
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    throw Error(what.rfind(index_path, 0) == 0 ? what : index_path + ": " + what);
  }
  try {
    if (packed_)
      for (int level = 0; level < dims.num_levels(); ++level) {
        const std::string& pack = entries_[level].front().file;
        levels_[level].pack_fd = tree_->open(pack, "level " + std::to_string(level) + " pack");
      }
    check_level_files();
  } catch (...) {
    for (Level& level : levels_)
      if (level.pack_fd >= 0) ::close(level.pack_fd), level.pack_fd = -1;
    throw;
  }
}

uint64_t Bank::file_size(const std::string& file) const {
  const int fd = tree_->open(file, "block file");
  struct stat info {};
  ::fstat(fd, &info);
  ::close(fd);
  return static_cast<uint64_t>(info.st_size);
}

void Bank::check_level_files() const {
  for (int level = 0; level < dims_.num_levels(); ++level) {
    const Entry& first = entries_[level].front();  // every other block is checked when it is read
    const uint64_t need = first.offset + levels_[level].payload_length;
    uint64_t have = 0;
    if (packed_) {
      struct stat info {};
      ::fstat(levels_[level].pack_fd, &info);
      have = static_cast<uint64_t>(info.st_size);
    } else {
      have = file_size(first.file);
    }
    if (have < need)
      throw Error(dir_ + "/" + first.file + ": " + std::to_string(have) + " bytes, the index needs " +
                  std::to_string(need) + " (truncated, or an index that does not describe this bank)");
  }
}

Bank::~Bank() {
  for (const Level& level : levels_)
    if (level.pack_fd >= 0) ::close(level.pack_fd);
}

uint64_t Bank::section_bytes(int level, int rows, int cols) const {
  const Level& scheme = levels_[level];
  uint64_t count = static_cast<uint64_t>(rows) * cols;
  switch (scheme.scheme_id) {
    case 1: return pad16(count * 4);
    case 2: case 3: return pad16(count * 2);
    case 4: return pad16(count) + pad16(static_cast<uint64_t>(cols) * 2);
    default: {  // int4 groupwise
      int group = std::min(scheme.group_size, rows), groups = (rows + group - 1) / group;
      return pad16((count + 1) / 2) + pad16(static_cast<uint64_t>(groups) * cols * 2);
    }
  }
}

const Bank::Entry& Bank::entry(int level, int node) const {
  if (level < 0 || level >= dims_.num_levels() || node < 0 || node >= dims_.nodes_at(level))
    throw Error(dir_ + ": no block (level " + std::to_string(level) + ", node " + std::to_string(node) + ")");
  return entries_[level][node];
}

void Bank::read(int level, int node, uint8_t* buffer, bool verify) const {
  const Entry& e = entry(level, node);
  const Level& scheme = levels_[level];
  const std::string block = "block (level " + std::to_string(level) + ", node " + std::to_string(node) + ")";
  const std::string path = dir_ + "/" + e.file;
  int fd = scheme.pack_fd;
  if (fd < 0) fd = tree_->open(e.file, block);
  const uint64_t size = block_size(level), start = e.offset - kPageSize;
  uint64_t done = 0;
  uint32_t crc = 0;  // running CRC-32 of the payload read so far
  int read_errno = 0;
  // Unverified: one pread (the loop only resumes a read the kernel split). Verified: the same bytes in reads of
  // kVerifyChunk, each checksummed while it is still in the CPU's cache, instead of a second pass over memory.
  while (done < size) {
    const uint64_t want = verify ? std::min(size - done, kVerifyChunk - done % kVerifyChunk) : size - done;
    ssize_t got = ::pread(fd, buffer + done, want, static_cast<off_t>(start + done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      read_errno = got < 0 ? errno : 0;
      break;
    }
    const uint64_t end = done + static_cast<uint64_t>(got), from = std::max(done, kPageSize);
    if (verify && end > from) crc = crc32(buffer + from, end - from, crc);
    done = end;
  }
  struct stat info {};
  ::fstat(fd, &info);
  if (scheme.pack_fd < 0) ::close(fd);
  if (read_errno) throw Error(path + ": cannot read " + block + ": " + std::strerror(read_errno));
  if (done < size)
    throw Error(path + ": truncated: " + block + " needs bytes [" + std::to_string(start) + ", " +
                std::to_string(start + size) + "), the file has " + std::to_string(info.st_size));
  auto mismatch = [&](const char* field, uint64_t got, uint64_t want) {
    if (got != want)
      throw Error(path + ": " + block + " header " + field + " is " + std::to_string(got) + ", the index says " +
                  std::to_string(want));
  };
  if (std::memcmp(buffer, "HMBK", 4) != 0) throw Error(path + ": " + block + ": bad magic (not an HMBK block)");
  mismatch("version", load_u16(buffer + 4), kBlockVersion);
  mismatch("header_length", load_u16(buffer + 6), kHeaderLength);
  mismatch("scheme_id", load_u16(buffer + 8), scheme.scheme_id);
  mismatch("level", load_u16(buffer + 10), level);
  mismatch("node", load_u32(buffer + 12), node);
  mismatch("layers", load_u16(buffer + 16), dims_.layers.size());
  mismatch("group_size", load_u16(buffer + 18), scheme.group_size);
  mismatch("d_model", load_u32(buffer + 20), dims_.d_model);
  mismatch("width", load_u32(buffer + 24), dims_.widths[level]);
  mismatch("payload_offset", load_u64(buffer + 32), e.offset);
  mismatch("payload_length", load_u64(buffer + 40), scheme.payload_length);
  mismatch("crc32", load_u32(buffer + 48), e.crc32);
  if (verify) {
    if (crc != e.crc32)
      throw Error(path + ": " + block + ": checksum mismatch (payload CRC-32 " + std::to_string(crc) +
                  ", expected " + std::to_string(e.crc32) + "): the block is corrupt");
    // The CRC catches damage; the sha256 catches a payload edited to keep its CRC, once the index is authenticated
    // (checked at open against a signed manifest). Once per block read, over the payload just read.
    if (authenticated_ && sha256_hex(buffer + kPageSize, scheme.payload_length) != e.sha256)
      throw Error(path + ": " + block + ": checksum mismatch (payload sha256 differs from the index's): the block "
                  "was edited after export");
  }
}

void Bank::decode_section(int level, const uint8_t* section, int rows, int cols, MatrixView out) const {
  const Level& scheme = levels_[level];
  const size_t count = static_cast<size_t>(rows) * cols;
  if (scheme.scheme_id <= 3) {  // float schemes
    for (int i = 0; i < rows; ++i) {
      float* row = reinterpret_cast<float*>(out.base + i * out.row_stride);
      const uint8_t* in = section + static_cast<size_t>(i) * cols * (scheme.scheme_id == 1 ? 4 : 2);
      if (scheme.scheme_id == 1) {
        std::memcpy(row, in, static_cast<size_t>(cols) * 4);  // little-endian host assumed (all targets are)
      } else {
        for (int c = 0; c < cols; ++c) {
          uint16_t half = load_u16(in + c * 2);
          uint32_t bits = static_cast<uint32_t>(half) << 16;  // bfloat16: the upper half of a float32
          if (scheme.scheme_id == 2) row[c] = half_to_float(half);
          else std::memcpy(&row[c], &bits, sizeof bits);
        }
      }
    }
    return;
  }
  // int8 (one scale per column) and int4 (one per group of rows and column): float(code) * float(scale),
  // the same single multiply as the Python reference, so the slot is bit-identical.
  const bool int8 = scheme.scheme_id == 4;
  const int group = block_group(level, rows), groups = (rows + group - 1) / group;
  const uint8_t* scale_bytes = section + (int8 ? pad16(count) : pad16((count + 1) / 2));
  std::vector<float> scales(static_cast<size_t>(groups) * cols);
  for (size_t k = 0; k < scales.size(); ++k) scales[k] = half_to_float(load_u16(scale_bytes + k * 2));
  for (int i = 0; i < rows; ++i) {
    float* row = reinterpret_cast<float*>(out.base + i * out.row_stride);
    const float* scale = scales.data() + static_cast<size_t>(i / group) * cols;
    const size_t first = static_cast<size_t>(i) * cols;
    if (int8) {
      const int8_t* codes = reinterpret_cast<const int8_t*>(section) + first;
      for (int c = 0; c < cols; ++c) row[c] = static_cast<float>(codes[c]) * scale[c];
    } else {  // element e in the low (e even) or high (e odd) nibble of byte e / 2, stored as q + 8
      for (int c = 0; c < cols; ++c) {
        size_t e = first + c;
        row[c] = static_cast<float>(((section[e / 2] >> (4 * (e % 2))) & 15) - 8) * scale[c];
      }
    }
  }
}

int Bank::block_group(int level, int rows) const {
  return levels_[level].scheme_id == 4 ? rows : std::min(levels_[level].group_size, rows);
}

// A quantized slot holds the block's own bytes: each row's codes (int8, or int4 pairs in the bank's nibble
// order: the slot packs the same column pairs), then each slot scale row gets the block scale row covering it.
void Bank::copy_section(int level, const uint8_t* section, int rows, int cols, MatrixView out) const {
  const bool int8 = levels_[level].scheme_id == 4;
  const size_t row_bytes = int8 ? cols : cols / 2, codes = row_bytes * rows;
  for (int i = 0; i < rows; ++i) std::memcpy(out.base + i * out.row_stride, section + i * row_bytes, row_bytes);
  const uint8_t* scales = section + pad16(codes);
  const size_t scale_row = static_cast<size_t>(cols) * 2;
  const int group = block_group(level, rows);
  for (int k = 0; k < rows / out.scale_group; ++k)
    std::memcpy(out.scales + k * out.scale_stride, scales + static_cast<size_t>(k) * out.scale_group / group * scale_row,
                scale_row);
}

void Bank::decode(int level, const uint8_t* payload, const LevelViews& views) const {
  const int d = dims_.d_model, r = dims_.widths[level];
  const uint64_t wide = section_bytes(level, d, r), tall = section_bytes(level, r, d);
  auto write = [&](const uint8_t* section, int rows, int cols, const MatrixView& view) {
    if (view.scales) copy_section(level, section, rows, cols, view);
    else decode_section(level, section, rows, cols, view);
  };
  for (size_t j = 0; j < dims_.layers.size(); ++j) {
    const uint8_t* layer = payload + j * (2 * wide + tall);
    write(layer, d, r, views[j * 3 + kGate]);
    write(layer + wide, d, r, views[j * 3 + kUp]);
    write(layer + 2 * wide, r, d, views[j * 3 + kDown]);
  }
}

void Bank::check_quantized_slot(const std::string& storage, int gate_up_group, int down_group) const {
  const int want = storage == "int8" ? 4 : 5;
  for (int level = 0; level < dims_.num_levels(); ++level) {
    const std::string where = dir_ + "/index.json: level " + std::to_string(level) + " (" + levels_[level].scheme + ")";
    if (levels_[level].scheme_id != want)
      throw Error(where + " cannot fill an " + storage + " slot: the slot copies the bank's codes, every level must "
                  "be " + (storage == "int8" ? "int8" : "int4-g*"));
    const int gate_up = block_group(level, dims_.d_model), down = block_group(level, dims_.widths[level]);
    if (gate_up % gate_up_group != 0 || down % down_group != 0)
      throw Error(where + ": block groups (" + std::to_string(gate_up) + ", " + std::to_string(down) +
                  " rows) are not multiples of the slot's gate_up_group " + std::to_string(gate_up_group) +
                  " and down_group " + std::to_string(down_group));
  }
}

BlockCache::BlockCache(const Bank& bank, int levels, const CachePolicy& policy) : bank_(bank), policy_(policy) {
  for (int level = 0; level < levels; ++level) scratch_.emplace_back(bank.block_size(level));
  adopted_.resize(levels);
}

bool BlockCache::contains(int level, int node) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return resident_.count({level, node}) > 0 || lru_index_.count({level, node}) > 0;
}

BlockCache::Fetched BlockCache::get(int level, int node) {
  const Key key{level, node};
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto it = resident_.find(key); it != resident_.end()) return {it->second.data() + kPageSize, "resident", 0};
    if (auto it = lru_index_.find(key); it != lru_index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);  // most recently used first
      return {it->second->second.data() + kPageSize, "cache", 0};
    }
  }
  const uint64_t size = bank_.block_size(level);
  if (level >= policy_.resident_levels && size > policy_.cache_bytes) {  // stream: into the level's scratch buffer
    bank_.read(level, node, scratch_[level].data(), policy_.verify);
    return {scratch_[level].data() + kPageSize, "storage", size};
  }
  AlignedBuffer buffer(size);
  bank_.read(level, node, buffer.data(), policy_.verify);
  return keep(key, std::move(buffer), "storage");
}

BlockCache::Fetched BlockCache::adopt(int level, int node, AlignedBuffer block) {
  const uint64_t size = block.size();
  if (level >= policy_.resident_levels && size > policy_.cache_bytes) {
    adopted_[level] = std::move(block);
    return {adopted_[level].data() + kPageSize, "prefetch", size};
  }
  return keep({level, node}, std::move(block), "prefetch");
}

BlockCache::Fetched BlockCache::keep(const Key& key, AlignedBuffer buffer, const char* source) {
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t size = buffer.size();
  const uint8_t* payload = buffer.data() + kPageSize;
  if (key.first < policy_.resident_levels) {
    resident_.emplace(key, std::move(buffer));
  } else {
    lru_.emplace_front(key, std::move(buffer));
    lru_index_[key] = lru_.begin();
    lru_bytes_ += size;
    while (lru_bytes_ > policy_.cache_bytes) {  // never evicts the block just read: it fits the cap alone
      lru_bytes_ -= lru_.back().second.size();
      lru_index_.erase(lru_.back().first);
      lru_.pop_back();
    }
  }
  return {payload, source, size};
}

}  // namespace hm
