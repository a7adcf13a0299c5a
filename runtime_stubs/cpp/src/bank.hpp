// The bank of memory blocks (docs/bank-format.md): index validation, one aligned read per block, CRC-32,
// dequantization straight into the slot, and the level-aware block cache.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "files.hpp"
#include "hm_runtime.hpp"

namespace hm {

constexpr uint64_t kPageSize = 4096;  // header page; payload offsets are multiples of it

// The memory layout both the slot contract and the bank must agree on.
struct MemoryDims {
  int d_model = 0;
  std::vector<int> branching, widths, layers;

  int num_levels() const { return static_cast<int>(widths.size()); }
  int nodes_at(int level) const;
  int offset(int level) const;  // first hidden unit of the level in the slot
  int total_width() const { return offset(num_levels()); }
};

// A 4 KiB-aligned byte buffer (posix_memalign), as the format asks for block reads.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t size);
  uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const;
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_ = 0;
};

// Where one block matrix lands in the slot: row i at base + i * row_stride (bytes). A float slot gets
// float32 values; a quantized slot the block's codes there and its float16 scales repeated onto the slot's
// scale grid: slot scale row k (at scales + k * scale_stride bytes) covers rows [k * scale_group, ...).
struct MatrixView {
  uint8_t* base = nullptr;
  size_t row_stride = 0;
  uint8_t* scales = nullptr;  // null: float slot
  size_t scale_stride = 0;
  int scale_group = 0;
};
enum Matrix { kGate = 0, kUp = 1, kDown = 2 };
using LevelViews = std::vector<MatrixView>;  // [memory layer * 3 + Matrix]

// CRC-32 (zlib's) by the CPU's instructions where present, else zlib (crc32.cpp); crc32_method() says which.
// `crc` continues a running value (zlib's convention: crc32(b, crc32(a)) == crc32(a + b)).
uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc = 0);
const char* crc32_method();
float half_to_float(uint16_t bits);

class Bank {
 public:
  // Parses and checks index.json in `tree` (exactly `index_bytes` long, as the manifest declares) against the
  // model dims and the manifest's bank schema hash, and checks each level's first block file (or pack) is as
  // large as the index says, so buffers sized from the index are bounded by data really on disk.
  // `index_sha256`: the index's digest as pinned by a manifest whose signature a trusted key verified (the
  // opener passes it only then; empty otherwise). With it the index bytes parsed must have that digest, the
  // bank is authenticated() and verified reads also check each payload's sha256; without it, the CRC-32 only.
  Bank(std::unique_ptr<Tree> tree, const MemoryDims& dims, const std::string& expected_schema_hash,
       int64_t index_bytes, const std::string& index_sha256);
  ~Bank();
  Bank(const Bank&) = delete;
  Bank& operator=(const Bank&) = delete;

  uint64_t block_size(int level) const { return kPageSize + levels_[level].payload_length; }
  const std::string& block_file(int level, int node) const { return entry(level, node).file; }  // path (per-level: the pack)
  bool authenticated() const { return authenticated_; }
  // One read of the block's header page + payload into `buffer` (block_size bytes); checks the header
  // against the index and, with `verify`, the payload's CRC-32 (and its sha256 when authenticated(): without
  // a trusted key whoever edits a block can rewrite the index, manifest and seal as well, so the hash would
  // bound the read and add nothing). Throws hm::Error naming the file.
  void read(int level, int node, uint8_t* buffer, bool verify) const;
  // Writes a payload of `level` into the slot views of that level: dequantized into a float slot, codes
  // and scales copied into a quantized one (bit-identical to QuantizedLevelWriter in kernels/strategies.py).
  void decode(int level, const uint8_t* payload, const LevelViews& views) const;
  // Throws Error naming the index and level when a level cannot fill a quantized slot of `storage` ("int8"
  // or "int4") with that scale grid: other bits, or block groups the slot's groups do not divide.
  void check_quantized_slot(const std::string& storage, int gate_up_group, int down_group) const;

 private:
  struct Level {
    std::string scheme;
    int scheme_id = 0, group_size = 0;
    uint64_t payload_length = 0;
    int pack_fd = -1;  // layout per-level: the level's pack, kept open
  };
  struct Entry {
    std::string file;  // relative to the bank directory
    uint64_t offset = 0;
    uint32_t crc32 = 0;
    std::string sha256;  // lowercase hex of the payload (format version 3)
  };
  uint64_t section_bytes(int level, int rows, int cols) const;
  void decode_section(int level, const uint8_t* section, int rows, int cols, MatrixView out) const;
  void copy_section(int level, const uint8_t* section, int rows, int cols, MatrixView out) const;
  int block_group(int level, int rows) const;  // rows per block scale (int8: all rows)
  const Entry& entry(int level, int node) const;

  void check_level_files() const;
  uint64_t file_size(const std::string& file) const;

  std::unique_ptr<Tree> tree_;
  std::string dir_;
  MemoryDims dims_;
  bool packed_ = false;
  bool authenticated_ = false;
  std::vector<Level> levels_;
  std::vector<std::vector<Entry>> entries_;  // [level][node]
};

// Block payloads by (level, node): resident levels kept once read, an LRU for deeper levels, or streamed
// into one scratch buffer per level (cache_bytes 0), as runtime_stubs/block_cache.py.
class BlockCache {
 public:
  BlockCache(const Bank& bank, int levels, const CachePolicy& policy);
  struct Fetched {
    const uint8_t* payload;
    const char* source;
    uint64_t bytes_read;
  };
  Fetched get(int level, int node);
  // A block read elsewhere (the prefetch thread): kept as the policy keeps a block read here, or held until
  // the level's next fill when the policy streams. Reported as source "prefetch".
  Fetched adopt(int level, int node, AlignedBuffer block);
  bool contains(int level, int node) const;  // in RAM (resident or LRU); safe from any thread

 private:
  using Key = std::pair<int, int>;
  Fetched keep(const Key& key, AlignedBuffer buffer, const char* source);
  const Bank& bank_;
  CachePolicy policy_;
  mutable std::mutex mutex_;  // guards the maps against contains() from the prefetch thread
  std::vector<AlignedBuffer> scratch_;
  std::vector<AlignedBuffer> adopted_;  // per level: a streamed prefetched block, until the next fill
  std::map<Key, AlignedBuffer> resident_;
  std::list<std::pair<Key, AlignedBuffer>> lru_;  // most recent first
  std::map<Key, std::list<std::pair<Key, AlignedBuffer>>::iterator> lru_index_;
  uint64_t lru_bytes_ = 0;
};

}  // namespace hm
