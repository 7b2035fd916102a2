// AVX512-BF16 for the products of items of 16 rows or more when the model computes in bf16, on top of the AVX-512
// operations: `vdpbf16ps` multiplies 16 pairs of bf16 and adds both products to 16 fp32 sums, twice the products
// per instruction of a float32 FMA. Included by attention_avx512bf16.cpp and (as the base of simd_amx.h)
// attention_amx.cpp only, inside their target regions and an anonymous namespace, after simd_avx512.h.
//
// Products in bf16, as vLLM's own CPU attention computes them for a bf16 model: the queries (already bf16 there),
// the dequantized and rotated keys, the softmax weights and the values are rounded to bf16, the sums kept in fp32.
// Blocks of 16 rows take a softmax step per STEP keys (STEP_TILES tiles of a page), not per tile, with their
// operands in the layouts below (which AMX tiles load as they are):
//   queries  [rows, D] bf16
//   keys     [STEP_TILES, D / 2, TILE, 2] bf16: per tile, per channel pair (2j, 2j + 1), both channels of each key
//   weights  [rows, STEP] bf16
//   values   [D / 16, STEP / 2, 16, 2] bf16: per block of 16 channels, per key pair (2i, 2i + 1), both keys' values
// so that one broadcast pair of a row (two query channels, or the weights of two keys) meets a vector of 16 pairs.
#pragma once

struct Avx512Bf16 : Avx512 {
  static constexpr const char* name = "avx512bf16";
  static constexpr bool BF16_STEPS = true;
  static constexpr int TILE_ROWS = 16;
  static constexpr int STEP = BF16_STEP, STEP_TILES = STEP / TILE;
  static_assert(STEP == 64, "a step's keys go in two halves of 32 (tile_accumulate's halves)");
  // Rows per register block of the products: 4 rows x 4 tiles (logits) or 4 blocks of 16 channels (outputs) of
  // fp32 sums, with the 4 operand vectors, in 32 registers.
  static constexpr int PRODUCT_ROWS = 4;

  static void begin_products() {}  // no state to set up (AMX configures its tiles here)
  static void end_products() {}

  // 16 floats -> bf16, rounded to nearest even.
  static void store_bf16(uint16_t* dst, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }

  // n floats (a multiple of 16) -> bf16.
  static void to_bf16(const float* src, uint16_t* dst, int n) {
    for (int i = 0; i < n; i += 16) store_bf16(dst + i, _mm512_loadu_ps(src + i));
  }

  // 16 floats of a and 16 of b as the bf16 pairs (a[i], b[i]).
  static void store_pairs(uint16_t* dst, F a, F b) {
    const __m512i order = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005,
                                            0x00160006, 0x00170007, 0x00180008, 0x00190009, 0x001A000A, 0x001B000B,
                                            0x001C000C, 0x001D000D, 0x001E000E, 0x001F000F);
    const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a in words 0-15, b in 16-31
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(order, halves));
  }

  // Keys of a tile turned by i (RoPE of the offsets in the tile), [D, 16] fp32 (keys[c * 16 + i]), turned further
  // by the tile start (rope: cos, sin of t0 x inv_freq, [D]) -> [D / 2, 16, 2] bf16: channel pairs (2j, 2j + 1) per
  // key. The rows then multiply unturned queries; bf16 products are not bit-equal to the float32 rows anyway.
  template <int D>
  static void turned_keys_to_pairs(const float* keys, const float* rope, uint16_t* pairs) {
    constexpr int HALF = D / 2;
    auto turned = [&](int c) {  // channel c of R(t0) k
      const int f = c % HALF;
      const F k = _mm512_loadu_ps(keys + c * 16), partner = _mm512_loadu_ps(keys + (c < HALF ? c + HALF : c - HALF) * 16);
      const F cos0 = _mm512_set1_ps(rope[f]), sin0 = _mm512_set1_ps(rope[HALF + f]);
      return c < HALF ? _mm512_fmsub_ps(k, cos0, _mm512_mul_ps(partner, sin0))
                      : _mm512_fmadd_ps(k, cos0, _mm512_mul_ps(partner, sin0));
    };
    for (int j = 0; j < D / 2; ++j) store_pairs(pairs + j * 32, turned(2 * j), turned(2 * j + 1));
  }

  // Values of tile `slot` of a step, [16, D] fp32 -> its key pairs (2i, 2i + 1) in the step's
  // [D / 16, STEP / 2, 16, 2] bf16: per block of 16 channels, the step's key pairs in order.
  template <int D>
  static void values_to_pairs(const float* values, int slot, uint16_t* pairs) {
    for (int b = 0; b < D / 16; ++b) {
      for (int i = 0; i < 8; ++i) {
        store_pairs(pairs + (b * STEP / 2 + slot * 8 + i) * 32, _mm512_loadu_ps(values + 2 * i * D + b * 16),
                    _mm512_loadu_ps(values + (2 * i + 1) * D + b * 16));
      }
    }
  }

  // Zero value pairs of tile `slot` (the unused half of a step's last 32 keys: its weights are 0, and 0 x NaN is
  // not 0).
  template <int D>
  static void clear_pairs(int slot, uint16_t* pairs) {
    for (int b = 0; b < D / 16; ++b) {
      for (int i = 0; i < 8; ++i) _mm512_storeu_si512(pairs + (b * STEP / 2 + slot * 8 + i) * 32, _mm512_setzero_si512());
    }
  }

  // The bf16 pair at p (two channels of a query row, or two keys' weights) in every lane.
  static __m512bh broadcast_pair(const uint16_t* p) {
    int32_t pair;
    std::memcpy(&pair, p, 4);
    return reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
  }

  static __m512bh load_pairs(const uint16_t* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); }

  // Logits of 16 rows against the first `tiles` tiles of a step: s[r * STEP + k * TILE + i] = q[r] . key i of tile
  // k; q: [16, D] bf16, key pairs as turned_keys_to_pairs, tile after tile.
  template <int D>
  static void step_scores(const uint16_t* q, const uint16_t* key_pairs, int tiles, float* s) {
    switch (tiles) {
      case 1: return step_scores_of<D, 1>(q, key_pairs, s);
      case 2: return step_scores_of<D, 2>(q, key_pairs, s);
      case 3: return step_scores_of<D, 3>(q, key_pairs, s);
      default: return step_scores_of<D, 4>(q, key_pairs, s);
    }
  }

  template <int D, int T>
  static void step_scores_of(const uint16_t* q, const uint16_t* key_pairs, float* s) {
    constexpr int R = PRODUCT_ROWS;
    for (int r0 = 0; r0 < TILE_ROWS; r0 += R) {
      F acc[R][T];
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < T; ++k) acc[r][k] = zero();
      for (int j = 0; j < D / 2; ++j) {
        __m512bh keys[T];
        for (int k = 0; k < T; ++k) keys[k] = load_pairs(key_pairs + k * D * TILE + j * 32);
        for (int r = 0; r < R; ++r) {
          const __m512bh qr = broadcast_pair(q + (r0 + r) * D + 2 * j);
          for (int k = 0; k < T; ++k) acc[r][k] = _mm512_dpbf16_ps(acc[r][k], qr, keys[k]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < T; ++k) store(s + (r0 + r) * STEP + k * TILE, acc[r][k]);
    }
  }

  // out[r] = out[r] * alpha[r] + sum_i weights[r * STEP + i] * value i, i < 32 x halves, for 16 rows (D floats
  // apart); weights [16, STEP] bf16, value pairs as values_to_pairs. `partial` is AMX's scratch (unused here).
  template <int D>
  static void tile_accumulate(const uint16_t* weights, int halves, const float* alpha, const uint16_t* value_pairs,
                              float* out, float* /*partial*/) {
    constexpr int R = PRODUCT_ROWS, CB = 4;  // rows x blocks of 16 channels per pass
    static_assert(D % (16 * CB) == 0, "output blocks go four at a time");
    const int key_pairs = 16 * halves;
    for (int r0 = 0; r0 < TILE_ROWS; r0 += R) {
      for (int b0 = 0; b0 < D / 16; b0 += CB) {
        F acc[R][CB];
        for (int r = 0; r < R; ++r) {
          const F a = set1(alpha[r0 + r]);
          for (int b = 0; b < CB; ++b) acc[r][b] = mul(load(out + (r0 + r) * D + (b0 + b) * 16), a);
        }
        for (int i = 0; i < key_pairs; ++i) {
          __m512bh values[CB];
          for (int b = 0; b < CB; ++b) values[b] = load_pairs(value_pairs + ((b0 + b) * STEP / 2 + i) * 32);
          for (int r = 0; r < R; ++r) {
            const __m512bh w = broadcast_pair(weights + (r0 + r) * STEP + 2 * i);
            for (int b = 0; b < CB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], w, values[b]);
          }
        }
        for (int r = 0; r < R; ++r)
          for (int b = 0; b < CB; ++b) store(out + (r0 + r) * D + (b0 + b) * 16, acc[r][b]);
      }
    }
  }
};
