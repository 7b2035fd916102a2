// Paged decode attention over kvquant pages (layout version 2, kvquant_vllm/quant/paged.py): one query token
// per sequence attends to its 2-4 bit KVQuant cache, read page by page straight from the codes.
//
// Grid (kv heads x head groups, sequences, partitions of the context), NUM_WARPS warps per block. A block serves
// up to MAX_GROUP query heads of one kv head (GQA) over one partition; its warps split the partition into
// contiguous runs of TILE-token tiles and work independently (each its own online softmax), merging at the end;
// a reduce kernel merges the partitions (split-K).
//
// Per tile a warp:
//   1. has the tile's codes, value scales/offsets and value outliers copied from the kv head's segment of the
//      page to shared memory by cp.async (16-byte chunks, double buffered: the next tile's copy is in flight
//      while this one is computed);
//   2. computes the logits S^T[token, query head] on tensor cores, 16 tokens x 8 heads per MMA: keys are
//      dequantized in registers straight into the A fragments (bit-plane codes -> per-channel lookup table in
//      shared memory, which folds in the calibrated scale and offset) and rotated by their offset i within the
//      tile (cos/sin of i * inv_freq: a table made once per block); the query, the B operand, is rotated back
//      by the tile's first position t0 (cos/sin of t0 * inv_freq in registers, the angle exact in fp64), since
//      q . R(t0 + i) k = (R(t0)^T q) . (R(i) k);
//   3. adds the kv head's sparse key outliers as logit corrections (exact minus dense, times the query rotated
//      to the outlier's position), reading the page's token-ordered list once, from where the previous tile
//      stopped;
//   4. updates the online softmax (log2 domain) and accumulates P V on tensor cores, values dequantized into
//      the A fragments (codebook x per-token scale + offset, the vector's outliers and the sink in place).
//
// MMA precision follows the query dtype: fp16 or bf16 inputs with fp32 accumulation for 16-bit queries, and
// for fp32 queries three tf32 products per MMA (a = a_big + a_small, a.b ~ a_big b_big + a_big b_small +
// a_small b_big), within about 2^-21 of fp32.
//
// Section offsets come from the host (PageLayout.sections() and head_stride), never re-derived here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#ifndef KVQUANT_HOST_EMULATION  // tests run this header on the CPU with host versions of these instructions
#include "kvquant_ptx.cuh"
#endif

namespace kvquant {

constexpr int NUM_WARPS = 4;
constexpr int NUM_THREADS = 32 * NUM_WARPS;
constexpr int MAX_GROUP = 8;  // query heads per block: the N of the tensor-core tiles
constexpr int SUB_TILE = 16;  // tokens per tensor-core tile: the M of QK^T, the K of PV
constexpr int LOGIT_ROW = 12;  // floats per token row of a warp's logit tile (8 heads, padded against bank conflicts)
constexpr double TWO_PI = 6.283185307179586;

// Byte offsets of the sections within a kv head's segment of a page, in PageLayout.sections() order.
struct PageSections {
  int64_t key_codes, value_codes, value_scale, value_offset, value_out_val, value_out_idx, key_out_val,
      key_out_pos, key_out_count, sink;
};

struct DecodeParams {
  void* out;                  // [num_seqs, num_q_heads, D] query dtype; written when num_partitions == 1
  float* tmp_out;             // [num_seqs, num_q_heads, num_partitions, D]: each partition's normalised output
  float* max_logits;          // [num_seqs, num_q_heads, num_partitions]: its max logit (log2 units)
  float* exp_sums;            // [num_seqs, num_q_heads, num_partitions]: its sum of exp2(logit - max)
  const void* query;          // [num_seqs, num_q_heads, D], last dim contiguous
  int64_t query_seq_stride, query_head_stride;
  const uint8_t* cache;       // [num_blocks, page_stride] pages, 16-byte aligned
  int64_t page_stride;        // bytes between pages
  int64_t head_stride;        // bytes between the segments of consecutive kv heads in a page
  const int32_t* block_table;  // [num_seqs, block_table_stride]
  int64_t block_table_stride;
  const int32_t* seq_lens;    // [num_seqs]
  const float* key_scale;     // [H, D]
  const float* key_offset;    // [H, D]
  const float* key_book;      // [H, D, 2**BITS] decode codebooks, one per channel
  const float* value_book;    // [2**BITS]
  const float* inv_freq;      // [D / 2] RoPE inverse frequencies
  float logit_scale;          // softmax scale x RoPE scaling x log2(e): logits in log2 units
  int num_q_heads;
  int num_kv_heads;
  int gqa;                    // query heads per kv head
  int head_groups;            // blocks per kv head: ceil(gqa / MAX_GROUP)
  int num_partitions;
  int partition_tokens;       // a multiple of the tile
  int block_size;             // a multiple of SUB_TILE
  int key_outlier_capacity;
  int value_outliers;         // per token-head vector
  bool sink;
  PageSections sections;
};

// Compile-time shape of the codes and of one tile.
template <int HEAD_DIM, int BITS>
struct Geometry {
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "head dim 64, 128 or 256");
  static_assert(BITS >= 2 && BITS <= 4, "2, 3 or 4 bits");
  static constexpr int HALF = HEAD_DIM / 2;
  static constexpr int NUM_CODES = 1 << BITS;
  static constexpr int CODE_BYTES = HEAD_DIM * BITS / 8;  // one packed vector
  static constexpr int CODE_WORDS = CODE_BYTES / 4;
  // Bit planes (packing.pack_code_planes): 2-bit codes one 2-bit plane, 3-bit a 2-bit plane then a 1-bit plane,
  // 4-bit one 4-bit plane.
  static constexpr int LOW_WIDTH = BITS == 4 ? 4 : 2;
  static constexpr int LOW_WORDS = HEAD_DIM * LOW_WIDTH / 32;
  static constexpr int HIGH_WORDS = HEAD_DIM / 32;
  // Tensor-core tiles per tile: two for head dims up to 128 (the query rotation and the outlier bookkeeping
  // amortised over 32 tokens), one at 256 (shared memory).
  static constexpr int SUB_TILES = HEAD_DIM <= 128 ? 2 : 1;
  static constexpr int TILE = SUB_TILE * SUB_TILES;
  // Value outliers per vector that the kernel holds: those of the kvquant dtypes (1% of a vector, rounded,
  // at least one: kvquant.outliers_per_vector); the host refuses more.
  static constexpr int MAX_VALUE_OUTLIERS = (HEAD_DIM + 50) / 100;
  static constexpr int CHUNKS = HEAD_DIM / 16;  // k16 chunks of QK^T; m16 tiles of PV
  // Blocks per SM that registers are budgeted for (shared memory allows about as many).
  static constexpr int MIN_BLOCKS = HEAD_DIM == 64 ? 4 : HEAD_DIM == 128 ? 3 : 2;
};

// A bit plane of WORDS 32-bit words per vector, fields of WIDTH bits: channel c is field c / WORDS of word
// c % WORDS. For c = 8 m + u (u < 8), the word and the shift, written so that m (unrolled) and u (fixed per
// thread) need no division at run time.
template <int WORDS, int WIDTH>
struct Plane {
  static constexpr int GROUPS = WORDS >= 8 ? WORDS / 8 : 1;
  __host__ __device__ static constexpr int word(int m, int u) { return WORDS >= 8 ? 8 * (m % GROUPS) + u : u % WORDS; }
  __host__ __device__ static constexpr int shift(int m, int u) {
    return WIDTH * (WORDS >= 8 ? m / GROUPS : m * (8 / WORDS) + u / WORDS);
  }
};

// The code of channel 8 m + u of the packed vector `row`.
template <int HEAD_DIM, int BITS>
__device__ __forceinline__ int code_at(const uint32_t* row, int m, int u) {
  using G = Geometry<HEAD_DIM, BITS>;
  using Low = Plane<G::LOW_WORDS, G::LOW_WIDTH>;
  int code = (row[Low::word(m, u)] >> Low::shift(m, u)) & ((1 << G::LOW_WIDTH) - 1);
  if constexpr (BITS == 3) {
    using High = Plane<G::HIGH_WORDS, 1>;
    code |= ((row[G::LOW_WORDS + High::word(m, u)] >> High::shift(m, u)) & 1) << 2;
  }
  return code;
}

// Row of channel 8 m + u in the key lookup table. The lanes of one load read channels 8 m + 2 j + b for
// j = 0..3: their rows are consecutive, so their entries lie in distinct banks.
__host__ __device__ constexpr int lut_row(int m, int u) { return 8 * m + 4 * (u & 1) + (u >> 1); }

// Shared memory of the decode kernel, byte offsets (every array 16-byte aligned).
template <int HEAD_DIM, int BITS>
struct SmemLayout {
  using G = Geometry<HEAD_DIM, BITS>;
  static constexpr int align(int n) { return (n + 15) / 16 * 16; }
  // Rope table row: float4 (cos p, cos p + 1, sin p, sin p + 1) per even pair p; the 4 extra entries put the
  // 8 lanes of a quarter warp (2 rows x 4 pairs) in distinct banks.
  static constexpr int ROPE_ROW = HEAD_DIM / 4 + 4;

  // One tile's staged page data (rows of SUB_TILES sub-tiles one after the other, as copied).
  static constexpr int KEY_CODES = 0;
  static constexpr int VALUE_CODES = KEY_CODES + G::TILE * G::CODE_BYTES;
  static constexpr int VALUE_SCALE = VALUE_CODES + G::TILE * G::CODE_BYTES;
  static constexpr int VALUE_OFFSET = VALUE_SCALE + G::TILE * 2;
  static constexpr int VALUE_OUT_VAL = VALUE_OFFSET + G::TILE * 2;
  static constexpr int VALUE_OUT_IDX = VALUE_OUT_VAL + G::TILE * G::MAX_VALUE_OUTLIERS * 2;
  static constexpr int STAGE_BYTES = align(VALUE_OUT_IDX + G::TILE * G::MAX_VALUE_OUTLIERS);

  // Per warp: two stages, cos/sin of the tile start, the tile's logits.
  static constexpr int WARP_STAGES = 0;
  static constexpr int WARP_START_ROPE = WARP_STAGES + 2 * STAGE_BYTES;
  static constexpr int WARP_LOGITS = WARP_START_ROPE + G::HALF * 8;
  static constexpr int WARP_BYTES = align(WARP_LOGITS + G::TILE * LOGIT_ROW * 4);

  // The warps' results for the merge (after the token loop, over the warps' areas).
  static constexpr int MERGE_MAX = 0;
  static constexpr int MERGE_SUM = MERGE_MAX + NUM_WARPS * MAX_GROUP * 4;
  static constexpr int MERGE_ACC = MERGE_SUM + NUM_WARPS * MAX_GROUP * 4;
  static constexpr int MERGE_BYTES = MERGE_ACC + NUM_WARPS * MAX_GROUP * HEAD_DIM * 4;

  static constexpr int KEY_LUT = 0;  // float [D rows (lut_row)][NUM_CODES]: book * key_scale + key_offset
  static constexpr int ROPE = KEY_LUT + align(HEAD_DIM * G::NUM_CODES * 4);  // float4 [TILE][ROPE_ROW]
  static constexpr int QUERY = ROPE + G::TILE * ROPE_ROW * 16;               // float [MAX_GROUP][D]
  static constexpr int VALUE_BOOK = QUERY + MAX_GROUP * HEAD_DIM * 4;        // float [NUM_CODES]
  static constexpr int WARPS = VALUE_BOOK + align(G::NUM_CODES * 4);
  static constexpr int BYTES =
      WARPS + (NUM_WARPS * WARP_BYTES > MERGE_BYTES ? NUM_WARPS * WARP_BYTES : MERGE_BYTES);
};

// Split-K plan: tokens per partition, a multiple of the tile, so that the grid has about `target_blocks`
// blocks while each warp keeps at least two tiles.
__host__ __device__ inline int plan_partition_tokens(int tile, int64_t max_seq_len, int64_t blocks_per_partition,
                                                     int64_t target_blocks) {
  const int64_t tiles = (max_seq_len + tile - 1) / tile;
  const int64_t wanted = blocks_per_partition > 0 ? (target_blocks + blocks_per_partition - 1) / blocks_per_partition : 1;
  int64_t per = wanted > 0 ? (tiles + wanted - 1) / wanted : tiles;
  if (per < 2 * NUM_WARPS) per = 2 * NUM_WARPS;
  return static_cast<int>(per * tile);
}

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

// cos and sin of position * inv_freq: the product and its reduction modulo 2 pi in fp64 (the angle is as exact
// at position 100,000 as at 1, as in Rope.cos_sin), then the fast fp32 sincos on [-pi, pi] (absolute error
// below 2^-21.4 there).
__device__ __forceinline__ float2 rope_cos_sin(int64_t position, float inv_freq) {
  const double angle = static_cast<double>(position) * static_cast<double>(inv_freq);
  const double turns = floor(angle / TWO_PI + 0.5);
  const float reduced = static_cast<float>(fma(-turns, TWO_PI, angle));
  float s, c;
  __sincosf(reduced, &s, &c);
  return make_float2(c, s);
}

// The K column (logical index within 16) of element e of a thread's A or B fragment: {2t, 2t+1, 2t+8, 2t+9}.
__device__ __forceinline__ constexpr int kcol(int e, int t) { return 2 * t + (e & 1) + 8 * (e >> 1); }

// Tensor-core tile C[16x8] += A[16x16] B[16x8] for the query dtype, from fp32 fragments in one layout for all
// dtypes (t = lane % 4, g = lane / 4): a[r][e] is A[g + 8 r][kcol(e, t)], b[e] is B[kcol(e, t)][g], c[2 r + i] is
// C[g + 8 r][2 t + i]. The 16 K columns are a sum, so any order of them is fine as long as A and B agree:
// fp16/bf16 pack them as m16n8k16 wants; tf32 runs two m16n8k8 with column kcol(e, t) in K slot t + 4 (e & 1)
// of MMA e >> 1.
template <typename scalar_t>
struct Mma;

// fp16 and bf16: one m16n8k16 per tile, elements packed in pairs (the lower K column in the low half).
template <typename Pair>
struct Mma16 {
  struct A {
    uint32_t x[4];
  };
  struct B {
    uint32_t x[2];
  };
  __device__ static A a(const float (&v)[2][4]) {
    return {{Pair::pack(v[0][0], v[0][1]), Pair::pack(v[1][0], v[1][1]), Pair::pack(v[0][2], v[0][3]),
             Pair::pack(v[1][2], v[1][3])}};
  }
  __device__ static B b(const float (&v)[4]) { return {{Pair::pack(v[0], v[1]), Pair::pack(v[2], v[3])}}; }
  __device__ static void run(float (&c)[4], const A& a, const B& b) { Pair::mma(c, a.x, b.x); }
};

struct HalfPair {
  __device__ static uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { mma_m16n8k16_f16(c, a, b); }
};

struct BfloatPair {
  __device__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { mma_m16n8k16_bf16(c, a, b); }
};

template <>
struct Mma<__half> : Mma16<HalfPair> {};
template <>
struct Mma<__nv_bfloat16> : Mma16<BfloatPair> {};

// fp32: per tile two m16n8k8 (K columns kcol(e, t) with e >> 1 == h in MMA h), each as three tf32 products.
template <>
struct Mma<float> {
  struct A {
    uint32_t big[2][4], small[2][4];  // [h][k]: register k of MMA h
  };
  struct B {
    uint32_t big[2][2], small[2][2];
  };
  __device__ static void split(float x, uint32_t& big, uint32_t& small) {
    big = to_tf32(x);
    small = to_tf32(x - __uint_as_float(big));
  }
  __device__ static A a(const float (&v)[2][4]) {
    A r;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // a0: (row g, slot t), a1: (row g + 8, slot t), a2: (row g, slot t + 4), a3: (row g + 8, slot t + 4).
      split(v[0][2 * h], r.big[h][0], r.small[h][0]);
      split(v[1][2 * h], r.big[h][1], r.small[h][1]);
      split(v[0][2 * h + 1], r.big[h][2], r.small[h][2]);
      split(v[1][2 * h + 1], r.big[h][3], r.small[h][3]);
    }
    return r;
  }
  __device__ static B b(const float (&v)[4]) {
    B r;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // b0: (slot t, column g), b1: (slot t + 4, column g).
      split(v[2 * h], r.big[h][0], r.small[h][0]);
      split(v[2 * h + 1], r.big[h][1], r.small[h][1]);
    }
    return r;
  }
  __device__ static void run(float (&c)[4], const A& a, const B& b) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mma_m16n8k8_tf32(c, a.small[h], b.big[h]);
      mma_m16n8k8_tf32(c, a.big[h], b.small[h]);
      mma_m16n8k8_tf32(c, a.big[h], b.big[h]);
    }
  }
};

__device__ __forceinline__ float warp_max4(float x) {  // over the 4 lanes of a group (same lane / 4)
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float warp_sum4(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One warp's share of a block: its run of tiles, its online softmax, its part of the output.
template <typename scalar_t, int HEAD_DIM, int BITS>
struct DecodeWarp {
  using G = Geometry<HEAD_DIM, BITS>;
  using S = SmemLayout<HEAD_DIM, BITS>;
  using M = Mma<scalar_t>;
  static constexpr int NC = G::NUM_CODES;
  static constexpr int INVALID_BLOCK = -1;

  const DecodeParams& p;
  const int seq, kv_head, heads, start, end;
  const int lane, g, t;  // lane = 4 g + t: the fragment coordinates (groupID, threadID_in_group)
  const float* lut;
  const float4* rope;
  const float* query;
  const float* value_book;
  uint8_t* stages;
  float2* start_rope;
  float* logits;
  const uint8_t* head_base;  // the cache offset by this kv head's segment: page b's segment is at b * page_stride
  float inv_freq[G::HALF / 32];  // inv_freq[lane + 32 i]: the pairs this lane rotates by t0

  // Online softmax of query head g (m: max logit, l: this lane's part of the sum), and the accumulator
  // O^T[channel 16 c + g + 8 r][head 2 t + i] in acc[c][2 r + i].
  float m = -INFINITY, l = 0.f;
  float acc[G::CHUNKS][4];

  // The key outlier list being read: the page's block, its length, the next entry.
  int outlier_block = INVALID_BLOCK, outlier_count = 0, outlier_entry = 0;

  __device__ DecodeWarp(const DecodeParams& params, uint8_t* smem, int seq_, int kv_head_, int heads_, int start_,
                        int end_)
      : p(params), seq(seq_), kv_head(kv_head_), heads(heads_), start(start_), end(end_),
        lane(threadIdx.x % 32), g(lane / 4), t(lane % 4),
        lut(reinterpret_cast<const float*>(smem + S::KEY_LUT)),
        rope(reinterpret_cast<const float4*>(smem + S::ROPE)),
        query(reinterpret_cast<const float*>(smem + S::QUERY)),
        value_book(reinterpret_cast<const float*>(smem + S::VALUE_BOOK)),
        stages(smem + S::WARPS + threadIdx.x / 32 * S::WARP_BYTES + S::WARP_STAGES),
        start_rope(reinterpret_cast<float2*>(smem + S::WARPS + threadIdx.x / 32 * S::WARP_BYTES + S::WARP_START_ROPE)),
        logits(reinterpret_cast<float*>(smem + S::WARPS + threadIdx.x / 32 * S::WARP_BYTES + S::WARP_LOGITS)),
        head_base(params.cache + kv_head_ * params.head_stride) {
#pragma unroll
    for (int i = 0; i < G::HALF / 32; ++i) inv_freq[i] = p.inv_freq[lane + 32 * i];
#pragma unroll
    for (int c = 0; c < G::CHUNKS; ++c) {
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[c][k] = 0.f;
    }
  }

  __device__ const uint8_t* segment(int block) const { return head_base + static_cast<int64_t>(block) * p.page_stride; }

  // The blocks holding the sub-tiles of tile k (INVALID_BLOCK past the end).
  __device__ void tile_blocks(int k, int (&blocks)[G::SUB_TILES]) const {
#pragma unroll
    for (int s = 0; s < G::SUB_TILES; ++s) {
      const int token = start + k * G::TILE + s * SUB_TILE;
      blocks[s] = token < end ? p.block_table[seq * p.block_table_stride + token / p.block_size] : INVALID_BLOCK;
    }
  }

  __device__ void copy(uint8_t* dst, const uint8_t* src, int bytes) const {
    for (int c = lane; c < bytes / 16; c += 32) cp_async_16(dst + 16 * c, src + 16 * c);
  }

  // Starts the copies of tile k's page data into stage `stage` (no commit).
  __device__ void stage_tile(int k, const int (&blocks)[G::SUB_TILES], int stage) const {
    uint8_t* dst = stages + stage * S::STAGE_BYTES;
    const int kv = p.value_outliers;
#pragma unroll
    for (int s = 0; s < G::SUB_TILES; ++s) {
      if (blocks[s] == INVALID_BLOCK) continue;
      const uint8_t* seg = segment(blocks[s]);
      const int local = (start + k * G::TILE + s * SUB_TILE) % p.block_size;  // the sub-tile's first slot
      const PageSections& sec = p.sections;
      copy(dst + S::KEY_CODES + s * SUB_TILE * G::CODE_BYTES, seg + sec.key_codes + local * G::CODE_BYTES,
           SUB_TILE * G::CODE_BYTES);
      copy(dst + S::VALUE_CODES + s * SUB_TILE * G::CODE_BYTES, seg + sec.value_codes + local * G::CODE_BYTES,
           SUB_TILE * G::CODE_BYTES);
      copy(dst + S::VALUE_SCALE + s * SUB_TILE * 2, seg + sec.value_scale + local * 2, SUB_TILE * 2);
      copy(dst + S::VALUE_OFFSET + s * SUB_TILE * 2, seg + sec.value_offset + local * 2, SUB_TILE * 2);
      copy(dst + S::VALUE_OUT_VAL + s * SUB_TILE * kv * 2, seg + sec.value_out_val + local * kv * 2,
           SUB_TILE * kv * 2);
      copy(dst + S::VALUE_OUT_IDX + s * SUB_TILE * kv, seg + sec.value_out_idx + local * kv, SUB_TILE * kv);
    }
  }

  // The warp's run of tiles.
  __device__ void run() {
    const int tiles = (end - start + G::TILE - 1) / G::TILE;
    const int per_warp = (tiles + NUM_WARPS - 1) / NUM_WARPS;
    const int first = threadIdx.x / 32 * per_warp;
    const int last = min(first + per_warp, tiles);
    if (first >= last) return;
    // Block ids of the tile being staged next and of the one after (its load overlaps a tile's compute).
    int next[G::SUB_TILES], after[G::SUB_TILES];
    tile_blocks(first, next);
    stage_tile(first, next, 0);
    cp_async_commit();
    if (first + 1 < last) tile_blocks(first + 1, after);
    for (int k = first; k < last; ++k) {
      int blocks[G::SUB_TILES];
#pragma unroll
      for (int s = 0; s < G::SUB_TILES; ++s) blocks[s] = next[s];
      if (k + 1 < last) {
        stage_tile(k + 1, after, (k + 1 - first) & 1);
#pragma unroll
        for (int s = 0; s < G::SUB_TILES; ++s) next[s] = after[s];
        if (k + 2 < last) tile_blocks(k + 2, after);
      }
      cp_async_commit();
      cp_async_wait<1>();  // tile k's copies (all but the group just committed) have landed
      __syncwarp();        // ... those of every lane
      const int t0 = start + k * G::TILE;
      const uint8_t* stage = stages + ((k - first) & 1) * S::STAGE_BYTES;
      if (p.sink && t0 == 0) {
        tile<true>(stage, t0, min(G::TILE, end - t0), blocks);
      } else {
        tile<false>(stage, t0, min(G::TILE, end - t0), blocks);
      }
      __syncwarp();  // every lane is done with the stage and the logits before they are overwritten
    }
    cp_async_wait<0>();
  }

  // One tile: tokens t0 .. t0 + n - 1 (n >= 1), staged in `stage`. SINK: the tile holds position 0, whose K and V
  // are the sink's.
  template <bool SINK>
  __device__ void tile(const uint8_t* stage, int t0, int n, const int (&blocks)[G::SUB_TILES]) {
    // cos/sin of t0 * inv_freq, to rotate the query back by the tile's first position.
#pragma unroll
    for (int i = 0; i < G::HALF / 32; ++i) start_rope[lane + 32 * i] = rope_cos_sin(t0, inv_freq[i]);
    __syncwarp();

    const __half* sink = SINK ? reinterpret_cast<const __half*>(segment(blocks[0]) + p.sections.sink) : nullptr;
    float s[G::SUB_TILES][4];
    logits_qk<SINK>(stage, sink, s);

    // S^T [token][head] to shared memory (log2 units), then the key outliers' corrections.
#pragma unroll
    for (int st = 0; st < G::SUB_TILES; ++st) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float* row = logits + (st * SUB_TILE + g + 8 * r) * LOGIT_ROW + 2 * t;
        row[0] = s[st][2 * r] * p.logit_scale;
        row[1] = s[st][2 * r + 1] * p.logit_scale;
      }
    }
    __syncwarp();
    if (p.key_outlier_capacity > 0) {
#pragma unroll
      for (int st = 0; st < G::SUB_TILES; ++st) {
        if (st * SUB_TILE < n) key_outliers<SINK>(stage, st, t0 + st * SUB_TILE, blocks[st]);
      }
      __syncwarp();
    }

    // Online softmax of head g over this lane's tokens kcol(e, t) of each sub-tile.
    float prob[G::SUB_TILES][4];
    float tile_max = -INFINITY;
#pragma unroll
    for (int st = 0; st < G::SUB_TILES; ++st) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int token = st * SUB_TILE + kcol(e, t);
        prob[st][e] = token < n ? logits[token * LOGIT_ROW + g] : -INFINITY;
        tile_max = fmaxf(tile_max, prob[st][e]);
      }
    }
    const float new_max = fmaxf(m, warp_max4(tile_max));  // finite: the tile's first token is valid
    const float alpha = exp2f(m - new_max);
    float sum = 0.f;
#pragma unroll
    for (int st = 0; st < G::SUB_TILES; ++st) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        prob[st][e] = exp2f(prob[st][e] - new_max);
        sum += prob[st][e];
      }
    }
    l = l * alpha + sum;
    m = new_max;
    // The accumulator's columns are heads 2t and 2t + 1: their factors are held by lanes 4 (2t) and 4 (2t + 1).
    const float alpha0 = __shfl_sync(0xffffffffu, alpha, 8 * t);
    const float alpha1 = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
#pragma unroll
    for (int c = 0; c < G::CHUNKS; ++c) {
      acc[c][0] *= alpha0;
      acc[c][1] *= alpha1;
      acc[c][2] *= alpha0;
      acc[c][3] *= alpha1;
    }

#pragma unroll
    for (int st = 0; st < G::SUB_TILES; ++st) {
      if (st * SUB_TILE < n) accumulate_pv<SINK>(stage, sink, st, n, prob[st]);
    }
  }

  // s[st] = S^T of sub-tile st: C[token g + 8 r][head 2 t + i] in s[st][2 r + i], not yet scaled.
  template <bool SINK>
  __device__ void logits_qk(const uint8_t* stage, const __half* sink, float (&s)[G::SUB_TILES][4]) const {
    const uint32_t* codes = reinterpret_cast<const uint32_t*>(stage + S::KEY_CODES);
    const float* q = query + g * HEAD_DIM;  // query head g (zeros past the block's heads)
    // This lane's rows of the lookup table, lut_row(m, 2 t + b) = 8 m + lut_row(0, 2 t + b): the m part is a
    // constant offset of the loads.
    const float* lut_lane[2] = {lut + lut_row(0, 2 * t) * NC, lut + lut_row(0, 2 * t + 1) * NC};
#pragma unroll
    for (int st = 0; st < G::SUB_TILES; ++st) {
#pragma unroll
      for (int k = 0; k < 4; ++k) s[st][k] = 0.f;
    }
#pragma unroll
    for (int chunk = 0; chunk < G::HALF / 16; ++chunk) {
      // Channel 16 chunk + kcol(e, t) = 8 m + u of the first half, and its RoPE partner in the second.
      // B: the query rotated back by t0, q' = R(t0)^T q: q'_lo = q_lo c + q_hi s, q'_hi = q_hi c - q_lo s.
      float b_lo[4], b_hi[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int pair = 16 * chunk + kcol(e, t);
        const float2 cs = start_rope[pair];
        const float lo = q[pair], hi = q[pair + G::HALF];
        b_lo[e] = lo * cs.x + hi * cs.y;
        b_hi[e] = hi * cs.x - lo * cs.y;
      }
      const typename M::B frag_lo = M::b(b_lo), frag_hi = M::b(b_hi);
#pragma unroll
      for (int st = 0; st < G::SUB_TILES; ++st) {
        float a_lo[2][4], a_hi[2][4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = st * SUB_TILE + g + 8 * r;  // token offset in the tile: the key's rotation
          const uint32_t* key = codes + row * G::CODE_WORDS;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int m_lo = 2 * chunk + (e >> 1), m_hi = m_lo + G::HALF / 8, u = 2 * t + (e & 1);
            float lo = lut_lane[e & 1][8 * m_lo * NC + code_at<HEAD_DIM, BITS>(key, m_lo, u)];
            float hi = lut_lane[e & 1][8 * m_hi * NC + code_at<HEAD_DIM, BITS>(key, m_hi, u)];
            if (SINK && st == 0 && r == 0 && g == 0) {  // position 0: the sink's key
              lo = __half2float(sink[8 * m_lo + u]);
              hi = __half2float(sink[8 * m_hi + u]);
            }
            // (cos, sin) of row * inv_freq[pair], pair = 16 chunk + kcol(e, t) = 2 (8 chunk + t + 4 (e >> 1)) + (e & 1).
            const float4 rt = rope[row * S::ROPE_ROW + 8 * chunk + t + 4 * (e >> 1)];
            const float c = (e & 1) ? rt.y : rt.x, sn = (e & 1) ? rt.w : rt.z;
            a_lo[r][e] = lo * c - hi * sn;
            a_hi[r][e] = hi * c + lo * sn;
          }
        }
        M::run(s[st], M::a(a_lo), frag_lo);
        M::run(s[st], M::a(a_hi), frag_hi);
      }
    }
  }

  // First entry of the key outlier list `positions` [count] (sorted) at or after `target`: two probes per lane.
  __device__ int lower_bound(const uint16_t* positions, int count, uint32_t target) const {
    if (count == 0) return 0;
    const int stride = (count + 31) / 32;  // entries per bracket; bracket i ends with entry (i + 1) stride - 1
    const int probe = min((lane + 1) * stride, count) - 1;
    const int below = __popc(__ballot_sync(0xffffffffu, positions[probe] < target));  // brackets wholly before
    int first = below * stride;
    const int stop = min(first + stride, count);
    for (; first < stop; first += 32) {
      const int e = first + lane;
      const int n = __popc(__ballot_sync(0xffffffffu, e < stop && positions[e] < target));
      if (n < 32) return min(first + n, stop);
    }
    return stop;
  }

  // Adds to the logits of sub-tile st (tokens first .. first + 15 of page block `block`) the corrections of the
  // kv head's key outliers: entry (token, channel d, exact) turns the key's dense value into `exact`, which moves
  // the logit of head h by (exact - dense) (R(position)^T q_h)[d].
  template <bool SINK>
  __device__ void key_outliers(const uint8_t* stage, int st, int first, int block) {
    const uint8_t* seg = segment(block);
    const uint16_t* positions = reinterpret_cast<const uint16_t*>(seg + p.sections.key_out_pos);
    const int local = first % p.block_size;
    if (block != outlier_block) {
      // Entries past the capacity were never written; a negative count means an empty list.
      outlier_count = min(max(*reinterpret_cast<const int32_t*>(seg + p.sections.key_out_count), 0),
                          p.key_outlier_capacity);
      outlier_entry = local == 0 ? 0 : lower_bound(positions, outlier_count, static_cast<uint32_t>(local) * HEAD_DIM);
      outlier_block = block;
    }
    const uint32_t lo = static_cast<uint32_t>(local) * HEAD_DIM, hi = lo + SUB_TILE * HEAD_DIM;
    const __half* values = reinterpret_cast<const __half*>(seg + p.sections.key_out_val);
    const uint32_t* codes = reinterpret_cast<const uint32_t*>(stage + S::KEY_CODES);
    for (;;) {
      const int e = outlier_entry + lane;
      const uint32_t pos = e < outlier_count ? positions[e] : 0xffffffffu;
      const bool in_tile = pos < hi;  // the list is token ordered: these are a prefix of the lanes
      const int taken = __popc(__ballot_sync(0xffffffffu, in_tile));
      if (in_tile && pos >= lo) {
        const int token = static_cast<int>(pos / HEAD_DIM) - local, d = static_cast<int>(pos % HEAD_DIM);
        if (!(SINK && st == 0 && token == 0)) {  // the sink holds position 0 exactly
          const int row = st * SUB_TILE + token;
          const float dense = lut[lut_row(d >> 3, d & 7) * NC +
                                  code_at<HEAD_DIM, BITS>(codes + row * G::CODE_WORDS, d >> 3, d & 7)];
          const float delta = (__half2float(values[e]) - dense) * p.logit_scale;
          // cos/sin of (t0 + row) theta = the tile start's rotation composed with the offset's.
          const int pair = d % G::HALF;
          const float4 rt = rope[row * S::ROPE_ROW + pair / 2];
          const float ci = (pair & 1) ? rt.y : rt.x, si = (pair & 1) ? rt.w : rt.z;
          const float2 cs0 = start_rope[pair];
          const float c = cs0.x * ci - cs0.y * si, sn = cs0.y * ci + cs0.x * si;
          for (int h = 0; h < heads; ++h) {
            const float q_lo = query[h * HEAD_DIM + pair], q_hi = query[h * HEAD_DIM + pair + G::HALF];
            const float coef = d < G::HALF ? q_lo * c + q_hi * sn : q_hi * c - q_lo * sn;
            atomicAdd(logits + row * LOGIT_ROW + h, delta * coef);
          }
        }
      }
      outlier_entry += taken;
      if (taken < 32) break;
    }
  }

  // acc += V^T P^T for sub-tile st: prob[e] is P[head g][token kcol(e, t)].
  template <bool SINK>
  __device__ void accumulate_pv(const uint8_t* stage, const __half* sink, int st, int n, const float (&prob)[4]) {
    const typename M::B frag_p = M::b(prob);
    const uint32_t* codes = reinterpret_cast<const uint32_t*>(stage + S::VALUE_CODES);
    const __half* scales = reinterpret_cast<const __half*>(stage + S::VALUE_SCALE);
    const __half* offsets = reinterpret_cast<const __half*>(stage + S::VALUE_OFFSET);
    const __half* out_vals = reinterpret_cast<const __half*>(stage + S::VALUE_OUT_VAL);
    const uint8_t* out_idx = stage + S::VALUE_OUT_IDX;
    const int kv = p.value_outliers;
    // Per token: scale, offset and the outliers that fall in this lane's channels 8 m + g (m = out_m, -1: none).
    // Tokens past the end read as zeros (their pages may hold anything, and 0 * NaN is not 0).
    float scale[4], offset[4], out_val[4][G::MAX_VALUE_OUTLIERS];
    int out_m[4][G::MAX_VALUE_OUTLIERS];
    const uint32_t* rows[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int token = st * SUB_TILE + kcol(e, t);
      const bool valid = token < n;
      rows[e] = codes + token * G::CODE_WORDS;
      scale[e] = valid ? __half2float(scales[token]) : 0.f;
      offset[e] = valid ? __half2float(offsets[token]) : 0.f;
#pragma unroll
      for (int o = 0; o < G::MAX_VALUE_OUTLIERS; ++o) {
        out_m[e][o] = -1;
        out_val[e][o] = 0.f;
        if (o < kv && valid) {
          const int channel = min(static_cast<int>(out_idx[token * kv + o]), HEAD_DIM - 1);
          if ((channel & 7) == g) out_m[e][o] = channel >> 3;
          out_val[e][o] = __half2float(out_vals[token * kv + o]);
        }
      }
    }
    const bool sink_lane = SINK && st == 0 && t == 0;  // holds token 0 as element e = 0
#pragma unroll
    for (int c = 0; c < G::CHUNKS; ++c) {
      float a[2][4];  // a[r][e] = V[token kcol(e, t)][channel 16 c + g + 8 r]
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int m_ = 2 * c + r;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = fmaf(value_book[code_at<HEAD_DIM, BITS>(rows[e], m_, g)], scale[e], offset[e]);
#pragma unroll
          for (int o = 0; o < G::MAX_VALUE_OUTLIERS; ++o) v = m_ == out_m[e][o] ? out_val[e][o] : v;
          if (sink_lane && e == 0) v = __half2float(sink[HEAD_DIM + 8 * m_ + g]);
          a[r][e] = v;
        }
      }
      M::run(acc[c], M::a(a), frag_p);
    }
  }
};

// grid (num_kv_heads * head_groups, num_seqs, num_partitions), block NUM_THREADS, dynamic shared memory
// SmemLayout::BYTES.
template <typename scalar_t, int HEAD_DIM, int BITS>
__global__ void __launch_bounds__(NUM_THREADS, Geometry<HEAD_DIM, BITS>::MIN_BLOCKS) paged_decode_kernel(const DecodeParams p) {
  using G = Geometry<HEAD_DIM, BITS>;
  using S = SmemLayout<HEAD_DIM, BITS>;
  const int kv_head = blockIdx.x / p.head_groups, group = blockIdx.x % p.head_groups;
  const int seq = blockIdx.y, partition = blockIdx.z;
  const int first_head = kv_head * p.gqa + group * MAX_GROUP;  // the block's query heads: first_head + 0 .. heads - 1
  const int heads = min(MAX_GROUP, p.gqa - group * MAX_GROUP);
  const int tid = threadIdx.x;
  const int seq_len = p.seq_lens[seq];
  const int start = partition * p.partition_tokens;
  const int64_t out_row = static_cast<int64_t>(seq) * p.num_q_heads + first_head;
  if (start >= seq_len) {
    // With one partition only an empty sequence gets here: its output is defined as zeros.
    if (p.num_partitions == 1) {
      scalar_t* out = static_cast<scalar_t*>(p.out) + out_row * HEAD_DIM;
      for (int i = tid; i < heads * HEAD_DIM; i += NUM_THREADS) out[i] = from_float<scalar_t>(0.f);
    }
    return;
  }
  const int end = min(start + p.partition_tokens, seq_len);

  uint8_t* smem = dynamic_smem();
  {
    float* lut = reinterpret_cast<float*>(smem + S::KEY_LUT);
    for (int i = tid; i < HEAD_DIM * G::NUM_CODES; i += NUM_THREADS) {
      const int c = i / G::NUM_CODES, code = i % G::NUM_CODES;
      // The product rounded before the sum, as the PyTorch load computes it.
      lut[lut_row(c >> 3, c & 7) * G::NUM_CODES + code] =
          __fadd_rn(__fmul_rn(p.key_book[(kv_head * HEAD_DIM + c) * G::NUM_CODES + code],
                              p.key_scale[kv_head * HEAD_DIM + c]),
                    p.key_offset[kv_head * HEAD_DIM + c]);
    }
    float4* rope = reinterpret_cast<float4*>(smem + S::ROPE);
    for (int i = tid; i < G::TILE * HEAD_DIM / 4; i += NUM_THREADS) {
      const int row = i / (HEAD_DIM / 4), quad = i % (HEAD_DIM / 4);
      const float2 a = rope_cos_sin(row, p.inv_freq[2 * quad]), b = rope_cos_sin(row, p.inv_freq[2 * quad + 1]);
      rope[row * S::ROPE_ROW + quad] = make_float4(a.x, b.x, a.y, b.y);
    }
    float* query = reinterpret_cast<float*>(smem + S::QUERY);
    const scalar_t* q = static_cast<const scalar_t*>(p.query) + seq * p.query_seq_stride;
    for (int i = tid; i < MAX_GROUP * HEAD_DIM; i += NUM_THREADS) {
      const int h = i / HEAD_DIM, d = i % HEAD_DIM;
      query[i] = h < heads ? to_float(q[(first_head + h) * p.query_head_stride + d]) : 0.f;
    }
    float* value_book = reinterpret_cast<float*>(smem + S::VALUE_BOOK);
    for (int i = tid; i < G::NUM_CODES; i += NUM_THREADS) value_book[i] = p.value_book[i];
  }
  __syncthreads();

  DecodeWarp<scalar_t, HEAD_DIM, BITS> w(p, smem, seq, kv_head, heads, start, end);
  w.run();
  const float sum = warp_sum4(w.l);  // head g's sum over the warp's tokens
  __syncthreads();  // the warps' areas become the merge area

  const int warp = tid / 32;
  float* merge_max = reinterpret_cast<float*>(smem + S::WARPS + S::MERGE_MAX);
  float* merge_sum = reinterpret_cast<float*>(smem + S::WARPS + S::MERGE_SUM);
  float* merge_acc = reinterpret_cast<float*>(smem + S::WARPS + S::MERGE_ACC);
  if (w.t == 0) {
    merge_max[warp * MAX_GROUP + w.g] = w.m;  // -inf for a warp without tokens
    merge_sum[warp * MAX_GROUP + w.g] = sum;
  }
#pragma unroll
  for (int c = 0; c < G::CHUNKS; ++c) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int head = 2 * w.t + (k & 1), channel = 16 * c + w.g + 8 * (k >> 1);
      merge_acc[(warp * MAX_GROUP + head) * HEAD_DIM + channel] = w.acc[c][k];
    }
  }
  __syncthreads();

  for (int i = tid; i < heads * HEAD_DIM; i += NUM_THREADS) {
    const int h = i / HEAD_DIM, d = i % HEAD_DIM;
    float max_logit = -INFINITY;
#pragma unroll
    for (int v = 0; v < NUM_WARPS; ++v) max_logit = fmaxf(max_logit, merge_max[v * MAX_GROUP + h]);
    float total = 0.f, value = 0.f;
#pragma unroll
    for (int v = 0; v < NUM_WARPS; ++v) {
      const float weight = exp2f(merge_max[v * MAX_GROUP + h] - max_logit);  // 0 for a warp without tokens
      total += weight * merge_sum[v * MAX_GROUP + h];
      value += weight * merge_acc[(v * MAX_GROUP + h) * HEAD_DIM + d];
    }
    if (p.num_partitions == 1) {
      static_cast<scalar_t*>(p.out)[(out_row + h) * HEAD_DIM + d] = from_float<scalar_t>(value / total);
    } else {
      const int64_t part = (out_row + h) * p.num_partitions + partition;
      p.tmp_out[part * HEAD_DIM + d] = value / total;
      if (d == 0) {
        p.max_logits[part] = max_logit;
        p.exp_sums[part] = total;
      }
    }
  }
}

// grid (num_q_heads, num_seqs), block NUM_THREADS, dynamic shared memory num_partitions floats.
// Merges the partitions of one query head: out = sum_i w_i tmp_out_i / sum_i w_i, w_i = exp_sum_i 2^(max_i - max).
template <typename scalar_t, int HEAD_DIM>
__global__ void __launch_bounds__(NUM_THREADS) paged_decode_reduce_kernel(const DecodeParams p) {
  const int q_head = blockIdx.x, seq = blockIdx.y;
  const int seq_len = p.seq_lens[seq];
  const int parts = min((seq_len + p.partition_tokens - 1) / p.partition_tokens, p.num_partitions);
  const int64_t row = static_cast<int64_t>(seq) * p.num_q_heads + q_head;
  const float* max_logits = p.max_logits + row * p.num_partitions;
  const float* exp_sums = p.exp_sums + row * p.num_partitions;
  float* weights = reinterpret_cast<float*>(dynamic_smem());  // [num_partitions]

  // Every thread finds the max itself (a few hundred partitions at most), then the weights are shared.
  float max_logit = -INFINITY;
  for (int i = 0; i < parts; ++i) max_logit = fmaxf(max_logit, max_logits[i]);
  for (int i = threadIdx.x; i < parts; i += NUM_THREADS) weights[i] = exp_sums[i] * exp2f(max_logits[i] - max_logit);
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < parts; ++i) total += weights[i];

  const float* partial = p.tmp_out + row * p.num_partitions * HEAD_DIM;
  scalar_t* out = static_cast<scalar_t*>(p.out) + row * HEAD_DIM;
  for (int d = threadIdx.x; d < HEAD_DIM; d += NUM_THREADS) {
    float value = 0.f;
    for (int i = 0; i < parts; ++i) value += weights[i] * partial[i * HEAD_DIM + d];
    out[d] = from_float<scalar_t>(parts > 0 ? value / total : 0.f);
  }
}

}  // namespace kvquant
