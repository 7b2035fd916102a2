// AMX (bf16 tiles) for the products of items of 16 rows or more when the model computes in bf16, on top of the
// AVX-512 operations. Included by attention_amx.cpp only, inside its target region and an anonymous namespace,
// after simd_avx512.h.
//
// Products in bf16, as vLLM's own CPU attention computes them for a bf16 model: the queries (already bf16 there),
// the dequantized and rotated keys, the softmax weights and the values are rounded to bf16, the sums kept in fp32.
// Tiles (one configuration per item):
//   0  logits   16 rows x 16 keys fp32          1  queries  16 rows x 32 channels bf16
//   2  keys     16 channel pairs x 16 keys x 2  3  weights  16 rows x 16 keys bf16
//   4  values   8 key pairs x 16 channels x 2   5  outputs  16 rows x 16 channels fp32
#pragma once

struct Amx : Avx512 {
  static constexpr const char* name = "amx";
  static constexpr bool AMX = true;
  static constexpr int TILE_ROWS = 16;

  struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  };

  static void tiles_configure() {
    TileConfig cfg{};
    cfg.palette = 1;
    const int rows[6] = {16, 16, 16, 16, 8, 16}, bytes[6] = {64, 64, 64, 32, 64, 64};
    for (int t = 0; t < 6; ++t) {
      cfg.rows[t] = static_cast<uint8_t>(rows[t]);
      cfg.colsb[t] = static_cast<uint16_t>(bytes[t]);
    }
    // GCC does not see ldtilecfg read the struct and drops the stores above without this barrier (the tiles are
    // then unconfigured and the first tile instruction faults).
    asm volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
  }
  static void tiles_release() { _tile_release(); }

  // n floats (a multiple of 16) -> bf16, rounded to nearest even.
  static void to_bf16(const float* src, uint16_t* dst, int n) {
    for (int i = 0; i < n; i += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i))));
    }
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

  // Values of a tile, [16, D] fp32 -> [D / 16, 8, 16, 2] bf16: key pairs (2i, 2i + 1) per channel, 16 channels a block.
  template <int D>
  static void values_to_pairs(const float* values, uint16_t* pairs) {
    for (int b = 0; b < D / 16; ++b) {
      for (int i = 0; i < 8; ++i) {
        store_pairs(pairs + (b * 8 + i) * 32, _mm512_loadu_ps(values + 2 * i * D + b * 16),
                    _mm512_loadu_ps(values + (2 * i + 1) * D + b * 16));
      }
    }
  }

  // Logits of 16 rows: s[r * 16 + i] = q[r] . key i; q: [16, D] bf16, key pairs as keys_to_pairs.
  template <int D>
  static void tile_scores(const uint16_t* q, const uint16_t* key_pairs, float* s) {
    _tile_zero(0);
    for (int k = 0; k < D / 32; ++k) {
      _tile_loadd(1, q + k * 32, D * 2);
      _tile_loadd(2, key_pairs + k * 16 * 32, 64);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, s, 64);
  }

  // out[r] = out[r] * alpha[r] + sum_i p[r * 16 + i] * value i for 16 rows (D floats apart); weights and scratch:
  // [16, 16] bf16 and [16, 16] fp32.
  template <int D>
  static void tile_accumulate(const float* p, const float* alpha, const uint16_t* value_pairs, float* out,
                              uint16_t* weights, float* partial) {
    to_bf16(p, weights, 16 * 16);
    _tile_loadd(3, weights, 32);
    for (int b = 0; b < D / 16; ++b) {
      _tile_zero(5);
      _tile_loadd(4, value_pairs + b * 8 * 32, 64);
      _tile_dpbf16ps(5, 3, 4);
      _tile_stored(5, partial, 64);
      for (int r = 0; r < 16; ++r) {
        float* o = out + r * D + b * 16;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), _mm512_set1_ps(alpha[r]), _mm512_loadu_ps(partial + r * 16)));
      }
    }
  }
};
