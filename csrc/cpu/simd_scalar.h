// Portable operations of the attention kernel (any CPU): 8 lanes as plain arrays, loops the compiler may
// vectorize for the machine's baseline. Included by attention_scalar.cpp only, inside an anonymous namespace.
// The operations mirror simd_avx512.h.
#pragma once

struct Scalar {
  static constexpr const char* name = "scalar";
  static constexpr int L = 8;
  static constexpr int REGS = 16;
  static constexpr bool BF16_STEPS = false;  // no bf16 step products (simd_avx512bf16.h)
  struct F {
    float v[L];
  };
  struct I {
    uint32_t v[L];
  };

  template <class Op>
  static F map(Op op) {
    F r;
    for (int l = 0; l < L; ++l) r.v[l] = op(l);
    return r;
  }
  template <class Op>
  static I map_i(Op op) {
    I r;
    for (int l = 0; l < L; ++l) r.v[l] = op(l);
    return r;
  }

  // ------------------------------------------------------------------------------------------ floats
  static F zero() { return set1(0.0f); }
  static F set1(float x) { return map([&](int) { return x; }); }
  static F load(const float* p) { return map([&](int l) { return p[l]; }); }
  static void store(float* p, F v) { std::memcpy(p, v.v, sizeof v.v); }
  static F add(F a, F b) { return map([&](int l) { return a.v[l] + b.v[l]; }); }
  static F sub(F a, F b) { return map([&](int l) { return a.v[l] - b.v[l]; }); }
  static F mul(F a, F b) { return map([&](int l) { return a.v[l] * b.v[l]; }); }
  static F fmadd(F a, F b, F c) { return map([&](int l) { return std::fma(a.v[l], b.v[l], c.v[l]); }); }
  static F fmsub(F a, F b, F c) { return map([&](int l) { return std::fma(a.v[l], b.v[l], -c.v[l]); }); }
  static F max(F a, F b) { return map([&](int l) { return a.v[l] > b.v[l] ? a.v[l] : b.v[l]; }); }
  static float hmax(F v) {
    float m = v.v[0];
    for (int l = 1; l < L; ++l) m = v.v[l] > m ? v.v[l] : m;
    return m;
  }
  static float hadd(F v) {
    float s = 0.0f;
    for (int l = 0; l < L; ++l) s += v.v[l];
    return s;
  }
  static F prefix(F v, int n, float fill) { return map([&](int l) { return l < n ? v.v[l] : fill; }); }
  static float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    float magnitude;
    if (exponent == 0) {
      magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
    } else if (exponent == 31) {
      magnitude = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    } else {
      magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
    }
    uint32_t bits;
    std::memcpy(&bits, &magnitude, 4);
    bits |= sign;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
  }
  static F load_half(const uint16_t* p) { return map([&](int l) { return half_to_float(p[l]); }); }
  static F blend_lanes(F v, uint32_t lanes, const float* p) {
    return map([&](int l) { return (lanes >> l) & 1u ? p[l] : v.v[l]; });
  }
  static F put_where(F v, I channel, I at, F x) {
    return map([&](int l) { return channel.v[l] == at.v[l] ? x.v[l] : v.v[l]; });
  }
  static F exp2(F x) { return map([&](int l) { return std::exp2(x.v[l]); }); }

  // ------------------------------------------------------------------------------------- code words
  static I load_words(const uint8_t* p) {
    I r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static I gather(const uint8_t* base, I index) {
    return map_i([&](int l) {
      uint32_t word;
      std::memcpy(&word, base + 4 * static_cast<size_t>(index.v[l]), 4);
      return word;
    });
  }
  template <int W>
  static I pattern(const uint8_t* p) {
    uint32_t words[W];
    std::memcpy(words, p, sizeof words);
    return map_i([&](int l) { return words[l % W]; });
  }
  static I iota() { return map_i([](int l) { return static_cast<uint32_t>(l); }); }
  static I set1_i(int x) { return map_i([&](int) { return static_cast<uint32_t>(x); }); }
  static I add_i(I a, I b) { return map_i([&](int l) { return a.v[l] + b.v[l]; }); }
  static I srlv(I a, I n) { return map_i([&](int l) { return a.v[l] >> n.v[l]; }); }
  template <int N>
  static I srli(I a) { return map_i([&](int l) { return a.v[l] >> N; }); }
  template <int N>
  static I slli(I a) { return map_i([&](int l) { return a.v[l] << N; }); }
  // 3-bit codes, as Avx512: the high plane's words kept shifted so that the wanted bit is bit 0.
  static I high_count(I bit) { return bit; }
  static I high_lanes(I words, I count) { return srlv(words, count); }
  static I high_start(I words, int bit) { return map_i([&](int l) { return words.v[l] >> bit; }); }
  static I high_next(I high) { return srli<2>(high); }
  static I high_skip(I high) { return srli<16>(high); }
  static I merge3(I low, I high) { return map_i([&](int l) { return (low.v[l] & 3u) | ((high.v[l] & 1u) << 2); }); }

  // -------------------------------------------------------------------------------------- codebooks
  struct Book {
    float entries[16];
  };
  template <int BITS>
  static Book book(const float* b) {
    Book r;
    for (int i = 0; i < 16; ++i) r.entries[i] = b[i % (1 << BITS)];
    return r;
  }
  template <int BITS>
  static F lookup(const Book& b, I code) { return lookup_table<BITS>(b.entries, code); }
  static Book scaled(const Book& b, F scale, F offset) {
    Book r;
    for (int i = 0; i < 16; ++i) r.entries[i] = std::fma(b.entries[i], scale.v[0], offset.v[0]);
    return r;
  }
  template <int BITS>
  static F lookup_table(const float* table, I code) { return map([&](int l) { return table[code.v[l] & 15u]; }); }

  // ------------------------------------------------------------------------------------------- RoPE
  static void sincos(const float* inv_freq, int64_t position, int n, float* cos_out, float* sin_out) {
    for (int c = 0; c < n; ++c) {
      const double angle = static_cast<double>(position) * static_cast<double>(inv_freq[c]);
      cos_out[c] = static_cast<float>(std::cos(angle));
      sin_out[c] = static_cast<float>(std::sin(angle));
    }
  }
};
