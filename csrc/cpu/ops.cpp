// The torch op `kvquant_cpu::paged_attention`: checks, work items, the instruction set chosen at run time, the
// threads (at::parallel_for), and the merge of a decode's context splits. The kernels are in attention_*.cpp.
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
// Query rows (tokens x query heads of a kv head) per prefill work item: the rows share each dequantized tile.
constexpr int PREFILL_ROWS = 48;  // three blocks of AMX tiles

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
    return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("amx-tile") &&
           __builtin_cpu_supports("amx-bf16") && amx_permitted();
  }
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

// The best instruction set of this CPU, or the one asked for ("amx", "avx512", "avx2", "scalar"; "" for the best).
Kernels select_kernels(const std::string& isa) {
  if (isa.empty()) {
    if (cpu_has("amx")) return kernels_amx();
    if (cpu_has("avx512")) return kernels_avx512();
    if (cpu_has("avx2")) return kernels_avx2();
    return kernels_scalar();
  }
  TORCH_CHECK(isa == "amx" || isa == "avx512" || isa == "avx2" || isa == "scalar",
              "kvquant CPU attention: unknown instruction set '", isa, "' (amx, avx512, avx2 or scalar)");
  TORCH_CHECK(cpu_has(isa.c_str()), "kvquant CPU attention: this CPU does not support ", isa);
  if (isa == "amx") return kernels_amx();
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

// Runs every item on at::parallel_for's threads, each thread taking the next item as it finishes one (items
// differ in cost: a prefill block late in a long prompt attends to many more keys than an early one).
void run_items(const Kernels& kernels, const Problem& pb, const std::vector<Item>& items, int64_t max_rows) {
  if (items.empty()) return;
  const int64_t scratch = kernels.scratch_floats(max_rows, pb.head_dim);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(scratch));
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t i = next.fetch_add(1); i < static_cast<int64_t>(items.size()); i = next.fetch_add(1)) {
        kernels.attend(pb, items[i], buffer.data());
      }
    }
  });
}

// out [num_tokens, num_q_heads, D] float32 (written), query [num_tokens, num_q_heads, D] float32 (last dim
// contiguous), pages [num_blocks, page_stride] uint8 (rows contiguous), block_table [num_reqs, max_blocks] int32,
// query_start_loc [num_reqs + 1], seq_lens [num_reqs] (context + chunk; integer), key_scale / key_offset
// [H, D], key_book / value_book [2**bits], inv_freq [D / 2] float32. sections: PageLayout.sections() offsets in
// the order of `Sections`. bf16_products: the model computes in bf16, so products may round to bf16 (AMX tiles).
// num_splits > 1 splits each request's pages (decode only: one query token per request).
void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& pages, const at::Tensor& block_table,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& key_scale,
                     const at::Tensor& key_offset, const at::Tensor& key_book, const at::Tensor& value_book,
                     const at::Tensor& inv_freq, double logit_scale, int64_t bits, int64_t block_size,
                     at::IntArrayRef sections, int64_t head_stride, int64_t key_capacity, int64_t value_outliers,
                     bool sink, bool bf16_products, int64_t num_splits, const std::string& isa) {
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
  check_float(key_book, "key_book", {int64_t{1} << bits});
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
  TORCH_CHECK(num_splits >= 1, "kvquant CPU attention: num_splits must be at least 1");
  TORCH_CHECK(starts[0] == 0 && starts[num_reqs] <= num_tokens, "kvquant CPU attention: query_start_loc must start at "
              "0 and end within the ", num_tokens, " query tokens");

  const Kernels kernels = select_kernels(isa);
  const int64_t gqa = num_q_heads / num_kv_heads;
  std::vector<float> offset_rope(static_cast<size_t>(TILE * d));
  kernels.rope_table(inv_freq.data_ptr<float>(), static_cast<int>(d / 2), offset_rope.data());
  // Each channel's key table, 16 entries (a smaller book repeated): one permute dequantizes a code.
  std::vector<float> key_lut(static_cast<size_t>(num_kv_heads * d * 16));
  const float* scale = key_scale.data_ptr<float>();
  const float* offset = key_offset.data_ptr<float>();
  const float* book = key_book.data_ptr<float>();
  for (int64_t c = 0; c < num_kv_heads * d; ++c) {
    for (int64_t j = 0; j < 16; ++j) key_lut[c * 16 + j] = book[j % (int64_t{1} << bits)] * scale[c] + offset[c];
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
  pb.key_lut = key_lut.data();
  pb.value_book = value_book.data_ptr<float>();
  pb.inv_freq = inv_freq.data_ptr<float>();
  pb.offset_rope = offset_rope.data();
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

  // A decode split into partial results [splits, tokens, q heads, D] with their max and sum, merged below.
  const bool split = num_splits > 1;
  at::Tensor partial, stats;
  if (split) {
    partial = at::empty({num_splits, num_tokens, num_q_heads, d}, query.options());
    stats = at::full({2, num_splits, num_tokens, num_q_heads}, 0.0f, query.options());
    stats[0].fill_(-std::numeric_limits<float>::infinity());
  }

  std::vector<Item> items;
  int64_t max_rows = 0;
  const int64_t block_q = std::max<int64_t>(1, PREFILL_ROWS / gqa);
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
    TORCH_CHECK(!split || q_len == 1, "kvquant CPU attention: num_splits > 1 needs one query token per request");
    const int64_t first_pos = seq_len - q_len;
    for (int64_t q0 = 0; q0 < q_len; q0 += block_q) {
      const int64_t count = std::min(block_q, q_len - q0);
      max_rows = std::max(max_rows, count * gqa);
      const int64_t token = starts[r] + q0;
      const int64_t pages_per_split = (num_pages + num_splits - 1) / num_splits;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        for (int64_t s = 0; s < num_splits && s * pages_per_split < num_pages; ++s) {
          Item it{};
          it.blocks = blocks;
          it.first_token = token;
          it.num_tokens = count;
          it.first_position = first_pos + q0;
          it.page_begin = s * pages_per_split;
          it.page_end = std::min(num_pages, (s + 1) * pages_per_split);
          it.kv_head = static_cast<int>(h);
          it.out_stride_token = out_stride;
          if (split) {
            it.out = partial.data_ptr<float>() + ((s * num_tokens + token) * num_q_heads + h * gqa) * d;
            it.max_out = stats.data_ptr<float>() + (s * num_tokens + token) * num_q_heads + h * gqa;
            it.sum_out = it.max_out + num_splits * num_tokens * num_q_heads;
            it.stat_stride_token = num_q_heads;
          } else {
            it.out = out_ptr + token * out_stride + h * gqa * d;
          }
          items.push_back(it);
        }
      }
    }
  }
  // Longest first, so that the last items to start are short ones.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return (a.first_position + a.num_tokens) * a.num_tokens > (b.first_position + b.num_tokens) * b.num_tokens;
  });
  run_items(kernels, pb, items, max_rows);

  if (split) {  // out = sum_s w_s out_s / sum_s w_s, w_s = sum_s x 2**(max_s - max)
    const float* part = partial.data_ptr<float>();
    const float* maxes = stats.data_ptr<float>();
    const float* sums = maxes + num_splits * num_tokens * num_q_heads;
    const int64_t rows = num_tokens * num_q_heads, split_stride = rows;
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < num_splits; ++s) top = std::max(top, maxes[s * split_stride + row]);
        if (top == -std::numeric_limits<float>::infinity()) continue;  // an empty request: zeros
        float total = 0.0f;
        float* o = out_ptr + row * d;
        for (int64_t s = 0; s < num_splits; ++s) {
          const float m = maxes[s * split_stride + row];
          if (m == -std::numeric_limits<float>::infinity()) continue;
          const float w = sums[s * split_stride + row] * std::exp2(m - top);
          total += w;
          const float* src = part + (s * split_stride + row) * d;
          for (int64_t c = 0; c < d; ++c) o[c] += w * src[c];
        }
        for (int64_t c = 0; c < d; ++c) o[c] /= total;
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY(kvquant_cpu, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor pages, Tensor block_table, Tensor query_start_loc, "
      "Tensor seq_lens, Tensor key_scale, Tensor key_offset, Tensor key_book, Tensor value_book, Tensor inv_freq, "
      "float logit_scale, int bits, int block_size, int[] sections, int head_stride, int key_capacity, "
      "int value_outliers, bool sink, bool bf16_products, int num_splits, str isa) -> ()");
  m.def("best_isa() -> str", &best_isa);
}

TORCH_LIBRARY_IMPL(kvquant_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }

}  // namespace kvquant_cpu
