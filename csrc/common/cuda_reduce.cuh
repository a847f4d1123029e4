// Block-wide reductions shared by the CUDA kernels.
#pragma once
#include "common/device_shared.cuh"
#include "common/launch.h"

namespace fastcascade {

// Sum over the block in a fixed order (warp shuffles, then the warp sums): deterministic. The result
// is valid in thread 0; every thread of the block must call it. Its kWarpSums accumulators are static
// shared memory that every kernel calling it holds (the launch configurations count them).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  FC_SHARED(acc_t, warp_sums, kWarpSums);
#if FC_MUTATION(SHUFFLE_OFFSET)
  for (int o = 8; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);  // mutant: starts at half the offset
#else
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
#endif
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nwarps ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
#if !FC_MUTATION(BLOCK_SUM_SECOND_SYNC)
  __syncthreads();  // warp_sums may be reused by the next call
#endif
  return v;
}

}  // namespace fastcascade
