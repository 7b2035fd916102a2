// The torch op `kvquant_cpu::store`: new tokens' post-RoPE keys and values -> their page slots, the arithmetic of
// PagedKVQuant.store (kvquant_vllm/quant/pagestore.py) operation for operation, so it writes the same bytes:
// inverse RoPE, keys normalised per channel (calibrated) and values per token after taking out their top-k
// outliers (distance from the vector's median; ties go to the lower channel, as the Triton store), nearest codebook
// entries, the values' scales and offsets refitted by least squares or moment matching (fixed-point sums, exact in
// any order), codes packed in bit planes, fp16 scales and outliers, the sink at position 0, and each head's key
// outlier list extended first come, first kept.
//
// Portable C++ (no instruction-set pragmas), built with -ffp-contract=off so that no product and sum fuse: every
// operation rounds as torch's does. Tokens run in parallel; the key outlier lists, which depend on the order of the
// tokens of a page, are extended afterwards in the batch's order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace kvquant_cpu {
namespace {

constexpr int NUM_SECTIONS = 10;

// float -> IEEE half, rounding to nearest even (as torch's .half()).
uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return static_cast<uint16_t>(sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u));  // NaN, inf
  if (x >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds past the largest half: inf
  if (x < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (x < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    const uint32_t mantissa = (x & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - static_cast<int>(x >> 23);  // 14 .. 24
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    half += (rest > halfway) | ((rest == halfway) & half & 1u);
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = ((x >> 13) - (112u << 10));  // rebias the exponent 127 -> 15
  const uint32_t rest = x & 0x1FFFu;
  // Rounding without a branch (which would mispredict every other call); a carry into the exponent is right.
  half += (rest > 0x1000u) | ((rest == 0x1000u) & half & 1u);
  return static_cast<uint16_t>(sign | half);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

struct StoreLayout {
  int bits, block_size, d, num_kv_heads, key_capacity, value_outliers, value_refits;
  bool match_moments;
  int64_t head_stride;
  int64_t key_codes, value_codes, value_scale, value_offset, value_out_val, value_out_idx, key_out_val, key_out_pos,
      key_out_count, sink;  // PageLayout.sections() offsets
  bool has_sink;
};

constexpr int MAX_D = 256;
// Partial maxima and minima per vector: reductions in LANES independent lanes vectorize (a float max reduced in one
// accumulator does not, without leave to reorder), and give the same max.
constexpr int LANES = 8;

// Codes of n normalised elements, clamped to [-1, 1] first, each with a book of its own: the number of its book's
// midpoints below it, the nearest entry (torch.bucketize on the midpoints). Midpoint i of element c at
// midpoints[i * stride + c] (planes of midpoints, so that the compares run along the elements, in vectors).
template <int BITS>
void channel_codes(const float* x, int n, const float* midpoints, int64_t stride, uint8_t* codes) {
  float clamped[MAX_D];
  for (int c = 0; c < n; ++c) {
    clamped[c] = std::min(std::max(x[c], -1.0f), 1.0f);
    codes[c] = 0;
  }
  for (int i = 0; i < (1 << BITS) - 1; ++i) {
    for (int c = 0; c < n; ++c) codes[c] += clamped[c] > midpoints[i * stride + c];
  }
}

void channel_codes_of(int bits, const float* x, int n, const float* midpoints, int64_t stride, uint8_t* codes) {
  if (bits == 2) return channel_codes<2>(x, n, midpoints, stride, codes);
  if (bits == 3) return channel_codes<3>(x, n, midpoints, stride, codes);
  channel_codes<4>(x, n, midpoints, stride, codes);
}

// Codes [D] (each < 2**BITS) in bit planes (pack_code_planes) -> out [D * BITS / 8] bytes. Template arguments so
// that the loops unroll.
template <int BITS, int D>
void pack_planes(const uint8_t* codes, uint8_t* out) {
  constexpr int LOW_WIDTH = BITS == 4 ? 4 : 2, LOW_WORDS = D * LOW_WIDTH / 32, HIGH_WORDS = D / 32;
  constexpr uint32_t LOW_MASK = (1u << LOW_WIDTH) - 1;
  uint32_t words[D * BITS / 32] = {};
  // Channel c = k * LOW_WORDS + w sits in word w at bits k * LOW_WIDTH.
  for (int k = 0; k < 32 / LOW_WIDTH; ++k) {
    for (int w = 0; w < LOW_WORDS; ++w) words[w] |= (codes[k * LOW_WORDS + w] & LOW_MASK) << (k * LOW_WIDTH);
  }
  if constexpr (BITS == 3) {  // channel c = k * HIGH_WORDS + w: bit k of high word w
    for (int k = 0; k < 32; ++k) {
      for (int w = 0; w < HIGH_WORDS; ++w) words[LOW_WORDS + w] |= ((codes[k * HIGH_WORDS + w] >> 2) & 1u) << k;
    }
  }
  std::memcpy(out, words, sizeof(words));  // little-endian words, as the planes are defined
}

template <int BITS>
void pack_planes_bits(const uint8_t* codes, int d, uint8_t* out) {
  if (d == 64) return pack_planes<BITS, 64>(codes, out);
  if (d == 128) return pack_planes<BITS, 128>(codes, out);
  pack_planes<BITS, 256>(codes, out);
}

void pack_planes(const uint8_t* codes, int d, int bits, uint8_t* out) {
  if (bits == 2) return pack_planes_bits<2>(codes, d, out);
  if (bits == 3) return pack_planes_bits<3>(codes, d, out);
  pack_planes_bits<4>(codes, d, out);
}

// Batcher's odd-even merge sort network for n inputs (a power of two): the compare-exchange pairs (i < j), in
// order. Built once per n.
const std::vector<std::pair<int, int>>& sort_network(int n) {
  static std::map<int, std::vector<std::pair<int, int>>> networks;
  static std::mutex guard;
  std::lock_guard<std::mutex> lock(guard);
  auto [it, fresh] = networks.try_emplace(n);
  if (fresh) {
    for (int p = 1; p < n; p *= 2) {
      for (int k = p; k >= 1; k /= 2) {
        for (int j = k % p; j + k < n; j += 2 * k) {
          for (int i = 0; i < std::min(k, n - j - k); ++i) {
            if ((i + j) / (2 * p) == (i + j + k) / (2 * p)) it->second.emplace_back(i + j, i + j + k);
          }
        }
      }
    }
  }
  return it->second;
}

// The lower median (element (d - 1) / 2 in sorted order, as torch.median) of each of `count` rows of d floats.
// A sorting network over LANES rows at once, one row per lane: no data-dependent branch (a selection by
// partitioning mispredicts about every other compare on 64 elements, and was most of the store's time).
void lower_medians(const float* rows, int64_t count, int d, float* out) {
  // Vectors of 4 floats (a GCC / Clang extension, for any target with 16-byte vectors), LANES / 4 per wire: the
  // network's min and max as vector operations, which the compiler does not find in a loop over the lanes of two
  // rows that may be the same.
  using Quad = float __attribute__((vector_size(16)));
  constexpr int QUADS = LANES / 4;
  const auto& network = sort_network(d);
  Quad buffer[MAX_D][QUADS];
  for (int64_t r0 = 0; r0 < count; r0 += LANES) {
    const int n = static_cast<int>(std::min<int64_t>(LANES, count - r0));
    for (int c = 0; c < d; ++c) {
      for (int l = 0; l < LANES; ++l) buffer[c][l / 4][l % 4] = rows[(r0 + std::min(l, n - 1)) * d + c];
    }
    for (const auto& [i, j] : network) {
      for (int k = 0; k < QUADS; ++k) {
        const Quad a = buffer[i][k], b = buffer[j][k];
        buffer[i][k] = b < a ? b : a;  // std::min and std::max, lane by lane
        buffer[j][k] = a < b ? b : a;
      }
    }
    for (int l = 0; l < n; ++l) out[r0 + l] = buffer[(d - 1) / 2][l / 4][l % 4];
  }
}

// The refit's fixed-point numbers (kvquant.to_fixed and its constants): x clamped to [-limit, limit] (NaN to limit),
// times a power of two, truncated towards zero. Their sums are exact in any order, so all stores agree.
constexpr float FIT_LIMIT = 4.0f, FIT_ONE = 1048576.0f, ERROR_LIMIT = 1048576.0f, ERROR_ONE = 16777216.0f;

int64_t to_fixed(float x, float limit, float one) {
  x = x < limit ? x : limit;
  x = x > -limit ? x : -limit;
  return static_cast<int64_t>(x * one);
}

// kvquant.inlier_error: the squared error of the inliers (flag 0) of v [d] decoded as book[codes] * scale + offset,
// in units of unit squared, fixed-point.
int64_t inlier_error(const float* v, const uint8_t* flag, const uint8_t* codes, const float* book, float scale,
                     float offset, float unit, int d) {
  int64_t sum = 0;
  for (int c = 0; c < d; ++c) {
    const float error = (v[c] - (book[codes[c]] * scale + offset)) / unit;
    float square = error * error;
    square = square < ERROR_LIMIT ? square : ERROR_LIMIT;  // NaN too
    sum += flag[c] ? 0 : static_cast<int64_t>(square * ERROR_ONE);
  }
  return sum;
}

// kvquant.refit_per_vector for one value vector v [d] with its outlier flags: lines of the inliers, normalised by
// the range fit (normalised [d]), against the decode book at their codes; least squares keeps the codes, scale and
// offset of the lowest inlier squared error, match_moments (slope std(xn) / std(b)) those of the last round that
// fits. book: the decode book [2**bits]; midpoints: its [2**bits - 1].
void refit_values(int bits, int rounds, bool match_moments, const float* v, const uint8_t* flag,
                  const float* normalised, const float* book, const float* midpoints, int d, uint8_t* codes,
                  uint16_t& scale16, uint16_t& offset16) {
  constexpr float INF = std::numeric_limits<float>::infinity();
  const uint16_t range_scale = scale16, range_offset = offset16;
  const float s0 = half_to_float(range_scale), o0 = half_to_float(range_offset);
  int64_t fixed_x[MAX_D], fixed_b[MAX_D], count = 0, sum_x = 0, sum_xx = 0;
  float recoded[MAX_D];
  uint8_t current[MAX_D];
  for (int c = 0; c < d; ++c) {
    fixed_x[c] = flag[c] ? 0 : to_fixed(normalised[c], FIT_LIMIT, FIT_ONE);
    count += flag[c] ? 0 : 1;
    sum_x += fixed_x[c];
    sum_xx += fixed_x[c] * fixed_x[c];
  }
  const int64_t spread_x = count * sum_xx - sum_x * sum_x;
  int64_t best = match_moments ? 0 : inlier_error(v, flag, codes, book, s0, o0, s0, d);
  std::copy(codes, codes + d, current);
  for (int round = 0; round < rounds; ++round) {
    int64_t sum_b = 0, sum_bb = 0, sum_bx = 0;
    for (int c = 0; c < d; ++c) {
      fixed_b[c] = flag[c] ? 0 : to_fixed(book[current[c]], FIT_LIMIT, FIT_ONE);
      sum_b += fixed_b[c];
      sum_bb += fixed_b[c] * fixed_b[c];
      sum_bx += fixed_b[c] * fixed_x[c];
    }
    const int64_t variance = count * sum_bb - sum_b * sum_b, covariance = count * sum_bx - sum_b * sum_x;
    const float slope = match_moments ? std::sqrt(static_cast<float>(spread_x) / static_cast<float>(variance))
                                      : static_cast<float>(covariance) / static_cast<float>(variance);
    uint16_t fit_scale = float_to_half(s0 * slope);
    float s = half_to_float(fit_scale);
    // The best offset for the fp16 scale (kvquant.refit_per_vector's expression, operation for operation).
    const float mean = (static_cast<float>(sum_x) - s / s0 * static_cast<float>(sum_b)) /
                       (static_cast<float>(count) * FIT_ONE);
    uint16_t fit_offset = float_to_half(o0 + s0 * mean);
    float o = half_to_float(fit_offset);
    const bool fits = variance > 0 && s > 0.0f && s < INF && std::fabs(o) < INF;
    if (!fits) {
      fit_scale = range_scale, fit_offset = range_offset, s = s0, o = o0;
    }
    for (int c = 0; c < d; ++c) {
      recoded[c] = (v[c] - o) / s;
      current[c] = 0;
    }
    for (int i = 0; i < (1 << bits) - 1; ++i) {
      for (int c = 0; c < d; ++c) current[c] += recoded[c] > midpoints[i];
    }
    const int64_t error = match_moments ? 0 : inlier_error(v, flag, current, book, s, o, s0, d);
    if (match_moments ? fits : error < best) {
      std::copy(current, current + d, codes);
      scale16 = fit_scale, offset16 = fit_offset, best = error;
    }
  }
}

struct Outlier {
  int64_t token;
  int head, channel;
  uint16_t value;
};

// The dense part of one token: codes, scales, value outliers, sink; its key outliers (in channel order, head by head)
// are returned for the lists.
void store_token(const StoreLayout& lay, uint8_t* page, int offset, int64_t position, const float* key,
                 const float* value, const float* cos, const float* sin, float inverse_gain, const float* key_scale,
                 const float* key_offset, const float* key_mid, const float* value_mid, const float* value_book,
                 const float* value_book_mid, const float* medians, int64_t token, std::vector<Outlier>& outliers) {
  const int d = lay.d, half = d / 2, packed = d * lay.bits / 8;
  float pre[MAX_D], normalised[MAX_D], deviation[MAX_D];
  uint8_t codes[MAX_D];
  alignas(8) uint8_t flag[MAX_D];  // key outliers, then value outliers
  for (int h = 0; h < lay.num_kv_heads; ++h) {
    uint8_t* seg = page + h * lay.head_stride;
    const float* x = key + h * d;
    const float* scale = key_scale + h * d;
    const float* shift = key_offset + h * d;
    // Keys: (x * cos - rotate_half(x) * sin) * inverse_gain, then (k - offset) / scale; halves apart so that the
    // loops have no branch.
    for (int c = 0; c < half; ++c) pre[c] = (x[c] * cos[c] - (-x[c + half]) * sin[c]) * inverse_gain;
    for (int c = half; c < d; ++c) pre[c] = (x[c] * cos[c] - x[c - half] * sin[c]) * inverse_gain;
    for (int c = 0; c < d; ++c) normalised[c] = (pre[c] - shift[c]) / scale[c];
    if (lay.key_capacity > 0 && !(lay.has_sink && position == 0)) {
      // Flags first (a loop that vectorizes), then the flagged channels eight flags at a time: about half the
      // vectors hold an outlier, at channels a branch per channel would mispredict.
      for (int c = 0; c < d; ++c) flag[c] = std::fabs(normalised[c]) > 1.0f;
      for (int c0 = 0; c0 < d; c0 += 8) {
        uint64_t eight;
        std::memcpy(&eight, flag + c0, 8);
        while (eight != 0) {
          const int c = c0 + std::countr_zero(eight) / 8;
          outliers.push_back({token, h, c, float_to_half(pre[c])});
          eight &= eight - 1;  // each flag is one bit
        }
      }
    }
    channel_codes_of(lay.bits, normalised, d, key_mid + h * d, int64_t{lay.num_kv_heads} * d, codes);
    pack_planes(codes, d, lay.bits, seg + lay.key_codes + offset * packed);

    // Values: the k farthest from the median (the lower one of the middle two) are outliers.
    const float* v = value + h * d;
    std::fill(flag, flag + d, uint8_t{0});
    if (lay.value_outliers > 0) {
      const float median = medians[h];
      for (int c = 0; c < d; ++c) deviation[c] = std::fabs(v[c] - median);
    }
    constexpr float INF = std::numeric_limits<float>::infinity();
    for (int e = 0; e < lay.value_outliers; ++e) {  // the largest deviation, then its lowest channel
      float largest[LANES];
      std::fill(largest, largest + LANES, -1.0f);  // below every deviation
      for (int c0 = 0; c0 < d; c0 += LANES) {
        for (int l = 0; l < LANES; ++l) largest[l] = std::max(largest[l], flag[c0 + l] ? -1.0f : deviation[c0 + l]);
      }
      // The first free channel at that deviation; where every free deviation is NaN (top stays -1), the first free
      // channel. One is free: fewer outliers than channels.
      const float top = *std::max_element(largest, largest + LANES);
      int best = 0;
      while (best < d - 1 && (flag[best] || !(deviation[best] == top || top < 0.0f))) ++best;
      flag[best] = 1;
    }
    float highest[LANES], lowest[LANES];  // branch-free: the outliers are rare and anywhere
    std::fill(highest, highest + LANES, -INF);
    std::fill(lowest, lowest + LANES, INF);
    for (int c0 = 0; c0 < d; c0 += LANES) {
      for (int l = 0; l < LANES; ++l) {
        highest[l] = std::max(highest[l], flag[c0 + l] ? -INF : v[c0 + l]);
        lowest[l] = std::min(lowest[l], flag[c0 + l] ? INF : v[c0 + l]);
      }
    }
    const float hi = *std::max_element(highest, highest + LANES), lo = *std::min_element(lowest, lowest + LANES);
    uint16_t offset16 = float_to_half((hi + lo) / 2), scale16 = float_to_half(std::max((hi - lo) / 2, 1e-4f));
    const float value_offset = half_to_float(offset16), value_scale = half_to_float(scale16);
    int e = 0;
    uint16_t* out_val = reinterpret_cast<uint16_t*>(seg + lay.value_out_val) + offset * lay.value_outliers;
    uint8_t* out_idx = seg + lay.value_out_idx + offset * lay.value_outliers;
    for (int c = 0; c < d; ++c) normalised[c] = (v[c] - value_offset) / value_scale;
    channel_codes_of(lay.bits, normalised, d, value_mid, d, codes);
    if (lay.value_refits > 0) {
      refit_values(lay.bits, lay.value_refits, lay.match_moments, v, flag, normalised, value_book, value_book_mid, d,
                   codes, scale16, offset16);
    }
    for (int c = 0; c < d; ++c) {
      if (flag[c]) {  // in channel order, as the stored index list is
        out_idx[e] = static_cast<uint8_t>(c);
        out_val[e] = float_to_half(v[c]);
        ++e;
      }
    }
    pack_planes(codes, d, lay.bits, seg + lay.value_codes + offset * packed);
    reinterpret_cast<uint16_t*>(seg + lay.value_scale)[offset] = scale16;
    reinterpret_cast<uint16_t*>(seg + lay.value_offset)[offset] = offset16;
    if (lay.has_sink && position == 0) {
      uint16_t* sink = reinterpret_cast<uint16_t*>(seg + lay.sink);
      for (int c = 0; c < d; ++c) {
        sink[c] = float_to_half(pre[c]);
        sink[d + c] = float_to_half(v[c]);
      }
    }
  }
}

// pages [num_blocks, page bytes] uint8 (written); key, value [T, H, D] float32 contiguous (key post-RoPE);
// slots, positions [T] int64 (slot = block * block_size + offset, negative = padding); cos, sin [T, D] float32
// (the model's scaled RoPE at the positions); key_scale, key_offset [H, D]; key_book [H, D, 2**bits] (a book per
// channel), value_book [2**bits] float32, the encode codebooks (sorted); value_decode_book [2**bits] float32, the
// values' decode book, which value_refits rounds of least squares (or, match_moments, of moment matching) fit their
// scales and offsets against.
void store(at::Tensor& pages, const at::Tensor& key, const at::Tensor& value, const at::Tensor& slots,
           const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, double inverse_gain,
           const at::Tensor& key_scale, const at::Tensor& key_offset, const at::Tensor& key_book,
           const at::Tensor& value_book, const at::Tensor& value_decode_book, int64_t value_refits,
           bool match_moments, int64_t bits, int64_t block_size, at::IntArrayRef sections, int64_t head_stride,
           int64_t key_capacity, int64_t value_outliers, bool sink) {
  TORCH_CHECK(key.dim() == 3 && key.is_contiguous() && key.scalar_type() == at::kFloat && value.sizes() == key.sizes() &&
                  value.is_contiguous() && value.scalar_type() == at::kFloat,
              "kvquant CPU store: key and value must be contiguous float32 [tokens, kv heads, D] of one shape");
  const int64_t num_tokens = key.size(0), heads = key.size(1), d = key.size(2);
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "kvquant CPU store: head dim ", d, " is not supported (64, 128, 256)");
  TORCH_CHECK(bits >= 2 && bits <= 4, "kvquant CPU store: ", bits, " bits are not supported");
  TORCH_CHECK(value_outliers >= 0 && value_outliers < d, "kvquant CPU store: bad value outlier count");
  for (const at::Tensor* t : {&slots, &positions}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == num_tokens && t->scalar_type() == at::kLong && t->is_contiguous(),
                "kvquant CPU store: slots and positions must be contiguous int64 [", num_tokens, "]");
  }
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) >= num_tokens && t->size(1) == d && t->scalar_type() == at::kFloat &&
                    t->stride(1) == 1,
                "kvquant CPU store: cos and sin must be float32 [tokens, ", d, "]");
  }
  for (const at::Tensor* t : {&key_scale, &key_offset}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({heads, d}) && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "kvquant CPU store: key_scale and key_offset must be contiguous float32 [", heads, ", ", d, "]");
  }
  const int64_t num_codes = int64_t{1} << bits;
  TORCH_CHECK(key_book.sizes() == at::IntArrayRef({heads, d, num_codes}) && key_book.is_contiguous() &&
                  key_book.scalar_type() == at::kFloat,
              "kvquant CPU store: key_book must be contiguous float32 [", heads, ", ", d, ", ", num_codes, "]");
  for (const at::Tensor* t : {&value_book, &value_decode_book}) {
    TORCH_CHECK(t->numel() == num_codes && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "kvquant CPU store: value_book and value_decode_book must be float32 [", num_codes, "]");
  }
  TORCH_CHECK(value_refits >= 0, "kvquant CPU store: value_refits must be >= 0");
  TORCH_CHECK(pages.dim() == 2 && pages.scalar_type() == at::kByte && pages.stride(1) == 1 &&
                  pages.size(1) >= heads * head_stride,
              "kvquant CPU store: pages must be uint8 [num_blocks, page bytes] with rows contiguous");
  TORCH_CHECK(static_cast<int64_t>(sections.size()) == NUM_SECTIONS, "kvquant CPU store: expected ", NUM_SECTIONS,
              " section offsets");
  const StoreLayout lay{static_cast<int>(bits), static_cast<int>(block_size), static_cast<int>(d),
                        static_cast<int>(heads), static_cast<int>(key_capacity), static_cast<int>(value_outliers),
                        static_cast<int>(value_refits), match_moments, head_stride, sections[0], sections[1],
                        sections[2], sections[3], sections[4], sections[5], sections[6], sections[7], sections[8],
                        sections[9], sink};

  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t num_blocks = pages.size(0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slot[t] < num_blocks * block_size, "kvquant CPU store: slot ", slot[t], " is outside the ", num_blocks,
                " pages");
  }
  // Midpoints of the books in planes (see channel_codes): the keys' [2**bits - 1][H * D], the values' one book
  // repeated for each of a vector's channels, [2**bits - 1][D].
  const int64_t channels = heads * d;
  std::vector<float> key_mid(static_cast<size_t>((num_codes - 1) * channels));
  std::vector<float> value_mid(static_cast<size_t>((num_codes - 1) * d));
  const float* key_books = key_book.data_ptr<float>();
  const float* value_books = value_book.data_ptr<float>();
  const float* value_decode = value_decode_book.data_ptr<float>();
  std::vector<float> value_decode_mid(static_cast<size_t>(num_codes - 1));
  for (int64_t i = 0; i + 1 < num_codes; ++i) {
    value_decode_mid[i] = (value_decode[i + 1] + value_decode[i]) / 2;
    for (int64_t c = 0; c < channels; ++c) {
      key_mid[i * channels + c] = (key_books[c * num_codes + i + 1] + key_books[c * num_codes + i]) / 2;
    }
    std::fill_n(value_mid.begin() + i * d, d, (value_books[i + 1] + value_books[i]) / 2);
  }

  // Values' medians first (for the value outliers), then the dense parts, token by token in parallel; each
  // token's key outliers kept for the lists.
  std::vector<float> medians(static_cast<size_t>(num_tokens * heads));
  if (value_outliers > 0) {
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      lower_medians(value.data_ptr<float>() + begin * heads * d, (end - begin) * heads, static_cast<int>(d),
                    medians.data() + begin * heads);
    });
  }
  uint8_t* base = pages.data_ptr<uint8_t>();
  std::vector<std::vector<Outlier>> found(static_cast<size_t>(num_tokens));
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slot[t] < 0) continue;
      uint8_t* page = base + (slot[t] / block_size) * pages.stride(0);
      store_token(lay, page, static_cast<int>(slot[t] % block_size), pos[t], key.data_ptr<float>() + t * heads * d,
                  value.data_ptr<float>() + t * heads * d, cos.data_ptr<float>() + t * cos.stride(0),
                  sin.data_ptr<float>() + t * sin.stride(0), static_cast<float>(inverse_gain),
                  key_scale.data_ptr<float>(), key_offset.data_ptr<float>(), key_mid.data(), value_mid.data(),
                  value_decode, value_decode_mid.data(), medians.data() + t * heads, t, found[t]);
    }
  });
  if (key_capacity == 0) return;

  // Key outlier lists: entries a previous occupant left at offsets >= the first new offset of a page go; the new
  // entries follow in (token, head, channel) order while there is room.
  std::map<int64_t, int64_t> first_new;  // page -> smallest offset written now
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slot[t] < 0) continue;
    auto [it, fresh] = first_new.emplace(slot[t] / block_size, slot[t] % block_size);
    if (!fresh) it->second = std::min(it->second, slot[t] % block_size);
  }
  std::map<int64_t, std::vector<int32_t>> counts;  // page -> per head: entries kept, then added
  for (const auto& [page, first] : first_new) {
    std::vector<int32_t>& c = counts[page];
    c.resize(static_cast<size_t>(heads));
    for (int64_t h = 0; h < heads; ++h) {
      const uint8_t* seg = base + page * pages.stride(0) + h * head_stride;
      int32_t listed;
      std::memcpy(&listed, seg + lay.key_out_count, 4);
      const uint16_t* stored = reinterpret_cast<const uint16_t*>(seg + lay.key_out_pos);
      int32_t kept = 0;
      for (int64_t i = 0; i < key_capacity && i < listed; ++i) kept += stored[i] / d < first;
      c[h] = kept;
    }
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slot[t] < 0) continue;
    const int64_t page = slot[t] / block_size, offset = slot[t] % block_size;
    std::vector<int32_t>& c = counts[page];
    for (const Outlier& o : found[t]) {
      if (c[o.head] >= key_capacity) continue;
      uint8_t* seg = base + page * pages.stride(0) + o.head * head_stride;
      reinterpret_cast<uint16_t*>(seg + lay.key_out_pos)[c[o.head]] = static_cast<uint16_t>(offset * d + o.channel);
      reinterpret_cast<uint16_t*>(seg + lay.key_out_val)[c[o.head]] = o.value;
      ++c[o.head];
    }
  }
  for (const auto& [page, c] : counts) {
    for (int64_t h = 0; h < heads; ++h) {
      std::memcpy(base + page * pages.stride(0) + h * head_stride + lay.key_out_count, &c[h], 4);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvquant_cpu, m) {
  m.def(
      "store(Tensor(a!) pages, Tensor key, Tensor value, Tensor slots, Tensor positions, Tensor cos, Tensor sin, "
      "float inverse_gain, Tensor key_scale, Tensor key_offset, Tensor key_book, Tensor value_book, "
      "Tensor value_decode_book, int value_refits, bool match_moments, int bits, int block_size, int[] sections, "
      "int head_stride, int key_capacity, int value_outliers, bool sink) -> ()");
}

TORCH_LIBRARY_IMPL(kvquant_cpu, CPU, m) { m.impl("store", &store); }

}  // namespace kvquant_cpu
