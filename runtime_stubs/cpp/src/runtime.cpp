// hm::Runtime: bundle validation (seal, manifest, files, slot contract), slot filling, decode.pte through
// executorch::extension::Module with the XNNPACK delegate.
//
// Nothing read from the bundle is trusted before it is checked: the manifest's bytes against bundle.sig
// (and a signature, given a key), every size and count against fixed limits and the files on disk, every
// file opened inside the bundle through no symlink (Tree), the program with ExecuTorch's full verification.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <utility>

#include "bank.hpp"
#include "files.hpp"
#include "hm_runtime.hpp"
#include "integrity.hpp"
#include "manifest.hpp"
#include "slot.hpp"
#include "tokenizer.hpp"

#include "et_threadpool.h"  // kernels/: ExecuTorch's threadpool, which the qlinear kernel shares with XNNPACK

namespace hm {
namespace {

using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using executorch::runtime::EValue;
using Clock = std::chrono::steady_clock;

constexpr size_t kInputPadding = 16;  // XNNPACK may read up to 16 bytes past an input (XNN_EXTRA_BYTES)
// The bounds of hm_export.config.LIMITS: far above any model, low enough that no product overflows.
constexpr int64_t kMaxVocab = 1 << 22, kMaxDModel = 1 << 16, kMaxLayers = 1 << 10, kMaxSeqLen = 1 << 20;
constexpr int64_t kMaxBranching = 1 << 16, kMaxWidth = 1 << 16, kMaxNodes = 1 << 24, kMaxLevels = 16;
constexpr uint64_t kMaxRouterBytes = 1ull << 32;
constexpr int64_t kMaxRouterTokens = 1 << 16;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

executorch::aten::ScalarType scalar_type(const std::string& dtype) {
  using executorch::aten::ScalarType;
  if (dtype == "float16") return ScalarType::Half;
  if (dtype == "int8") return ScalarType::Char;
  if (dtype == "uint8") return ScalarType::Byte;
  return ScalarType::Float;
}

// A list of integers each in [lo, hi] (so the cast to int is exact); throws naming `what`.
std::vector<int> to_ints(const json::Value& value, const std::string& what, int64_t lo = 0, int64_t hi = INT32_MAX) {
  std::vector<int> out;
  for (int64_t v : value.as_int_list(what)) {
    if (v < lo || v > hi)
      throw std::runtime_error(what + ": " + std::to_string(v) + " is outside [" + std::to_string(lo) + ", " +
                               std::to_string(hi) + "]");
    out.push_back(static_cast<int>(v));
  }
  return out;
}

int bounded(const json::Value& value, const std::string& what, int64_t lo, int64_t hi) {
  const int64_t v = value.as_int(what);
  if (v < lo || v > hi)
    throw std::runtime_error(what + ": " + std::to_string(v) + " is outside [" + std::to_string(lo) + ", " +
                             std::to_string(hi) + "]");
  return static_cast<int>(v);
}

// The next token from the last position's logits: argmax at temperature 0 (the first maximum, like torch's
// argmax), else a draw from softmax(logits / temperature) restricted to the top_k largest and to the smallest
// set whose mass reaches top_p (as runtime_stubs/generate.py, with std::mt19937_64 instead of torch's RNG).
int64_t next_token(const float* logits, int vocab, const GenerateOptions& options, std::mt19937_64& rng) {
  if (options.temperature <= 0) return std::max_element(logits, logits + vocab) - logits;
  std::vector<double> scores(logits, logits + vocab);
  for (double& s : scores) s /= options.temperature;
  std::vector<int> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores[a] > scores[b]; });
  size_t keep = options.top_k > 0 && options.top_k < vocab ? options.top_k : vocab;
  std::vector<double> probs(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += probs[i] = std::exp(scores[order[i]] - scores[order[0]]);
  if (options.top_p < 1) {
    double before = 0;
    for (size_t i = 0; i < keep; ++i) {
      if (before / total >= options.top_p) {
        keep = i;
        break;
      }
      before += probs[i];
    }
  }
  std::discrete_distribution<size_t> draw(probs.begin(), probs.begin() + keep);
  return order[draw(rng)];
}

// Reads the blocks of a path's changed levels on a background thread (docs/native-runtime.md, "Prefetch").
class Prefetcher {
 public:
  using Key = std::pair<int, int>;
  using Router = std::function<std::vector<int>(const std::string&)>;
  Prefetcher(const Bank& bank, const BlockCache& cache, bool verify, Router route)
      : bank_(bank), cache_(cache), verify_(verify), route_(std::move(route)), thread_([this] { loop(); }) {}
  ~Prefetcher() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    changed_.notify_all();
    thread_.join();
  }

  // `current`: the path the slot holds now (levels whose node it already has are not read).
  void request(std::vector<int> path, std::string context, std::vector<int> current) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_ = Job{std::move(path), std::move(context), std::move(current)};
    }
    changed_.notify_all();
  }

  // The block if the prefetch read it, waiting while it is planned and not read yet. A request still being
  // routed is not waited for: the caller reads the block itself rather than stall on the router.
  std::optional<AlignedBuffer> take(const Key& key) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return stop_ || planned_.count(key) == 0; });
    if (auto it = failed_.find(key); it != failed_.end()) {
      std::string why = it->second;
      failed_.erase(it);
      throw Error(why);
    }
    auto it = ready_.find(key);
    if (it == ready_.end()) return std::nullopt;
    AlignedBuffer block = std::move(it->second);
    ready_.erase(it);
    return block;
  }

  std::vector<int> wait_idle() {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return !pending_ && !busy_; });
    if (!route_error_.empty()) {
      std::string why;
      why.swap(route_error_);
      throw Error("prefetch: " + why);
    }
    return last_path_;
  }

 private:
  struct Job {
    std::vector<int> path;
    std::string context;  // routed on this thread when path is empty
    std::vector<int> current;
  };

  void loop() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return stop_ || pending_; });
        if (stop_) return;
        job = std::move(*pending_);
        pending_.reset();
        busy_ = true;
      }
      std::vector<int> path = job.path;
      std::string route_error;
      if (path.empty()) {
        try {
          path = route_(job.context);
        } catch (const std::exception& e) {
          route_error = e.what();
        }
      }
      std::vector<Key> plan;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        route_error_ = route_error;
        std::set<Key> wanted;
        for (size_t level = 0; level < path.size(); ++level) {
          const Key key{static_cast<int>(level), path[level]};
          wanted.insert(key);
          if ((level < job.current.size() && job.current[level] == path[level]) || ready_.count(key) ||
              cache_.contains(key.first, key.second))
            continue;
          plan.push_back(key);
        }
        for (auto it = ready_.begin(); it != ready_.end();) it = wanted.count(it->first) ? std::next(it) : ready_.erase(it);
        failed_.clear();
        planned_ = std::set<Key>(plan.begin(), plan.end());
        last_path_ = path;
      }
      changed_.notify_all();
      for (const Key& key : plan) {
        AlignedBuffer block(bank_.block_size(key.first));
        std::string error;
        try {
          bank_.read(key.first, key.second, block.data(), verify_);
        } catch (const std::exception& e) {
          error = e.what();
        }
        std::lock_guard<std::mutex> lock(mutex_);
        if (error.empty()) ready_[key] = std::move(block);
        else failed_[key] = error;
        planned_.erase(key);
        changed_.notify_all();
        if (pending_ || stop_) break;  // a newer request wins: leave the rest of this path unread
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        planned_.clear();
        busy_ = false;
      }
      changed_.notify_all();
    }
  }

  const Bank& bank_;
  const BlockCache& cache_;
  const bool verify_;
  Router route_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<Job> pending_;
  bool busy_ = false, stop_ = false;
  std::set<Key> planned_;
  std::map<Key, AlignedBuffer> ready_;
  std::map<Key, std::string> failed_;
  std::vector<int> last_path_;
  std::string route_error_;
  std::thread thread_;  // last: started after every other member exists
};

}  // namespace

struct SlotBuffer {
  TensorSpec spec;
  AlignedBuffer data;  // spec.nbytes() + padding bytes
  TensorPtr tensor;
};

struct Runtime::Impl {
  std::string root, manifest_path;
  std::unique_ptr<Tree> tree;  // every bundle file is opened through it
  std::vector<int> program_fds;  // the programs ExecuTorch maps, held open (it opens them by fd path)
  json::Value manifest;
  MemoryDims dims;
  SlotLayout layout;
  int vocab = 0, max_seq_len = 0, embed_dim = 0;
  std::vector<SlotBuffer> slot;
  std::vector<LevelViews> views;  // per level: where its block's matrices land in `slot`
  std::unique_ptr<Bank> bank;
  std::unique_ptr<BlockCache> cache;
  std::vector<int> path;
  std::vector<std::vector<float>> centroids;  // per level [n_l, embed_dim]
  std::unique_ptr<Module> module;
  // The decode program's prefill method (manifest decode.prefill_method; empty: none): the last position's logits
  // only. It shares forward's KV cache, so the module shares its memory arenas between methods.
  std::string prefill_method;
  int position = 0;
  Options options;
  // Text in / out, loaded on first use.
  std::mutex router_mutex, tokenizer_mutex;
  std::unique_ptr<Tokenizer> router_tokenizer, lm_tokenizer;
  std::unique_ptr<Module> router_module;
  int64_t router_min_tokens = 0, router_max_tokens = 0;  // the router program's token axis (program_io)
  std::string router_program_path, router_tokenizer_path;  // for errors
  std::string last_context;
  std::vector<int> last_route;
  std::unique_ptr<Prefetcher> prefetcher;  // last: its thread stops before the bank and cache go

  ~Impl() {
    prefetcher.reset();  // its thread may be running the router program
    router_module.reset();
    module.reset();
    for (int fd : program_fds) ::close(fd);
  }
  [[noreturn]] void refuse(const std::string& why) const { throw Error(manifest_path + ": " + why); }
  int64_t listed_size(const std::string& relative) const;
  std::string listed_sha256(const std::string& relative) const;  // lowercase hex (validate_manifest checked its form)
  const json::Value& listed(const std::string& relative) const;
  std::string read_listed(const std::string& relative, const std::string& what, uint64_t limit) const;
  std::string open_program(const std::string& relative, const std::string& what);
  void read_model();
  void check_slot_contract();
  void check_tensor(const json::Value& tensor, const TensorSpec& want, const std::string& where) const;
  void bind_views(const SlotBuffer& codes, const SlotBuffer* scales);
  void open_program(const Options& options);
  void check_method(const std::string& program, const std::string& method, bool last_only) const;
  void read_router();
  void load_router_program();
  std::vector<float> embed(const std::string& context);
  const Tokenizer& lm() ;
  std::vector<float> run(const std::vector<int64_t>& tokens, int64_t input_pos, const std::string& method = "forward");
  // A new sequence: `tokens` from position 0 through `method` (prefill / prefill_last).
  std::vector<float> start(const std::vector<int64_t>& tokens, const std::string& method);
};

// The declared size of a file the manifest names elsewhere (tokenizer, router, checks, programs): it must be
// listed, so it was checked by check_listed_files and its reads are capped by it.
int64_t Runtime::Impl::listed_size(const std::string& relative) const {
  return listed(relative).at("bytes", relative).as_int("files." + relative + ".bytes");
}

std::string Runtime::Impl::listed_sha256(const std::string& relative) const {
  return listed(relative).at("sha256", relative).as_string("files." + relative + ".sha256");
}

const json::Value& Runtime::Impl::listed(const std::string& relative) const {
  const json::Value* entry = manifest.at("files", "files").find(relative);
  if (entry == nullptr) refuse("'" + relative + "' is not listed in 'files' (no size or sha256 to check it by)");
  return *entry;
}

void Runtime::Impl::read_model() {
  const json::Value& model = manifest.at("model", "model");
  dims.d_model = bounded(model.at("d_model", "model"), "model.d_model", 1, kMaxDModel);
  vocab = bounded(model.at("vocab_size", "model"), "model.vocab_size", 1, kMaxVocab);
  max_seq_len = bounded(model.at("max_seq_len", "model"), "model.max_seq_len", 1, kMaxSeqLen);
  const int n_layers = bounded(model.at("n_layers", "model"), "model.n_layers", 1, kMaxLayers);
  const json::Value& memory = model.at("memory", "model.memory");
  dims.branching = to_ints(memory.at("branching", "model.memory"), "model.memory.branching", 1, kMaxBranching);
  dims.widths = to_ints(memory.at("widths", "model.memory"), "model.memory.widths", 1, kMaxWidth);
  dims.layers = to_ints(memory.at("layers", "model.memory"), "model.memory.layers", 0, n_layers - 1);
  if (dims.branching.size() != dims.widths.size() || dims.widths.empty() ||
      dims.widths.size() > static_cast<size_t>(kMaxLevels))
    refuse("model.memory: branching and widths must have one entry per level (1 to 16 levels)");
  int64_t nodes = 0, level_nodes = 1;
  for (int k : dims.branching) {
    level_nodes *= k;  // <= kMaxNodes * kMaxBranching before the check below: no overflow
    nodes += level_nodes;
    if (nodes > kMaxNodes) refuse("model.memory.branching: more than " + std::to_string(kMaxNodes) + " nodes");
  }
  if (dims.layers.empty()) refuse("model.memory.layers: empty");
  for (size_t i = 1; i < dims.layers.size(); ++i)
    if (dims.layers[i] <= dims.layers[i - 1]) refuse("model.memory.layers: not strictly ascending");
}

// Opens a program file inside the bundle (no symlink, regular, listed) and returns the path ExecuTorch opens:
// the descriptor's own path, so what it maps is exactly the file checked here.
std::string Runtime::Impl::open_program(const std::string& relative, const std::string& what) {
  listed_size(relative);
  program_fds.push_back(tree->open(relative, what));
  return fd_path(program_fds.back());
}

// A file the manifest names (tokenizer, router, checks): listed, read inside the bundle, exactly its listed
// size and at most `limit` bytes.
std::string Runtime::Impl::read_listed(const std::string& relative, const std::string& what, uint64_t limit) const {
  return tree->read(relative, what, limit, listed_size(relative));
}

// The slot contract must be exactly what SlotLayout.contract (SlotContract.for_model for a float32 slot) gives
// for the model config and the recorded strategy: the program's inputs were traced from it, so any other
// layout would silently compute with the wrong memory.
void Runtime::Impl::check_slot_contract() {
  const json::Value& contract = manifest.at("slot", "slot");
  auto mismatch = [&](const std::string& field) {
    refuse("slot contract does not match the model config (" + field + ")");
  };
  if (contract.at("d_model", "slot").as_int("slot.d_model") != dims.d_model) mismatch("d_model");
  if (to_ints(contract.at("branching", "slot"), "slot.branching") != dims.branching) mismatch("branching");
  if (to_ints(contract.at("widths", "slot"), "slot.widths") != dims.widths) mismatch("widths");
  if (to_ints(contract.at("memory_layers", "slot"), "slot.memory_layers") != dims.layers) mismatch("memory_layers");
  try {
    layout = parse_layout(contract, dims);
  } catch (const Error& e) {
    refuse(e.what());
  }
  const std::string& dtype = contract.at("dtype", "slot").as_string("slot.dtype");
  if (dtype != layout.name())
    mismatch("dtype: '" + dtype + "', slot strategy " + layout.strategy + " gives '" + layout.name() + "'");
  const std::vector<TensorSpec> specs = expected_tensors(dims, layout);
  const auto& tensors = contract.at("tensors", "slot").as_array("slot.tensors");
  if (tensors.size() != specs.size()) mismatch("number of tensors");
  for (size_t t = 0; t < specs.size(); ++t) {
    check_tensor(tensors[t], specs[t], "slot.tensors[" + std::to_string(t) + "]");
    SlotBuffer buffer;
    buffer.spec = specs[t];
    buffer.data = AlignedBuffer(specs[t].nbytes() + kInputPadding);
    slot.push_back(std::move(buffer));
  }
  views.assign(dims.num_levels(), LevelViews(3 * dims.layers.size()));
  const size_t step = layout.quantized() ? 2 : 1;  // a quantized slot: codes, then their scales
  for (size_t t = 0; t < slot.size(); t += step) bind_views(slot[t], layout.quantized() ? &slot[t + 1] : nullptr);
}

void Runtime::Impl::check_tensor(const json::Value& tensor, const TensorSpec& want, const std::string& where) const {
  auto mismatch = [&](const std::string& field) {
    refuse("slot contract does not match the model config (" + where + "." + field + ")");
  };
  if (tensor.at("name", where).as_string(where + ".name") != want.name) mismatch("name");
  if (tensor.at("layer", where).as_int(where) != want.layer) mismatch("layer");
  if (tensor.at("memory_index", where).as_int(where) != want.memory_index) mismatch("memory_index");
  if (tensor.at("role", where).as_string(where + ".role") != want.role) mismatch("role");
  if (to_ints(tensor.at("shape", where), where + ".shape") != want.shape) mismatch("shape");
  if (tensor.at("hidden_axis", where).as_int(where) != want.hidden_axis) mismatch("hidden_axis");
  const std::string& dtype = tensor.at("dtype", where).as_string(where + ".dtype");
  if (dtype != want.dtype) mismatch("dtype: '" + dtype + "', expected '" + want.dtype + "'");
  std::vector<std::string> sources;
  for (const json::Value& source : tensor.at("sources", where).as_array(where + ".sources"))
    sources.push_back(source.as_string(where + ".sources[]"));
  if (sources != want.sources) mismatch("sources");
  const auto& ranges = tensor.at("level_ranges", where).as_array(where + ".level_ranges");
  if (ranges.size() != want.level_ranges.size()) mismatch("level_ranges");
  for (size_t level = 0; level < ranges.size(); ++level) {
    std::vector<int64_t> got, expected;
    for (const json::Value& span : ranges[level].as_array(where))
      for (int64_t v : span.as_int_list(where)) got.push_back(v);
    for (const auto& [lo, hi] : want.level_ranges[level]) expected.insert(expected.end(), {lo, hi});
    if (got != expected) mismatch("level_ranges[" + std::to_string(level) + "]");
  }
}

// Where each level's block matrices land: gate and up in columns of gate_up, down in rows of down; for a
// quantized slot also the matching ranges of the scale tensor (scale_group rows per slot scale row).
void Runtime::Impl::bind_views(const SlotBuffer& codes, const SlotBuffer* scales) {
  const TensorSpec& spec = codes.spec;
  const size_t index = static_cast<size_t>(spec.memory_index);
  const bool gate_up = spec.role == "gate_up";
  for (int level = 0; level < dims.num_levels(); ++level) {
    for (size_t s = 0; s < spec.sources.size(); ++s) {
      MatrixView view{codes.data.data() + spec.byte_offset(spec.level_ranges[level][s].first), spec.row_bytes()};
      if (scales != nullptr) {
        const TensorSpec& grid = scales->spec;
        view.scales = scales->data.data() + grid.byte_offset(grid.level_ranges[level][s].first);
        view.scale_stride = grid.row_bytes();
        view.scale_group = gate_up ? layout.gate_up_group : layout.down_group;
      }
      views[level][index * 3 + (gate_up ? (s == 0 ? kGate : kUp) : kDown)] = view;
    }
  }
}

void Runtime::Impl::open_program(const Options& options) {
  const json::Value* target = manifest.at("targets", "targets").find("executorch");
  if (target == nullptr || target->find("decode") == nullptr)
    refuse("no executorch decode program (export with --target executorch and without --no-decode)");
  const json::Value& decode = target->at("decode", "targets.executorch.decode");
  const json::Value& files = decode.at("files", "targets.executorch.decode.files");
  if (files.kind != json::Value::Kind::Object) refuse("targets.executorch.decode.files: expected an object");
  // The decode program's inputs: tokens, input_pos, then the slot in contract order.
  std::vector<std::string> inputs;
  for (const json::Value& input : decode.at("io", "decode").at("inputs", "decode.io").as_array("decode.io.inputs"))
    inputs.push_back(input.at("name", "decode.io.inputs[]").as_string("decode.io.inputs[].name"));
  std::vector<std::string> expected = {"tokens", "input_pos"};
  for (const SlotBuffer& buffer : slot) expected.push_back(buffer.spec.name);
  if (inputs != expected) refuse("decode program inputs differ from tokens, input_pos and the slot contract");
  const std::string relative = files.at("program", "decode.files").as_string("decode.files.program");
  const std::string program = root + "/" + relative, program_fd = open_program(relative, "decode program");
  if (const json::Value* method = decode.find("prefill_method"))
    prefill_method = method->as_string("targets.executorch.decode.prefill_method");
  const bool shared = !prefill_method.empty();  // prefill and forward write one KV cache
  if (const json::Value* data = files.find("data"))
    module = std::make_unique<Module>(program_fd,
                                      open_program(data->as_string("decode.files.data"), "decode program data"),
                                      Module::LoadMode::Mmap, nullptr, nullptr, nullptr, shared);
  else
    module = std::make_unique<Module>(program_fd, Module::LoadMode::Mmap, nullptr, nullptr, nullptr, shared);
  if (options.threads > 0) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(options.threads);
  // Full verification always: trusted storage (verify_files off) skips the sha256s, not this.
  if (module->load(executorch::runtime::Program::Verification::InternalConsistency) != executorch::runtime::Error::Ok)
    throw Error(program + ": ExecuTorch refuses the program (it fails verification: corrupt or not a .pte)");
  for (const auto& [method, last_only] : {std::pair<std::string, bool>{"forward", false}, {prefill_method, true}}) {
    if (method.empty()) continue;
    if (module->load_method(method) != executorch::runtime::Error::Ok)
      throw Error(program + ": ExecuTorch cannot load method '" + method +
                  "' (corrupt program, a missing kernel/backend, or a manifest naming a method it lacks)");
    check_method(program, method, last_only);
  }
  for (SlotBuffer& buffer : slot)  // bound once: filling the slot writes into these buffers
    buffer.tensor = executorch::extension::from_blob(
        buffer.data.data(), {buffer.spec.shape[0], buffer.spec.shape[1], buffer.spec.shape[2]},
        scalar_type(buffer.spec.dtype));
}

// The program must be the one the manifest describes: tokens of up to max_seq_len positions (its KV cache),
// float32 logits of the manifest's vocabulary (of one position for the prefill method: `last_only`), the slot
// tensors with their shapes and dtypes. A manifest that disagrees (an edited vocab_size, a larger max_seq_len) is
// refused here rather than trusted at run time.
void Runtime::Impl::check_method(const std::string& program, const std::string& method, bool last_only) const {
  auto meta = module->method_meta(method);
  if (!meta.ok()) throw Error(program + ": no metadata for method '" + method + "'");
  auto refuse_program = [&](const std::string& why) { throw Error(program + ": method '" + method + "': " + why); };
  if (meta->num_inputs() != 2 + slot.size() || meta->num_outputs() < 1)
    refuse_program("inputs or outputs differ from tokens, input_pos, the slot -> logits");
  auto tokens = meta->input_tensor_meta(0);
  if (!tokens.ok() || tokens->sizes().size() != 2 || tokens->sizes()[1] < max_seq_len)
    refuse_program("its tokens input holds fewer than the manifest's max_seq_len " + std::to_string(max_seq_len) +
                   " positions");
  auto logits = meta->output_tensor_meta(0);
  if (!logits.ok() || logits->sizes().size() != 3 || logits->sizes()[2] != vocab ||
      (last_only && logits->sizes()[1] != 1) || logits->scalar_type() != executorch::aten::ScalarType::Float)
    refuse_program("its logits are not float32 [1, " + std::string(last_only ? "1" : "n") + ", " +
                   std::to_string(vocab) + "] (the manifest's vocab_size)");
  for (size_t t = 0; t < slot.size(); ++t) {
    auto input = meta->input_tensor_meta(2 + t);
    const TensorSpec& spec = slot[t].spec;
    bool same = input.ok() && input->sizes().size() == spec.shape.size() &&
                input->scalar_type() == scalar_type(spec.dtype);
    for (size_t d = 0; same && d < spec.shape.size(); ++d) same = input->sizes()[d] == spec.shape[d];
    if (!same) refuse_program("slot input " + spec.name + " differs from the slot contract");
  }
}

void Runtime::Impl::read_router() {
  const json::Value& router = manifest.at("router", "router");
  const std::string relative = router.at("file", "router").as_string("router.file");
  const std::string file = root + "/" + relative;
  embed_dim = bounded(router.at("dim", "router"), "router.dim", 1, 1 << 16);
  auto tensors = parse_safetensors(read_listed(relative, "router", kMaxRouterBytes), file);
  for (int level = 0; level < dims.num_levels(); ++level) {
    auto it = tensors.find("level" + std::to_string(level));
    if (it == tensors.end() || it->second.shape != std::vector<int64_t>{dims.nodes_at(level), embed_dim})
      throw Error(file + ": level" + std::to_string(level) + " centroids missing or not [" +
                  std::to_string(dims.nodes_at(level)) + ", " + std::to_string(embed_dim) + "]");
    centroids.push_back(std::move(it->second.f32));
  }
}

// The router tokenizer and the ExecuTorch router program (manifest router.tokenizer, router.program_io,
// router.programs.executorch), read like every other bundle file: listed, inside the bundle, capped by their
// listed sizes, the program fully verified by ExecuTorch and its method checked against program_io.
void Runtime::Impl::load_router_program() {
  if (router_module) return;
  const json::Value& router = manifest.at("router", "router");
  const json::Value* programs = router.find("programs");
  const json::Value* program = programs ? programs->find("executorch") : nullptr;
  if (program == nullptr || router.find("tokenizer") == nullptr)
    refuse("the bundle has no executorch router program (re-export with --target executorch, without "
           "--no-router-program), or route with an embedding (route()) or a path (set_path())");
  try {
    const std::string tokenizer_file =
        router.at("tokenizer", "router").at("file", "router.tokenizer").as_string("router.tokenizer.file");
    const json::Value& input = router.at("program_io", "router")
                                   .at("inputs", "router.program_io")
                                   .as_array("router.program_io.inputs")
                                   .at(0);
    const std::vector<int64_t> tokens = input.at("tokens", "router.program_io.inputs[0]")
                                            .as_int_list("router.program_io.inputs[0].tokens");
    if (tokens.size() != 2 || tokens[0] < 1 || tokens[1] < tokens[0] || tokens[1] > kMaxRouterTokens)
      refuse("router.program_io.inputs[0].tokens: expected [min, max] with 1 <= min <= max <= " +
             std::to_string(kMaxRouterTokens));
    router_min_tokens = tokens[0], router_max_tokens = tokens[1];
    const std::string relative = program->at("files", "router.programs.executorch")
                                     .at("program", "router.programs.executorch.files")
                                     .as_string("router.programs.executorch.files.program");
    auto tokenizer = std::make_unique<Tokenizer>(
        read_listed(tokenizer_file, "router tokenizer", Tokenizer::kMaxBytes), root + "/" + tokenizer_file);
    const std::string file = root + "/" + relative;
    auto loaded = std::make_unique<Module>(open_program(relative, "router program"), Module::LoadMode::Mmap);
    if (loaded->load(executorch::runtime::Program::Verification::InternalConsistency) != executorch::runtime::Error::Ok)
      throw Error(file + ": ExecuTorch refuses the router program (it fails verification: corrupt or not a .pte)");
    if (loaded->load_method("forward") != executorch::runtime::Error::Ok)
      throw Error(file + ": ExecuTorch cannot load method 'forward' (corrupt program or a missing kernel/backend)");
    auto meta = loaded->method_meta("forward");
    if (!meta.ok() || meta->num_inputs() != 1 || meta->num_outputs() < 1)
      throw Error(file + ": the router program does not take input_ids and return an embedding");
    auto in = meta->input_tensor_meta(0);
    auto out = meta->output_tensor_meta(0);
    if (!in.ok() || in->sizes().size() != 2 || in->scalar_type() != executorch::aten::ScalarType::Long ||
        !out.ok() || out->scalar_type() != executorch::aten::ScalarType::Float)
      throw Error(file + ": the router program's I/O is not int64 input_ids [1, n] -> float32 embedding");
    router_tokenizer = std::move(tokenizer);
    router_module = std::move(loaded);
    router_program_path = file, router_tokenizer_path = root + "/" + tokenizer_file;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {  // a field of the wrong type or missing
    refuse(e.what());
  }
}

std::vector<float> Runtime::Impl::embed(const std::string& context) {
  std::lock_guard<std::mutex> lock(router_mutex);
  load_router_program();
  std::vector<int64_t> ids = router_tokenizer->encode(context);
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n < router_min_tokens || n > router_max_tokens)
    throw Error(router_tokenizer_path + ": gave " + std::to_string(n) + " tokens, the router program takes " +
                std::to_string(router_min_tokens) + " to " + std::to_string(router_max_tokens));
  auto input = executorch::extension::make_tensor_ptr({1, static_cast<int>(n)}, std::move(ids));
  auto result = router_module->forward({EValue(*input)});
  if (!result.ok())
    throw Error(router_program_path + ": the router program failed (ExecuTorch error " +
                std::to_string(static_cast<int>(result.error())) + ")");
  if (result->empty() || !result->at(0).isTensor())
    throw Error(router_program_path + ": the router program returned no embedding tensor");
  const auto& out = result->at(0).toTensor();
  if (out.scalar_type() != executorch::aten::ScalarType::Float || out.numel() != embed_dim)
    throw Error(router_program_path + ": the router program returned " + std::to_string(out.numel()) +
                " values, the tree has dim " + std::to_string(embed_dim));
  std::vector<float> embedding(out.const_data_ptr<float>(), out.const_data_ptr<float>() + out.numel());
  for (float v : embedding)
    if (!std::isfinite(v)) throw Error(router_program_path + ": the router program returned a non-finite embedding");
  return embedding;
}

const Tokenizer& Runtime::Impl::lm() {
  std::lock_guard<std::mutex> lock(tokenizer_mutex);
  if (!lm_tokenizer) {
    const json::Value* tokenizer = manifest.find("tokenizer");
    if (tokenizer == nullptr) refuse("no tokenizer section");
    try {
      const std::string relative = tokenizer->at("file", "tokenizer").as_string("tokenizer.file");
      auto loaded = std::make_unique<Tokenizer>(read_listed(relative, "tokenizer", Tokenizer::kMaxBytes),
                                                root + "/" + relative);
      if (loaded->vocab_size() > vocab)
        throw Error(root + "/" + relative + ": " + std::to_string(loaded->vocab_size()) +
                    " tokens, more than the model's vocab_size " + std::to_string(vocab));
      lm_tokenizer = std::move(loaded);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      refuse(e.what());
    }
  }
  return *lm_tokenizer;
}

// Logits [rows, vocab] of `tokens` at input_pos ..: every position's (forward), or the last one's (prefill method).
std::vector<float> Runtime::Impl::run(const std::vector<int64_t>& tokens, int64_t input_pos, const std::string& method) {
  const int n = static_cast<int>(tokens.size());
  for (int64_t token : tokens)  // an id outside the vocabulary would index the embedding out of bounds
    if (token < 0 || token >= vocab)
      throw Error("token id " + std::to_string(token) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  auto token_tensor = executorch::extension::make_tensor_ptr({1, n}, std::vector<int64_t>(tokens));
  auto pos_tensor = executorch::extension::make_tensor_ptr({1}, std::vector<int64_t>{input_pos});
  std::vector<EValue> inputs = {EValue(*token_tensor), EValue(*pos_tensor)};
  for (const SlotBuffer& buffer : slot) inputs.emplace_back(*buffer.tensor);
  auto result = module->execute(method, inputs);
  if (!result.ok())
    throw Error("decode program method '" + method + "' failed (ExecuTorch error " +
                std::to_string(static_cast<int>(result.error())) + ")");
  if (result->empty() || !result->at(0).isTensor())
    throw Error("decode program method '" + method + "' returned no logits tensor");
  const auto& logits = result->at(0).toTensor();
  const int64_t rows = method == "forward" ? n : 1;
  if (logits.scalar_type() != executorch::aten::ScalarType::Float || logits.numel() != rows * vocab)
    throw Error("decode program method '" + method + "' returned " + std::to_string(logits.numel()) +
                " logits for " + std::to_string(n) + " tokens, expected " + std::to_string(rows * vocab) +
                " float32 values");
  const float* data = logits.const_data_ptr<float>();
  return std::vector<float>(data, data + logits.numel());
}

Runtime::Runtime(const std::string& bundle_dir, const Options& options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.options = options;
  m.root = bundle_dir;
  m.manifest_path = bundle_dir + "/manifest.json";
  m.tree = std::make_unique<Tree>(bundle_dir, "bundle");
  m.manifest = read_manifest(*m.tree, options.verify_key, options.verify_files);
  try {
    m.read_model();
    // The bank first: it checks its files on disk are as large as the dims say, which bounds every buffer
    // allocated from the dims below (slot, block cache) by data really in the bundle.
    const json::Value& bank = m.manifest.at("bank", "bank");
    const std::string bank_dir = bank.at("dir", "bank").as_string("bank.dir"), index = bank_dir + "/index.json";
    // Only a manifest whose signature a trusted key verified (check_seal threw otherwise) authenticates the
    // index, and through it each block's sha256; unkeyed, verified reads check the CRC-32 alone.
    const std::string index_sha256 = options.verify_key.empty() ? std::string() : m.listed_sha256(index);
    m.bank = std::make_unique<Bank>(std::make_unique<Tree>(*m.tree, bank_dir, "bank"), m.dims,
                                    bank.at("schema_hash", "bank").as_string("bank.schema_hash"),
                                    m.listed_size(index), index_sha256);
    m.check_slot_contract();
    if (m.layout.quantized()) m.bank->check_quantized_slot(m.layout.storage, m.layout.gate_up_group, m.layout.down_group);
    m.cache = std::make_unique<BlockCache>(*m.bank, m.dims.num_levels(), options.cache);
    m.path.assign(m.dims.num_levels(), -1);
    m.read_router();
    m.open_program(options);
  } catch (const Error&) {
    throw;
  } catch (const std::runtime_error& e) {  // a JSON field of the wrong type or missing
    m.refuse(e.what());
  }
}

Runtime::~Runtime() = default;

int Runtime::num_levels() const { return impl_->dims.num_levels(); }
int Runtime::nodes_at(int level) const { return impl_->dims.nodes_at(level); }
int Runtime::vocab_size() const { return impl_->vocab; }
int Runtime::max_seq_len() const { return impl_->max_seq_len; }
int Runtime::embedding_dim() const { return impl_->embed_dim; }
const std::vector<int>& Runtime::path() const { return impl_->path; }
int Runtime::position() const { return impl_->position; }
size_t Runtime::slot_count() const { return impl_->slot.size(); }
const std::string& Runtime::slot_name(size_t index) const { return impl_->slot.at(index).spec.name; }
const std::string& Runtime::slot_dtype(size_t index) const { return impl_->slot.at(index).spec.dtype; }
const void* Runtime::slot_data(size_t index) const { return impl_->slot.at(index).data.data(); }
size_t Runtime::slot_nbytes(size_t index) const { return impl_->slot.at(index).spec.nbytes(); }
const std::string& Runtime::slot_strategy() const { return impl_->layout.strategy; }

std::string Runtime::read_listed(const std::string& relative) const {
  return impl_->read_listed(relative, "listed file", std::numeric_limits<uint64_t>::max());
}

std::string Runtime::check_precision() const {
  const json::Value* targets = impl_->manifest.find("targets");
  const json::Value* executorch = targets ? targets->find("executorch") : nullptr;
  const json::Value* quant = executorch ? executorch->find("anchor_quant") : nullptr;
  if (quant != nullptr && quant->kind == json::Value::Kind::Object) {
    for (const auto& [name, part] : quant->object) {
      const json::Value* activations = part.kind == json::Value::Kind::Object ? part.find("activations") : nullptr;
      if (activations && activations->kind == json::Value::Kind::String &&
          activations->string.find("int8") != std::string::npos)
        return "int8-activations";
    }
  }
  return "float32";
}

std::pair<std::string, std::string> Runtime::checks_files() const {
  const Impl& m = *impl_;
  const json::Value* checks = m.manifest.find("checks");
  if (checks == nullptr) return {};
  try {
    std::pair<std::string, std::string> files{checks->at("file", "checks").as_string("checks.file"),
                                              checks->at("expected", "checks").as_string("checks.expected")};
    m.listed_size(files.first);
    m.listed_size(files.second);
    return files;
  } catch (const Error&) {
    throw;
  } catch (const std::runtime_error& e) {
    m.refuse(e.what());
  }
}

std::vector<int> Runtime::route(const float* embedding, size_t dim) const {
  const Impl& m = *impl_;
  if (dim != static_cast<size_t>(m.embed_dim))
    throw Error("embedding has " + std::to_string(dim) + " values, the router expects " + std::to_string(m.embed_dim));
  std::vector<int> path;
  int parent = 0;
  for (int level = 0; level < m.dims.num_levels(); ++level) {  // greedy: nearest (L2) child of the current node
    const int k = m.dims.branching[level];
    int best = -1;
    float best_distance = std::numeric_limits<float>::infinity();
    for (int child = parent * k; child < parent * k + k; ++child) {
      const float* centroid = m.centroids[level].data() + static_cast<size_t>(child) * dim;
      float distance = 0;
      for (size_t i = 0; i < dim; ++i) distance += (centroid[i] - embedding[i]) * (centroid[i] - embedding[i]);
      if (distance < best_distance) best = child, best_distance = distance;
    }
    path.push_back(parent = best);
  }
  return path;
}

SlotUpdate Runtime::set_path(const std::vector<int>& path) {
  Impl& m = *impl_;
  if (path.size() != static_cast<size_t>(m.dims.num_levels()))
    throw Error("path has " + std::to_string(path.size()) + " levels, the tree has " + std::to_string(m.dims.num_levels()));
  for (int level = 0; level < m.dims.num_levels(); ++level) {
    const int parent = level ? path[level - 1] : 0;
    if (path[level] < parent * m.dims.branching[level] || path[level] >= (parent + 1) * m.dims.branching[level])
      throw Error("path: node " + std::to_string(path[level]) + " of level " + std::to_string(level) +
                  " is not a child of the node above it");
  }
  SlotUpdate update;
  update.path = path;
  for (int level = 0; level < m.dims.num_levels(); ++level) {
    if (m.path[level] == path[level]) continue;
    auto start = Clock::now();
    m.path[level] = -1;  // a failure below leaves this level marked as not loaded
    std::optional<AlignedBuffer> block;
    if (m.prefetcher && !m.cache->contains(level, path[level])) block = m.prefetcher->take({level, path[level]});
    BlockCache::Fetched fetched =
        block ? m.cache->adopt(level, path[level], std::move(*block)) : m.cache->get(level, path[level]);
    update.fetch_seconds.push_back(seconds_since(start));
    m.bank->decode(level, fetched.payload, m.views[level]);
    m.path[level] = path[level];
    update.levels_changed.push_back(level);
    update.sources.emplace_back(fetched.source);
    update.level_seconds.push_back(seconds_since(start));
    update.storage_bytes += fetched.bytes_read;
  }
  return update;
}

bool Runtime::has_router_program() const {
  const json::Value* programs = impl_->manifest.at("router", "router").find("programs");
  return programs != nullptr && programs->find("executorch") != nullptr;
}

std::vector<float> Runtime::embed(const std::string& context) { return impl_->embed(context); }

std::vector<int> Runtime::route_text(const std::string& context) {
  const std::vector<float> embedding = impl_->embed(context);
  return route(embedding.data(), embedding.size());
}

std::vector<int64_t> Runtime::encode(const std::string& text) { return impl_->lm().encode(text); }

std::string Runtime::decode_text(const std::vector<int64_t>& ids) { return impl_->lm().decode(ids); }

void Runtime::prefetch(const std::vector<int>& path) {
  Impl& m = *impl_;
  if (path.size() != static_cast<size_t>(m.dims.num_levels()))
    throw Error("prefetch: path has " + std::to_string(path.size()) + " levels, the tree has " +
                std::to_string(m.dims.num_levels()));
  start_prefetcher();
  m.prefetcher->request(path, "", m.path);
}

void Runtime::prefetch_text(const std::string& context) {
  start_prefetcher();
  impl_->prefetcher->request({}, context, impl_->path);
}

void Runtime::start_prefetcher() {  // the thread starts with the first request
  Impl& m = *impl_;
  if (!m.prefetcher)
    m.prefetcher = std::make_unique<Prefetcher>(*m.bank, *m.cache, m.options.cache.verify,
                                                [this](const std::string& text) { return route_text(text); });
}

std::vector<int> Runtime::wait_prefetch() { return impl_->prefetcher ? impl_->prefetcher->wait_idle() : std::vector<int>(); }

Generation Runtime::generate(const std::string& context, const std::string& prompt, const GenerateOptions& options,
                             const TextCallback& on_text) {
  Impl& m = *impl_;
  Generation out;
  auto start = Clock::now();
  if (m.last_route.empty() || context != m.last_context) {  // route once per context, as generate.py
    m.last_route = route_text(context);
    m.last_context = context;
  }
  out.path = m.last_route;
  out.route_seconds = seconds_since(start);
  start = Clock::now();
  out.update = set_path(out.path);
  out.fill_seconds = seconds_since(start);
  out.prompt_tokens = encode(prompt);
  start = Clock::now();
  std::vector<float> logits = prefill_last(out.prompt_tokens);
  out.prefill_seconds = seconds_since(start);
  const float* last = logits.data();
  std::mt19937_64 rng(options.seed);
  std::string shown;
  out.stop_reason = "max_new_tokens";
  while (static_cast<int>(out.new_tokens.size()) < options.max_new_tokens) {
    const int64_t token = next_token(last, m.vocab, options, rng);
    if (out.new_tokens.empty()) out.first_token_seconds = seconds_since(start);
    if (std::find(options.stop_tokens.begin(), options.stop_tokens.end(), token) != options.stop_tokens.end()) {
      out.stop_reason = "stop_token";
      break;
    }
    out.new_tokens.push_back(token);
    if (on_text) {  // whole characters only: a character split across tokens waits for the next token
      std::string text = decode_text(out.new_tokens);
      if (text.size() < 3 || text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") != 0) {
        if (text.size() > shown.size()) on_text(text.substr(shown.size()));
        shown.swap(text);
      }
    }
    if (static_cast<int>(out.new_tokens.size()) == options.max_new_tokens) break;
    const size_t position = out.prompt_tokens.size() + out.new_tokens.size() - 1;
    if (position >= static_cast<size_t>(m.max_seq_len)) {
      out.stop_reason = "cache_full";
      break;
    }
    auto step = Clock::now();
    logits = decode(token);
    out.decode_seconds += seconds_since(step);
    last = logits.data();
  }
  out.text = decode_text(out.new_tokens);
  return out;
}

std::vector<float> Runtime::prefill(const std::vector<int64_t>& tokens) { return impl_->start(tokens, "forward"); }

std::vector<float> Runtime::prefill_last(const std::vector<int64_t>& tokens) {
  Impl& m = *impl_;
  if (m.prefill_method.empty()) {  // an older program: every position's logits, keep the last
    std::vector<float> logits = m.start(tokens, "forward");
    return std::vector<float>(logits.end() - m.vocab, logits.end());
  }
  return m.start(tokens, m.prefill_method);
}

std::vector<float> Runtime::Impl::start(const std::vector<int64_t>& tokens, const std::string& method) {
  for (int node : path)
    if (node < 0) throw Error("no memory path set: call set_path() first");
  if (tokens.empty() || tokens.size() > static_cast<size_t>(max_seq_len))
    throw Error("prompt of " + std::to_string(tokens.size()) + " tokens: need 1 to " + std::to_string(max_seq_len));
  // A new sequence needs no cache reset: positions after the last written one are masked (docs/decode.md).
  std::vector<float> logits = run(tokens, 0, method);
  position = static_cast<int>(tokens.size());
  return logits;
}

std::vector<float> Runtime::decode(int64_t token) {
  Impl& m = *impl_;
  if (m.position == 0) throw Error("decode() before prefill()");
  if (m.position >= m.max_seq_len) throw Error("the KV cache is full (" + std::to_string(m.max_seq_len) + " positions)");
  std::vector<float> logits = m.run({token}, m.position);
  ++m.position;
  return logits;
}

}  // namespace hm
