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
  int verify_blocks;        /* CRC-32 of every block read from storage */
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
/* Fill the slot with a path (one node per level); only levels whose node changed are fetched. */
int hm_set_path(hm_runtime* runtime, const int32_t* path, size_t levels, hm_slot_update* update);

/* New sequence: feed `count` prompt tokens from position 0; logits_out receives the LAST position's logits
 * (hm_vocab_size floats). */
int hm_prefill(hm_runtime* runtime, const int64_t* tokens, size_t count, float* logits_out);
/* Feed one token at the next position; logits_out receives its logits (hm_vocab_size floats). */
int hm_decode(hm_runtime* runtime, int64_t token, float* logits_out);

#ifdef __cplusplus
}
#endif

#endif /* HM_RUNTIME_H */
