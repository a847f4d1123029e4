// Launch arithmetic of the pixel-adapter CUDA kernels (common/launch.h): adapter/pixel_adapter_cuda.cu
// launches with it, tests/test_cuda_launch.py sweeps it.
#pragma once
#include "common/launch.h"

namespace fastcascade {

constexpr int64_t kPixelThreads = 256;
constexpr int64_t kPixelMaxTile = 16;  // positions per block, at most

// One block per tile of positions; the tile's hidden layer lives in shared memory: one [tile][r]
// array forward, three backward, whose kernel also holds a double per thread (red[kPixelThreads]) to
// add its d/ds shares.
struct PixelLaunch {
  LaunchConfig cfg;
  int64_t tile = 0;
};

inline PixelLaunch pixel_adapter_launch(int64_t T, int64_t r, int64_t acc_bytes, bool backward,
                                        const DeviceLimits& dev) {
  PixelLaunch L;
  LaunchConfig& cfg = L.cfg;
  const char* op = backward ? "pixel_adapter_backward" : "pixel_adapter";
  const int64_t per_position = (backward ? 3 : 1) * r * acc_bytes;
  cfg.block_x = kPixelThreads;
  cfg.static_smem = backward ? kPixelThreads * int64_t(sizeof(double)) : 0;
  // As many positions as fit the default budget next to the static bytes; opted in where not even one does.
  int64_t fit = (kDefaultSmemBytes - cfg.static_smem) / per_position;
  if (fit < 1) fit = (max_shared(dev) - cfg.static_smem) / per_position;
  if (fit < 1) {
    cfg.error = std::string(op) + " (CUDA): bottleneck r = " + std::to_string(r) + " is too wide: at most " +
                std::to_string((max_shared(dev) - cfg.static_smem) / (per_position / r)) + " for " +
                acc_dtype_name(acc_bytes) + " x on this device; use backend='triton'";
    return L;
  }
  L.tile = fit < kPixelMaxTile ? fit : kPixelMaxTile;
  fit_shared(cfg, L.tile * per_position, dev);
  cfg.grid_x = ceil_div(T, L.tile);
  if (cfg.grid_x > kMaxGridX)
    cfg.error = std::string(op) + " (CUDA): at most " + std::to_string(kMaxGridX * L.tile) +
                " positions per call at r = " + std::to_string(r) + ", got " + std::to_string(T);
  return L;
}

}  // namespace fastcascade
