// Launch arithmetic of the Dice + focal CUDA kernels (common/launch.h): dice/dice_focal_cuda.cu launches
// with it, tests/test_cuda_launch.py sweeps it.
#pragma once
#include "common/launch.h"

namespace fastcascade {

constexpr int64_t kDiceMaxThreads = 256;       // forward threads per block, at most
constexpr int64_t kDiceChunk = 4096;           // pixels per partial: fixed, so partials depend on the shape only
constexpr int64_t kDiceChunksThreads = 128;    // the kernel adding the chunks' partials
constexpr int64_t kDiceBackwardThreads = 256;

// Forward: a (chunk, image) grid; each thread keeps its 2C class sums in column tid of a shared
// [2C][acc_ld] array, next to block_sum's kWarpSums static accumulators. acc_ld = threads + 1: the
// block's final sum reads one class per thread, lanes acc_ld apart, and a stride that is a multiple
// of 32 words puts every lane in the same bank; an odd stride serves 4- and 8-byte sums alike.
struct DiceForwardLaunch {
  LaunchConfig cfg;
  int64_t nchunk = 0, acc_ld = 0;
};

constexpr int64_t dice_acc_ld(int64_t threads) { return threads + 1; }

inline int64_t dice_class_sums_bytes(int64_t C, int64_t threads, int64_t acc_bytes) {
  return 2 * C * dice_acc_ld(threads) * acc_bytes;
}

inline DiceForwardLaunch dice_focal_forward_launch(int64_t B, int64_t C, int64_t S, int64_t acc_bytes,
                                                   const DeviceLimits& dev) {
  DiceForwardLaunch L;
  LaunchConfig& cfg = L.cfg;
  cfg.static_smem = kWarpSums * acc_bytes;
  // The most threads (a power of two, at least a warp) whose sums fit the default budget; one warp,
  // opted in, where even that does not fit: the smallest block gives the most blocks per SM.
  int64_t threads = kDiceMaxThreads;
  while (threads > 32 && cfg.static_smem + dice_class_sums_bytes(C, threads, acc_bytes) > kDefaultSmemBytes)
    threads /= 2;
  L.acc_ld = dice_acc_ld(threads);
  cfg.block_x = threads;
  if (!fit_shared(cfg, dice_class_sums_bytes(C, threads, acc_bytes), dev)) {
    const int64_t most = (max_shared(dev) - cfg.static_smem) / dice_class_sums_bytes(1, 32, acc_bytes);
    cfg.error = "dice_focal (CUDA): at most " + std::to_string(most) + " classes for " + acc_dtype_name(acc_bytes) +
                " logits on this device (" + std::to_string(max_shared(dev)) +
                " bytes of shared memory per block), got C = " + std::to_string(C) + "; use backend='triton'";
  }
  L.nchunk = ceil_div(S, kDiceChunk);
  cfg.grid_x = L.nchunk;
  cfg.grid_y = B;
  if (B > kMaxGridYZ)
    cfg.error = "dice_focal (CUDA): at most " + std::to_string(kMaxGridYZ) + " images per call, got B = " +
                std::to_string(B);
  return L;
}

// The chunks' partials of each image added in order: one block per image.
inline LaunchConfig dice_focal_chunks_launch(int64_t B) {
  LaunchConfig cfg;
  cfg.block_x = kDiceChunksThreads;
  cfg.grid_x = B;
  return cfg;
}

// Backward: one thread per pixel, grid-stride, at most 8 blocks per SM.
inline LaunchConfig dice_focal_backward_launch(int64_t B, int64_t S, const DeviceLimits& dev) {
  LaunchConfig cfg;
  cfg.block_x = kDiceBackwardThreads;
  cfg.grid_x = capped_blocks(B * S, kDiceBackwardThreads, 8, dev);
  return cfg;
}

}  // namespace fastcascade
