// Paged decode attention over kvquant pages (2-4 bit KVQuant codes), modelled on vLLM's paged
// attention v2: one thread block per (kv head, sequence, partition of the context), all query heads
// of that kv head (GQA) in the block, online softmax inside a partition, a reduce kernel across
// partitions.
//
// The kernels only read pages. A page holds block_size tokens x num_kv_heads heads in sections
// whose byte offsets come from the host (computed by the Python PageLayout, never re-derived here):
//
//   key_codes      [block_size, H, CODE_BYTES]  uint8   pre-RoPE keys, per-channel codebook indices
//   value_codes    [block_size, H, CODE_BYTES]  uint8   values, per-token codebook indices
//   value_scale    [block_size, H]              fp16
//   value_offset   [block_size, H]              fp16
//   value_out_val  [block_size, H, kv]          fp16    per-vector value outliers
//   value_out_idx  [block_size, H, kv]          uint8   their channels
//   key_out_val    [capacity]                   fp16    per-page sparse key outliers
//   key_out_pos    [capacity]                   uint16 or int32: t * H * D + h * D + d
//   key_out_count  [1]                          int32
//   sink           [2, H, D]                    fp16    pre-RoPE K and V of position 0
//
// Codes of BITS bits are packed little-endian, 8 codes in BITS bytes.
//
// Dequantization (what kvquant_vllm.quant.pagestore.PagedKVQuant.load does):
//   key   = key_book[code] * key_scale[h, d] + key_offset[h, d], then the page's key outliers
//           overwrite their elements; RoPE (rotate-half) at the token's position is applied after.
//   value = value_book[code] * value_scale + value_offset, then the vector's outliers overwrite.
//   With the sink enabled, position 0 is the sink's K and V instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace kvquant {

constexpr int NUM_THREADS = 128;
constexpr int NUM_WARPS = NUM_THREADS / 32;
// Tokens per partition (split-K unit): one block per partition, the reduce kernel merges them.
constexpr int PARTITION_TOKENS = 512;

// Byte offsets of the sections inside a page, in PageLayout.sections() order.
struct PageSections {
  int64_t key_codes, value_codes, value_scale, value_offset, value_out_val, value_out_idx, key_out_val,
      key_out_pos, key_out_count, sink;
};

struct DecodeParams {
  void* out;                // [num_seqs, num_q_heads, D] query dtype; written when num_partitions == 1
  float* tmp_out;           // [num_seqs, num_q_heads, num_partitions, D]  normalised partial outputs
  float* max_logits;        // [num_seqs, num_q_heads, num_partitions]
  float* exp_sums;          // [num_seqs, num_q_heads, num_partitions]  sum of exp(logit - max)
  const void* query;        // [num_seqs, num_q_heads, D], last dim contiguous
  int64_t query_seq_stride, query_head_stride;
  const uint8_t* cache;     // [num_blocks, page_stride] pages
  int64_t page_stride;
  const int32_t* block_table;  // [num_seqs, block_table_stride]
  int64_t block_table_stride;
  const int32_t* seq_lens;  // [num_seqs]
  const float* key_scale;   // [H, D]
  const float* key_offset;  // [H, D]
  const float* key_book;    // [2**BITS] decode codebook
  const float* value_book;  // [2**BITS]
  const float* cos_sin;     // [max_position, D]: cos of the D/2 frequencies, then their sin
  int64_t cos_sin_stride;
  float scale;
  int num_q_heads;
  int num_kv_heads;
  int gqa;                  // query heads per kv head
  int num_partitions;
  int block_size;
  int key_outlier_capacity;
  int value_outliers;       // per token-head vector
  int position_bytes;       // 2 (read unsigned) or 4
  bool sink;
  int vector_bytes;         // 16, 8 or 4: widest load that the code sections' alignment allows
  PageSections sections;
};

// Compile-time shape of one step of the token loop.
template <int HEAD_DIM, int BITS>
struct TileShape {
  static_assert(HEAD_DIM % 64 == 0, "head dim must be a multiple of 64");
  static_assert(BITS >= 2 && BITS <= 4, "2, 3 or 4 bits");
  // Tokens dequantized per step; at most 32 so that the softmax step holds one token per lane.
  static constexpr int TOKENS = HEAD_DIM > 128 ? 16 : 32;
  // Row stride of the dequantized tile: 8 floats of padding put the 4 rows that a warp reads at
  // once in the logits step in distinct banks.
  static constexpr int ROW = HEAD_DIM + 8;
  static constexpr int CODE_BYTES = HEAD_DIM * BITS / 8;  // one packed token-head vector
  static constexpr int NUM_CODES = 1 << BITS;
  // Dequantization: a thread owns a group of 8 channels (BITS bytes of codes), always the same group.
  static constexpr int GROUPS = HEAD_DIM / 8;
  static constexpr int TOKENS_PER_PASS = NUM_THREADS / GROUPS;
  // Logits: LANES lanes share a token, each lane rotates PAIRS (d, d + D/2) channel pairs.
  static constexpr int LANES = 8;
  static constexpr int PAIRS = HEAD_DIM / 2 / LANES;
  static_assert(TOKENS <= 32 && PARTITION_TOKENS % TOKENS == 0, "tile must fit a warp and a partition");
  static_assert(CODE_BYTES % 4 == 0, "code vectors must allow 4-byte loads");
};

// Byte offsets into the dynamic shared memory of the decode kernel (gqa is known at launch only).
template <int HEAD_DIM, int BITS>
struct DecodeSmem {
  using T = TileShape<HEAD_DIM, BITS>;
  int tile;         // float [TOKENS][ROW]: dequantized keys, then values, of the current tile
  int key_codes;    // uint8 [TOKENS][CODE_BYTES]: packed codes staged from the pages
  int value_codes;  // uint8 [TOKENS][CODE_BYTES]
  int query;        // float [gqa][D]
  int acc;          // float [gqa][D]: unnormalised output, each element owned by one thread
  int probs;        // float [gqa][TOKENS]: logits, then exp(logit - running max)
  int row_max;      // float [gqa]: running max logit
  int row_sum;      // float [gqa]: running sum of exp(logit - running max)
  int rescale;      // float [gqa]: exp(old max - new max) of the current tile
  int key_book;     // float [NUM_CODES]
  int value_book;   // float [NUM_CODES]
  int bytes;

  __host__ __device__ explicit DecodeSmem(int gqa) {
    int at = 0;
    tile = take(at, T::TOKENS * T::ROW * 4);
    key_codes = take(at, T::TOKENS * T::CODE_BYTES);
    value_codes = take(at, T::TOKENS * T::CODE_BYTES);
    query = take(at, gqa * HEAD_DIM * 4);
    acc = take(at, gqa * HEAD_DIM * 4);
    probs = take(at, gqa * T::TOKENS * 4);
    row_max = take(at, gqa * 4);
    row_sum = take(at, gqa * 4);
    rescale = take(at, gqa * 4);
    key_book = take(at, T::NUM_CODES * 4);
    value_book = take(at, T::NUM_CODES * 4);
    bytes = at;
  }

 private:
  // Every array starts 16-byte aligned (float4 and uint4 accesses).
  __host__ __device__ static int take(int& at, int size) {
    const int start = at;
    at += (size + 15) / 16 * 16;
    return start;
  }
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

// Reduction over the whole block; every thread gets the result. scratch: NUM_WARPS floats.
template <bool MAX>
__device__ float block_reduce(float x, float* scratch) {
  x = MAX ? warp_max(x) : warp_sum(x);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < NUM_WARPS; ++w) r = MAX ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();  // scratch may be reused right away
  return r;
}

// The page that holds logical token `token` of a sequence.
__device__ __forceinline__ const uint8_t* page_of(const DecodeParams& p, const int32_t* blocks, int token) {
  return p.cache + static_cast<int64_t>(blocks[token / p.block_size]) * p.page_stride;
}

// Index of (token's slot in its page, head) in the [block_size, H, ...] sections.
__device__ __forceinline__ int slot_head(const DecodeParams& p, int token, int head) {
  return (token % p.block_size) * p.num_kv_heads + head;
}

// The BITS bytes that hold 8 codes, as one little-endian word.
template <int BITS>
__device__ __forceinline__ uint32_t code_group(const uint8_t* bytes) {
  uint32_t word = 0;
#pragma unroll
  for (int b = 0; b < BITS; ++b) word |= static_cast<uint32_t>(bytes[b]) << (8 * b);
  return word;
}

__device__ __forceinline__ void store8(float* dst, const float (&x)[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(x[0], x[1], x[2], x[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(x[4], x[5], x[6], x[7]);
}

// Copies the packed code vectors of head `head` for tokens [first, first + n) of one section into
// shared memory [n][CODE_BYTES], with Vec-wide coalesced loads.
template <typename Vec, int CODE_BYTES>
__device__ void stage_codes_as(uint8_t* dst, const DecodeParams& p, const int32_t* blocks, int head, int first, int n,
                               int64_t section) {
  constexpr int PER_TOKEN = CODE_BYTES / sizeof(Vec);
  for (int i = threadIdx.x; i < n * PER_TOKEN; i += NUM_THREADS) {
    const int t = i / PER_TOKEN;
    const uint8_t* src = page_of(p, blocks, first + t) + section +
                         static_cast<int64_t>(slot_head(p, first + t, head)) * CODE_BYTES;
    reinterpret_cast<Vec*>(dst + t * CODE_BYTES)[i % PER_TOKEN] = reinterpret_cast<const Vec*>(src)[i % PER_TOKEN];
  }
}

template <int CODE_BYTES>
__device__ void stage_codes(uint8_t* dst, const DecodeParams& p, const int32_t* blocks, int head, int first, int n,
                            int64_t section) {
  if constexpr (CODE_BYTES % 16 == 0) {
    if (p.vector_bytes == 16) return stage_codes_as<uint4, CODE_BYTES>(dst, p, blocks, head, first, n, section);
  }
  if constexpr (CODE_BYTES % 8 == 0) {
    if (p.vector_bytes == 8) return stage_codes_as<uint2, CODE_BYTES>(dst, p, blocks, head, first, n, section);
  }
  stage_codes_as<uint32_t, CODE_BYTES>(dst, p, blocks, head, first, n, section);
}

// Overwrites the tile's dequantized keys with the sparse key outliers of the pages it spans.
// The lists are per page (all heads), so every entry is filtered by head and by token.
template <int HEAD_DIM, int BITS>
__device__ void apply_key_outliers(float* tile, const DecodeParams& p, const int32_t* blocks, int head, int first,
                                   int n) {
  using T = TileShape<HEAD_DIM, BITS>;
  const int head_elems = p.num_kv_heads * HEAD_DIM;
  const int page_elems = p.block_size * head_elems;
  for (int page_index = first / p.block_size; page_index <= (first + n - 1) / p.block_size; ++page_index) {
    const uint8_t* page = p.cache + static_cast<int64_t>(blocks[page_index]) * p.page_stride;
    // Entries past the capacity were never written; a negative count means an empty list.
    const int count = min(max(*reinterpret_cast<const int32_t*>(page + p.sections.key_out_count), 0),
                          p.key_outlier_capacity);
    for (int e = threadIdx.x; e < count; e += NUM_THREADS) {
      const int pos = p.position_bytes == 2 ? reinterpret_cast<const uint16_t*>(page + p.sections.key_out_pos)[e]
                                            : reinterpret_cast<const int32_t*>(page + p.sections.key_out_pos)[e];
      if (pos < 0 || pos >= page_elems) continue;
      const int slot = pos / head_elems, within = pos % head_elems;
      const int t = page_index * p.block_size + slot - first;
      // Position 0 is replaced whole by the sink.
      if (within / HEAD_DIM != head || t < 0 || t >= n || (p.sink && page_index == 0 && slot == 0)) continue;
      tile[t * T::ROW + within % HEAD_DIM] =
          __half2float(reinterpret_cast<const __half*>(page + p.sections.key_out_val)[e]);
    }
  }
}

// grid: (num_kv_heads, num_seqs, num_partitions), block: NUM_THREADS, dynamic smem: DecodeSmem::bytes.
//
// Each step of the token loop handles TileShape::TOKENS tokens:
//   1. stage the packed key and value codes of the tile in shared memory (wide loads);
//   2. dequantize keys into the tile (or the sink for position 0);
//   3. overwrite the key outliers;
//   4. RoPE + dot products with every query head of the group -> logits;
//   5. online softmax update per query head; dequantize values into the tile (outliers, sink);
//   6. acc = acc * rescale + probs @ values.
template <typename scalar_t, int HEAD_DIM, int BITS>
__global__ void __launch_bounds__(NUM_THREADS) paged_decode_kernel(const DecodeParams p) {
  using T = TileShape<HEAD_DIM, BITS>;
  const int head = blockIdx.x, seq = blockIdx.y, partition = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int gqa = p.gqa;
  const int seq_len = p.seq_lens[seq];
  const int start = partition * PARTITION_TOKENS;
  if (start >= seq_len) {
    // Only an empty sequence reaches this with the single partition: its output is defined as zeros.
    if (p.num_partitions == 1) {
      scalar_t* out =
          static_cast<scalar_t*>(p.out) + (static_cast<int64_t>(seq) * p.num_q_heads + head * gqa) * HEAD_DIM;
      for (int e = tid; e < gqa * HEAD_DIM; e += NUM_THREADS) out[e] = from_float<scalar_t>(0.f);
    }
    return;
  }
  const int end = min(start + PARTITION_TOKENS, seq_len);
  const int32_t* blocks = p.block_table + seq * p.block_table_stride;

  extern __shared__ __align__(16) uint8_t smem[];
  const DecodeSmem<HEAD_DIM, BITS> layout(gqa);
  float* tile = reinterpret_cast<float*>(smem + layout.tile);
  uint8_t* key_codes = smem + layout.key_codes;
  uint8_t* value_codes = smem + layout.value_codes;
  float* query = reinterpret_cast<float*>(smem + layout.query);
  float* acc = reinterpret_cast<float*>(smem + layout.acc);
  float* probs = reinterpret_cast<float*>(smem + layout.probs);
  float* row_max = reinterpret_cast<float*>(smem + layout.row_max);
  float* row_sum = reinterpret_cast<float*>(smem + layout.row_sum);
  float* rescale = reinterpret_cast<float*>(smem + layout.rescale);
  float* key_book = reinterpret_cast<float*>(smem + layout.key_book);
  float* value_book = reinterpret_cast<float*>(smem + layout.value_book);

  const scalar_t* q = static_cast<const scalar_t*>(p.query) + seq * p.query_seq_stride;
  for (int e = tid; e < gqa * HEAD_DIM; e += NUM_THREADS) {
    const int g = e / HEAD_DIM, d = e % HEAD_DIM;
    query[e] = to_float(q[(head * gqa + g) * p.query_head_stride + d]);
    acc[e] = 0.f;
  }
  for (int g = tid; g < gqa; g += NUM_THREADS) {
    row_max[g] = -INFINITY;
    row_sum[g] = 0.f;
  }
  for (int c = tid; c < T::NUM_CODES; c += NUM_THREADS) {
    key_book[c] = p.key_book[c];
    value_book[c] = p.value_book[c];
  }
  // The channel group this thread dequantizes never changes: keep its key scale and offset in registers
  // (key = book[code] * scale + offset is the per-channel lookup table, computed on the fly).
  const int group = tid % T::GROUPS;
  float key_scale[8], key_offset[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    key_scale[i] = p.key_scale[head * HEAD_DIM + group * 8 + i];
    key_offset[i] = p.key_offset[head * HEAD_DIM + group * 8 + i];
  }
  __syncthreads();

  for (int first = start; first < end; first += T::TOKENS) {
    const int n = min(T::TOKENS, end - first);

    // 1. Stage packed codes.
    stage_codes<T::CODE_BYTES>(key_codes, p, blocks, head, first, n, p.sections.key_codes);
    stage_codes<T::CODE_BYTES>(value_codes, p, blocks, head, first, n, p.sections.value_codes);
    __syncthreads();

    // 2. Dequantize keys (pre-RoPE).
    for (int t = tid / T::GROUPS; t < n; t += T::TOKENS_PER_PASS) {
      float k[8];
      if (p.sink && first + t == 0) {
        const __half* sink = reinterpret_cast<const __half*>(page_of(p, blocks, 0) + p.sections.sink) +
                             head * HEAD_DIM + group * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) k[i] = __half2float(sink[i]);
      } else {
        const uint32_t codes = code_group<BITS>(key_codes + t * T::CODE_BYTES + group * BITS);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          k[i] = key_book[(codes >> (i * BITS)) & (T::NUM_CODES - 1)] * key_scale[i] + key_offset[i];
        }
      }
      store8(tile + t * T::ROW + group * 8, k);
    }
    __syncthreads();

    // 3. Sparse key outliers.
    apply_key_outliers<HEAD_DIM, BITS>(tile, p, blocks, head, first, n);
    __syncthreads();

    // 4. Logits. LANES lanes per token: each rotates its channel pairs once and dots them with every
    //    query head of the group, then the lanes sum their parts.
    {
      const int sub = lane % T::LANES;
      const unsigned lanes_mask = 0xffu << (lane / T::LANES * T::LANES);
      for (int t = tid / T::LANES; t < n; t += NUM_THREADS / T::LANES) {
        const float* cos = p.cos_sin + static_cast<int64_t>(first + t) * p.cos_sin_stride;
        const float* sin = cos + HEAD_DIM / 2;
        const float* key = tile + t * T::ROW;
        float lo[T::PAIRS], hi[T::PAIRS];  // rotated channels d and d + D/2
#pragma unroll
        for (int m = 0; m < T::PAIRS; ++m) {
          const int d = sub + m * T::LANES;
          const float c = cos[d], s = sin[d], x = key[d], y = key[d + HEAD_DIM / 2];
          lo[m] = x * c - y * s;
          hi[m] = y * c + x * s;
        }
        for (int g = 0; g < gqa; ++g) {
          const float* qg = query + g * HEAD_DIM;
          float dot = 0.f;
#pragma unroll
          for (int m = 0; m < T::PAIRS; ++m) {
            const int d = sub + m * T::LANES;
            dot += qg[d] * lo[m] + qg[d + HEAD_DIM / 2] * hi[m];
          }
#pragma unroll
          for (int mask = T::LANES / 2; mask > 0; mask /= 2) dot += __shfl_xor_sync(lanes_mask, dot, mask);
          if (sub == 0) probs[g * T::TOKENS + t] = dot * p.scale;
        }
      }
    }
    __syncthreads();

    // 5a. Online softmax: one warp per query head, one lane per token.
    for (int g = warp; g < gqa; g += NUM_WARPS) {
      float* row = probs + g * T::TOKENS;
      const float logit = lane < n ? row[lane] : -INFINITY;
      const float old_max = row_max[g];
      const float new_max = fmaxf(old_max, warp_max(logit));
      const float prob = lane < n ? expf(logit - new_max) : 0.f;
      const float tile_sum = warp_sum(prob);
      if (lane < n) row[lane] = prob;
      __syncwarp();  // every lane has read row_max[g] before lane 0 replaces it
      if (lane == 0) {
        const float r = expf(old_max - new_max);
        rescale[g] = r;
        row_sum[g] = row_sum[g] * r + tile_sum;
        row_max[g] = new_max;
      }
    }

    // 5b. Dequantize values into the tile (the keys are no longer needed).
    for (int t = tid / T::GROUPS; t < n; t += T::TOKENS_PER_PASS) {
      const int token = first + t;
      const uint8_t* page = page_of(p, blocks, token);
      float v[8];
      if (p.sink && token == 0) {
        const __half* sink = reinterpret_cast<const __half*>(page + p.sections.sink) +
                             (p.num_kv_heads + head) * HEAD_DIM + group * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __half2float(sink[i]);
      } else {
        const int sh = slot_head(p, token, head);
        const float scale = __half2float(reinterpret_cast<const __half*>(page + p.sections.value_scale)[sh]);
        const float offset = __half2float(reinterpret_cast<const __half*>(page + p.sections.value_offset)[sh]);
        const uint32_t codes = code_group<BITS>(value_codes + t * T::CODE_BYTES + group * BITS);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = value_book[(codes >> (i * BITS)) & (T::NUM_CODES - 1)] * scale + offset;
        // The vector's outliers that fall in this thread's channels, in list order. Unwritten slots
        // may hold any byte: channels are clamped to the vector as the PyTorch load does.
        const uint8_t* out_idx = page + p.sections.value_out_idx + static_cast<int64_t>(sh) * p.value_outliers;
        const __half* out_val = reinterpret_cast<const __half*>(page + p.sections.value_out_val) +
                                static_cast<int64_t>(sh) * p.value_outliers;
        for (int e = 0; e < p.value_outliers; ++e) {
          const int c = min(static_cast<int>(out_idx[e]), HEAD_DIM - 1) - group * 8;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (i == c) v[i] = __half2float(out_val[e]);  // static register index, no local memory
          }
        }
      }
      store8(tile + t * T::ROW + group * 8, v);
    }
    __syncthreads();

    // 6. acc[g, d] = acc[g, d] * rescale[g] + sum_t probs[g, t] * value[t, d].
    for (int e = tid; e < gqa * HEAD_DIM; e += NUM_THREADS) {
      const int g = e / HEAD_DIM, d = e % HEAD_DIM;
      const float* prob = probs + g * T::TOKENS;
      float a = acc[e] * rescale[g];
      for (int t = 0; t < n; ++t) a += prob[t] * tile[t * T::ROW + d];
      acc[e] = a;
    }
    // The next step's first barrier orders these reads of the tile before it is overwritten.
  }

  // Each thread reads back only the acc elements it wrote; row_sum/row_max were last written before a barrier.
  const int64_t row = static_cast<int64_t>(seq) * p.num_q_heads + head * gqa;  // first query head of the group
  for (int e = tid; e < gqa * HEAD_DIM; e += NUM_THREADS) {
    const int g = e / HEAD_DIM, d = e % HEAD_DIM;
    const float value = acc[e] / row_sum[g];
    if (p.num_partitions == 1) {
      static_cast<scalar_t*>(p.out)[(row + g) * HEAD_DIM + d] = from_float<scalar_t>(value);
    } else {
      p.tmp_out[((row + g) * p.num_partitions + partition) * HEAD_DIM + d] = value;
    }
  }
  if (p.num_partitions > 1) {
    for (int g = tid; g < gqa; g += NUM_THREADS) {
      p.max_logits[(row + g) * p.num_partitions + partition] = row_max[g];
      p.exp_sums[(row + g) * p.num_partitions + partition] = row_sum[g];
    }
  }
}

// grid: (num_q_heads, num_seqs), block: NUM_THREADS, dynamic smem: num_partitions floats.
// Merges the partitions of one query head: out = sum_p w_p * tmp_out_p / sum_p w_p with
// w_p = exp_sum_p * exp(max_p - max over partitions).
template <typename scalar_t, int HEAD_DIM>
__global__ void __launch_bounds__(NUM_THREADS) paged_decode_reduce_kernel(const DecodeParams p) {
  const int q_head = blockIdx.x, seq = blockIdx.y;
  const int seq_len = p.seq_lens[seq];
  const int parts = seq_len > 0 ? min((seq_len + PARTITION_TOKENS - 1) / PARTITION_TOKENS, p.num_partitions) : 0;
  const int64_t row = static_cast<int64_t>(seq) * p.num_q_heads + q_head;
  const float* max_logits = p.max_logits + row * p.num_partitions;
  const float* exp_sums = p.exp_sums + row * p.num_partitions;

  extern __shared__ float weights[];  // [num_partitions]
  __shared__ float scratch[NUM_WARPS];

  float local_max = -INFINITY;
  for (int i = threadIdx.x; i < parts; i += NUM_THREADS) local_max = fmaxf(local_max, max_logits[i]);
  const float global_max = block_reduce<true>(local_max, scratch);
  float local_sum = 0.f;
  for (int i = threadIdx.x; i < parts; i += NUM_THREADS) {
    weights[i] = exp_sums[i] * expf(max_logits[i] - global_max);
    local_sum += weights[i];
  }
  const float total = block_reduce<false>(local_sum, scratch);  // its barrier also publishes weights

  const float* partial = p.tmp_out + row * p.num_partitions * HEAD_DIM;
  scalar_t* out = static_cast<scalar_t*>(p.out) + row * HEAD_DIM;
  for (int d = threadIdx.x; d < HEAD_DIM; d += NUM_THREADS) {
    float a = 0.f;
    for (int i = 0; i < parts; ++i) a += weights[i] * partial[i * HEAD_DIM + d];
    out[d] = from_float<scalar_t>(parts > 0 ? a / total : 0.f);
  }
}

}  // namespace kvquant
