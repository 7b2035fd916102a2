// The interface between the torch op (ops.cpp) and the attention kernels compiled once per instruction set
// (attention_amx.cpp, attention_avx512bf16.cpp, attention_avx512.cpp, attention_avx2.cpp, attention_scalar.cpp).
// Plain C++: the kernel translation units include no torch header, so nothing they compile for AVX-512 can be
// shared with (and linked into) the code that runs on a CPU without it.
#pragma once

#include <cstdint>

namespace kvquant_cpu {

// Tokens per tile: keys and values are dequantized, rotated and attended 16 at a time.
constexpr int TILE = 16;
// Keys per softmax step of the rows that take their products in bf16 (simd_avx512bf16.h): four tiles of a page.
constexpr int BF16_STEP = 4 * TILE;

// Byte offsets of the sections within one kv head's page segment: PageLayout.sections(), passed in (never
// computed here) in this order.
struct Sections {
  int64_t key_codes, value_codes, value_scale, value_offset, value_out_val, value_out_idx, key_out_val,
      key_out_pos, key_out_count, sink;
};

// What every work item of one call shares.
struct Problem {
  int bits, head_dim, block_size, num_kv_heads, gqa;  // gqa: query heads per kv head
  const uint8_t* pages;                                // [num_blocks, page_stride] uint8
  int64_t page_stride, head_stride;                    // bytes between pages, between a page's kv head segments
  Sections sections;
  int key_capacity, value_outliers;  // entries of a head's key outlier list, value outliers per vector
  bool sink;                         // position 0 from the sink of the sequence's first page
  const float* key_lut;              // [num_kv_heads, D, 16]: key_book[j % 2**bits] x key_scale + key_offset
  const float* value_book;           // [2**bits] decode codebook
  const float* inv_freq;             // [D / 2] RoPE inverse frequencies
  const float* offset_rope;          // [2, D / 2, TILE]: cos, sin of i x inv_freq[c], i < TILE (rope_tables)
  const float* start_rope;           // [tiles, 2, D / 2]: cos, sin of k x TILE x inv_freq[c] (rope_tables)
  float logit_scale;                 // softmax scale x RoPE scaling x log2(e): logits in base 2
  bool bf16_products;                // the model computes in bf16: products may round to bf16 (BF16_STEPS)
  const float* query;                // float32, rows of D contiguous
  int64_t q_stride_token, q_stride_head;
};

// One work item: the query heads of one kv head for a run of query tokens of one request, over the pages
// [page_begin, page_end) of its context (all of them, or one split of it).
struct Item {
  const int32_t* blocks;      // the request's block table row
  int64_t first_token;        // index of the first query token in Problem::query
  int64_t num_tokens;         // query tokens (1 for decode)
  int64_t first_position;     // position of the first query token; the others follow it
  int64_t page_begin, page_end;
  int kv_head;
  float* out;                 // row of (first_token, first query head of kv_head): normalised output
  int64_t out_stride_token;   // floats between tokens; query heads of a token are D floats apart
  float* max_out;             // base-2 running max per row, or nullptr (then out is all that is written)
  float* sum_out;             // softmax denominator per row
  int64_t stat_stride_token;  // floats between tokens in max_out / sum_out
};

using AttendFn = void (*)(const Problem&, const Item&, float* scratch);
// offsets [2, half, TILE] (cos, sin of i x inv_freq, i < TILE), starts [tiles, 2, half] (of k x TILE x inv_freq).
using RopeTablesFn = void (*)(const float* inv_freq, int half, int64_t tiles, float* offsets, float* starts);
using ScratchFn = int64_t (*)(int64_t rows, int head_dim);  // floats of scratch for items of `rows` query rows

struct Kernels {
  const char* isa;
  bool bf16_steps;  // a bf16 model's blocks of 16 rows take bf16 products in softmax steps (V::BF16_STEPS)
  AttendFn attend;
  RopeTablesFn rope_tables;
  ScratchFn scratch_floats;
};

Kernels kernels_amx();
Kernels kernels_avx512bf16();
Kernels kernels_avx512();
Kernels kernels_avx2();
Kernels kernels_scalar();

}  // namespace kvquant_cpu
