// Launch of the routing ops' CUDA kernels (routing_kernels.cuh holds the device code and says how
// partition works): guard, stream, the chains between launches, launch checks. No host sync, no atomics.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launch.cuh"
#include "routing/routing_kernels.cuh"
#include "routing/routing_launch.h"
#include "routing/routing_math.h"

namespace fastcascade {
namespace {

// One thread per row over n rows (route_*, vote, partition_offsets).
dim3 rows_grid(int64_t n) { return grid_of(route_rows_launch(n, current_device_limits())); }

at::Tensor route_threshold_cuda(const at::Tensor& logits, double logit_threshold) {
  const int64_t N = check_route_logits_1d(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.reshape({N}).contiguous();
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kInt));
  if (N == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float c32 = round_down_to_float(logit_threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "route_threshold_cuda", [&] {
    route_threshold_kernel<scalar_t><<<rows_grid(N), kRouteThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), N, logit_threshold, c32, out.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor route_argmax_cuda(const at::Tensor& logits) {
  check_route_logits_2d(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kInt));
  if (N == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "route_argmax_cuda", [&] {
    route_argmax_kernel<scalar_t><<<rows_grid(N), kRouteThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), N, C,
                                                                        out.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor route_confident_cuda(const at::Tensor& logits, double temperature, double max_sum) {
  check_route_logits_2d(logits);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kInt));
  if (N == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "route_confident_cuda", [&] {
    route_confident_kernel<scalar_t><<<rows_grid(N), kRouteThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), N, C, temperature, max_sum, out.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// partition

std::tuple<at::Tensor, at::Tensor, at::Tensor> partition_cuda(const at::Tensor& branch_in, int64_t num_branches) {
  check_partition(branch_in, num_branches);
  const c10::cuda::CUDAGuard guard(branch_in.device());
  const at::Tensor branch = branch_in.contiguous();
  const int64_t N = branch.size(0), B = num_branches;
  const auto opts = branch.options().dtype(at::kLong);
  if (N == 0) return {at::empty({0}, opts), at::zeros({B}, opts), at::zeros({B + 1}, opts)};
  const PartitionLaunch L = partition_launch(N, B, current_device_limits());
  if (L.by_sort) {
    // Many branches: a stable device sort of the ids (out-of-range ones as B), bins by binary search.
    const at::Tensor key = at::where((branch >= 0) & (branch < B), branch.to(at::kLong), at::Scalar(B));
    auto [sorted, order] = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor offsets = at::searchsorted(sorted, at::arange(B + 1, opts));
    return {order, offsets.narrow(0, 1, B) - offsets.narrow(0, 0, B), offsets};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t ntiles = L.ntiles;
  const dim3 blocks = grid_of(L.cfg), threads = block_of(L.cfg);
  const size_t smem = dynamic_smem_of(L.cfg);
  at::Tensor table = at::empty({(B + 1) * ntiles}, opts);
  at::Tensor order = at::empty({N}, opts), counts = at::empty({B}, opts), offsets = at::empty({B + 1}, opts);
  AT_DISPATCH_INDEX_TYPES(branch.scalar_type(), "partition_cuda", [&] {
    const index_t* b = branch.const_data_ptr<index_t>();
    partition_tiles_kernel<index_t, false><<<blocks, threads, smem, stream>>>(b, N, B, ntiles,
                                                                               table.mutable_data_ptr<int64_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table = at::cumsum(table, 0).sub_(table);  // exclusive scan in (bin, tile) order
    partition_tiles_kernel<index_t, true><<<blocks, threads, smem, stream>>>(
        b, N, B, ntiles, table.mutable_data_ptr<int64_t>(), order.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  partition_offsets_kernel<<<rows_grid(B + 1), kRouteThreads, 0, stream>>>(
      table.const_data_ptr<int64_t>(), B, ntiles, counts.mutable_data_ptr<int64_t>(), offsets.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {order, counts, offsets};
}

// ---------------------------------------------------------------------------------------------
// gather_rows / scatter_rows: one copy_rows_kernel, with the widest vector the rows and pointers allow

template <typename idx_t>
void launch_copy_rows(const at::Tensor& src, const idx_t* src_idx, at::Tensor& dst, const idx_t* dst_idx, int64_t M,
                      cudaStream_t stream) {
  int64_t row_bytes = src.element_size();
  for (int64_t d = 1; d < src.dim(); ++d) row_bytes *= src.size(d);
  if (M == 0 || row_bytes == 0) return;
  const auto sp = reinterpret_cast<uintptr_t>(src.const_data_ptr()), dp = reinterpret_cast<uintptr_t>(dst.data_ptr());
  const CopyRowsLaunch L = copy_rows_launch(M, row_bytes, int64_t(sp % 16), int64_t(dp % 16), current_device_limits());
  const int64_t row_vecs = L.row_vecs;
  const dim3 block = block_of(L.cfg), grid = grid_of(L.cfg);
  const int64_t src_rows = src.size(0), dst_rows = dst.size(0);
  auto launch = [&](auto vec_tag) {
    using vec_t = decltype(vec_tag);
    copy_rows_kernel<vec_t, idx_t><<<grid, block, 0, stream>>>(
        static_cast<const vec_t*>(src.const_data_ptr()), src_rows, src_idx, static_cast<vec_t*>(dst.data_ptr()),
        dst_rows, dst_idx, M, row_vecs);
  };
  switch (L.vec) {
    case 16: launch(uint4{}); break;
    case 8: launch(uint2{}); break;
    case 4: launch(uint32_t{}); break;
    case 2: launch(uint16_t{}); break;
    default: launch(uint8_t{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_rows_cuda(const at::Tensor& x_in, const at::Tensor& index_in) {
  check_row_index(x_in, "x", index_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), index = index_in.contiguous();
  const int64_t M = index.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = M;
  at::Tensor out = at::empty(shape, x.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "gather_rows_cuda", [&] {
    launch_copy_rows<index_t>(x, index.const_data_ptr<index_t>(), out, nullptr, M, stream);
  });
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& src_in, const at::Tensor& index_in, int64_t num_rows) {
  check_row_index(src_in, "src", index_in);
  TORCH_CHECK(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  TORCH_CHECK(index_in.size(0) == src_in.size(0), "index must have one entry per row of src (", src_in.size(0),
              "), got ", index_in.size(0));
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous(), index = index_in.contiguous();
  std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
  shape[0] = num_rows;
  at::Tensor out = at::zeros(shape, src.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "scatter_rows_cuda", [&] {
    launch_copy_rows<index_t>(src, nullptr, out, index.const_data_ptr<index_t>(), index.size(0), stream);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// vote

std::tuple<at::Tensor, at::Tensor> vote_cuda(const at::Tensor& member_logits, int64_t mode, bool need_probs) {
  check_vote(member_logits, mode);
  const c10::cuda::CUDAGuard guard(member_logits.device());
  const at::Tensor x = member_logits.contiguous();
  const int64_t K = x.size(0), N = x.size(1), C = x.size(2);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor labels = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor sum = at::empty({N, C}, x.options().dtype(acc));
  at::Tensor votes = at::empty({mode == 0 ? N : 0, C}, x.options().dtype(at::kInt));
  if (N > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vote_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      vote_kernel<scalar_t><<<rows_grid(N), kRouteThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), K, N, C, sum.mutable_data_ptr<acc_t>(),
          mode == 0 ? votes.mutable_data_ptr<int32_t>() : nullptr, need_probs, labels.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {labels, need_probs ? sum : at::empty({0, C}, x.options().dtype(acc))};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CUDA, m) {
  m.impl("route_threshold", &route_threshold_cuda);
  m.impl("route_argmax", &route_argmax_cuda);
  m.impl("route_confident", &route_confident_cuda);
  m.impl("partition", &partition_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("vote", &vote_cuda);
}

}  // namespace fastcascade
