// Block-wide reductions shared by the CUDA kernels.
#pragma once
#include "common/launch.h"

namespace fastcascade {

// Sum over the block in a fixed order (warp shuffles, then the warp sums): deterministic. The result
// is valid in thread 0; every thread of the block must call it. Its kWarpSums accumulators are static
// shared memory that every kernel calling it holds (the launch configurations count them).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kWarpSums];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nwarps ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // warp_sums may be reused by the next call
  return v;
}

}  // namespace fastcascade
