// AVX2 (+ FMA, F16C) operations of the attention kernel: 8 float lanes. Included by attention_avx2.cpp only,
// inside its target region and an anonymous namespace. The operations mirror simd_avx512.h.
#pragma once

struct Avx2 {
  static constexpr const char* name = "avx2";
  static constexpr int L = 8;
  static constexpr int REGS = 16;
  static constexpr bool BF16_STEPS = false;  // no bf16 step products (simd_avx512bf16.h)
  using F = __m256;
  using I = __m256i;

  // ------------------------------------------------------------------------------------------ floats
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fmsub(F a, F b, F c) { return _mm256_fmsub_ps(a, b, c); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static float hmax(F v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float hadd(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static F prefix(F v, int n, float fill) {
    const F keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota()));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, keep);
  }
  static F load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  static F blend_lanes(F v, uint32_t lanes, const float* p) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i take = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes)), bit), bit);
    return _mm256_blendv_ps(v, _mm256_loadu_ps(p), _mm256_castsi256_ps(take));
  }
  static F put_where(F v, I channel, I at, F x) {
    return _mm256_blendv_ps(v, x, _mm256_castsi256_ps(_mm256_cmpeq_epi32(channel, at)));
  }

  // 2**x for x <= 0 (-inf included), as Avx512::exp2; 2**round(x) from the exponent bits (x >= -126 there,
  // below that the result is below 2**-126 and only ever multiplies masked lanes).
  static F exp2(F x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
    const F n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const F f = _mm256_sub_ps(x, n);
    F p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const I scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
  }


  // ------------------------------------------------------------------------------------- code words
  static I load_words(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I gather(const uint8_t* base, I index) {
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), index, 4);
  }
  template <int W>
  static I pattern(const uint8_t* p) {
    if constexpr (W == 1) return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(p));
    else if constexpr (W == 2) return _mm256_set1_epi64x(*reinterpret_cast<const int64_t*>(p));
    else return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I set1_i(int x) { return _mm256_set1_epi32(x); }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static I srlv(I a, I n) { return _mm256_srlv_epi32(a, n); }
  template <int N>
  static I srli(I a) { return _mm256_srli_epi32(a, N); }
  template <int N>
  static I slli(I a) { return _mm256_slli_epi32(a, N); }
  // 3-bit codes, as Avx512: the high plane's words kept shifted so that the wanted bit is bit 0.
  static I high_count(I bit) { return bit; }
  static I high_lanes(I words, I count) { return _mm256_srlv_epi32(words, count); }
  static I high_start(I words, int bit) { return _mm256_srl_epi32(words, _mm_cvtsi32_si128(bit)); }
  static I high_next(I high) { return _mm256_srli_epi32(high, 2); }
  static I high_skip(I high) { return _mm256_srli_epi32(high, 16); }
  static I merge3(I low, I high) {
    return _mm256_or_si256(_mm256_and_si256(low, _mm256_set1_epi32(3)), _mm256_slli_epi32(high, 2));
  }

  // -------------------------------------------------------------------------------------- codebooks
  // vpermps reads 3 index bits: 2- and 3-bit books fill one register (a 2-bit one twice), a 4-bit one takes two
  // and a blend on bit 3.
  struct Book {
    F low, high;
  };
  template <int BITS>
  static Book book(const float* b) {
    alignas(32) float e[16];
    for (int i = 0; i < 16; ++i) e[i] = b[i % (1 << BITS)];
    return {_mm256_load_ps(e), _mm256_load_ps(e + 8)};
  }
  template <int BITS>
  static F lookup(const Book& b, I code) {
    const F low = _mm256_permutevar8x32_ps(b.low, code);
    if constexpr (BITS < 4) {
      return low;
    } else {
      const F high = _mm256_permutevar8x32_ps(b.high, code);
      return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
    }
  }
  static Book scaled(const Book& b, F scale, F offset) {
    return {_mm256_fmadd_ps(b.low, scale, offset), _mm256_fmadd_ps(b.high, scale, offset)};
  }
  template <int BITS>
  static F lookup_table(const float* table, I code) {
    if constexpr (BITS < 4) {
      return _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), code);
    } else {
      return lookup<BITS>(Book{_mm256_loadu_ps(table), _mm256_loadu_ps(table + 8)}, code);
    }
  }

  // ------------------------------------------------------------------------------------------- RoPE
  // As Avx512::sincos, 8 channels at a time.
  static void sincos(const float* inv_freq, int64_t position, int n, float* cos_out, float* sin_out) {
    const __m256d pos = _mm256_set1_pd(static_cast<double>(position));
    for (int c = 0; c < n; c += 8) {
      __m128 rh[2];
      __m128i qh[2];
      for (int h = 0; h < 2; ++h) {
        const __m256d angle = _mm256_mul_pd(pos, _mm256_cvtps_pd(_mm_loadu_ps(inv_freq + c + 4 * h)));
        const __m256d turns = _mm256_round_pd(_mm256_mul_pd(angle, _mm256_set1_pd(0.63661977236758134308)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256d red = _mm256_fnmadd_pd(turns, _mm256_set1_pd(1.5707963267948966192), angle);
        red = _mm256_fnmadd_pd(turns, _mm256_set1_pd(6.123233995736766036e-17), red);
        rh[h] = _mm256_cvtpd_ps(red);
        qh[h] = _mm256_cvtpd_epi32(turns);
      }
      const F r = _mm256_set_m128(rh[1], rh[0]);
      const I quadrant = _mm256_set_m128i(qh[1], qh[0]);
      const F r2 = _mm256_mul_ps(r, r);
      F s = _mm256_fmadd_ps(_mm256_set1_ps(-1.9515295891e-4f), r2, _mm256_set1_ps(8.3321608736e-3f));
      s = _mm256_fmadd_ps(s, r2, _mm256_set1_ps(-1.6666654611e-1f));
      s = _mm256_fmadd_ps(_mm256_mul_ps(s, r2), r, r);
      F co = _mm256_fmadd_ps(_mm256_set1_ps(2.443315711809948e-5f), r2, _mm256_set1_ps(-1.388731625493765e-3f));
      co = _mm256_fmadd_ps(co, r2, _mm256_set1_ps(4.166664568298827e-2f));
      co = _mm256_fmadd_ps(_mm256_mul_ps(co, r2), r2, _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), r2, _mm256_set1_ps(1.0f)));
      const F odd = _mm256_castsi256_ps(_mm256_slli_epi32(quadrant, 31));
      const F sin_v = _mm256_blendv_ps(s, co, odd);
      const F cos_v = _mm256_blendv_ps(co, s, odd);
      const I sin_sign = _mm256_slli_epi32(_mm256_and_si256(quadrant, _mm256_set1_epi32(2)), 30);
      const I cos_sign =
          _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(quadrant, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30);
      _mm256_storeu_ps(sin_out + c, _mm256_xor_ps(sin_v, _mm256_castsi256_ps(sin_sign)));
      _mm256_storeu_ps(cos_out + c, _mm256_xor_ps(cos_v, _mm256_castsi256_ps(cos_sign)));
    }
  }
};
