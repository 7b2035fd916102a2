// AMX (bf16 tiles) for the products of items of 16 rows or more when the model computes in bf16: the operands and
// softmax steps of simd_avx512bf16.h, multiplied in tiles. Included by attention_amx.cpp only, inside its target
// region and an anonymous namespace, after simd_avx512bf16.h.
// Tiles (one configuration per item):
//   logits:   0, 3, 6, 7  16 rows x 16 keys fp32 (the step's four tiles)
//             1  queries 16 rows x 32 channels bf16     2, 4, 5  keys 16 channel pairs x 16 keys x 2
//   outputs:  0, 1, 2, 5  16 rows x 16 channels fp32 (four blocks of channels)
//             3, 6  weights 16 rows x 32 keys bf16 (keys 0-31, 32-63 of the step)
//             4, 7  values 16 key pairs x 16 channels x 2 (7: keys 32-63 with two halves)
#pragma once

struct Amx : Avx512Bf16 {
  static constexpr const char* name = "amx";

  struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  };

  static void begin_products() {
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
  static void end_products() { _tile_release(); }

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
