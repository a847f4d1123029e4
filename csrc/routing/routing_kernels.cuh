// Device code of the routing ops (fastcascade/reference.py: route_*, partition, gather_rows,
// scatter_rows, vote). No host sync, no atomics: every output is a function of the inputs alone.
//
// partition is a stable counting sort in three launches: each warp counts the branch ids of its tile
// of 512 rows; one exclusive scan (torch's cumsum) over the (branch, tile) counts gives every
// tile's first slot per branch; each warp then places its rows in order (ranks among equal ids within
// 32 rows by __match_any_sync). Branch ids outside [0, num_branches) go to a last, uncounted bin
// after offsets[-1]: no memory fault and no sync (the Python API raises under FASTCASCADE_CHECK=1).
// gather_rows and scatter_rows are one row-copy kernel parameterised by which side is indexed, with
// the widest vector (up to 16 bytes) that the row length and the pointers allow. Grids, blocks and
// shared bytes come from routing/routing_launch.h. Compiled by nvcc through routing_cuda.cu and by the
// host compiler under the tests' CUDA emulation (tests/emulation/).
#pragma once
#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>

#include "common/device_shared.cuh"
#include "routing/routing_launch.h"
#include "routing/routing_math.h"

namespace fastcascade {

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

// ---------------------------------------------------------------------------------------------
// partition

// One warp per tile of kPartitionTile rows; bin B collects the out-of-range ids. COUNT: writes the tile's
// per-bin counts to table[bin * ntiles + tile]. PLACE: table holds each (bin, tile)'s first slot,
// and each row i goes to order[first + (rows of its bin before it in the tile)].
template <typename idx_t, bool PLACE>
__global__ void __launch_bounds__(kRouteThreads)
partition_tiles_kernel(const idx_t* __restrict__ branch, int64_t N, int64_t B, int64_t ntiles,
                       int64_t* __restrict__ table, int64_t* __restrict__ order) {
  FC_DYNAMIC_SHARED(int32_t, run_smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t nb = B + 1;
  auto run = run_smem + warp * nb;  // rows of each bin seen so far in this tile
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

}  // namespace fastcascade
