// hm-export native runtime, C++ API: open a bundle, fill the memory slot level by level, run decode.pte.
//
// One Runtime per bundle; not thread-safe (one consumer thread, like executorch::extension::Module).
// Every failure throws hm::Error whose message names the file and the problem; no input, however damaged
// or hostile, makes it read outside the bundle, block, or crash.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace hm {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Which blocks stay in RAM (still encoded: an int4 block costs its int4 bytes), as the Python CachePolicy.
struct CachePolicy {
  int resident_levels = 1;           // levels 0 .. resident_levels-1: a block read once is kept
  uint64_t cache_bytes = 256ull << 20;  // LRU cap for deeper levels (header pages included); 0 = stream
  bool verify = true;                // CRC-32 and sha256 of every block read from storage
};

struct Options {
  // sha256 of every file listed in the manifest, at open. Off (trusted storage) skips only the hashes: the
  // manifest's seal, every size, every file type and ExecuTorch's program verification are always checked.
  bool verify_files = true;
  // A trusted Ed25519 public key (32 bytes) the bundle's manifest must be signed with; empty: no signature
  // needed (the manifest's sha256 seal is still checked).
  std::vector<uint8_t> verify_key;
  CachePolicy cache;
  int threads = 0;  // XNNPACK threadpool size; 0 = leave ExecuTorch's default
};

// What one set_path cost, per changed level (seconds of fetch + dequantize, and of the fetch alone).
struct SlotUpdate {
  std::vector<int> path;
  std::vector<int> levels_changed;
  std::vector<std::string> sources;  // "resident", "cache" or "storage" per changed level
  std::vector<double> level_seconds;
  std::vector<double> fetch_seconds;
  uint64_t storage_bytes = 0;  // bytes read from storage (header pages included)
};

// Sampling for generate(): temperature 0 is greedy (argmax, what the golden checks record).
struct GenerateOptions {
  int max_new_tokens = 32;
  float temperature = 0;  // > 0: softmax(logits / temperature), restricted by top_k / top_p
  int top_k = 0;          // 0: all tokens
  float top_p = 1;        // 1: all tokens
  uint64_t seed = 0;      // std::mt19937_64 seed (sampled text differs from the Python runtime's torch RNG)
  std::vector<int64_t> stop_tokens;
};

// One continuation: its path and fill, ids, text and timings (seconds).
struct Generation {
  std::vector<int> path;
  SlotUpdate update;  // what this context's fill cost (no levels when the path was loaded already)
  std::vector<int64_t> prompt_tokens, new_tokens;
  std::string text;
  std::string stop_reason;  // "stop_token", "max_new_tokens" or "cache_full"
  double route_seconds = 0, fill_seconds = 0, prefill_seconds = 0, first_token_seconds = 0, decode_seconds = 0;
};

// Receives the text a new token completes (whole UTF-8 characters only; may be called with less than a token).
using TextCallback = std::function<void(const std::string& piece)>;

class Runtime {
 public:
  // Opens and validates the bundle (manifest, slot contract, bank index) and loads the decode program.
  explicit Runtime(const std::string& bundle_dir, const Options& options = Options());
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int num_levels() const;
  int nodes_at(int level) const;
  int vocab_size() const;
  int max_seq_len() const;  // KV-cache positions of the decode program
  int embedding_dim() const;  // router centroid width (all-MiniLM-L6-v2: 384)

  // Greedy L2 descent of the router tree for a context embedding computed by the app (see docs/native-runtime.md).
  std::vector<int> route(const float* embedding, size_t dim) const;
  // Text in: the bundle's router tokenizer (WordPiece) and router program (router/minilm.pte), loaded on first
  // use; embed() returns the L2-normalised context embedding, route_text() its path.
  bool has_router_program() const;
  std::vector<float> embed(const std::string& context);
  std::vector<int> route_text(const std::string& context);
  // The LM's tokenizer (the bundle's tokenizer.json), loaded on first use.
  std::vector<int64_t> encode(const std::string& text);
  std::string decode_text(const std::vector<int64_t>& ids);
  // Routes `context` (re-routing only when it differs from the last one), fills its path, prefills `prompt` and
  // continues it; `on_text` streams the text as it grows.
  Generation generate(const std::string& context, const std::string& prompt,
                      const GenerateOptions& options = GenerateOptions(), const TextCallback& on_text = nullptr);

  // Makes the slot hold `path`'s memory; fetches and dequantizes only the levels whose node changed. Blocks a
  // prefetch read in the background are taken from it (waiting for one still in flight).
  SlotUpdate set_path(const std::vector<int>& path);
  // Background prefetch: reads the blocks of `path`'s levels that differ from the current path (and are not in
  // RAM already) on the runtime's prefetch thread; prefetch_text() routes `context` on that thread first. Returns
  // at once; the next set_path()/generate() to that path uses the blocks. A newer request replaces an older one.
  void prefetch(const std::vector<int>& path);
  void prefetch_text(const std::string& context);
  // Waits until the prefetch thread is idle; returns the path it prefetched last (empty: none).
  std::vector<int> wait_prefetch();
  const std::vector<int>& path() const;  // -1 per level not loaded yet

  // Starts a new sequence: logits [n, vocab] of `tokens` fed from position 0 in one call.
  std::vector<float> prefill(const std::vector<int64_t>& tokens);
  // The same, returning the last position's logits [vocab] only: through the program's prefill method when it
  // has one (the output head computed for that position alone), what generation needs.
  std::vector<float> prefill_last(const std::vector<int64_t>& tokens);
  // Feeds one token at the next position; returns its logits [vocab].
  std::vector<float> decode(int64_t token);
  int position() const;  // tokens in the KV cache

  // The slot buffers in contract order, e.g. to compare against another loader: float32 for host-fp32;
  // int8 / uint8 (packed int4) codes and float16 scales for fused-int8 / fused-int4.
  const std::string& slot_strategy() const;  // the manifest's slot.strategy (host-fp32 when none recorded)

  // A file the checked manifest lists (e.g. "checks/checks.json"), read inside the bundle through no symlink,
  // of exactly its declared size.
  std::string read_listed(const std::string& relative) const;
  // The manifest's golden checks: {checks file, expected-logits file}, both listed; empty strings when none.
  std::pair<std::string, std::string> checks_files() const;
  // The golden checks' tolerance key of the ExecuTorch program (hm_export.reference.program_precision):
  // "int8-activations" when its anchor quantizes activations at run time (--anchor-quant 8da*), else "float32".
  std::string check_precision() const;
  size_t slot_count() const;
  const std::string& slot_name(size_t index) const;
  const std::string& slot_dtype(size_t index) const;  // float32, float16, int8 or uint8
  const void* slot_data(size_t index) const;
  size_t slot_nbytes(size_t index) const;

  struct Impl;

 private:
  void start_prefetcher();
  std::unique_ptr<Impl> impl_;
};

}  // namespace hm
