// AMX (bf16 tiles) for the products of items of 16 rows or more when the model computes in bf16, on top of the
// AVX-512 operations. Included by attention_amx.cpp only, inside its target region and an anonymous namespace,
// after simd_avx512.h.
//
// Products in bf16, as vLLM's own CPU attention computes them for a bf16 model: the queries (already bf16 there),
// the dequantized and rotated keys, the softmax weights and the values are rounded to bf16, the sums kept in fp32.
// The tile rows take a softmax step per STEP keys (STEP_TILES tiles of a page), not per tile: the outputs leave
// the tiles (and are rescaled) once per step, and each product runs over 32 keys.
// Tiles (one configuration per item):
//   logits:   0, 3, 6, 7  16 rows x 16 keys fp32 (the step's four tiles)
//             1  queries 16 rows x 32 channels bf16     2, 4, 5  keys 16 channel pairs x 16 keys x 2
//   outputs:  0, 1, 2, 5  16 rows x 16 channels fp32 (four blocks of channels)
//             3, 6  weights 16 rows x 32 keys bf16 (keys 0-31, 32-63 of the step)
//             4, 7  values 16 key pairs x 16 channels x 2 (7: keys 32-63 with two halves)
#pragma once

struct Amx : Avx512 {
  static constexpr const char* name = "amx";
  static constexpr bool AMX = true;
  static constexpr int TILE_ROWS = 16;
  static constexpr int STEP = AMX_STEP, STEP_TILES = STEP / TILE;
  static_assert(STEP == 64, "tile_accumulate takes a step's keys in two halves of 32");

  struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  };

  static void tiles_configure() {
    TileConfig cfg{};
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = 16;
      cfg.colsb[t] = 64;
    }
    // GCC does not see ldtilecfg read the struct and drops the stores above without this barrier (the tiles are
    // then unconfigured and the first tile instruction faults).
    asm volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
  }
  static void tiles_release() { _tile_release(); }

  // 16 floats -> bf16, rounded to nearest even.
  static void store_bf16(uint16_t* dst, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }

  // n floats (a multiple of 16) -> bf16.
  static void to_bf16(const float* src, uint16_t* dst, int n) {
    for (int i = 0; i < n; i += 16) store_bf16(dst + i, _mm512_loadu_ps(src + i));
  }

  // 16 floats of a and 16 of b as the bf16 pairs (a[i], b[i]): the VNNI layout of a tile operand.
  static void store_pairs(uint16_t* dst, F a, F b) {
    const __m512i order = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005,
                                            0x00160006, 0x00170007, 0x00180008, 0x00190009, 0x001A000A, 0x001B000B,
                                            0x001C000C, 0x001D000D, 0x001E000E, 0x001F000F);
    const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a in words 0-15, b in 16-31
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(order, halves));
  }

  // Keys of a tile turned by i (RoPE of the offsets in the tile), [D, 16] fp32 (keys[c * 16 + i]), turned further
  // by the tile start (rope: cos, sin of t0 x inv_freq, [D]) -> [D / 2, 16, 2] bf16: channel pairs (2j, 2j + 1) per
  // key. The tile rows then multiply unturned queries; bf16 products are not bit-equal to the float32 rows anyway.
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

  // Logits of 16 rows against the first `tiles` tiles of a step: s[r * STEP + i] = q[r] . key i; q: [16, D] bf16,
  // key pairs as turned_keys_to_pairs, tile after tile. Each block of 32 query channels is loaded once for the step's
  // tiles (their sums in tiles 0, 3, 6, 7), not once per tile.
  template <int D>
  static void step_scores(const uint16_t* q, const uint16_t* key_pairs, int tiles, float* s) {
    static_assert(STEP_TILES == 4, "one sum tile per tile of the step");
    _tile_zero(0);
    _tile_zero(3);
    _tile_zero(6);
    _tile_zero(7);
    for (int k = 0; k < D / 32; ++k) {
      _tile_loadd(1, q + k * 32, D * 2);
      const uint16_t* keys = key_pairs + k * 16 * 32;
      // A macro: the tile intrinsics take their tile numbers as literals.
#define KVQUANT_TILE_SCORES(T, K, j)                   \
  if (tiles > (j)) {                                   \
    _tile_loadd(K, keys + (j) * D * TILE, 64);         \
    _tile_dpbf16ps(T, 1, K);                           \
  }
      KVQUANT_TILE_SCORES(0, 2, 0)
      KVQUANT_TILE_SCORES(3, 4, 1)
      KVQUANT_TILE_SCORES(6, 5, 2)
      KVQUANT_TILE_SCORES(7, 2, 3)
#undef KVQUANT_TILE_SCORES
    }
    _tile_stored(0, s, STEP * 4);
    if (tiles > 1) _tile_stored(3, s + TILE, STEP * 4);
    if (tiles > 2) _tile_stored(6, s + 2 * TILE, STEP * 4);
    if (tiles > 3) _tile_stored(7, s + 3 * TILE, STEP * 4);
  }

  // out[r] = out[r] * alpha[r] + sum_i weights[r * STEP + i] * value i, i < 32 x halves, for 16 rows (D floats
  // apart); weights [16, STEP] bf16, value pairs as values_to_pairs, scratch [4, 16, 16] fp32. Four output blocks
  // at a time in tiles 0, 1, 2, 5, so that their products overlap before they are stored.
  template <int D>
  static void tile_accumulate(const uint16_t* weights, int halves, const float* alpha, const uint16_t* value_pairs,
                              float* out, float* partial) {
    static_assert(D % 64 == 0, "output blocks go four at a time");
    _tile_loadd(3, weights, STEP * 2);
    if (halves > 1) _tile_loadd(6, weights + 32, STEP * 2);
    // Output block T = weights x the block's value pairs: the step's first 32 keys (tiles 3 and V) and, with two
    // halves, the next 32 (tiles 6 and 7). A macro: the tile intrinsics take their tile numbers as literals.
#define KVQUANT_BLOCK_PRODUCT(T, V, block_pairs) \
  _tile_zero(T);                                 \
  _tile_loadd(V, block_pairs, 64);               \
  _tile_dpbf16ps(T, 3, V);                       \
  if (halves > 1) {                              \
    _tile_loadd(7, (block_pairs) + 16 * 32, 64); \
    _tile_dpbf16ps(T, 6, 7);                     \
  }
    for (int b0 = 0; b0 < D / 16; b0 += 4) {
      const uint16_t* pairs = value_pairs + b0 * STEP / 2 * 32;
      KVQUANT_BLOCK_PRODUCT(0, 4, pairs)
      KVQUANT_BLOCK_PRODUCT(1, 7, pairs + STEP / 2 * 32)
      KVQUANT_BLOCK_PRODUCT(2, 4, pairs + 2 * STEP / 2 * 32)
      KVQUANT_BLOCK_PRODUCT(5, 7, pairs + 3 * STEP / 2 * 32)
      _tile_stored(0, partial, 64);
      _tile_stored(1, partial + 256, 64);
      _tile_stored(2, partial + 512, 64);
      _tile_stored(5, partial + 768, 64);
      for (int j = 0; j < 4; ++j) {
        for (int r = 0; r < 16; ++r) {
          float* o = out + r * D + (b0 + j) * 16;
          _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), _mm512_set1_ps(alpha[r]),
                                              _mm512_loadu_ps(partial + j * 256 + r * 16)));
        }
      }
    }
#undef KVQUANT_BLOCK_PRODUCT
  }
};
