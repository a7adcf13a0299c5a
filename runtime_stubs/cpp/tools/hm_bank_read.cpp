// hm_bank_read: verified-read throughput of a bank, natively (docs/native-runtime.md, "Verified reads").
//
//   hm_bank_read BANK_DIR [--blocks 256] [--rounds 5] [--cold] [--seed 0]
//   hm_bank_read BANK_DIR --check [--index-sha256 HEX]
//   hm_bank_read --crc-self-test
//
// Reads `--blocks` random blocks (seeded; every level, in proportion to its node count) as the loader reads
// them (one aligned pread of header page + payload, header checked against the index), in rounds that
// rotate between raw reads (no checksum), verified reads of an unkeyed bundle (CRC-32 of every payload) and
// verified reads of a bundle opened with a trusted key (CRC-32 + sha256: the bank authenticated by the index's
// digest, here computed from the index itself as a signed manifest would pin it), and prints JSON: GB/s of
// each and their ratios to raw. Warm by default (the blocks are read once first, so every mode reads from the
// page cache: the case where the checksums cost most); --cold drops each block file's pages before each read.
// --crc-self-test compares crc32() with zlib's on random buffers of many lengths and alignments.
// --check opens the bank as the runtime does (index checks, level files) and reads every block verified
// (header, CRC-32; with --index-sha256, the digest a signed manifest pins for index.json, also the index's and
// each payload's sha256); prints {"blocks": N} and exits 0, or the error and exits 2: the C++ half of the
// bank-index fixtures that tests/test_formats.py feeds to both readers.
#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bank.hpp"
#include "files.hpp"
#include "json.hpp"

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kMaxIndexBytes = 256 << 20;  // as the runtime's bank reader

int crc_self_test() {
  std::mt19937_64 rng(1);
  std::vector<uint8_t> data(1 << 20);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  int failures = 0, cases = 0;
  for (size_t length : {0, 1, 15, 16, 63, 64, 65, 127, 128, 1000, 4096, 65536 + 7, 1 << 19})
    for (size_t offset : {0, 1, 3, 8, 13}) {
      const uint32_t want = static_cast<uint32_t>(::crc32(0, data.data() + offset, static_cast<uInt>(length)));
      const uint32_t got = hm::crc32(data.data() + offset, length);
      const size_t half = length / 3;  // continued over two calls, as verified reads do chunk by chunk
      const uint32_t continued = hm::crc32(data.data() + offset + half, length - half, hm::crc32(data.data() + offset, half));
      failures += (want != got) + (want != continued);
      cases += 2;
    }
  std::cout << "{\"method\": \"" << hm::crc32_method() << "\", \"cases\": " << cases << ", \"failures\": " << failures
            << "}\n";
  return failures == 0 ? 0 : 1;
}

// Dims from the index, bounded as the runtime bounds the manifest's (hm_export.config.LIMITS).
std::vector<int> ints(const hm::json::Value& model, const char* key, int64_t lo, int64_t hi) {
  std::vector<int> out;
  for (int64_t v : model.at(key, key).as_int_list(key)) {
    if (v < lo || v > hi) throw hm::Error(std::string("index.json: model.") + key + ": " + std::to_string(v) + " out of range");
    out.push_back(static_cast<int>(v));
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string dir, index_sha256;
    int blocks = 256, rounds = 5;
    uint64_t seed = 0;
    bool cold = false, check = false;
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg == "--crc-self-test") return crc_self_test();
      if (arg == "--cold") cold = true;
      else if (arg == "--check") check = true;
      else if (arg == "--blocks" && i + 1 < argc) blocks = std::stoi(argv[++i]);
      else if (arg == "--rounds" && i + 1 < argc) rounds = std::stoi(argv[++i]);
      else if (arg == "--seed" && i + 1 < argc) seed = std::stoull(argv[++i]);
      else if (arg == "--index-sha256" && i + 1 < argc) index_sha256 = argv[++i];
      else if (dir.empty() && arg[0] != '-') dir = arg;
      else throw hm::Error("usage: hm_bank_read BANK_DIR [--blocks 256] [--rounds 5] [--cold] [--seed 0]");
    }
    if (dir.empty() || blocks < 1 || rounds < 1) throw hm::Error("usage: hm_bank_read BANK_DIR [--blocks N] ...");
    const std::string index_path = dir + "/index.json";
    const std::string index_bytes = hm::read_file(index_path, kMaxIndexBytes);
    const hm::json::Value index = hm::parse_json(index_bytes, index_path);
    const hm::json::Value& model = index.at("model", "model");
    hm::MemoryDims dims;
    const int64_t d_model = model.at("d_model", "model").as_int("d_model");
    if (d_model < 1 || d_model > (1 << 16)) throw hm::Error(index_path + ": model.d_model out of range");
    dims.d_model = static_cast<int>(d_model);
    dims.branching = ints(model, "branching", 1, 1 << 16);
    dims.widths = ints(model, "widths", 1, 1 << 16);
    dims.layers = ints(model, "memory_layers", 0, 1 << 10);
    int64_t nodes = 0, level_nodes = 1;
    for (int k : dims.branching) level_nodes = std::min<int64_t>(level_nodes * k, 1ll << 40), nodes += level_nodes;
    if (dims.widths.empty() || dims.widths.size() > 16 || dims.branching.size() != dims.widths.size() ||
        nodes > (1 << 24))
      throw hm::Error(index_path + ": model.branching/widths: 1 to 16 levels and at most 2^24 nodes expected");
    const std::string schema_hash = index.at("schema_hash", "schema_hash").as_string("schema_hash");
    auto open_bank = [&](const std::string& digest) {
      return std::make_unique<hm::Bank>(std::make_unique<hm::Tree>(dir, "bank"), dims, schema_hash, -1, digest);
    };
    if (check) {
      const std::unique_ptr<hm::Bank> checked_bank = open_bank(index_sha256);
      const hm::Bank& bank = *checked_bank;
      int checked = 0;
      for (int level = 0; level < dims.num_levels(); ++level) {
        hm::AlignedBuffer block(bank.block_size(level));
        for (int node = 0; node < dims.nodes_at(level); ++node, ++checked) bank.read(level, node, block.data(), true);
      }
      std::printf("{\"blocks\": %d}\n", checked);
      return 0;
    }
    const std::unique_ptr<hm::Bank> unkeyed = open_bank(""), keyed = open_bank(hm::sha256_hex(index_bytes));
    const hm::Bank& bank = *unkeyed;
    // Blocks drawn like random contexts' nodes: a uniform node over all levels' nodes.
    std::mt19937_64 rng(seed);
    int total = 0;
    for (int level = 0; level < dims.num_levels(); ++level) total += dims.nodes_at(level);
    std::vector<std::pair<int, int>> picks;
    for (int i = 0; i < blocks; ++i) {
      int node = std::uniform_int_distribution<int>(0, total - 1)(rng), level = 0;
      while (node >= dims.nodes_at(level)) node -= dims.nodes_at(level++);
      picks.emplace_back(level, node);
    }
    uint64_t largest = 0, bytes = 0;
    for (const auto& [level, node] : picks) largest = std::max(largest, bank.block_size(level)), bytes += bank.block_size(level);
    hm::AlignedBuffer buffer(largest);
    auto drop = [&](int level, int node) {  // cold: the block's pages leave the page cache first
      const int fd = ::open((dir + "/" + bank.block_file(level, node)).c_str(), O_RDONLY);
      if (fd >= 0) ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), ::close(fd);
    };
    auto pass = [&](const hm::Bank& reader, bool verify) {
      double seconds = 0;
      for (const auto& [level, node] : picks) {
        if (cold) drop(level, node);
        auto start = Clock::now();
        reader.read(level, node, buffer.data(), verify);
        seconds += std::chrono::duration<double>(Clock::now() - start).count();
      }
      return bytes / seconds / 1e9;
    };
    if (!cold) pass(*keyed, true);  // warm the page cache (and check every block once)
    // Interleaved: each round runs the three modes, in an order that rotates from round to round.
    std::vector<double> raw(rounds), verified(rounds), verified_keyed(rounds);
    for (int round = 0; round < rounds; ++round)
      for (int step = 0; step < 3; ++step) switch ((round + step) % 3) {
          case 0: raw[round] = pass(bank, false); break;
          case 1: verified[round] = pass(bank, true); break;
          default: verified_keyed[round] = pass(*keyed, true);
        }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    auto ratios = [&](const std::vector<double>& mode) {
      std::vector<double> out;
      for (int round = 0; round < rounds; ++round) out.push_back(mode[round] / raw[round]);
      return out;
    };
    const std::vector<double> unkeyed_ratios = ratios(verified), keyed_ratios = ratios(verified_keyed);
    std::printf(
        "{\"bank\": \"%s\", \"blocks\": %d, \"bytes_per_pass\": %llu, \"rounds\": %d, \"page_cache\": \"%s\", "
        "\"crc32\": \"%s\", \"raw_gb_per_s\": %.3f, \"verified_gb_per_s\": %.3f, \"verified_keyed_gb_per_s\": %.3f, "
        "\"ratio_median\": %.3f, \"ratio_min\": %.3f, \"ratio_keyed_median\": %.3f, \"ratio_keyed_min\": %.3f}\n",
        dir.c_str(), blocks, static_cast<unsigned long long>(bytes), rounds, cold ? "cold" : "warm", hm::crc32_method(),
        median(raw), median(verified), median(verified_keyed), median(unkeyed_ratios),
        *std::min_element(unkeyed_ratios.begin(), unkeyed_ratios.end()), median(keyed_ratios),
        *std::min_element(keyed_ratios.begin(), keyed_ratios.end()));
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
