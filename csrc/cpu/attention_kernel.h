// Paged attention straight from kvquant pages (layout version 2, kvquant_vllm/quant/paged.py), generic over the
// vector operations V (simd_avx512.h, simd_avx2.h, simd_scalar.h). Included once per instruction set, inside an
// anonymous namespace, so that every function here has internal linkage in the translation unit that compiles it
// for its instruction set.
//
// One call of attend() serves one work item (attention.h `Item`): the g query heads of one kv head for a run of
// query tokens of one request (a decode token, or a block of a prefill chunk), as rows = tokens x g, over a range
// of the request's pages, walked in tiles of TILE tokens with an online softmax in base 2:
//   1. keys of the tile: codes unpacked from their bit planes, looked up in the codebook (one permute per L
//      channels), scaled and offset per channel (calibrated), the head's listed key outliers written over their
//      elements (the list is in token order: one cursor per page), the sink at position 0; then rotated by RoPE
//      at their positions t0 + i, with cos and sin of (t0 + i) x inv_freq composed from those of t0 (exact
//      angle, per tile) and of i (a per-call table);
//   2. logits of every row against the tile (L tokens at a time, their dot products summed across lanes in one
//      transposed reduction), causal mask, running max and denominator per row;
//   3. values of the tile (per-token fp16 scale and offset, the vector's outliers, the sink) accumulated into
//      the rows' outputs.
// Nothing is allocated: the rows' state and the tile's keys and values live in the caller's scratch.
#pragma once

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Codes of one packed vector (pack_code_planes): the low plane (2 bits; 4 for 4-bit codes) of W 32-bit words,
// where channel c is bits [(c / W) * width, +width) of word c % W, then for 3-bit codes a 1-bit plane likewise.
template <class V, int BITS, int D>
struct Codes {
  using I = typename V::I;
  static constexpr int L = V::L, NG = D / L;
  static constexpr int LOW_WIDTH = BITS == 4 ? 4 : 2;
  static constexpr int LOW_WORDS = D * LOW_WIDTH / 32, HIGH_WORDS = D / 32;
  static constexpr int PACKED = D * BITS / 8;  // bytes per vector
  I low_shift[NG], high_shift[NG];              // per lane of channel group j: (c / W) * width

  Codes() {
    for (int j = 0; j < NG; ++j) {
      const I channel = V::add_i(V::iota(), V::set1_i(j * L));
      low_shift[j] = plane_shift<LOW_WORDS, LOW_WIDTH>(channel);
      high_shift[j] = plane_shift<HIGH_WORDS, 1>(channel);
    }
  }

  template <int W, int WIDTH>
  static I plane_shift(I channel) {
    const I word_round = V::template srli<log2(W)>(channel);
    return V::template slli<log2(WIDTH)>(word_round);
  }

  static constexpr int log2(int x) { return x <= 1 ? 0 : 1 + log2(x / 2); }

  // Words of a plane for channel group j: lane l holds the word of channel j * L + l.
  template <int W>
  static I words(const uint8_t* plane, int j) {
    if constexpr (W >= L) {
      return V::load_words(plane + 4 * ((j * L) % W));
    } else {
      return V::template pattern<W>(plane);
    }
  }

  // Codes of channels [j * L, j * L + L) of the vector at `vec` in the low bits of each lane (bits above may hold
  // other channels' bits: codebook lookups ignore them).
  I code(const uint8_t* vec, int j) const {
    I c = V::srlv(words<LOW_WORDS>(vec, j), low_shift[j]);
    if constexpr (BITS == 3) {
      c = V::merge3(c, V::srlv(words<HIGH_WORDS>(vec + 4 * LOW_WORDS, j), high_shift[j]));
    }
    return c;
  }
};

// Scratch layout of one item (floats): queries and outputs of the rows, their softmax state, one tile's logits,
// keys and values, and the tile's RoPE and value scales.
struct ScratchLayout {
  int64_t q, acc, m, l, alpha, p, keys, values, rope, value_scale, visible, total;
  ScratchLayout(int64_t rows, int d) {
    q = 0;
    acc = q + rows * d;
    m = acc + rows * d;
    l = m + rows;
    alpha = l + rows;
    p = alpha + rows;
    keys = p + rows * TILE;
    values = keys + TILE * d;
    rope = values + TILE * d;
    value_scale = rope + d;
    visible = value_scale + 2 * TILE;  // int32 per row, in float slots
    total = visible + rows;
  }
};

int64_t scratch_floats(int64_t rows, int head_dim) { return ScratchLayout(rows, head_dim).total; }

template <class V>
void rope_table(const float* inv_freq, int half, float* table) {
  for (int i = 0; i < TILE; ++i) V::sincos(inv_freq, i, half, table + i * 2 * half, table + i * 2 * half + half);
}

template <class V, int BITS, int D>
void attend(const Problem& pb, const Item& it, float* scratch) {
  using F = typename V::F;
  constexpr int L = V::L, NG = D / L, HALF = D / 2, NH = HALF / L, NB = TILE / L;
  constexpr int CHUNK = NG < 8 ? NG : 8;  // output vectors held in registers while values stream by
  static_assert(HALF % L == 0 && TILE % L == 0 && NG % CHUNK == 0, "head dim and tile must fill the vectors");
  using CodesT = Codes<V, BITS, D>;
  constexpr int PACKED = CodesT::PACKED;

  const int g = pb.gqa, kvh = it.kv_head, bs = pb.block_size;
  const int64_t rows = it.num_tokens * g;
  const ScratchLayout lay(rows, D);
  float* q = scratch + lay.q;
  float* acc = scratch + lay.acc;
  float* m = scratch + lay.m;
  float* l = scratch + lay.l;
  float* alpha = scratch + lay.alpha;
  float* p = scratch + lay.p;
  float* keys = scratch + lay.keys;
  float* values = scratch + lay.values;
  float* rope = scratch + lay.rope;
  float* value_scale = scratch + lay.value_scale;
  int32_t* visible = reinterpret_cast<int32_t*>(scratch + lay.visible);

  const F logit_scale = V::set1(pb.logit_scale);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = pb.query + (it.first_token + r / g) * pb.q_stride_token + (kvh * g + r % g) * pb.q_stride_head;
    for (int j = 0; j < NG; ++j) {
      V::store(q + r * D + j * L, V::mul(V::load(src + j * L), logit_scale));
      V::store(acc + r * D + j * L, V::zero());
    }
    m[r] = NEG_INF;
    l[r] = 0.0f;
  }

  const CodesT codes;
  const auto key_book = V::template book<BITS>(pb.key_book);
  const auto value_book = V::template book<BITS>(pb.value_book);
  const float* key_scale = pb.key_scale + kvh * D;
  const float* key_offset = pb.key_offset + kvh * D;
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

    for (int off = 0; off < page_tokens; off += TILE) {
      const int n = std::min(TILE, page_tokens - off);
      const int64_t t0 = page_start + off;

      // ---- keys: dequantized pre-RoPE, outliers and sink in place, then rotated to their positions.
      const uint8_t* key_codes = seg + sec.key_codes + off * PACKED;
      for (int t = 0; t < n; ++t) {
        for (int j = 0; j < NG; ++j) {
          const F k = V::template lookup<BITS>(key_book, codes.code(key_codes + t * PACKED, j));
          V::store(keys + t * D + j * L, V::fmadd(k, V::load(key_scale + j * L), V::load(key_offset + j * L)));
        }
      }
      for (int t = n; t < TILE; ++t) {  // past the last key: finite values that the mask drops
        for (int j = 0; j < NG; ++j) V::store(keys + t * D + j * L, V::zero());
      }
      while (entry < count) {  // the head's outliers in (t, d) order: those of this tile come next
        const int position = out_pos[entry];
        const int t = position / D - off;
        if (t >= n) break;
        if (t >= 0) keys[t * D + position % D] = V::half_to_float(out_val[entry]);
        ++entry;
      }
      if (pb.sink && t0 == 0) {
        for (int j = 0; j < NG; ++j) V::store(keys + j * L, V::load_half(sink + j * L));
      }
      V::sincos(pb.inv_freq, t0, HALF, rope, rope + HALF);
      for (int t = 0; t < n; ++t) {
        const float* offset_rope = pb.tile_rope + t * D;  // cos, sin of t x inv_freq
        for (int h = 0; h < NH; ++h) {
          const F c0 = V::load(rope + h * L), s0 = V::load(rope + HALF + h * L);
          const F ci = V::load(offset_rope + h * L), si = V::load(offset_rope + HALF + h * L);
          const F cos_t = V::fmsub(c0, ci, V::mul(s0, si)), sin_t = V::fmadd(s0, ci, V::mul(c0, si));
          float* lo_ptr = keys + t * D + h * L;
          const F lo = V::load(lo_ptr), hi = V::load(lo_ptr + HALF);
          V::store(lo_ptr, V::fmsub(lo, cos_t, V::mul(hi, sin_t)));
          V::store(lo_ptr + HALF, V::fmadd(hi, cos_t, V::mul(lo, sin_t)));
        }
      }

      // ---- logits and online softmax, row by row.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t position = it.first_position + r / g;
        const int vis = static_cast<int>(std::min<int64_t>(std::max<int64_t>(position - t0 + 1, 0), n));
        visible[r] = vis;
        if (vis == 0) continue;
        const float* qr = q + r * D;
        F s[NB];
        float tile_max = NEG_INF;
        for (int b = 0; b < NB; ++b) {
          F part[L];
          for (int i = 0; i < L; ++i) part[i] = V::zero();
          for (int j = 0; j < NG; ++j) {
            const F qj = V::load(qr + j * L);
            for (int i = 0; i < L; ++i) {
              part[i] = V::fmadd(qj, V::load(keys + (b * L + V::lane_order[i]) * D + j * L), part[i]);
            }
          }
          s[b] = V::prefix(V::hsum_lanes(part), vis - b * L, NEG_INF);
          tile_max = std::max(tile_max, V::hmax(s[b]));
        }
        float a = 1.0f;
        if (tile_max > m[r]) {
          a = std::exp2(m[r] - tile_max);  // 0 for the row's first keys
          m[r] = tile_max;
        }
        alpha[r] = a;
        const F shift = V::set1(m[r]);
        float sum = 0.0f;
        for (int b = 0; b < NB; ++b) {
          const F e = V::prefix(V::exp2(V::sub(s[b], shift)), vis - b * L, 0.0f);
          V::store(p + r * TILE + b * L, e);
          sum += V::hadd(e);
        }
        l[r] = l[r] * a + sum;
      }

      // ---- values: dequantized per token, outliers and sink in place.
      const uint8_t* value_codes = seg + sec.value_codes + off * PACKED;
      for (int b = 0; b < NB; ++b) {  // off + TILE <= block_size: whole tiles of the sections are in the page
        V::store(value_scale + b * L, V::load_half(reinterpret_cast<const uint16_t*>(seg + sec.value_scale) + off + b * L));
        V::store(value_scale + TILE + b * L,
                 V::load_half(reinterpret_cast<const uint16_t*>(seg + sec.value_offset) + off + b * L));
      }
      for (int t = 0; t < n; ++t) {
        const F scale = V::set1(value_scale[t]), offset = V::set1(value_scale[TILE + t]);
        for (int j = 0; j < NG; ++j) {
          const F v = V::template lookup<BITS>(value_book, codes.code(value_codes + t * PACKED, j));
          V::store(values + t * D + j * L, V::fmadd(v, scale, offset));
        }
        const uint8_t* idx = seg + sec.value_out_idx + (off + t) * vo;
        const uint16_t* val = reinterpret_cast<const uint16_t*>(seg + sec.value_out_val) + (off + t) * vo;
        for (int e = 0; e < vo; ++e) values[t * D + std::min<int>(idx[e], D - 1)] = V::half_to_float(val[e]);
      }
      if (pb.sink && t0 == 0) {
        for (int j = 0; j < NG; ++j) V::store(values + j * L, V::load_half(sink + D + j * L));
      }

      // ---- outputs: rescaled by the change of the running max, plus the tile's weighted values.
      for (int64_t r = 0; r < rows; ++r) {
        const int vis = visible[r];
        if (vis == 0) continue;
        const F a = V::set1(alpha[r]);
        const float* pr = p + r * TILE;
        for (int j0 = 0; j0 < NG; j0 += CHUNK) {
          F o[CHUNK];
          for (int j = 0; j < CHUNK; ++j) o[j] = V::mul(V::load(acc + r * D + (j0 + j) * L), a);
          for (int t = 0; t < vis; ++t) {
            const F pt = V::set1(pr[t]);
            for (int j = 0; j < CHUNK; ++j) o[j] = V::fmadd(pt, V::load(values + t * D + (j0 + j) * L), o[j]);
          }
          for (int j = 0; j < CHUNK; ++j) V::store(acc + r * D + (j0 + j) * L, o[j]);
        }
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = r / g, head = r % g;
    float* out = it.out + token * it.out_stride_token + head * D;
    const F inv = V::set1(l[r] > 0.0f ? 1.0f / l[r] : 0.0f);
    for (int j = 0; j < NG; ++j) V::store(out + j * L, V::mul(V::load(acc + r * D + j * L), inv));
    if (it.max_out != nullptr) {
      it.max_out[token * it.stat_stride_token + head] = m[r];
      it.sum_out[token * it.stat_stride_token + head] = l[r];
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
