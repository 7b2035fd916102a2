// Host side of the kvquant paged decode kernels: argument checks, dispatch over (query dtype,
// head dim, bits), launch, and the torch.library op `kvquant::paged_decode`.
//
// The Python wrapper (kvquant_vllm/kernels/cuda.py) does the user-facing validation and passes the
// page layout (section offsets from PageLayout.sections()); the checks here only keep a direct call
// of the op from reading out of bounds or misinterpreting memory.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kvquant_decode.cuh"

namespace kvquant {
namespace {

constexpr int NUM_SECTIONS = 10;

template <typename scalar_t, int HEAD_DIM, int BITS>
void launch(const DecodeParams& params, int num_seqs, cudaStream_t stream) {
  const DecodeSmem<HEAD_DIM, BITS> smem(params.gqa);
  const auto kernel = paged_decode_kernel<scalar_t, HEAD_DIM, BITS>;
  if (smem.bytes > 48 * 1024) {
    // Large GQA groups need more than the default 48 KiB of dynamic shared memory.
    int device = 0, limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(smem.bytes <= limit, "kvquant paged decode: ", params.gqa, " query heads per kv head need ",
                smem.bytes, " bytes of shared memory, the device has ", limit);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem.bytes));
  }
  kernel<<<dim3(params.num_kv_heads, num_seqs, params.num_partitions), NUM_THREADS, smem.bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (params.num_partitions > 1) {
    paged_decode_reduce_kernel<scalar_t, HEAD_DIM><<<dim3(params.num_q_heads, num_seqs), NUM_THREADS,
                                                     params.num_partitions * sizeof(float), stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, int HEAD_DIM>
void dispatch_bits(int64_t bits, const DecodeParams& params, int num_seqs, cudaStream_t stream) {
  switch (bits) {
    case 2: return launch<scalar_t, HEAD_DIM, 2>(params, num_seqs, stream);
    case 3: return launch<scalar_t, HEAD_DIM, 3>(params, num_seqs, stream);
    case 4: return launch<scalar_t, HEAD_DIM, 4>(params, num_seqs, stream);
  }
  TORCH_CHECK(false, "kvquant paged decode: ", bits, " bits are not supported (2, 3 or 4)");
}

template <typename scalar_t>
void dispatch_head_dim(int64_t head_dim, int64_t bits, const DecodeParams& params, int num_seqs, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return dispatch_bits<scalar_t, 64>(bits, params, num_seqs, stream);
    case 128: return dispatch_bits<scalar_t, 128>(bits, params, num_seqs, stream);
    case 256: return dispatch_bits<scalar_t, 256>(bits, params, num_seqs, stream);
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
// cache [num_blocks, page_stride] uint8 (rows contiguous), block_table [num_seqs, max_blocks] int32,
// seq_lens [num_seqs] int32, key_scale/key_offset [H, D] float32, key_book/value_book [2**bits] float32,
// cos_sin_cache [max_position, D] float32. max_seq_len >= max(seq_lens) sizes the split-K partitions.
void paged_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_table,
                  const at::Tensor& seq_lens, const at::Tensor& key_scale, const at::Tensor& key_offset,
                  const at::Tensor& key_book, const at::Tensor& value_book, const at::Tensor& cos_sin_cache,
                  double scale, int64_t max_seq_len, int64_t bits, int64_t block_size, at::IntArrayRef sections,
                  int64_t key_outlier_capacity, int64_t value_outliers_per_vector, int64_t position_bytes, bool sink,
                  int64_t vector_bytes) {
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
  check_cuda(block_table, "block_table", at::kInt, device);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == num_seqs && block_table.stride(1) == 1,
              "kvquant paged decode: block_table must be [num_seqs, max_blocks] with contiguous rows");
  check_cuda(seq_lens, "seq_lens", at::kInt, device);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == num_seqs && seq_lens.is_contiguous(),
              "kvquant paged decode: seq_lens must be a contiguous [num_seqs]");
  check_float_table(key_scale, "key_scale", {num_kv_heads, head_dim}, device);
  check_float_table(key_offset, "key_offset", {num_kv_heads, head_dim}, device);
  check_float_table(key_book, "key_book", {int64_t{1} << bits}, device);
  check_float_table(value_book, "value_book", {int64_t{1} << bits}, device);
  check_cuda(cos_sin_cache, "cos_sin_cache", at::kFloat, device);
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim && cos_sin_cache.stride(1) == 1,
              "kvquant paged decode: cos_sin_cache must be [max_position, D] with contiguous rows");
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "kvquant paged decode: ", num_q_heads,
              " query heads are not a multiple of ", num_kv_heads, " kv heads");
  TORCH_CHECK(sections.size() == NUM_SECTIONS, "kvquant paged decode: expected ", NUM_SECTIONS, " section offsets");
  // The sink ([2, H, D] fp16) is the last section of a page.
  TORCH_CHECK(block_size > 0 && sections[NUM_SECTIONS - 1] + 4 * num_kv_heads * head_dim <= cache.size(1),
              "kvquant paged decode: cache rows of ", cache.size(1), " bytes are shorter than the page layout");
  TORCH_CHECK(position_bytes == 2 || position_bytes == 4, "kvquant paged decode: position_bytes must be 2 or 4");
  TORCH_CHECK(vector_bytes == 4 || vector_bytes == 8 || vector_bytes == 16,
              "kvquant paged decode: vector_bytes must be 4, 8 or 16");
  TORCH_CHECK(max_seq_len <= block_table.size(1) * block_size && max_seq_len <= cos_sin_cache.size(0),
              "kvquant paged decode: max_seq_len ", max_seq_len, " exceeds the block table or the RoPE cache");
  TORCH_CHECK(num_seqs <= 65535, "kvquant paged decode: at most 65535 sequences per call (grid y), got ", num_seqs);
  if (num_seqs == 0) return;

  const int num_partitions =
      static_cast<int>(std::max<int64_t>(1, (max_seq_len + PARTITION_TOKENS - 1) / PARTITION_TOKENS));
  at::Tensor tmp_out, max_logits, exp_sums;
  if (num_partitions > 1) {
    const auto options = query.options().dtype(at::kFloat);
    tmp_out = at::empty({num_seqs, num_q_heads, num_partitions, head_dim}, options);
    max_logits = at::empty({num_seqs, num_q_heads, num_partitions}, options);
    exp_sums = at::empty({num_seqs, num_q_heads, num_partitions}, options);
  }

  DecodeParams params{};
  params.out = out.data_ptr();
  params.tmp_out = num_partitions > 1 ? tmp_out.data_ptr<float>() : nullptr;
  params.max_logits = num_partitions > 1 ? max_logits.data_ptr<float>() : nullptr;
  params.exp_sums = num_partitions > 1 ? exp_sums.data_ptr<float>() : nullptr;
  params.query = query.data_ptr();
  params.query_seq_stride = query.stride(0);
  params.query_head_stride = query.stride(1);
  params.cache = cache.data_ptr<uint8_t>();
  params.page_stride = cache.stride(0);
  params.block_table = block_table.data_ptr<int32_t>();
  params.block_table_stride = block_table.stride(0);
  params.seq_lens = seq_lens.data_ptr<int32_t>();
  params.key_scale = key_scale.data_ptr<float>();
  params.key_offset = key_offset.data_ptr<float>();
  params.key_book = key_book.data_ptr<float>();
  params.value_book = value_book.data_ptr<float>();
  params.cos_sin = cos_sin_cache.data_ptr<float>();
  params.cos_sin_stride = cos_sin_cache.stride(0);
  params.scale = static_cast<float>(scale);
  params.num_q_heads = static_cast<int>(num_q_heads);
  params.num_kv_heads = static_cast<int>(num_kv_heads);
  params.gqa = static_cast<int>(num_q_heads / num_kv_heads);
  params.num_partitions = num_partitions;
  params.block_size = static_cast<int>(block_size);
  params.key_outlier_capacity = static_cast<int>(key_outlier_capacity);
  params.value_outliers = static_cast<int>(value_outliers_per_vector);
  params.position_bytes = static_cast<int>(position_bytes);
  params.sink = sink;
  params.vector_bytes = static_cast<int>(vector_bytes);
  params.sections = PageSections{sections[0], sections[1], sections[2], sections[3], sections[4],
                                 sections[5], sections[6], sections[7], sections[8], sections[9]};

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int n = static_cast<int>(num_seqs);
  switch (query.scalar_type()) {
    case at::kHalf: return dispatch_head_dim<__half>(head_dim, bits, params, n, stream);
    case at::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(head_dim, bits, params, n, stream);
    case at::kFloat: return dispatch_head_dim<float>(head_dim, bits, params, n, stream);
    default: TORCH_CHECK(false, "kvquant paged decode: query dtype ", query.scalar_type(), " is not supported");
  }
}

}  // namespace
}  // namespace kvquant

// Section offsets are given in PageLayout.sections() order: key_codes, value_codes, value_scale,
// value_offset, value_out_val, value_out_idx, key_out_val, key_out_pos, key_out_count, sink.
TORCH_LIBRARY(kvquant, m) {
  m.def(
      "paged_decode(Tensor(a!) out, Tensor query, Tensor cache, Tensor block_table, Tensor seq_lens, "
      "Tensor key_scale, Tensor key_offset, Tensor key_book, Tensor value_book, Tensor cos_sin_cache, "
      "float scale, int max_seq_len, int bits, int block_size, int[] sections, int key_outlier_capacity, "
      "int value_outliers_per_vector, int position_bytes, bool sink, int vector_bytes) -> ()");
}

TORCH_LIBRARY_IMPL(kvquant, CUDA, m) { m.impl("paged_decode", &kvquant::paged_decode); }
