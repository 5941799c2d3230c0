// tokenizer.h — pyllm's C tokenizer (C11, libc only): byte-level BPE identical to pyllm/tokenizer.py, and
// llama2.c's sentencepiece-style tokenizer.bin. Used by csrc/run.c; tested by tests/test_tokenizer_c.py.
//
// One API serves both kinds (tokenizer.kind); tokenizer_build() detects the kind from the file's first bytes.
//
// ---- pyllm tokenizer file (written by pyllm.tokenizer.Tokenizer.save_bin), all integers little-endian ------
//   offset 0   uint32 magic        = 0x4b4f5450 (the bytes "PTOK")
//          4   uint32 version      = 1
//          8   uint32 vocab_size   number of tokens, specials included
//         12   uint32 n_merges
//         16   uint32 n_special
//         20   uint32 max_token_len longest token in bytes
//         24   uint32 pretok       pre-tokenizer id, 1 = TOKENIZER_PRETOK_V1 below
//         28   uint32 reserved     = 0
//   then vocab:    vocab_size x { uint32 len; uint8 bytes[len] }   raw bytes of each token (not the GPT-2
//                  byte->unicode mapping); a special token's bytes are its text, e.g. "<|bos|>"
//   then merges:   n_merges x { int32 left, right, merged }        in rank order (rank 0 = applied first);
//                  bytes(merged) == bytes(left) + bytes(right)
//   then specials: n_special x { int32 id; uint32 len; char name[len] }   e.g. (256, 7, "<|bos|>")
//   and nothing after. Every one of the 256 single bytes must be a (non-special) token.
//
// ---- pre-tokenization TOKENIZER_PRETOK_V1 (works on raw UTF-8 bytes; every byte >= 0x80 is class O) -------
//   the regex (HF `Split`, behavior "isolated", then ByteLevel(add_prefix_space=False, use_regex=False)):
//     [ ]?[A-Za-z]+|[ ]?[0-9]|[ ]?[^\t\n\x0b\x0c\r A-Za-z0-9]+|[\t\n\x0b\x0c\r ]+(?![^\t\n\x0b\x0c\r ])|[\t\n\x0b\x0c\r ]+
//   i.e. letter runs, single digits, runs of everything else, each optionally led by one space; a whitespace
//   run gives up its last character when a non-space follows it (so "  x" -> " ", " x").
//   Then each pre-token is BPE-merged: repeatedly merge the adjacent pair of lowest merge rank, leftmost first.
//   Special-token text in the input is NOT parsed by default (a user typing "<|end|>" gets ordinary tokens);
//   TOKENIZER_ALLOW_SPECIAL parses it (leftmost-longest match of the special names).
//
// ---- llama2.c tokenizer.bin ------------------------------------------------------------------------------
//   uint32 max_token_length, then per token until EOF: float score; int32 len; char bytes[len].
//   encode = llama2.c run.c: optional BOS (1), a dummy-prefix " " token if the text is non-empty, one token per
//   UTF-8 character (or its bytes as <0xHH> tokens = byte + 3), then repeatedly merge the adjacent pair whose
//   concatenation is a token of highest score, leftmost on ties. decode strips a leading space after BOS and
//   turns "<0xHH>" into the raw byte.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TOKENIZER_MAGIC 0x4b4f5450u   // "PTOK"
#define TOKENIZER_VERSION 1
#define TOKENIZER_PRETOK_V1 1

enum { TOKENIZER_PYLLM = 1, TOKENIZER_LLAMA2C = 2 };

// tokenizer_encode_ex flags
#define TOKENIZER_ADD_BOS 1
#define TOKENIZER_ALLOW_SPECIAL 2

// error codes (negative returns of tokenizer_build / tokenizer_encode*)
#define TOKENIZER_ERR_IO (-1)        // cannot open / read the file
#define TOKENIZER_ERR_FORMAT (-2)    // bad magic, version, truncated, ids out of range, ...
#define TOKENIZER_ERR_NOMEM (-3)
#define TOKENIZER_ERR_ARG (-4)       // NULL pointer / negative length / unbuilt tokenizer
#define TOKENIZER_ERR_SPACE (-5)     // out[] too small (max_out)

typedef struct {
    int32_t left, right, merged;  // pair (left, right) -> merged token
    int32_t used;                 // 0 = empty slot
    double priority;              // lower merges first: rank (pyllm) or -score (llama2.c)
} tokenizer_pair;

typedef struct {
    int kind;                  // TOKENIZER_PYLLM or TOKENIZER_LLAMA2C (0 = not built)
    int vocab_size;
    int bos_id;                // <|bos|> (pyllm) or 1 (llama2.c)
    int eos_id;                // <|end|> end of turn (pyllm) or 2 (llama2.c)
    int max_token_len;
    char** vocab;              // (vocab_size) raw bytes of each token, NUL-terminated for convenience
    uint32_t* vocab_len;       // (vocab_size)
    float* scores;             // (vocab_size) llama2.c scores; NULL for pyllm
    int32_t byte_id[256];      // pyllm: token of each single byte; llama2.c: byte + 3 (<0xHH>)
    tokenizer_pair* pairs;     // (n_pair_slots) open-addressing hash table (left, right) -> merged
    size_t n_pair_slots;       // power of two
    int n_special;
    int32_t* special_ids;      // (n_special)
    char** special_names;      // (n_special) e.g. "<|bos|>"
    uint8_t* is_special;       // (vocab_size)
    int32_t* str_slots;        // (n_str_slots) llama2.c: hash table bytes -> id (-1 empty)
    size_t n_str_slots;        // power of two
    int space_id;              // llama2.c: the " " token used as the dummy prefix (-1 if none)
    unsigned char byte_piece[512];  // llama2.c decode: byte i at byte_piece[2 * i], NUL after
    uint32_t file_crc;         // zlib's CRC-32 of the whole file: a pyllm model.bin names its tokenizer by it
} tokenizer;

// Load a pyllm tokenizer file or a llama2.c tokenizer.bin. Returns 0, or a negative error code with a one-line
// message naming the file in err. Never crashes on a malformed file. On failure t is left freed (zeroed).
int tokenizer_build(tokenizer* t, const char* path, char* err, size_t errlen);
void tokenizer_free(tokenizer* t);

// Encode len bytes of text (need not be NUL-terminated, may be any bytes) into out[0..max_out).
// Returns the number of ids, or a negative error code (TOKENIZER_ERR_SPACE if max_out is too small).
int tokenizer_encode(const tokenizer* t, const char* text, size_t len, int add_bos, int32_t* out, int max_out);
// Same with flags (TOKENIZER_ADD_BOS | TOKENIZER_ALLOW_SPECIAL).
int tokenizer_encode_ex(const tokenizer* t, const char* text, size_t len, int flags, int32_t* out, int max_out);

// The raw bytes of token id (not NUL-terminated in general: use *len), following prev for llama2.c's
// "strip the space after BOS" rule. Returns NULL (len 0) for an id out of range. A special token decodes to
// its text (run.c should test ids against eos_id instead of printing them).
const char* tokenizer_decode(const tokenizer* t, int prev, int id, size_t* len);

// Id of a special token by name: "<|end|>" or "end" (also "bos"/"eos" for llama2.c). -1 if absent.
int tokenizer_special(const tokenizer* t, const char* name);

#ifdef __cplusplus
}
#endif
