// AVX-512 (F, DQ, BW, VL) operations of the attention kernel: 16 float lanes. Included by attention_avx512.cpp
// only, inside its target region and an anonymous namespace.
#pragma once

struct Avx512 {
  static constexpr const char* name = "avx512";
  static constexpr int L = 16;
  static constexpr int REGS = 32;  // vector registers
  static constexpr bool BF16_STEPS = false;  // no bf16 step products (simd_avx512bf16.h)
  using F = __m512;
  using I = __m512i;

  // ------------------------------------------------------------------------------------------ floats
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
  static F fmsub(F a, F b, F c) { return _mm512_fmsub_ps(a, b, c); }  // a * b - c
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  static float hadd(F v) { return _mm512_reduce_add_ps(v); }
  // Lanes n and above replaced by `fill` (n may be <= 0 or >= L).
  static F prefix(F v, int n, float fill) {
    const __mmask16 keep = n <= 0 ? 0 : n >= L ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
    return _mm512_mask_blend_ps(keep, _mm512_set1_ps(fill), v);
  }
  static F load_half(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  // Lanes whose bit is set in `lanes` (bit l: lane l) from p, the others from v.
  static F blend_lanes(F v, uint32_t lanes, const float* p) {
    return _mm512_mask_loadu_ps(v, static_cast<__mmask16>(lanes), p);
  }
  // x in the lanes where `channel` equals `at`.
  static F put_where(F v, I channel, I at, F x) {
    return _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(channel, at), x);
  }

  // 2**x for x <= 0 (-inf included), to ~2 ulp: 2**round(x) x a degree-6 polynomial of the rest (Cephes exp2f).
  static F exp2(F x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
    const F n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const F f = _mm512_sub_ps(x, n);
    F p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }


  // ------------------------------------------------------------------------------------- code words
  static I load_words(const uint8_t* p) { return _mm512_loadu_si512(p); }
  // The 32-bit words at base + 4 * index[l].
  static I gather(const uint8_t* base, I index) { return _mm512_i32gather_epi32(index, base, 4); }
  // W consecutive 32-bit words repeated over the lanes (lane l holds word l % W); W divides L.
  template <int W>
  static I pattern(const uint8_t* p) {
    if constexpr (W == 1) return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p));
    else if constexpr (W == 2) return _mm512_set1_epi64(*reinterpret_cast<const int64_t*>(p));
    else if constexpr (W == 4) return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    else return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I set1_i(int x) { return _mm512_set1_epi32(x); }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static I srlv(I a, I n) { return _mm512_srlv_epi32(a, n); }
  template <int N>
  static I srli(I a) { return _mm512_srli_epi32(a, N); }
  template <int N>
  static I slli(I a) { return _mm512_slli_epi32(a, N); }
  // 3-bit codes: the low plane gives bits 0-1, the high plane bit 2. The high plane's words are kept rotated so
  // that the wanted bit sits at bit 2 (a rotation, unlike a shift, reaches bits 0 and 1 too); higher bits may hold
  // other channels' bits (lookups ignore them).
  static I high_count(I bit) { return _mm512_and_si512(_mm512_sub_epi32(bit, _mm512_set1_epi32(2)), _mm512_set1_epi32(31)); }
  static I high_lanes(I words, I count) { return _mm512_rorv_epi32(words, count); }  // lane l: bit l of count
  static I high_start(I words, int bit) { return _mm512_rorv_epi32(words, _mm512_set1_epi32((bit - 2) & 31)); }
  static I high_next(I high) { return _mm512_ror_epi32(high, 2); }  // the bit two places up
  static I high_skip(I high) { return _mm512_ror_epi32(high, 16); }  // the bit 16 places up
  static I merge3(I low, I high) { return _mm512_ternarylogic_epi32(low, high, _mm512_set1_epi32(3), 0xE4); }

  // -------------------------------------------------------------------------------------- codebooks
  // One register of 16 entries: the 2**BITS entries repeated, so that index bits above BITS do not matter.
  struct Book {
    F entries;
  };
  template <int BITS>
  static Book book(const float* b) {
    alignas(64) float e[16];
    for (int i = 0; i < 16; ++i) e[i] = b[i % (1 << BITS)];
    return {_mm512_load_ps(e)};
  }
  template <int BITS>
  static F lookup(const Book& b, I code) { return _mm512_permutexvar_ps(code, b.entries); }
  static Book scaled(const Book& b, F scale, F offset) { return {_mm512_fmadd_ps(b.entries, scale, offset)}; }
  // Entry code of a 16-float table (a book of fewer entries repeated, as book()).
  template <int BITS>
  static F lookup_table(const float* table, I code) { return _mm512_permutexvar_ps(code, _mm512_loadu_ps(table)); }

  // ------------------------------------------------------------------------------------------- RoPE
  // cos and sin of position x inv_freq[c] for c < n (n a multiple of 16). The angle is exact in double and
  // reduced there by multiples of pi/2 (two-part pi/2), so it is as exact at position 10**6 as at 1; cos and
  // sin of the reduced angle (|r| <= pi/4) in float by the Cephes polynomials (~1 ulp).
  static void sincos(const float* inv_freq, int64_t position, int n, float* cos_out, float* sin_out) {
    const __m512d pos = _mm512_set1_pd(static_cast<double>(position));
    for (int c = 0; c < n; c += 16) {
      __m512d angle[2], turns[2];
      F r;
      I quadrant;
      __m256 rh[2];
      __m256i qh[2];
      for (int h = 0; h < 2; ++h) {
        angle[h] = _mm512_mul_pd(pos, _mm512_cvtps_pd(_mm256_loadu_ps(inv_freq + c + 8 * h)));
        turns[h] = _mm512_roundscale_pd(_mm512_mul_pd(angle[h], _mm512_set1_pd(0.63661977236758134308)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512d red = _mm512_fnmadd_pd(turns[h], _mm512_set1_pd(1.5707963267948966192), angle[h]);
        red = _mm512_fnmadd_pd(turns[h], _mm512_set1_pd(6.123233995736766036e-17), red);
        rh[h] = _mm512_cvtpd_ps(red);
        qh[h] = _mm512_cvtpd_epi32(turns[h]);
      }
      r = _mm512_insertf32x8(_mm512_castps256_ps512(rh[0]), rh[1], 1);
      quadrant = _mm512_inserti64x4(_mm512_castsi256_si512(qh[0]), qh[1], 1);
      const F r2 = _mm512_mul_ps(r, r);
      F s = _mm512_fmadd_ps(_mm512_set1_ps(-1.9515295891e-4f), r2, _mm512_set1_ps(8.3321608736e-3f));
      s = _mm512_fmadd_ps(s, r2, _mm512_set1_ps(-1.6666654611e-1f));
      s = _mm512_fmadd_ps(_mm512_mul_ps(s, r2), r, r);
      F co = _mm512_fmadd_ps(_mm512_set1_ps(2.443315711809948e-5f), r2, _mm512_set1_ps(-1.388731625493765e-3f));
      co = _mm512_fmadd_ps(co, r2, _mm512_set1_ps(4.166664568298827e-2f));
      co = _mm512_fmadd_ps(_mm512_mul_ps(co, r2), r2, _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), r2, _mm512_set1_ps(1.0f)));
      // Quadrant q: sin = (s, c, -s, -c)[q], cos = (c, -s, -c, s)[q].
      const __mmask16 odd = _mm512_test_epi32_mask(quadrant, _mm512_set1_epi32(1));
      const F sin_v = _mm512_mask_blend_ps(odd, s, co);
      const F cos_v = _mm512_mask_blend_ps(odd, co, s);
      const I sin_sign = _mm512_slli_epi32(_mm512_and_si512(quadrant, _mm512_set1_epi32(2)), 30);
      const I cos_sign =
          _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(quadrant, _mm512_set1_epi32(1)), _mm512_set1_epi32(2)), 30);
      _mm512_storeu_ps(sin_out + c, _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sin_v), sin_sign)));
      _mm512_storeu_ps(cos_out + c, _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(cos_v), cos_sign)));
    }
  }
};
