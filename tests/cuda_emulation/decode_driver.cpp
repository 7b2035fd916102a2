// The kvquant decode kernels of csrc/kvquant_decode.cuh run on the CPU (cuda_host.h), launched as
// csrc/kvquant_decode.cu launches them: the same parameters, split-K plan and grids. Called from
// tests/test_cuda_kernel_emulated.py through ctypes. Built with -DEMULATED_CASES="X(dtype, head_dim, bits) ..."
// naming the instantiations to compile (each takes a while).
#include <type_traits>
#include <vector>

#include "kvquant_decode.cuh"

struct EmulatedDecode {
  void* out;
  const void* query;
  int64_t query_seq_stride, query_head_stride;
  const uint8_t* cache;
  int64_t page_stride, head_stride;
  const int32_t* block_table;
  int64_t block_table_stride;
  const int32_t* seq_lens;
  const float *key_scale, *key_offset, *key_book, *value_book, *inv_freq;
  double scale;  // softmax scale x RoPE scaling
  int64_t max_seq_len;
  int64_t sections[10];
  int dtype;  // 0 fp16, 1 bf16, 2 fp32
  int head_dim, bits, num_seqs, num_q_heads, num_kv_heads, block_size, key_outlier_capacity, value_outliers, sink;
  int sms;             // the device's SM count that the split-K plan assumes
  int num_partitions;  // out: the plan
};

namespace {

template <typename scalar_t, int HEAD_DIM, int BITS>
void run(EmulatedDecode& e) {
  using G = kvquant::Geometry<HEAD_DIM, BITS>;
  using S = kvquant::SmemLayout<HEAD_DIM, BITS>;
  kvquant::DecodeParams p{};
  p.out = e.out;
  p.query = e.query;
  p.query_seq_stride = e.query_seq_stride;
  p.query_head_stride = e.query_head_stride;
  p.cache = e.cache;
  p.page_stride = e.page_stride;
  p.head_stride = e.head_stride;
  p.block_table = e.block_table;
  p.block_table_stride = e.block_table_stride;
  p.seq_lens = e.seq_lens;
  p.key_scale = e.key_scale;
  p.key_offset = e.key_offset;
  p.key_book = e.key_book;
  p.value_book = e.value_book;
  p.inv_freq = e.inv_freq;
  p.logit_scale = static_cast<float>(e.scale * 1.4426950408889634);
  p.num_q_heads = e.num_q_heads;
  p.num_kv_heads = e.num_kv_heads;
  p.gqa = e.num_q_heads / e.num_kv_heads;
  p.head_groups = (p.gqa + kvquant::MAX_GROUP - 1) / kvquant::MAX_GROUP;
  p.block_size = e.block_size;
  p.key_outlier_capacity = e.key_outlier_capacity;
  p.value_outliers = e.value_outliers;
  p.sink = e.sink != 0;
  p.sections = kvquant::PageSections{e.sections[0], e.sections[1], e.sections[2], e.sections[3], e.sections[4],
                                     e.sections[5], e.sections[6], e.sections[7], e.sections[8], e.sections[9]};
  const int64_t blocks_per_partition = static_cast<int64_t>(p.num_kv_heads) * p.head_groups * e.num_seqs;
  p.partition_tokens = kvquant::plan_partition_tokens(G::TILE, e.max_seq_len, blocks_per_partition, 4L * e.sms);
  p.num_partitions = static_cast<int>(std::max<int64_t>(1, (e.max_seq_len + p.partition_tokens - 1) / p.partition_tokens));
  e.num_partitions = p.num_partitions;
  const size_t parts = static_cast<size_t>(e.num_seqs) * e.num_q_heads * p.num_partitions;
  std::vector<float> tmp_out(parts * HEAD_DIM, NAN), max_logits(parts, NAN), exp_sums(parts, NAN);
  p.tmp_out = tmp_out.data();
  p.max_logits = max_logits.data();
  p.exp_sums = exp_sums.data();

  const emu::Dim3 grid{static_cast<unsigned>(p.num_kv_heads * p.head_groups), static_cast<unsigned>(e.num_seqs),
                       static_cast<unsigned>(p.num_partitions)};
  emu::launch(grid, kvquant::NUM_THREADS, S::BYTES, [&] { kvquant::paged_decode_kernel<scalar_t, HEAD_DIM, BITS>(p); });
  if (p.num_partitions > 1) {
    const emu::Dim3 reduce_grid{static_cast<unsigned>(p.num_q_heads), static_cast<unsigned>(e.num_seqs), 1};
    emu::launch(reduce_grid, kvquant::NUM_THREADS, p.num_partitions * 4,
                [&] { kvquant::paged_decode_reduce_kernel<scalar_t, HEAD_DIM>(p); });
  }
}

}  // namespace

// Returns 0 when the (dtype, head dim, bits) instantiation was compiled in and ran, 1 otherwise.
extern "C" int kvquant_emulated_decode(EmulatedDecode* e) {
  using half = __half;
  using bfloat16 = __nv_bfloat16;
#define X(T, D, B)                                                                                             \
  if (e->dtype == (std::is_same_v<T, half> ? 0 : std::is_same_v<T, bfloat16> ? 1 : 2) && e->head_dim == D && \
      e->bits == B) {                                                                                          \
    run<T, D, B>(*e);                                                                                          \
    return 0;                                                                                                  \
  }
  EMULATED_CASES
#undef X
  return 1;
}

// cos and sin of position * inv_freq as the kernel computes them (its sincos on [-pi, pi] is the host's here).
extern "C" void kvquant_emulated_rope(int64_t position, float inv_freq, float* cos, float* sin) {
  const float2 r = kvquant::rope_cos_sin(position, inv_freq);
  *cos = r.x;
  *sin = r.y;
}
