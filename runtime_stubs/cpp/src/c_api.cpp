// The C API over hm::Runtime: exceptions become -1 + a thread-local message.
#include "hm_runtime.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "hm_runtime.hpp"

struct hm_runtime {
  hm::Runtime runtime;
  hm_runtime(const char* dir, const hm::Options& options) : runtime(dir, options) {}
};

namespace {

thread_local std::string last_error;

template <typename Body>
int guarded(Body body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown error";
  }
  return -1;
}

void copy_last(const std::vector<float>& logits, size_t vocab, float* out) {
  std::memcpy(out, logits.data() + logits.size() - vocab, vocab * sizeof(float));
}

}  // namespace

extern "C" {

hm_options hm_default_options(void) {
  hm::Options defaults;
  return {1, 1, defaults.cache.resident_levels, defaults.cache.cache_bytes, 0};
}

const char* hm_last_error(void) { return last_error.c_str(); }

int hm_open_signed(const char* bundle_dir, const hm_options* options, const uint8_t public_key[32], hm_runtime** out) {
  return guarded([&] {
    hm_options given = options ? *options : hm_default_options();
    hm::Options converted;
    converted.verify_files = given.verify_files != 0;
    converted.cache = {given.resident_levels, given.cache_bytes, given.verify_blocks != 0};
    converted.threads = given.threads;
    if (public_key != nullptr) converted.verify_key.assign(public_key, public_key + 32);
    *out = new hm_runtime(bundle_dir, converted);
  });
}

int hm_open(const char* bundle_dir, const hm_options* options, hm_runtime** out) {
  return hm_open_signed(bundle_dir, options, nullptr, out);
}

void hm_close(hm_runtime* runtime) { delete runtime; }

int hm_num_levels(const hm_runtime* runtime) { return runtime->runtime.num_levels(); }
int hm_vocab_size(const hm_runtime* runtime) { return runtime->runtime.vocab_size(); }
int hm_max_seq_len(const hm_runtime* runtime) { return runtime->runtime.max_seq_len(); }
int hm_embedding_dim(const hm_runtime* runtime) { return runtime->runtime.embedding_dim(); }

int hm_route(const hm_runtime* runtime, const float* embedding, size_t dim, int32_t* path_out) {
  return guarded([&] {
    std::vector<int> path = runtime->runtime.route(embedding, dim);
    for (size_t level = 0; level < path.size(); ++level) path_out[level] = path[level];
  });
}

int hm_route_text(hm_runtime* runtime, const char* context, int32_t* path_out) {
  return guarded([&] {
    std::vector<int> path = runtime->runtime.route_text(context);
    std::copy(path.begin(), path.end(), path_out);
  });
}

hm_generate_options hm_default_generate_options(void) {
  hm::GenerateOptions defaults;
  return {defaults.max_new_tokens, defaults.temperature, defaults.top_k, defaults.top_p, defaults.seed, nullptr, 0};
}

int hm_generate(hm_runtime* runtime, const char* context, const char* prompt, const hm_generate_options* options,
                hm_text_callback on_text, void* user_data, char** text_out) {
  return guarded([&] {
    const hm_generate_options given = options ? *options : hm_default_generate_options();
    hm::GenerateOptions converted;
    converted.max_new_tokens = given.max_new_tokens;
    converted.temperature = given.temperature;
    converted.top_k = given.top_k;
    converted.top_p = given.top_p;
    converted.seed = given.seed;
    if (given.stop_tokens) converted.stop_tokens.assign(given.stop_tokens, given.stop_tokens + given.stop_count);
    hm::TextCallback callback;
    if (on_text) callback = [&](const std::string& piece) { on_text(piece.data(), piece.size(), user_data); };
    hm::Generation result = runtime->runtime.generate(context, prompt, converted, callback);
    if (text_out) {
      *text_out = static_cast<char*>(std::malloc(result.text.size() + 1));
      if (*text_out == nullptr) throw std::bad_alloc();
      std::memcpy(*text_out, result.text.c_str(), result.text.size() + 1);
    }
  });
}

void hm_free_text(char* text) { std::free(text); }

int hm_prefetch(hm_runtime* runtime, const int32_t* path, size_t levels) {
  return guarded([&] { runtime->runtime.prefetch(std::vector<int>(path, path + levels)); });
}

int hm_prefetch_text(hm_runtime* runtime, const char* context) {
  return guarded([&] { runtime->runtime.prefetch_text(context); });
}

int hm_set_path(hm_runtime* runtime, const int32_t* path, size_t levels, hm_slot_update* update) {
  return guarded([&] {
    hm::SlotUpdate result = runtime->runtime.set_path(std::vector<int>(path, path + levels));
    if (update != nullptr) {
      update->levels_changed = static_cast<int>(result.levels_changed.size());
      update->seconds = 0;
      for (double s : result.level_seconds) update->seconds += s;
      update->storage_bytes = result.storage_bytes;
    }
  });
}

int hm_prefill(hm_runtime* runtime, const int64_t* tokens, size_t count, float* logits_out) {
  return guarded([&] {
    copy_last(runtime->runtime.prefill_last(std::vector<int64_t>(tokens, tokens + count)),
              runtime->runtime.vocab_size(), logits_out);
  });
}

int hm_decode(hm_runtime* runtime, int64_t token, float* logits_out) {
  return guarded([&] { copy_last(runtime->runtime.decode(token), runtime->runtime.vocab_size(), logits_out); });
}

}  // extern "C"
