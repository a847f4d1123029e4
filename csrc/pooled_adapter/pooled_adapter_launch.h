// Launch arithmetic of the pooled-adapter CUDA kernels (common/launch.h): adapter/adapter_cuda.cu
// launches with it, tests/test_cuda_launch.py sweeps it.
#pragma once
#include "common/launch.h"

namespace fastcascade {

constexpr int64_t kPooledThreads = 256;

// One block per sample; its C- and r-long vectors live in shared memory: [C] pooled, [r] hidden and
// [C] up-projection forward; [C] grad sums, [C] grad of the pooled vector, [r] act and [r] grad of
// the hidden layer backward.
inline LaunchConfig pooled_adapter_launch(int64_t B, int64_t C, int64_t r, int64_t acc_bytes, bool backward,
                                          const DeviceLimits& dev) {
  LaunchConfig cfg;
  cfg.block_x = kPooledThreads;
  cfg.grid_x = B;
  const char* op = backward ? "pooled_adapter_backward" : "pooled_adapter";
  const int64_t need = (2 * C + (backward ? 2 : 1) * r) * acc_bytes;
  if (!fit_shared(cfg, need, dev))
    cfg.error = std::string(op) + " (CUDA): C = " + std::to_string(C) + " and r = " + std::to_string(r) + " need " +
                std::to_string(need) + " bytes of shared memory, more than the " + std::to_string(max_shared(dev)) +
                " a block has on this device; use backend='triton'";
  if (B > kMaxGridX)
    cfg.error = std::string(op) + " (CUDA): at most " + std::to_string(kMaxGridX) + " samples per call, got B = " +
                std::to_string(B);
  return cfg;
}

}  // namespace fastcascade
