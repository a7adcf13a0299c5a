/* hm-export native runtime, C API: for Swift (import via a bridging header / module map) and JNI.
 *
 * Every function returning int returns 0 on success and -1 on failure; hm_last_error() then gives the
 * message (naming the file and the problem) for the calling thread. A runtime is used by one thread at a time.
 */
#ifndef HM_RUNTIME_H
#define HM_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct hm_runtime hm_runtime;

typedef struct {
  int verify_files;         /* size + sha256 of every manifest file at open (0: trusted storage) */
  int verify_blocks;        /* CRC-32 and sha256 of every block read from storage */
  int resident_levels;      /* levels 0 .. resident_levels-1 stay in RAM once read */
  uint64_t cache_bytes;     /* LRU cap for deeper levels; 0 = stream every miss */
  int threads;              /* XNNPACK threads; 0 = ExecuTorch's default */
} hm_options;

/* Per set_path: which levels were fetched and what it cost. */
typedef struct {
  int levels_changed;        /* how many levels were rewritten */
  double seconds;            /* fetch + dequantize, all changed levels */
  uint64_t storage_bytes;    /* bytes read from storage (0 when every block came from RAM) */
} hm_slot_update;

hm_options hm_default_options(void);
const char* hm_last_error(void);

int hm_open(const char* bundle_dir, const hm_options* options, hm_runtime** out);
/* As hm_open, and the bundle's manifest must carry an Ed25519 signature by `public_key` (32 raw bytes): the key
 * the app trusts. Fails when the runtime was built without OpenSSL. */
int hm_open_signed(const char* bundle_dir, const hm_options* options, const uint8_t public_key[32], hm_runtime** out);
void hm_close(hm_runtime* runtime);

int hm_num_levels(const hm_runtime* runtime);
int hm_vocab_size(const hm_runtime* runtime);
int hm_max_seq_len(const hm_runtime* runtime);
int hm_embedding_dim(const hm_runtime* runtime);

/* Routing on device: the app embeds the context (all-MiniLM-L6-v2, mean pooled, L2-normalized) and passes
 * the vector here; path_out receives one node id per level (hm_num_levels entries). */
int hm_route(const hm_runtime* runtime, const float* embedding, size_t dim, int32_t* path_out);
/* Routing from text: the bundle's router tokenizer and router program (router/minilm.pte) embed `context`
 * (UTF-8), then the descent gives the path (hm_num_levels entries). The program is loaded on first use. */
int hm_route_text(hm_runtime* runtime, const char* context, int32_t* path_out);

/* Fill the slot with a path (one node per level); only levels whose node changed are fetched. */
int hm_set_path(hm_runtime* runtime, const int32_t* path, size_t levels, hm_slot_update* update);

/* New sequence: feed `count` prompt tokens from position 0; logits_out receives the LAST position's logits
 * (hm_vocab_size floats). */
int hm_prefill(hm_runtime* runtime, const int64_t* tokens, size_t count, float* logits_out);
/* Feed one token at the next position; logits_out receives its logits (hm_vocab_size floats). */
int hm_decode(hm_runtime* runtime, int64_t token, float* logits_out);

/* Text in, text out. temperature 0 is greedy; seed drives std::mt19937_64 when sampling. */
typedef struct {
  int max_new_tokens;
  float temperature;
  int top_k;               /* 0: all tokens */
  float top_p;             /* 1: all tokens */
  uint64_t seed;
  const int64_t* stop_tokens;  /* may be NULL */
  size_t stop_count;
} hm_generate_options;

/* Receives each piece of text as it is generated (UTF-8, whole characters, not NUL-terminated). */
typedef void (*hm_text_callback)(const char* piece, size_t length, void* user_data);

hm_generate_options hm_default_generate_options(void);
/* Route `context` (re-routed only when it differs from the previous call's), fill its memory, continue `prompt`.
 * `on_text` (may be NULL) streams the continuation; *text_out (may be NULL) receives all of it, NUL-terminated,
 * to be released with hm_free_text. */
int hm_generate(hm_runtime* runtime, const char* context, const char* prompt, const hm_generate_options* options,
                hm_text_callback on_text, void* user_data, char** text_out);
void hm_free_text(char* text);

/* Background prefetch of the blocks a path (or the path `context` routes to) needs beyond the current one; the
 * next hm_set_path / hm_generate to that path takes them. Returns at once. */
int hm_prefetch(hm_runtime* runtime, const int32_t* path, size_t levels);
int hm_prefetch_text(hm_runtime* runtime, const char* context);

#ifdef __cplusplus
}
#endif

#endif /* HM_RUNTIME_H */
