// The torch op `kvquant_cpu::paged_attention`: checks, work items, the instruction set chosen at run time, the
// threads (at::parallel_for), and the merge of context splits. The kernels are in attention_*.cpp.
//
// The Python wrapper (kvquant_vllm/kernels/cpu.py) validates what a user passes and fills the page layout from
// PageLayout; the checks here keep a direct call of the op from reading out of bounds.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "attention.h"

// The hash of the sources this library was built from (kvquant_vllm/kernels/cpu_build.py passes it): the Python
// loader reads it from the file to tell a prebuilt library from a stale one without loading it.
#ifndef KVQUANT_SOURCE_HASH
#define KVQUANT_SOURCE_HASH unknown
#endif
#define KVQUANT_STRING(x) KVQUANT_STRING_(x)
#define KVQUANT_STRING_(x) #x
extern "C" __attribute__((used)) const char kvquant_cpu_source[] = "kvquant-cpu-source:" KVQUANT_STRING(KVQUANT_SOURCE_HASH);

namespace kvquant_cpu {
namespace {

constexpr int NUM_SECTIONS = 10;
// A prefill work item's keys and values are dequantized and rotated once per item and tile, and its rows (tokens x
// query heads of a kv head) share them. Rows that take their products in bf16 (a bf16 model: AMX tiles, or
// AVX512-BF16 dot products) cost so little that the dequantization dominates unless many rows share it: up to
// TILE_PREFILL_ROWS, while their state (about 1.4 KB per row at head dim 64) stays in the L2 cache. Rows of FMA
// products keep theirs in L1: FMA_PREFILL_ROWS.
constexpr int TILE_PREFILL_ROWS = 768;
constexpr int FMA_PREFILL_ROWS = 48;
constexpr int ITEMS_PER_THREAD = 4;
// Tokens per item are a multiple of 16 (one block of bf16 rows), so that which rows take their products in bf16
// depends on the chunk alone, not on the block size that the thread count chooses.
constexpr int PREFILL_TOKEN_STEP = 16;

// Linux gives a process AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); torch and
// vLLM ask too, asking again is harmless.
bool amx_permitted() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
#else
  return false;
#endif
}

bool cpu_has(const char* isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::strcmp(isa, "amx") == 0) {
    return cpu_has("avx512bf16") && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
           amx_permitted();
  }
  if (std::strcmp(isa, "avx512bf16") == 0) return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
  if (std::strcmp(isa, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("avx2");
  }
  if (std::strcmp(isa, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
#endif
  return std::strcmp(isa, "scalar") == 0;
}

// The best instruction set of this CPU, or the one asked for ("amx", "avx512bf16", "avx512", "avx2", "scalar"; ""
// for the best).
Kernels select_kernels(const std::string& isa) {
  if (isa.empty()) {
    if (cpu_has("amx")) return kernels_amx();
    if (cpu_has("avx512bf16")) return kernels_avx512bf16();
    if (cpu_has("avx512")) return kernels_avx512();
    if (cpu_has("avx2")) return kernels_avx2();
    return kernels_scalar();
  }
  TORCH_CHECK(isa == "amx" || isa == "avx512bf16" || isa == "avx512" || isa == "avx2" || isa == "scalar",
              "kvquant CPU attention: unknown instruction set '", isa, "' (amx, avx512bf16, avx512, avx2 or scalar)");
  TORCH_CHECK(cpu_has(isa.c_str()), "kvquant CPU attention: this CPU does not support ", isa);
  if (isa == "amx") return kernels_amx();
  if (isa == "avx512bf16") return kernels_avx512bf16();
  if (isa == "avx512") return kernels_avx512();
  if (isa == "avx2") return kernels_avx2();
  return kernels_scalar();
}

std::string best_isa() { return select_kernels("").isa; }

void check_float(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.sizes() == shape && t.is_contiguous(),
              "kvquant CPU attention: ", name, " must be a contiguous float32 CPU tensor of shape ", shape, ", got ",
              t.scalar_type(), " ", t.sizes());
}

std::vector<int64_t> to_vector(const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == size, "kvquant CPU attention: ", name,
              " must be a 1-D CPU tensor of ", size, " entries, got ", t.sizes());
  const at::Tensor v = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(v.data_ptr<int64_t>(), v.data_ptr<int64_t>() + size);
}

// Where a request whose context attends in splits keeps its partial results (offsets in floats).
struct SplitRequest {
  int64_t num_splits = 0;  // ceil(pages / split_pages); the buffers below only when > 1
  int64_t partial = 0;     // into the partial outputs: [num_splits, query tokens, q heads, D]
  int64_t stats = 0;       // into the stats: [2 (max, sum), num_splits, query tokens, q heads]
};

// Runs every item on at::parallel_for's threads, each thread taking the next item as it finishes one (items
// differ in cost: a prefill block late in a long prompt attends to many more keys than an early one).
void run_items(const Kernels& kernels, const Problem& pb, const std::vector<Item>& items, int64_t max_rows) {
  if (items.empty()) return;
  const int64_t scratch = kernels.scratch_floats(max_rows, pb.head_dim);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    // On a cache line (std::vector aligns to 16 bytes only): the kernels' vectors and tile rows are 64 bytes.
    std::vector<float> buffer(static_cast<size_t>(scratch + 16));
    float* aligned = buffer.data() + (16 - reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float) % 16) % 16;
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t i = next.fetch_add(1); i < static_cast<int64_t>(items.size()); i = next.fetch_add(1)) {
        kernels.attend(pb, items[i], aligned);
      }
    }
  });
}

// Query tokens per prefill work item: the largest multiple of PREFILL_TOKEN_STEP within TILE_PREFILL_ROWS rows (bf16
// products) or FMA_PREFILL_ROWS that still leaves ITEMS_PER_THREAD items (counted before context splits) for
// each of torch's threads.
int64_t prefill_block_tokens(const std::vector<int64_t>& starts, int64_t num_kv_heads, int64_t gqa, bool tiles) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t rows = tiles ? TILE_PREFILL_ROWS : FMA_PREFILL_ROWS;
  int64_t block = std::max<int64_t>(PREFILL_TOKEN_STEP, rows / gqa / PREFILL_TOKEN_STEP * PREFILL_TOKEN_STEP);
  auto items = [&](int64_t tokens_per_item) {
    int64_t n = 0;
    for (size_t r = 0; r + 1 < starts.size(); ++r) {
      n += (starts[r + 1] - starts[r] + tokens_per_item - 1) / tokens_per_item;
    }
    return n * num_kv_heads;
  };
  while (block > PREFILL_TOKEN_STEP && items(block) < ITEMS_PER_THREAD * threads) block -= PREFILL_TOKEN_STEP;
  return block;
}

// out [num_tokens, num_q_heads, D] float32 (written), query [num_tokens, num_q_heads, D] float32 (last dim
// contiguous), pages [num_blocks, page_stride] uint8 (rows contiguous), block_table [num_reqs, max_blocks] int32,
// query_start_loc [num_reqs + 1], seq_lens [num_reqs] (context + chunk; integer), key_scale / key_offset
// [H, D], key_book [H, D, 2**bits] (a decode codebook per channel), value_book [2**bits], inv_freq [D / 2]
// float32. sections: PageLayout.sections() offsets in the order of `Sections`. bf16_products: the model computes
// in bf16, so products may round to bf16 (Kernels::bf16_steps).
// split_pages: a context of more pages attends in splits of that many pages, merged.
void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& pages, const at::Tensor& block_table,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& key_scale,
                     const at::Tensor& key_offset, const at::Tensor& key_book, const at::Tensor& value_book,
                     const at::Tensor& inv_freq, double logit_scale, int64_t bits, int64_t block_size,
                     at::IntArrayRef sections, int64_t head_stride, int64_t key_capacity, int64_t value_outliers,
                     bool sink, bool bf16_products, int64_t split_pages, const std::string& isa) {
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == at::kFloat && query.dim() == 3 && query.stride(2) == 1,
              "kvquant CPU attention: query must be a float32 CPU tensor [tokens, heads, D] with its last dim "
              "contiguous, got ", query.scalar_type(), " ", query.sizes());
  const int64_t num_tokens = query.size(0), num_q_heads = query.size(1), d = query.size(2);
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "kvquant CPU attention: head dim ", d, " is not supported (64, 128, 256)");
  TORCH_CHECK(bits >= 2 && bits <= 4, "kvquant CPU attention: ", bits, " bits are not supported (2, 3 or 4)");
  TORCH_CHECK(block_size > 0 && block_size % TILE == 0, "kvquant CPU attention: block size ", block_size,
              " is not a multiple of ", TILE);
  TORCH_CHECK(key_scale.dim() == 2, "kvquant CPU attention: key_scale must be [kv heads, D]");
  const int64_t num_kv_heads = key_scale.size(0);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "kvquant CPU attention: ", num_q_heads,
              " query heads are not a multiple of ", num_kv_heads, " kv heads");
  check_float(out, "out", query.sizes());
  check_float(key_scale, "key_scale", {num_kv_heads, d});
  check_float(key_offset, "key_offset", {num_kv_heads, d});
  check_float(key_book, "key_book", {num_kv_heads, d, int64_t{1} << bits});
  check_float(value_book, "value_book", {int64_t{1} << bits});
  check_float(inv_freq, "inv_freq", {d / 2});
  TORCH_CHECK(pages.device().is_cpu() && pages.scalar_type() == at::kByte && pages.dim() == 2 && pages.stride(1) == 1,
              "kvquant CPU attention: pages must be a uint8 CPU tensor [num_blocks, page bytes] with rows contiguous");
  TORCH_CHECK(pages.size(1) >= num_kv_heads * head_stride, "kvquant CPU attention: pages hold ", pages.size(1),
              " bytes, the layout needs ", num_kv_heads * head_stride);
  TORCH_CHECK(static_cast<int64_t>(sections.size()) == NUM_SECTIONS, "kvquant CPU attention: expected ", NUM_SECTIONS,
              " section offsets, got ", sections.size());
  for (int64_t offset : sections) {
    TORCH_CHECK(offset >= 0 && offset < head_stride, "kvquant CPU attention: section offset ", offset,
                " outside the head segment of ", head_stride, " bytes");
  }
  TORCH_CHECK(block_table.device().is_cpu() && block_table.scalar_type() == at::kInt && block_table.dim() == 2 &&
                  block_table.stride(1) == 1,
              "kvquant CPU attention: block_table must be an int32 CPU tensor [requests, max blocks], rows contiguous");
  const int64_t num_reqs = block_table.size(0);
  const std::vector<int64_t> starts = to_vector(query_start_loc, "query_start_loc", num_reqs + 1);
  const std::vector<int64_t> lengths = to_vector(seq_lens, "seq_lens", num_reqs);
  TORCH_CHECK(split_pages >= 1, "kvquant CPU attention: split_pages must be at least 1");
  TORCH_CHECK(starts[0] == 0 && starts[num_reqs] <= num_tokens, "kvquant CPU attention: query_start_loc must start at "
              "0 and end within the ", num_tokens, " query tokens");

  const Kernels kernels = select_kernels(isa);
  const int64_t gqa = num_q_heads / num_kv_heads;
  // RoPE's cos and sin, made once per call (they cost a tenth of a decode per tile): of the offsets within a tile,
  // and of every tile start that a request reaches.
  const int64_t max_len = lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
  const int64_t rope_tiles = (max_len + TILE - 1) / TILE;
  // Tables as tensors: on cache lines (torch's CPU allocator aligns to 64 bytes), as the kernels' vector loads are.
  const at::Tensor offset_rope = at::empty({TILE * d}, query.options());
  const at::Tensor start_rope = at::empty({rope_tiles * d}, query.options());
  kernels.rope_tables(inv_freq.data_ptr<float>(), static_cast<int>(d / 2), rope_tiles, offset_rope.data_ptr<float>(),
                      start_rope.data_ptr<float>());
  // Each channel's key table, 16 entries (a smaller book repeated): one permute dequantizes a code.
  const int64_t codes = int64_t{1} << bits;
  const at::Tensor key_lut_table = at::empty({num_kv_heads * d * 16}, query.options());
  float* key_lut = key_lut_table.data_ptr<float>();
  const float* scale = key_scale.data_ptr<float>();
  const float* offset = key_offset.data_ptr<float>();
  const float* book = key_book.data_ptr<float>();
  for (int64_t c = 0; c < num_kv_heads * d; ++c) {
    for (int64_t j = 0; j < 16; ++j) key_lut[c * 16 + j] = book[c * codes + j % codes] * scale[c] + offset[c];
  }

  Problem pb{};
  pb.bits = static_cast<int>(bits);
  pb.head_dim = static_cast<int>(d);
  pb.block_size = static_cast<int>(block_size);
  pb.num_kv_heads = static_cast<int>(num_kv_heads);
  pb.gqa = static_cast<int>(gqa);
  pb.pages = pages.data_ptr<uint8_t>();
  pb.page_stride = pages.stride(0);
  pb.head_stride = head_stride;
  pb.sections = {sections[0], sections[1], sections[2], sections[3], sections[4],
                 sections[5], sections[6], sections[7], sections[8], sections[9]};
  pb.key_capacity = static_cast<int>(key_capacity);
  pb.value_outliers = static_cast<int>(value_outliers);
  pb.sink = sink;
  pb.key_lut = key_lut;
  pb.value_book = value_book.data_ptr<float>();
  pb.inv_freq = inv_freq.data_ptr<float>();
  pb.offset_rope = offset_rope.data_ptr<float>();
  pb.start_rope = start_rope.data_ptr<float>();
  pb.logit_scale = static_cast<float>(logit_scale);
  pb.bf16_products = bf16_products;
  pb.query = query.data_ptr<float>();
  pb.q_stride_token = query.stride(0);
  pb.q_stride_head = query.stride(1);

  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t num_blocks = pages.size(0), max_blocks = block_table.size(1);
  float* out_ptr = out.data_ptr<float>();
  const int64_t out_stride = num_q_heads * d;
  out.zero_();  // rows of empty requests stay 0

  // A context of more than split_pages pages attends in splits of split_pages pages, into partial results with
  // their max and sum, merged below in split order. The splits are fixed page ranges of the request's own context,
  // the same for a decode token and for the rows of a prefill chunk: what a row computes depends on its request
  // alone, never on the batch around it, the chunking of its prompt or the thread count.
  std::vector<SplitRequest> splits(static_cast<size_t>(num_reqs));
  int64_t partial_floats = 0, stat_floats = 0;
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t q_len = starts[r + 1] - starts[r], seq_len = lengths[r];
    TORCH_CHECK(q_len >= 0, "kvquant CPU attention: query_start_loc must not decrease");
    if (q_len == 0 || seq_len == 0) continue;
    TORCH_CHECK(seq_len >= q_len, "kvquant CPU attention: request ", r, " has ", q_len, " query tokens but seq_len ",
                seq_len);
    const int64_t num_pages = (seq_len + block_size - 1) / block_size;
    TORCH_CHECK(num_pages <= max_blocks, "kvquant CPU attention: request ", r, " needs ", num_pages,
                " blocks, the block table holds ", max_blocks);
    const int32_t* blocks = table + r * block_table.stride(0);
    for (int64_t i = 0; i < num_pages; ++i) {
      TORCH_CHECK(blocks[i] >= 0 && blocks[i] < num_blocks, "kvquant CPU attention: block id ", blocks[i],
                  " of request ", r, " is outside the ", num_blocks, " pages");
    }
    SplitRequest& sr = splits[r];
    sr.num_splits = (num_pages + split_pages - 1) / split_pages;
    if (sr.num_splits > 1) {
      sr.partial = partial_floats;
      sr.stats = stat_floats;
      partial_floats += sr.num_splits * q_len * num_q_heads * d;
      stat_floats += 2 * sr.num_splits * q_len * num_q_heads;
    }
  }
  // partial [splits, q_len, q heads, D] and stats [2 (max, sum), splits, q_len, q heads] of each split request;
  // a split that a row does not reach keeps max -inf and is skipped by the merge.
  const at::Tensor partial = at::empty({partial_floats}, query.options());
  const at::Tensor stats = at::full({stat_floats}, -std::numeric_limits<float>::infinity(), query.options());

  std::vector<Item> items;
  int64_t max_rows = 0;
  const bool tiles = bf16_products && kernels.bf16_steps;  // tile rows (attend)
  const int64_t block_q = prefill_block_tokens(starts, num_kv_heads, gqa, tiles);
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t q_len = starts[r + 1] - starts[r], seq_len = lengths[r];
    if (q_len == 0 || seq_len == 0) continue;
    const SplitRequest& sr = splits[r];
    const int64_t first_pos = seq_len - q_len;
    for (int64_t q0 = 0; q0 < q_len; q0 += block_q) {
      const int64_t count = std::min(block_q, q_len - q0);
      max_rows = std::max(max_rows, count * gqa);
      const int64_t token = starts[r] + q0;
      const int64_t pages_seen = (first_pos + q0 + count + block_size - 1) / block_size;  // by the block's last row
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        for (int64_t s = 0; s * split_pages < pages_seen; ++s) {
          Item it{};
          it.blocks = table + r * block_table.stride(0);
          it.first_token = token;
          it.num_tokens = count;
          it.first_position = first_pos + q0;
          it.page_begin = s * split_pages;
          it.page_end = std::min(pages_seen, (s + 1) * split_pages);
          it.kv_head = static_cast<int>(h);
          if (sr.num_splits > 1) {
            const int64_t row = (s * q_len + q0) * num_q_heads + h * gqa;
            it.out = partial.data_ptr<float>() + sr.partial + row * d;
            it.out_stride_token = num_q_heads * d;
            it.max_out = stats.data_ptr<float>() + sr.stats + row;
            it.sum_out = it.max_out + sr.num_splits * q_len * num_q_heads;
            it.stat_stride_token = num_q_heads;
          } else {
            it.out = out_ptr + token * out_stride + h * gqa * d;
            it.out_stride_token = out_stride;
          }
          items.push_back(it);
        }
      }
    }
  }
  // Most keys first, so that the last items to start are short ones (the order changes no result).
  auto keys_attended = [block_size](const Item& it) {
    const int64_t end = std::min(it.page_end * block_size, it.first_position + it.num_tokens);
    return (end - it.page_begin * block_size) * it.num_tokens;
  };
  std::stable_sort(items.begin(), items.end(),
                   [&](const Item& a, const Item& b) { return keys_attended(a) > keys_attended(b); });
  run_items(kernels, pb, items, max_rows);

  // out = sum_s w_s out_s / sum_s w_s, w_s = sum_s x 2**(max_s - max), over the splits in order; a row that only
  // its first split reaches takes that split's result as it is, as it would unsplit.
  at::parallel_for(0, num_reqs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const SplitRequest& sr = splits[r];
      if (sr.num_splits <= 1) continue;
      const int64_t rows = (starts[r + 1] - starts[r]) * num_q_heads;  // a split's rows, [q_len, q heads]
      const float* part = partial.data_ptr<float>() + sr.partial;
      const float* maxes = stats.data_ptr<float>() + sr.stats;
      const float* sums = maxes + sr.num_splits * rows;
      for (int64_t row = 0; row < rows; ++row) {
        float* o = out_ptr + (starts[r] * num_q_heads + row) * d;
        float top = -std::numeric_limits<float>::infinity();
        int64_t live = 0;
        for (int64_t s = 0; s < sr.num_splits; ++s) {
          const float m = maxes[s * rows + row];
          live += m != -std::numeric_limits<float>::infinity();
          top = std::max(top, m);
        }
        if (live == 1) {  // split 0, the only one a row before the second split sees
          std::memcpy(o, part + row * d, static_cast<size_t>(d) * sizeof(float));
          continue;
        }
        float total = 0.0f;
        for (int64_t s = 0; s < sr.num_splits; ++s) {
          const float m = maxes[s * rows + row];
          if (m == -std::numeric_limits<float>::infinity()) continue;
          const float w = sums[s * rows + row] * std::exp2(m - top);
          total += w;
          const float* src = part + (s * rows + row) * d;
          for (int64_t c = 0; c < d; ++c) o[c] += w * src[c];
        }
        for (int64_t c = 0; c < d; ++c) o[c] /= total;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(kvquant_cpu, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor pages, Tensor block_table, Tensor query_start_loc, "
      "Tensor seq_lens, Tensor key_scale, Tensor key_offset, Tensor key_book, Tensor value_book, Tensor inv_freq, "
      "float logit_scale, int bits, int block_size, int[] sections, int head_stride, int key_capacity, "
      "int value_outliers, bool sink, bool bf16_products, int split_pages, str isa) -> ()");
  m.def("best_isa() -> str", &best_isa);
}

TORCH_LIBRARY_IMPL(kvquant_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }

}  // namespace kvquant_cpu
