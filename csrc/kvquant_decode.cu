// Host side of the kvquant paged decode kernels: argument checks, the split-K plan, dispatch over (query dtype,
// head dim, bits), launch, and the torch.library op `kvquant::paged_decode`.
//
// The Python wrapper (kvquant_vllm/kernels/cuda.py) does the user-facing validation and passes the page layout
// (section offsets from PageLayout.sections(), head_stride); the checks here keep a direct call of the op from
// reading out of bounds or misinterpreting memory.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>

#include "kvquant_decode.cuh"

// The hash of the sources this library was built from (kvquant_vllm/kernels/cuda_build.py passes it): the Python
// loader reads it from the file to tell a prebuilt library from a stale one without loading it.
#ifndef KVQUANT_SOURCE_HASH
#define KVQUANT_SOURCE_HASH unknown
#endif
#define KVQUANT_STRING(x) KVQUANT_STRING_(x)
#define KVQUANT_STRING_(x) #x
extern "C" __attribute__((used)) const char kvquant_decode_source[] =
    "kvquant-decode-source:" KVQUANT_STRING(KVQUANT_SOURCE_HASH);

namespace kvquant {
namespace {

constexpr int NUM_SECTIONS = 10;
constexpr int BLOCKS_PER_SM = 4;  // the split-K plan aims at this many blocks per SM
constexpr int DEFAULT_SMEM = 48 * 1024;

// Opts the kernel in to `bytes` of dynamic shared memory on `device`, once per process.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, int bytes, int device, std::atomic<uint64_t>& done) {
  if (bytes <= DEFAULT_SMEM || (device < 64 && (done.load() >> device) & 1)) return;
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= limit, "kvquant paged decode: the kernel needs ", bytes, " bytes of shared memory, the device "
              "allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (device < 64) done.fetch_or(uint64_t{1} << device);
}

template <typename scalar_t, int HEAD_DIM, int BITS>
void launch(DecodeParams& params, int64_t max_seq_len, int num_seqs, int device, const at::Tensor& query,
            cudaStream_t stream) {
  using G = Geometry<HEAD_DIM, BITS>;
  using S = SmemLayout<HEAD_DIM, BITS>;
  TORCH_CHECK(params.value_outliers <= G::MAX_VALUE_OUTLIERS, "kvquant paged decode: ", params.value_outliers,
              " value outliers per vector; the kernel holds at most ", G::MAX_VALUE_OUTLIERS, " at head dim ", HEAD_DIM);
  const int64_t blocks_per_partition = static_cast<int64_t>(params.num_kv_heads) * params.head_groups * num_seqs;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  params.partition_tokens = plan_partition_tokens(G::TILE, max_seq_len, blocks_per_partition, int64_t{BLOCKS_PER_SM} * sms);
  params.num_partitions = static_cast<int>(std::max<int64_t>(1, (max_seq_len + params.partition_tokens - 1) /
                                                                    params.partition_tokens));
  TORCH_CHECK(params.num_partitions <= 65535, "kvquant paged decode: too many partitions");
  at::Tensor tmp_out, max_logits, exp_sums;
  if (params.num_partitions > 1) {
    const auto options = query.options().dtype(at::kFloat);
    const int64_t q_heads = params.num_q_heads;
    tmp_out = at::empty({num_seqs, q_heads, params.num_partitions, HEAD_DIM}, options);
    max_logits = at::empty({num_seqs, q_heads, params.num_partitions}, options);
    exp_sums = at::empty({num_seqs, q_heads, params.num_partitions}, options);
    params.tmp_out = tmp_out.data_ptr<float>();
    params.max_logits = max_logits.data_ptr<float>();
    params.exp_sums = exp_sums.data_ptr<float>();
  }

  static std::atomic<uint64_t> opted_in{0};
  const auto kernel = paged_decode_kernel<scalar_t, HEAD_DIM, BITS>;
  allow_shared_memory(kernel, S::BYTES, device, opted_in);
  const dim3 grid(params.num_kv_heads * params.head_groups, num_seqs, params.num_partitions);
  kernel<<<grid, NUM_THREADS, S::BYTES, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (params.num_partitions > 1) {
    const int smem = params.num_partitions * static_cast<int>(sizeof(float));
    static std::atomic<uint64_t> reduce_opted_in{0};
    const auto reduce = paged_decode_reduce_kernel<scalar_t, HEAD_DIM>;
    allow_shared_memory(reduce, smem, device, reduce_opted_in);
    reduce<<<dim3(params.num_q_heads, num_seqs), NUM_THREADS, smem, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, int HEAD_DIM>
void dispatch_bits(int64_t bits, DecodeParams& params, int64_t max_seq_len, int num_seqs, int device,
                   const at::Tensor& query, cudaStream_t stream) {
  switch (bits) {
    case 2: return launch<scalar_t, HEAD_DIM, 2>(params, max_seq_len, num_seqs, device, query, stream);
    case 3: return launch<scalar_t, HEAD_DIM, 3>(params, max_seq_len, num_seqs, device, query, stream);
    case 4: return launch<scalar_t, HEAD_DIM, 4>(params, max_seq_len, num_seqs, device, query, stream);
  }
  TORCH_CHECK(false, "kvquant paged decode: ", bits, " bits are not supported (2, 3 or 4)");
}

template <typename scalar_t>
void dispatch_head_dim(int64_t head_dim, int64_t bits, DecodeParams& params, int64_t max_seq_len, int num_seqs,
                       int device, const at::Tensor& query, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return dispatch_bits<scalar_t, 64>(bits, params, max_seq_len, num_seqs, device, query, stream);
    case 128: return dispatch_bits<scalar_t, 128>(bits, params, max_seq_len, num_seqs, device, query, stream);
    case 256: return dispatch_bits<scalar_t, 256>(bits, params, max_seq_len, num_seqs, device, query, stream);
  }
  TORCH_CHECK(false, "kvquant paged decode: head dim ", head_dim, " is not supported (64, 128 or 256)");
}

void check_cuda(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "kvquant paged decode: ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "kvquant paged decode: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_float_table(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Device& device) {
  check_cuda(t, name, at::kFloat, device);
  TORCH_CHECK(t.sizes() == shape && t.is_contiguous(), "kvquant paged decode: ", name, " must be a contiguous ",
              shape, ", got ", t.sizes());
}

// out [num_seqs, num_q_heads, D] (written), query [num_seqs, num_q_heads, D] (last dim contiguous),
// cache [num_blocks, page_stride] uint8 (rows contiguous, 16-byte aligned), block_table [num_seqs, max_blocks]
// int32, seq_lens [num_seqs] int32, key_scale/key_offset [H, D] float32, key_book [H, D, 2**bits] float32 (a book
// per channel), value_book [2**bits] float32, inv_freq [D / 2] float32. scale: the softmax scale times the RoPE
// scaling factor (keys are rotated by unscaled cos/sin). max_seq_len >= max(seq_lens) plans the split-K partitions.
// head_stride and sections: the page layout.
void paged_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_table,
                  const at::Tensor& seq_lens, const at::Tensor& key_scale, const at::Tensor& key_offset,
                  const at::Tensor& key_book, const at::Tensor& value_book, const at::Tensor& inv_freq, double scale,
                  int64_t max_seq_len, int64_t bits, int64_t block_size, int64_t head_stride,
                  at::IntArrayRef sections, int64_t key_outlier_capacity, int64_t value_outliers_per_vector,
                  bool sink) {
  const at::Device device = query.device();
  TORCH_CHECK(device.is_cuda(), "kvquant paged decode: tensors must be on a CUDA device, got ", device);
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "kvquant paged decode: query must be [num_seqs, heads, D] "
              "with a contiguous last dim");
  const int64_t num_seqs = query.size(0), num_q_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = key_scale.size(0);
  check_cuda(out, "out", query.scalar_type(), device);
  TORCH_CHECK(out.sizes() == query.sizes() && out.is_contiguous(), "kvquant paged decode: out must be a contiguous "
              "tensor of the query's shape");
  check_cuda(cache, "cache", at::kByte, device);
  TORCH_CHECK(cache.dim() == 2 && cache.stride(1) == 1, "kvquant paged decode: cache must be [num_blocks, page bytes]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0 && cache.stride(0) % 16 == 0,
              "kvquant paged decode: cache pages must start at 16-byte aligned addresses");
  check_cuda(block_table, "block_table", at::kInt, device);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == num_seqs && block_table.stride(1) == 1,
              "kvquant paged decode: block_table must be [num_seqs, max_blocks] with contiguous rows");
  check_cuda(seq_lens, "seq_lens", at::kInt, device);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == num_seqs && seq_lens.is_contiguous(),
              "kvquant paged decode: seq_lens must be a contiguous [num_seqs]");
  check_float_table(key_scale, "key_scale", {num_kv_heads, head_dim}, device);
  check_float_table(key_offset, "key_offset", {num_kv_heads, head_dim}, device);
  check_float_table(key_book, "key_book", {num_kv_heads, head_dim, int64_t{1} << bits}, device);
  check_float_table(value_book, "value_book", {int64_t{1} << bits}, device);
  check_float_table(inv_freq, "inv_freq", {head_dim / 2}, device);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "kvquant paged decode: ", num_q_heads,
              " query heads are not a multiple of ", num_kv_heads, " kv heads");
  TORCH_CHECK(sections.size() == NUM_SECTIONS, "kvquant paged decode: expected ", NUM_SECTIONS, " section offsets");
  for (const int64_t offset : sections) {
    TORCH_CHECK(offset >= 0 && offset % 16 == 0, "kvquant paged decode: section offsets must be 16-byte aligned");
  }
  // The sink ([2, D] fp16) is the last section of a head's segment.
  TORCH_CHECK(head_stride % 16 == 0 && sections[NUM_SECTIONS - 1] + 4 * head_dim <= head_stride &&
                  num_kv_heads * head_stride <= cache.size(1),
              "kvquant paged decode: cache rows of ", cache.size(1), " bytes do not hold ", num_kv_heads,
              " head segments of ", head_stride, " bytes");
  TORCH_CHECK(block_size > 0 && block_size % SUB_TILE == 0 && block_size * head_dim <= 65536,
              "kvquant paged decode: the block size must be a multiple of ", SUB_TILE,
              " with block_size x head_dim <= 65536, got ", block_size);
  TORCH_CHECK(key_outlier_capacity >= 0 && value_outliers_per_vector >= 0,
              "kvquant paged decode: outlier counts must be >= 0");
  TORCH_CHECK(max_seq_len >= 0 && max_seq_len <= block_table.size(1) * block_size,
              "kvquant paged decode: max_seq_len ", max_seq_len, " exceeds the block table");
  TORCH_CHECK(num_seqs <= 65535, "kvquant paged decode: at most 65535 sequences per call (grid y), got ", num_seqs);
  if (num_seqs == 0) return;

  DecodeParams params{};
  params.out = out.data_ptr();
  params.query = query.data_ptr();
  params.query_seq_stride = query.stride(0);
  params.query_head_stride = query.stride(1);
  params.cache = cache.data_ptr<uint8_t>();
  params.page_stride = cache.stride(0);
  params.head_stride = head_stride;
  params.block_table = block_table.data_ptr<int32_t>();
  params.block_table_stride = block_table.stride(0);
  params.seq_lens = seq_lens.data_ptr<int32_t>();
  params.key_scale = key_scale.data_ptr<float>();
  params.key_offset = key_offset.data_ptr<float>();
  params.key_book = key_book.data_ptr<float>();
  params.value_book = value_book.data_ptr<float>();
  params.inv_freq = inv_freq.data_ptr<float>();
  params.logit_scale = static_cast<float>(scale * 1.4426950408889634);  // log2(e): the softmax runs on exp2
  params.num_q_heads = static_cast<int>(num_q_heads);
  params.num_kv_heads = static_cast<int>(num_kv_heads);
  params.gqa = static_cast<int>(num_q_heads / num_kv_heads);
  params.head_groups = (params.gqa + MAX_GROUP - 1) / MAX_GROUP;
  params.block_size = static_cast<int>(block_size);
  params.key_outlier_capacity = static_cast<int>(key_outlier_capacity);
  params.value_outliers = static_cast<int>(value_outliers_per_vector);
  params.sink = sink;
  params.sections = PageSections{sections[0], sections[1], sections[2], sections[3], sections[4],
                                 sections[5], sections[6], sections[7], sections[8], sections[9]};

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int n = static_cast<int>(num_seqs), index = device.index();
  switch (query.scalar_type()) {
    case at::kHalf: return dispatch_head_dim<__half>(head_dim, bits, params, max_seq_len, n, index, query, stream);
    case at::kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(head_dim, bits, params, max_seq_len, n, index, query, stream);
    case at::kFloat: return dispatch_head_dim<float>(head_dim, bits, params, max_seq_len, n, index, query, stream);
    default: TORCH_CHECK(false, "kvquant paged decode: query dtype ", query.scalar_type(), " is not supported");
  }
}

}  // namespace
}  // namespace kvquant

// Section offsets are given in PageLayout.sections() order: key_codes, value_codes, value_scale, value_offset,
// value_out_val, value_out_idx, key_out_val, key_out_pos, key_out_count, sink.
TORCH_LIBRARY(kvquant, m) {
  m.def(
      "paged_decode(Tensor(a!) out, Tensor query, Tensor cache, Tensor block_table, Tensor seq_lens, "
      "Tensor key_scale, Tensor key_offset, Tensor key_book, Tensor value_book, Tensor inv_freq, float scale, "
      "int max_seq_len, int bits, int block_size, int head_stride, int[] sections, int key_outlier_capacity, "
      "int value_outliers_per_vector, bool sink) -> ()");
}

TORCH_LIBRARY_IMPL(kvquant, CUDA, m) { m.impl("paged_decode", &kvquant::paged_decode); }
