// Launch arithmetic of the focal-loss CUDA kernels (common/launch.h): focal/focal_cuda.cu launches with
// it, tests/test_cuda_launch.py sweeps it.
#pragma once
#include "common/launch.h"

namespace fastcascade {

constexpr int64_t kFocalThreads = 256;
constexpr int64_t kFocalFinalThreads = 1024;
constexpr int64_t kFocalWaves = 8;  // blocks per SM, at most: the partials' count depends on the shape and device only

// An elementwise pass: grid-stride over work items, one partial per block from block_sum<acc_t>.
inline LaunchConfig focal_pass_launch(int64_t work_items, int64_t acc_bytes, const DeviceLimits& dev) {
  LaunchConfig cfg;
  cfg.block_x = kFocalThreads;
  cfg.grid_x = capped_blocks(work_items, kFocalThreads, kFocalWaves, dev);
  cfg.static_smem = kWarpSums * acc_bytes;
  return cfg;
}

// Sigmoid focal over N elements: sized as 4 elements per thread whatever the dtype's vector width,
// so the grid, and the bits of the sum, do not depend on the alignment path.
inline LaunchConfig sigmoid_focal_launch(int64_t N, int64_t acc_bytes, const DeviceLimits& dev) {
  return focal_pass_launch(ceil_div(N, 4), acc_bytes, dev);
}

// Softmax focal: one thread per row (o, s).
inline LaunchConfig softmax_focal_launch(int64_t R, int64_t acc_bytes, const DeviceLimits& dev) {
  return focal_pass_launch(R, acc_bytes, dev);
}

// One block adds the partials in double (block_sum<double>).
inline LaunchConfig focal_finalize_launch() {
  LaunchConfig cfg;
  cfg.block_x = kFocalFinalThreads;
  cfg.static_smem = kWarpSums * int64_t(sizeof(double));
  return cfg;
}

}  // namespace fastcascade
