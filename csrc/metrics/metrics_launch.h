// Launch arithmetic of the confusion-matrix CUDA kernel (common/launch.h): metrics/metrics_cuda.cu
// launches with it, tests/test_cuda_launch.py sweeps it.
#pragma once
#include "common/launch.h"

namespace fastcascade {

constexpr int64_t kConfusionThreads = 256;
constexpr int64_t kConfusionWarps = kConfusionThreads / 32;
constexpr int64_t kConfusionUnroll = 4;  // elements per thread per step: independent loads in flight

// Grid-stride over the N elements; each block keeps `replicas` (a power of two up to one per warp)
// uint32 copies of the C x C counts in shared memory, as many as fit the default budget, or none
// (global atomics) when one copy does not fit.
struct ConfusionLaunch {
  LaunchConfig cfg;
  int64_t replicas = 0;
};

inline ConfusionLaunch confusion_launch(int64_t N, int64_t C, const DeviceLimits& dev) {
  ConfusionLaunch L;
  const int64_t cells = C * C, counter_bytes = int64_t(sizeof(uint32_t));
  for (int64_t r = kConfusionWarps; r >= 1 && L.replicas == 0; r /= 2)
    if (r * cells * counter_bytes <= kDefaultSmemBytes) L.replicas = r;
  const int64_t per_block = kConfusionThreads * kConfusionUnroll;
  // enough blocks to fill the device; and at least N / 2^31, so no uint32 shared counter can overflow
  const int64_t fill = capped_blocks(N, per_block, 8, dev), floor = (N >> 31) + 1;
  L.cfg.block_x = kConfusionThreads;
  L.cfg.grid_x = fill > floor ? fill : floor;
  L.cfg.dynamic_smem = L.replicas * cells * counter_bytes;
  return L;
}

}  // namespace fastcascade
