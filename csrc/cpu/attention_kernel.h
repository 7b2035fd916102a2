// Paged attention straight from kvquant pages (layout version 2, kvquant_vllm/quant/paged.py), generic over the
// vector operations V (simd_avx512.h, simd_avx2.h, simd_scalar.h). Included once per instruction set, inside an
// anonymous namespace, so that every function here has internal linkage in the translation unit that compiles it
// for its instruction set.
//
// One call of attend() serves one work item (attention.h `Item`): the g query heads of one kv head for a run of
// query tokens of one request (a decode token, or a block of a prefill chunk), as rows = tokens x g, over a range
// of the request's pages, walked in tiles of TILE tokens with an online softmax in base 2. Per tile:
//   1. keys, token-major in the lanes (keys[c] holds channel c of the tile's TILE tokens): the codes of a plane
//      word are gathered for the tile's tokens, each shift by the plane's width brings the next channel of that
//      word into the low bits, and one permute looks the codes up in the channel's table (codebook x calibrated
//      scale + offset, made once per call); then the head's listed outliers (a token-ordered list: one cursor per
//      page) and the sink at position 0 are written over their elements;
//   2. RoPE: cos and sin of (t0 + i) x inv_freq compose exact angles of the tile start t0 and of the offsets
//      i < TILE (both tables made once per call): the keys turn by i and the queries back by t0 (q . R(t0 + i) k =
//      (R(t0)^T q) . (R(i) k)), for every item alike, so that a row's result does not depend on how many rows
//      share its item (a decode token, or a block of a chunk that the scheduler cut anywhere);
//   3. logits of every row against the tile (one FMA per row and channel gives the row's TILE logits), causal
//      mask, running max and denominator per row;
//   4. values, channel-major (per token: the codebook scaled and offset by the token's fp16 scale and offset, then
//      the codes of L channels from one load of the plane's words, a variable shift and one permute), the vector's
//      outliers and the sink, accumulated into the rows' outputs, several rows per pass over the tile.
// An item of few rows (a decode) runs steps 1-3 and 4 straight from the codes, the keys and values never leaving
// registers (score_codes, CodedValues), in the same operations and order, so that its rows get the same bits.
// With AVX512-BF16 (simd_avx512bf16.h) or AMX (simd_amx.h) and a bf16 model, blocks of 16 rows take steps 3 and
// 4's products in bf16 (dot products of pairs, or tiles), and their softmax steps over BF16_STEP keys (four tiles
// of a page) at a time.
// Nothing is allocated: the rows' state and the tile live in the caller's scratch.
#pragma once

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

template <class V>
struct Blocks {
  static constexpr int L = V::L, NB = TILE / L;  // vectors per row of a tile
  // Rows per register block: logits (NB accumulators per row) and output chunks (CHUNK per row), leaving room for
  // the operands.
  static constexpr int SCORE_ROWS = std::min(8, (V::REGS - 2 * NB) / NB);
  template <int NG>
  static constexpr int CHUNK = std::min(NG, V::REGS / 4);
  template <int NG>
  static constexpr int VALUE_ROWS = std::min(6, (V::REGS - CHUNK<NG>) / CHUNK<NG>);
};

// Bit planes of a packed vector (pack_code_planes): the low plane (2 bits; 4 for 4-bit codes) of LOW_WORDS 32-bit
// words, channel c in bits [(c / W) * width, + width) of word c % W, then for 3-bit codes a 1-bit plane of
// HIGH_WORDS words likewise.
template <int BITS, int D>
struct Planes {
  static constexpr int LOW_WIDTH = BITS == 4 ? 4 : 2;
  static constexpr int LOW_WORDS = D * LOW_WIDTH / 32, HIGH_WORDS = D / 32;
  static constexpr int WORDS = D * BITS / 32;   // 32-bit words per vector
  static constexpr int PACKED = D * BITS / 8;   // bytes per vector
  static constexpr int PER_WORD = 32 / LOW_WIDTH;  // channels per low-plane word
};

// The i-th low-plane word in the order that every path walks a tile's key codes, and so sums a logit's channels:
// for 3-bit codes, low words w and w + HIGH_WORDS in turn, as they share high word w.
template <int BITS, int D>
constexpr int walked_word(int i) {
  return BITS == 3 ? i / 2 + i % 2 * Planes<BITS, D>::HIGH_WORDS : i;
}

// fn(low, high, w) for each low-plane word w of the tokens in lanes [b * L, b * L + L) of a tile's key codes, in
// walked order: `low` holds each lane's word w, `high` (3-bit codes) its high-plane word, turned so that the third
// bit of word w's first channel is where V::merge3 takes it.
template <class V, int BITS, int D, class Fn>
void for_each_word(const uint8_t* codes, int b, Fn&& fn) {
  using I = typename V::I;
  using P = Planes<BITS, D>;
  alignas(64) int32_t word0[V::L];  // word 0 of each lane's token, in words from `codes`
  for (int l = 0; l < V::L; ++l) word0[l] = (b * V::L + l) * P::WORDS;
  const I first = V::load_words(reinterpret_cast<const uint8_t*>(word0));
  auto word = [&](int w) { return V::gather(codes, V::add_i(first, V::set1_i(w))); };
  I high{};
  for (int i = 0; i < P::LOW_WORDS; ++i) {
    const int w = walked_word<BITS, D>(i);
    if constexpr (BITS == 3) {
      // Low words w and w + HIGH_WORDS share high word w: their channels' third bits sit at even and odd bits.
      if (i % 2 == 0) high = word(P::LOW_WORDS + w);
      fn(word(w), V::high_start(high, i % 2), w);
    } else {
      fn(word(w), I{}, w);
    }
  }
}

// Keys of a tile, token-major: keys[c * TILE + i] = dequantized channel c of token i (pre-RoPE).
template <class V, int BITS, int D>
void dequantize_keys(const uint8_t* codes, const float* lut, float* keys) {
  using I = typename V::I;
  using P = Planes<BITS, D>;
  constexpr int L = V::L, NB = TILE / L;
  for (int b = 0; b < NB; ++b) {
    for_each_word<V, BITS, D>(codes, b, [&](I low, I high, int w) {  // the PER_WORD channels of word w
      for (int k = 0; k < P::PER_WORD; ++k) {
        const int c = k * P::LOW_WORDS + w;
        I code = low;
        if constexpr (BITS == 3) code = V::merge3(low, high);
        V::store(keys + c * TILE + b * L, V::template lookup_table<BITS>(lut + c * 16, code));
        low = V::template srli<P::LOW_WIDTH>(low);
        if constexpr (BITS == 3) high = V::high_next(high);
      }
    });
  }
}

// The order in which a logit sums its channels, on both paths (keys from the tile, and codes straight to logits),
// so that a row's logits do not depend on which path its item took: the pairs (c, c + D / 2) that RoPE turns
// together, whose codes sit 16 bits apart in the same plane words, word by word in walked order.
template <int BITS, int D>
struct PairOrder {
  using P = Planes<BITS, D>;
  int channel[D / 2];  // the low channel of each pair
  constexpr PairOrder() : channel() {
    int n = 0;
    for (int i = 0; i < P::LOW_WORDS; ++i) {
      for (int k = 0; k < P::PER_WORD / 2; ++k) channel[n++] = k * P::LOW_WORDS + walked_word<BITS, D>(i);
    }
  }
};

// Logits of RB rows against a tile straight from its key codes, the keys never leaving registers: per channel
// pair, two lookups, the listed outliers (lanes whose bit is set in exact_lanes[c] take exact[c * TILE + i]),
// RoPE by the tile offsets, and each row's two FMAs. Equal, bit for bit, to dequantize_keys, the rotation and
// score_rows on the same tile. s[r * TILE + i] as score_rows.
template <class V, int BITS, int D, int RB>
void score_codes(const uint8_t* codes, const float* lut, const uint32_t* exact_lanes, const float* exact,
                 const float* offset_cos, const float* offset_sin, const float* q, float* s) {
  using F = typename V::F;
  using I = typename V::I;
  using P = Planes<BITS, D>;
  constexpr int L = V::L, NB = TILE / L, HALF = D / 2;
  for (int b = 0; b < NB; ++b) {
    F acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = V::zero();
    auto pairs = [&](I low, I high, int w) {
      I low_hi = V::template srli<16>(low), high_hi = V::high_skip(high);
      for (int k = 0; k < P::PER_WORD / 2; ++k) {
        const int c = k * P::LOW_WORDS + w, h = c + HALF;
        I code_lo = low, code_hi = low_hi;
        if constexpr (BITS == 3) {
          code_lo = V::merge3(low, high);
          code_hi = V::merge3(low_hi, high_hi);
        }
        F lo = V::template lookup_table<BITS>(lut + c * 16, code_lo);
        F hi = V::template lookup_table<BITS>(lut + h * 16, code_hi);
        lo = V::blend_lanes(lo, exact_lanes[c] >> (b * L), exact + c * TILE + b * L);
        hi = V::blend_lanes(hi, exact_lanes[h] >> (b * L), exact + h * TILE + b * L);
        const F cos_i = V::load(offset_cos + c * TILE + b * L), sin_i = V::load(offset_sin + c * TILE + b * L);
        const F lo_turned = V::fmsub(lo, cos_i, V::mul(hi, sin_i));
        const F hi_turned = V::fmadd(hi, cos_i, V::mul(lo, sin_i));
        for (int r = 0; r < RB; ++r) {
          acc[r] = V::fmadd(V::set1(q[r * D + c]), lo_turned, acc[r]);
          acc[r] = V::fmadd(V::set1(q[r * D + h]), hi_turned, acc[r]);
        }
        low = V::template srli<P::LOW_WIDTH>(low);
        low_hi = V::template srli<P::LOW_WIDTH>(low_hi);
        if constexpr (BITS == 3) {
          high = V::high_next(high);
          high_hi = V::high_next(high_hi);
        }
      }
    };
    for_each_word<V, BITS, D>(codes, b, pairs);
    for (int r = 0; r < RB; ++r) V::store(s + r * TILE + b * L, acc[r]);
  }
}

template <class V, int BITS, int D, int RB = Blocks<V>::SCORE_ROWS>
void score_codes_block(int rows, const uint8_t* codes, const float* lut, const uint32_t* exact_lanes,
                       const float* exact, const float* offset_cos, const float* offset_sin, const float* q, float* s) {
  if constexpr (RB > 1) {
    if (rows < RB) {
      return score_codes_block<V, BITS, D, RB - 1>(rows, codes, lut, exact_lanes, exact, offset_cos, offset_sin, q, s);
    }
  }
  score_codes<V, BITS, D, RB>(codes, lut, exact_lanes, exact, offset_cos, offset_sin, q, s);
}

// Codes of channels [j * L, j * L + L) of one packed vector, channel-major, in the low bits of each lane (bits
// above may hold other channels' bits: lookups ignore them).
template <class V, int BITS, int D>
struct ChannelCodes {
  using I = typename V::I;
  using P = Planes<BITS, D>;
  static constexpr int L = V::L, NG = D / L;
  I low_shift[NG], high_count[NG];  // per lane: (c / W) * width; the high plane's, as V::high_lanes takes it

  ChannelCodes() {
    for (int j = 0; j < NG; ++j) {
      const I channel = V::add_i(V::iota(), V::set1_i(j * L));
      low_shift[j] = V::template slli<log2(P::LOW_WIDTH)>(V::template srli<log2(P::LOW_WORDS)>(channel));
      high_count[j] = V::high_count(V::template srli<log2(P::HIGH_WORDS)>(channel));
    }
  }

  static constexpr int log2(int x) { return x <= 1 ? 0 : 1 + log2(x / 2); }

  template <int W>
  static I words(const uint8_t* plane, int j) {  // lane l: the word of channel j * L + l
    if constexpr (W >= L) {
      return V::load_words(plane + 4 * ((j * L) % W));
    } else {
      return V::template pattern<W>(plane);
    }
  }

  I code(const uint8_t* vec, int j) const {
    I c = V::srlv(words<P::LOW_WORDS>(vec, j), low_shift[j]);
    if constexpr (BITS == 3) {
      c = V::merge3(c, V::high_lanes(words<P::HIGH_WORDS>(vec + 4 * P::LOW_WORDS, j), high_count[j]));
    }
    return c;
  }
};

// Logits of RB rows against a tile: s[r * TILE + i] = q[r] . keys[:, i] (q rows D floats apart).
template <class V, int BITS, int D, int RB>
void score_rows(const float* q, const float* keys, float* s) {
  using F = typename V::F;
  constexpr int L = V::L, NB = TILE / L;
  constexpr PairOrder<BITS, D> order;
  F acc[RB][NB];
  for (int r = 0; r < RB; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = V::zero();
  for (int i = 0; i < D; ++i) {
    const int c = order.channel[i / 2] + (i % 2) * (D / 2);
    F k[NB];
    for (int b = 0; b < NB; ++b) k[b] = V::load(keys + c * TILE + b * L);
    for (int r = 0; r < RB; ++r) {
      const F qc = V::set1(q[r * D + c]);
      for (int b = 0; b < NB; ++b) acc[r][b] = V::fmadd(qc, k[b], acc[r][b]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int b = 0; b < NB; ++b) V::store(s + r * TILE + b * L, acc[r][b]);
}

template <class V, int BITS, int D, int RB = Blocks<V>::SCORE_ROWS>
void score_block(int rows, const float* q, const float* keys, float* s) {
  if constexpr (RB > 1) {
    if (rows < RB) return score_block<V, BITS, D, RB - 1>(rows, q, keys, s);
  }
  score_rows<V, BITS, D, RB>(q, keys, s);
}

// Where accumulate_rows takes a tile's values from: vectors<CH>(t, j0, v) gives token t's channels [j0 * L,
// (j0 + CH) * L) as CH vectors, inlined (a call per token would pass the vectors through memory).
template <class V, int D>
struct TileValues {  // dequantized: [TILE, D] floats
  const float* values;
  template <int CH>
  [[gnu::always_inline]] void vectors(int t, int j0, typename V::F* v) const {
    for (int j = 0; j < CH; ++j) v[j] = V::load(values + t * D + (j0 + j) * V::L);
  }
};

template <class V, int BITS, int D>
struct CodedValues {  // straight from a tile's codes: never leaving registers
  const ChannelCodes<V, BITS, D>& channel_codes;
  const typename V::Book& book;  // the decode codebook
  const uint8_t* codes;          // [TILE, D * BITS / 8]
  const float* scale;            // [2, TILE]: each token's scale, then its offset
  const uint8_t* idx;            // [TILE, vo]: channels of the vector's outliers
  const uint16_t* val;           // [TILE, vo] fp16: their values
  int vo;
  // The codebook scaled and offset for the token, one permute per vector, then the outliers in their order.
  template <int CH>
  [[gnu::always_inline]] void vectors(int t, int j0, typename V::F* v) const {
    const auto scaled = V::scaled(book, V::set1(scale[t]), V::set1(scale[TILE + t]));
    const uint8_t* vec = codes + t * Planes<BITS, D>::PACKED;
    for (int j = 0; j < CH; ++j) v[j] = V::template lookup<BITS>(scaled, channel_codes.code(vec, j0 + j));
    for (int e = 0; e < vo; ++e) {
      const int at = std::min<int>(idx[t * vo + e], D - 1);
      const auto x = V::set1(V::half_to_float(val[t * vo + e]));
      for (int j = 0; j < CH; ++j) v[j] = V::put_where(v[j], V::iota(), V::set1_i(at - (j0 + j) * V::L), x);
    }
  }
};

// out[r] = out[r] * alpha[r] + sum_i p[r * TILE + i] * values[i], i < tokens, for RB rows (D floats apart).
template <class V, int D, int RB, class Values>
void accumulate_rows(int tokens, const float* p, const float* alpha, const Values& values, float* out) {
  using F = typename V::F;
  constexpr int L = V::L, NG = D / L, CH = Blocks<V>::template CHUNK<NG>;
  for (int j0 = 0; j0 < NG; j0 += CH) {
    F acc[RB][CH];
    for (int r = 0; r < RB; ++r) {
      const F a = V::set1(alpha[r]);
      for (int j = 0; j < CH; ++j) acc[r][j] = V::mul(V::load(out + r * D + (j0 + j) * L), a);
    }
    for (int t = 0; t < tokens; ++t) {
      F v[CH];
      values.template vectors<CH>(t, j0, v);
      for (int r = 0; r < RB; ++r) {
        const F pt = V::set1(p[r * TILE + t]);
        for (int j = 0; j < CH; ++j) acc[r][j] = V::fmadd(pt, v[j], acc[r][j]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < CH; ++j) V::store(out + r * D + (j0 + j) * L, acc[r][j]);
  }
}

template <class V, int D, int RB = Blocks<V>::template VALUE_ROWS<D / V::L>, class Values>
void accumulate_block(int rows, int tokens, const float* p, const float* alpha, const Values& values, float* out) {
  if constexpr (RB > 1) {
    if (rows < RB) return accumulate_block<V, D, RB - 1>(rows, tokens, p, alpha, values, out);
  }
  accumulate_rows<V, D, RB>(tokens, p, alpha, values, out);
}

// Scratch layout of one item (floats). Every section starts on a cache line (the scratch does: run_items), so that
// no vector load or store of a section, nor a tile row, splits across two lines.
struct ScratchLayout {
  int64_t q, q_turned, acc, m, l, alpha, p, keys, values, value_scale, visible, exact_lanes, q16, p_step,
      key_pairs, value_pairs, weights, partial, total;
  ScratchLayout(int64_t rows, int d) {
    total = 0;
    auto section = [&](int64_t floats) {
      const int64_t start = total;
      total += (floats + 15) / 16 * 16;
      return start;
    };
    q = section(rows * d);                      // [rows, D] queries x logit scale
    q_turned = section(rows * d);               // [rows, D] the same turned back by the tile start
    acc = section(rows * d);                    // [rows, D] unnormalised outputs
    m = section(rows);                          // [rows] running max (base 2)
    l = section(rows * 16);                     // [rows, 16] running denominator, per lane
    alpha = section(rows);                      // [rows] rescale of the tile
    p = section(rows * TILE);                   // [rows, TILE] logits, then weights
    keys = section(d * TILE);                   // [D, TILE]
    values = section(TILE * d);                 // [TILE, D]
    value_scale = section(2 * TILE);            // [2, TILE]
    visible = section(rows);                    // [rows] int32: keys of the tile each row sees
    exact_lanes = section(d);                   // [D] uint32: tile lanes of each channel that outliers hold
    q16 = section(rows * d / 2);                // bf16 products (simd_avx512bf16.h): [rows, D] bf16 queries
    p_step = section(rows * BF16_STEP);         // [rows, BF16_STEP] logits
    key_pairs = section(d * BF16_STEP / 2);     // [BF16_STEP / TILE, D / 2, TILE, 2] bf16
    value_pairs = section(d * BF16_STEP / 2);   // [D / 16, BF16_STEP / 2, 16, 2] bf16
    weights = section(rows * BF16_STEP / 2);    // [rows, BF16_STEP] bf16
    partial = section(4 * 16 * 16);             // [4, 16, 16] AMX's output tiles
  }
};

int64_t scratch_floats(int64_t rows, int head_dim) { return ScratchLayout(rows, head_dim).total; }

template <class V>
void rope_tables(const float* inv_freq, int half, int64_t tiles, float* offsets, float* starts) {
  float column[256];  // half <= 128
  for (int i = 0; i < TILE; ++i) {
    V::sincos(inv_freq, i, half, column, column + half);
    for (int c = 0; c < 2 * half; ++c) offsets[c * TILE + i] = column[c];
  }
  for (int64_t k = 0; k < tiles; ++k) {
    float* start = starts + k * 2 * half;
    V::sincos(inv_freq, k * TILE, half, start, start + half);
  }
}

// Keys first_key .. first_key + keys - 1 that a query at `position` sees (causal): a prefix of them.
int keys_seen(int64_t position, int64_t first_key, int keys) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(position - first_key + 1, 0), keys));
}

// The online softmax of the tile rows [0, tile_rows) (a multiple of 16) over one step's keys step_t0 .. + keys: their
// logits p_step [rows, STEP] -> weights [rows, STEP] bf16 (written well before the products read them), running max
// and denominator, and each row's rescale in alpha. In three passes over the rows, so that the rows' reductions to
// their max (a chain of shuffles each) overlap, and their rescales take one vector exp2 per 16 rows.
template <class V>
void tile_step(const Item& it, int g, int tile_rows, int64_t step_t0, int keys, const float* p_step,
               uint16_t* weights, float* m, float* l, float* alpha) {
  using F = typename V::F;
  constexpr int L = V::L, NS = V::STEP / L;
  static_assert(L == 16, "one vector of per-lane sums per row; rescales of 16 rows per vector");
  auto visible = [&](int r) { return keys_seen(it.first_position + r / g, step_t0, keys); };
  for (int r = 0; r < tile_rows; ++r) {  // 1. the new running max; alpha keeps the previous one meanwhile
    alpha[r] = m[r];
    const int vis = visible(r);
    if (vis == 0) continue;
    const float* pr = p_step + r * V::STEP;
    F lanes_max = V::prefix(V::load(pr), vis, NEG_INF);
    for (int b = 1; b < NS; ++b) lanes_max = V::max(lanes_max, V::prefix(V::load(pr + b * L), vis - b * L, NEG_INF));
    m[r] = std::max(m[r], V::hmax(lanes_max));
  }
  // 2. alpha = 2^(previous max - max): 1 where the max stays (2^0 is exactly 1), 0 for a row's first keys (-inf
  // before; a row that has seen no key yet has -inf - -inf, which exp2 clamps to 0, on its zero sums).
  for (int r = 0; r < tile_rows; r += L) V::store(alpha + r, V::exp2(V::sub(V::load(alpha + r), V::load(m + r))));
  for (int r = 0; r < tile_rows; ++r) {  // 3. weights and denominators
    const int vis = visible(r);
    const float* pr = p_step + r * V::STEP;
    uint16_t* wr = weights + r * V::STEP;
    const F shift = V::set1(m[r]);
    F sum = V::mul(V::load(l + r * 16), V::set1(alpha[r]));  // a per-lane sum (L = 16): reduced once, at the end
    if (vis == 0) {
      for (int b = 0; b < NS; ++b) V::store_bf16(wr + b * L, V::zero());
    } else if (vis == V::STEP) {
      for (int b = 0; b < NS; ++b) {
        const F e = V::exp2(V::sub(V::load(pr + b * L), shift));
        V::store_bf16(wr + b * L, e);
        sum = V::add(sum, e);
      }
    } else {
      for (int b = 0; b < NS; ++b) {
        // Masked keys enter exp2 as the max, not -inf: 2^-inf would pass through a subnormal, which costs a
        // microcode assist per vector.
        const F s = V::prefix(V::load(pr + b * L), vis - b * L, m[r]);
        const F e = V::prefix(V::exp2(V::sub(s, shift)), vis - b * L, 0.0f);
        V::store_bf16(wr + b * L, e);
        sum = V::add(sum, e);
      }
    }
    V::store(l + r * 16, sum);
  }
}

template <class V, int BITS, int D>
void attend(const Problem& pb, const Item& it, float* scratch) {
  using F = typename V::F;
  constexpr int L = V::L, NG = D / L, HALF = D / 2, NH = HALF / L, NB = TILE / L;
  static_assert(HALF % L == 0 && TILE % L == 0, "head dim and tile must fill the vectors");
  using P = Planes<BITS, D>;

  const int g = pb.gqa, kvh = it.kv_head, bs = pb.block_size;
  const int rows = static_cast<int>(it.num_tokens) * g;
  // Rows [0, tile_rows) in blocks of 16 take their products in bf16 (bf16 models), the others float32 FMAs.
  int tile_rows = 0;
  if constexpr (V::BF16_STEPS) tile_rows = pb.bf16_products ? rows / V::TILE_ROWS * V::TILE_ROWS : 0;
  const ScratchLayout lay(rows, D);
  float* q = scratch + lay.q;
  float* q_turned = scratch + lay.q_turned;
  float* acc = scratch + lay.acc;
  float* m = scratch + lay.m;
  float* l = scratch + lay.l;
  float* alpha = scratch + lay.alpha;
  float* p = scratch + lay.p;
  float* keys = scratch + lay.keys;
  float* values = scratch + lay.values;
  float* value_scale = scratch + lay.value_scale;
  int32_t* visible = reinterpret_cast<int32_t*>(scratch + lay.visible);
  uint32_t* exact_lanes = reinterpret_cast<uint32_t*>(scratch + lay.exact_lanes);
  uint16_t* q16 = reinterpret_cast<uint16_t*>(scratch + lay.q16);
  uint16_t* key_pairs = reinterpret_cast<uint16_t*>(scratch + lay.key_pairs);
  uint16_t* value_pairs = reinterpret_cast<uint16_t*>(scratch + lay.value_pairs);
  float* p_step = scratch + lay.p_step;
  uint16_t* weights = reinterpret_cast<uint16_t*>(scratch + lay.weights);
  int slot = 0;  // the tile's place in the tile rows' softmax step (steps start with a page)
  // Few rows (decodes) take their logits and values straight from the codes; many rows share one dequantized
  // tile. Both give the same bits.
  const bool few_rows = tile_rows == 0 && rows <= Blocks<V>::SCORE_ROWS;
  const bool few_value_rows = tile_rows == 0 && rows <= Blocks<V>::template VALUE_ROWS<NG>;
  for (int c = 0; c < D; ++c) exact_lanes[c] = 0;

  const F logit_scale = V::set1(pb.logit_scale);
  for (int r = 0; r < rows; ++r) {
    const float* src = pb.query + (it.first_token + r / g) * pb.q_stride_token + (kvh * g + r % g) * pb.q_stride_head;
    for (int j = 0; j < NG; ++j) {
      V::store(q + r * D + j * L, V::mul(V::load(src + j * L), logit_scale));
      V::store(acc + r * D + j * L, V::zero());
    }
    for (int i = 0; i < 16; i += L) V::store(l + r * 16 + i, V::zero());
    m[r] = NEG_INF;
  }
  if constexpr (V::BF16_STEPS) {
    if (tile_rows) {
      V::begin_products();
      V::to_bf16(q, q16, tile_rows * D);
    }
  }

  const ChannelCodes<V, BITS, D> value_codes;
  const auto value_book = V::template book<BITS>(pb.value_book);
  const float* key_lut = pb.key_lut + static_cast<int64_t>(kvh) * D * 16;
  const float* offset_cos = pb.offset_rope;                // [HALF, TILE]
  const float* offset_sin = pb.offset_rope + HALF * TILE;  // [HALF, TILE]
  const Sections& sec = pb.sections;
  const int vo = pb.value_outliers;

  const int64_t kv_end = it.first_position + it.num_tokens;  // keys 0 .. kv_end - 1
  const int64_t page_end = std::min<int64_t>(it.page_end, (kv_end + bs - 1) / bs);
  for (int64_t page = it.page_begin; page < page_end; ++page) {
    const uint8_t* seg = pb.pages + static_cast<int64_t>(it.blocks[page]) * pb.page_stride + kvh * pb.head_stride;
    const int64_t page_start = page * bs;
    const int page_tokens = static_cast<int>(std::min<int64_t>(bs, kv_end - page_start));
    int32_t listed;
    std::memcpy(&listed, seg + sec.key_out_count, 4);
    const int count = std::min(std::max(listed, 0), pb.key_capacity);
    const uint16_t* out_pos = reinterpret_cast<const uint16_t*>(seg + sec.key_out_pos);
    const uint16_t* out_val = reinterpret_cast<const uint16_t*>(seg + sec.key_out_val);
    const uint16_t* sink = reinterpret_cast<const uint16_t*>(seg + sec.sink);
    int entry = 0;

    // Whole tiles of a page's sections lie in the page (block_size is a multiple of TILE): the tokens past n in
    // the last tile are read (finite: codes index tables) and masked.
    for (int off = 0; off < page_tokens; off += TILE) {
      const int n = std::min(TILE, page_tokens - off);
      const int64_t t0 = page_start + off;

      const bool sink_tile = pb.sink && t0 == 0;
      const bool from_codes = few_rows && !sink_tile;

      // ---- 1. keys (from_codes: their outliers only, as exact lanes)
      const uint8_t* kcodes = seg + sec.key_codes + off * P::PACKED;
      if (!from_codes) dequantize_keys<V, BITS, D>(kcodes, key_lut, keys);
      const int tile_entries = entry;
      while (entry < count) {  // the head's outliers in (t, d) order: those of this tile come next
        const int position = out_pos[entry];
        const int t = position / D - off;
        if (t >= n) break;
        if (t >= 0) {
          keys[(position % D) * TILE + t] = V::half_to_float(out_val[entry]);
          if (from_codes) exact_lanes[position % D] |= 1u << t;
        }
        ++entry;
      }
      if (sink_tile) {
        for (int c = 0; c < D; ++c) keys[c * TILE] = V::half_to_float(sink[c]);
      }

      // ---- 2. RoPE (from_codes: in score_codes)
      const float* rope = pb.start_rope + t0 / TILE * D;  // cos, sin of the tile start
      for (int c = 0; c < HALF && !from_codes; ++c) {
        F cos_i[NB], sin_i[NB];
        for (int b = 0; b < NB; ++b) {
          cos_i[b] = V::load(offset_cos + c * TILE + b * L);
          sin_i[b] = V::load(offset_sin + c * TILE + b * L);
          float* lo_ptr = keys + c * TILE + b * L;
          float* hi_ptr = keys + (c + HALF) * TILE + b * L;
          const F lo = V::load(lo_ptr), hi = V::load(hi_ptr);
          V::store(lo_ptr, V::fmsub(lo, cos_i[b], V::mul(hi, sin_i[b])));
          V::store(hi_ptr, V::fmadd(hi, cos_i[b], V::mul(lo, sin_i[b])));
        }
      }
      for (int r = tile_rows; r < rows; ++r) {  // R(t0)^T q (tile rows: the keys turn by t0 instead, below)
        for (int h = 0; h < NH; ++h) {
          const F c0 = V::load(rope + h * L), s0 = V::load(rope + HALF + h * L);
          const F lo = V::load(q + r * D + h * L), hi = V::load(q + r * D + HALF + h * L);
          V::store(q_turned + r * D + h * L, V::fmadd(lo, c0, V::mul(hi, s0)));
          V::store(q_turned + r * D + HALF + h * L, V::fmsub(hi, c0, V::mul(lo, s0)));
        }
      }

      // ---- 3. logits and online softmax
      if constexpr (V::BF16_STEPS) {
        if (tile_rows) V::template turned_keys_to_pairs<D>(keys, rope, key_pairs + slot * D * TILE);
      }
      if (from_codes) {
        score_codes_block<V, BITS, D>(rows, kcodes, key_lut, exact_lanes, keys, offset_cos, offset_sin, q_turned, p);
        for (int e = tile_entries; e < entry; ++e) exact_lanes[out_pos[e] % D] = 0;
      } else {
        for (int r0 = tile_rows; r0 < rows; r0 += Blocks<V>::SCORE_ROWS) {
          score_block<V, BITS, D>(std::min(Blocks<V>::SCORE_ROWS, rows - r0), q_turned + r0 * D, keys,
                                  p + r0 * TILE);
        }
      }
      int max_visible = 0;
      for (int r = tile_rows; r < rows; ++r) {
        const int64_t position = it.first_position + r / g;
        const int vis = keys_seen(position, t0, n);
        visible[r] = vis;
        max_visible = std::max(max_visible, vis);
        float* pr = p + r * TILE;
        alpha[r] = 1.0f;
        if (vis == 0) {
          for (int b = 0; b < NB; ++b) V::store(pr + b * L, V::zero());
          continue;
        }
        F s[NB];
        float tile_max = NEG_INF;
        for (int b = 0; b < NB; ++b) {
          s[b] = V::prefix(V::load(pr + b * L), vis - b * L, NEG_INF);
          tile_max = std::max(tile_max, V::hmax(s[b]));
        }
        if (tile_max > m[r]) {
          alpha[r] = std::exp2(m[r] - tile_max);  // 0 for the row's first keys
          m[r] = tile_max;
        }
        const F shift = V::set1(m[r]), a = V::set1(alpha[r]);
        for (int b = 0; b < NB; ++b) {
          // Masked keys enter exp2 as the max, not -inf: 2^-inf would pass through a subnormal, which costs a
          // microcode assist per vector.
          const F e = V::prefix(V::exp2(V::sub(V::prefix(s[b], vis - b * L, m[r]), shift)), vis - b * L, 0.0f);
          V::store(pr + b * L, e);
          float* lr = l + r * 16 + (b * L) % 16;  // a per-lane sum: reduced once, at the end
          V::store(lr, V::fmadd(V::load(lr), a, e));
        }
      }

      // ---- 4. values
      for (int b = 0; b < NB; ++b) {
        const uint16_t* scales = reinterpret_cast<const uint16_t*>(seg + sec.value_scale) + off + b * L;
        const uint16_t* offsets = reinterpret_cast<const uint16_t*>(seg + sec.value_offset) + off + b * L;
        V::store(value_scale + b * L, V::load_half(scales));
        V::store(value_scale + TILE + b * L, V::load_half(offsets));
      }
      if (tile_rows) {  // the last tile row sees the most keys
        max_visible = std::max(max_visible, keys_seen(it.first_position + (tile_rows - 1) / g, t0, n));
      }
      const CodedValues<V, BITS, D> coded{value_codes, value_book, seg + sec.value_codes + off * P::PACKED,
                                          value_scale, seg + sec.value_out_idx + off * vo,
                                          reinterpret_cast<const uint16_t*>(seg + sec.value_out_val) + off * vo, vo};
      auto accumulate_fma_rows = [&](const auto& source) {
        constexpr int VR = Blocks<V>::template VALUE_ROWS<NG>;
        for (int r0 = tile_rows; r0 < rows; r0 += VR) {
          const int rb = std::min(VR, rows - r0);
          int tokens = 0;
          for (int r = r0; r < r0 + rb; ++r) tokens = std::max(tokens, visible[r]);
          if (tokens > 0) accumulate_block<V, D>(rb, tokens, p + r0 * TILE, alpha + r0, source, acc + r0 * D);
        }
      };
      if (few_value_rows && !sink_tile) {
        accumulate_fma_rows(coded);
        continue;
      }
      for (int t = 0; t < max_visible; ++t) {
        F v[NG];
        coded.template vectors<NG>(t, 0, v);
        for (int j = 0; j < NG; ++j) V::store(values + t * D + j * L, v[j]);
      }
      if (sink_tile) {
        for (int j = 0; j < NG; ++j) V::store(values + j * L, V::load_half(sink + D + j * L));
      }
      if constexpr (V::BF16_STEPS) {
        if (tile_rows) {
          for (int t = max_visible; t < TILE; ++t) {  // weight 0, but 0 x NaN is not 0
            for (int j = 0; j < NG; ++j) V::store(values + t * D + j * L, V::zero());
          }
          V::template values_to_pairs<D>(values, slot, value_pairs);
          if (slot == V::STEP_TILES - 1 || off + TILE >= page_tokens) {  // the step is full, or the page ends
            const int keys_in_step = slot * TILE + n, halves = (slot + 2) / 2;
            if (slot % 2 == 0) V::template clear_pairs<D>(slot + 1, value_pairs);
            for (int r0 = 0; r0 < tile_rows; r0 += V::TILE_ROWS) {
              V::template step_scores<D>(q16 + r0 * D, key_pairs, slot + 1, p_step + r0 * V::STEP);
            }
            tile_step<V>(it, g, tile_rows, t0 - slot * TILE, keys_in_step, p_step, weights, m, l, alpha);
            for (int r0 = 0; r0 < tile_rows; r0 += V::TILE_ROWS) {
              V::template tile_accumulate<D>(weights + r0 * V::STEP, halves, alpha + r0, value_pairs, acc + r0 * D,
                                             scratch + lay.partial);
            }
            slot = 0;
          } else {
            ++slot;
          }
        }
      }
      accumulate_fma_rows(TileValues<V, D>{values});
    }
  }

  if constexpr (V::BF16_STEPS) {
    if (tile_rows) V::end_products();
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t token = r / g, head = r % g;
    float* out = it.out + token * it.out_stride_token + head * D;
    float sum = 0.0f;
    for (int i = 0; i < 16; i += L) sum += V::hadd(V::load(l + r * 16 + i));
    const F inv = V::set1(sum > 0.0f ? 1.0f / sum : 0.0f);
    for (int j = 0; j < NG; ++j) V::store(out + j * L, V::mul(V::load(acc + r * D + j * L), inv));
    if (it.max_out != nullptr) {
      it.max_out[token * it.stat_stride_token + head] = m[r];
      it.sum_out[token * it.stat_stride_token + head] = sum;
    }
  }
}

template <class V>
void attend_any(const Problem& pb, const Item& it, float* scratch) {
  switch (pb.head_dim * 10 + pb.bits) {
    case 642: return attend<V, 2, 64>(pb, it, scratch);
    case 643: return attend<V, 3, 64>(pb, it, scratch);
    case 644: return attend<V, 4, 64>(pb, it, scratch);
    case 1282: return attend<V, 2, 128>(pb, it, scratch);
    case 1283: return attend<V, 3, 128>(pb, it, scratch);
    case 1284: return attend<V, 4, 128>(pb, it, scratch);
    case 2562: return attend<V, 2, 256>(pb, it, scratch);
    case 2563: return attend<V, 3, 256>(pb, it, scratch);
    case 2564: return attend<V, 4, 256>(pb, it, scratch);
  }
  // ops.cpp checks head dim and bits before any item runs.
}
