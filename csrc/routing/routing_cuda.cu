// CUDA kernels of the routing ops (fastcascade/reference.py: route_*, partition, gather_rows,
// scatter_rows, vote). No host sync, no atomics: every output is a function of the inputs alone.
//
// partition is a stable counting sort in three launches: each warp counts the branch ids of its tile
// of 512 rows; one exclusive scan (torch's cumsum) over the (branch, tile) counts gives every
// tile's first slot per branch; each warp then places its rows in order (ranks among equal ids within
// 32 rows by __match_any_sync). Branch ids outside [0, num_branches) go to a last, uncounted bin
// after offsets[-1]: no memory fault and no sync (the Python API raises under FASTCASCADE_CHECK=1).
// gather_rows and scatter_rows are one row-copy kernel parameterised by which side is indexed, with
// the widest vector (up to 16 bytes) that the row length and the pointers allow. Grids, blocks and
// shared bytes come from routing/routing_launch.h.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launch.cuh"
#include "routing/routing_launch.h"
#include "routing/routing_math.h"

namespace fastcascade {
namespace {

// One thread per row over n rows (route_*, vote, partition_offsets).
dim3 rows_grid(int64_t n) { return grid_of(route_rows_launch(n, current_device_limits())); }

// ---------------------------------------------------------------------------------------------
// decisions: one thread per row

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteThreads)
route_threshold_kernel(const scalar_t* __restrict__ x, int64_t N, double c64, float c32, int32_t* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (std::is_same_v<scalar_t, double>) out[i] = x[i] > c64;
    else out[i] = float(x[i]) > c32;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteThreads)
route_argmax_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, int32_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = int32_t(row_argmax<scalar_t, acc_t>(x + i * C, C));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteThreads)
route_confident_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, double temperature, double max_sum,
                       int32_t* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = row_confident(x + i * C, C, temperature, max_sum);
}

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

// One warp per tile of kPartitionTile rows; bin B collects the out-of-range ids. COUNT: writes the tile's
// per-bin counts to table[bin * ntiles + tile]. PLACE: table holds each (bin, tile)'s first slot,
// and each row i goes to order[first + (rows of its bin before it in the tile)].
template <typename idx_t, bool PLACE>
__global__ void __launch_bounds__(kRouteThreads)
partition_tiles_kernel(const idx_t* __restrict__ branch, int64_t N, int64_t B, int64_t ntiles,
                       int64_t* __restrict__ table, int64_t* __restrict__ order) {
  extern __shared__ int32_t run_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t nb = B + 1;
  int32_t* run = run_smem + warp * nb;  // rows of each bin seen so far in this tile
  const int64_t tile = int64_t(blockIdx.x) * kPartitionTileWarps + warp;
  if (tile >= ntiles) return;  // the whole warp: nothing below synchronises the block
  for (int64_t j = lane; j < nb; j += 32) run[j] = 0;
  __syncwarp();
  const int64_t start = tile * kPartitionTile, end = min(N, start + kPartitionTile);
  const unsigned lower = (1u << lane) - 1u;
  for (int64_t base = start; base < end; base += 32) {  // the same trip count for every lane
    const int64_t i = base + lane;
    const bool valid = i < end;
    int bin = -1;
    if (valid) {
      const int64_t v = int64_t(branch[i]);
      bin = (v >= 0 && v < B) ? int(v) : int(B);
    }
    const unsigned peers = __match_any_sync(0xffffffffu, bin);  // lanes holding the same bin
    const int rank = __popc(peers & lower);
    const int before = valid ? run[bin] : 0;
    __syncwarp();
    if (valid && rank == 0) run[bin] = before + __popc(peers);  // one lane per bin updates it
    __syncwarp();
    if (PLACE && valid) order[table[bin * ntiles + tile] + before + rank] = i;
  }
  if (!PLACE)
    for (int64_t j = lane; j < nb; j += 32) table[j * ntiles + tile] = run[j];
}

// offsets[j] = first slot of bin j (tile 0's); counts[j] = offsets[j + 1] - offsets[j].
__global__ void __launch_bounds__(kRouteThreads)
partition_offsets_kernel(const int64_t* __restrict__ first, int64_t B, int64_t ntiles, int64_t* __restrict__ counts,
                         int64_t* __restrict__ offsets) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j <= B; j += int64_t(gridDim.x) * blockDim.x) {
    offsets[j] = first[j * ntiles];
    if (j < B) counts[j] = first[(j + 1) * ntiles] - first[j * ntiles];
  }
}

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
// gather_rows / scatter_rows: dst[dst_idx[i] or i] = src[src_idx[i] or i], rows of row_vecs vectors.
// threadIdx.x walks a row's vectors, threadIdx.y the rows. An out-of-range source row reads as zeros
// (gather); an out-of-range destination row is skipped (scatter): never a memory fault.

template <typename vec_t, typename idx_t>
__global__ void __launch_bounds__(kRouteThreads)
copy_rows_kernel(const vec_t* __restrict__ src, int64_t src_rows, const idx_t* __restrict__ src_idx,
                 vec_t* __restrict__ dst, int64_t dst_rows, const idx_t* __restrict__ dst_idx, int64_t M,
                 int64_t row_vecs) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; i < M; i += int64_t(gridDim.x) * blockDim.y) {
    const int64_t s = src_idx ? int64_t(src_idx[i]) : i, d = dst_idx ? int64_t(dst_idx[i]) : i;
    if (d < 0 || d >= dst_rows) continue;
    const bool ok = s >= 0 && s < src_rows;
    const vec_t* sp = src + s * row_vecs;
    vec_t* dp = dst + d * row_vecs;
    for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) dp[v] = ok ? sp[v] : vec_t{};
  }
}

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
// vote: one thread per row; the summed probabilities live in `sum` (N, C), the votes in (N, C) int32.

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteThreads)
vote_kernel(const scalar_t* __restrict__ x, int64_t K, int64_t N, int64_t C, at::opmath_type<scalar_t>* __restrict__ sum,
            int32_t* __restrict__ votes, bool write_mean, int64_t* __restrict__ labels) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t* p = sum + i * C;
    int32_t* v = votes ? votes + i * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      p[c] = 0;
      if (v) v[c] = 0;
    }
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* row = x + (k * N + i) * C;
      add_softmax<scalar_t, acc_t>(row, C, p);
      if (v) ++v[row_argmax<scalar_t, acc_t>(row, C)];
    }
    labels[i] = vote_pick(p, v, C);
    if (write_mean)
      for (int64_t c = 0; c < C; ++c) p[c] /= acc_t(K);
  }
}

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
