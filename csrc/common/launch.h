// Launch configurations as plain host arithmetic (no CUDA types). Each kernel family's <op>_launch.h
// computes what its .cu launches with (block, grid, shared bytes, whether it opts in to more shared
// memory) from the shape and a DeviceLimits; the same headers are compiled in every build, CPU-only
// too, and exposed as fastcascade._C._launch_config, so tests sweep every shape the ops accept
// against the hardware limits without a GPU. The .cu files launch with these numbers and nothing else.
#pragma once
#include <cstdint>
#include <string>

namespace fastcascade {

// Limits of a CUDA launch on every architecture fastcascade builds for (sm_70 and later).
constexpr int64_t kMaxBlockThreads = 1024;
constexpr int64_t kMaxGridX = 2147483647;         // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kDefaultSmemBytes = 48 * 1024;  // static + dynamic shared bytes per block without opting in

// block_sum's (common/cuda_reduce.cuh) shared partials: one per warp of the largest block. Kernels that
// call it hold kWarpSums accumulators of static shared memory.
constexpr int64_t kWarpSums = kMaxBlockThreads / 32;

// What a launch depends on in the device it runs on (cudaDeviceProp).
struct DeviceLimits {
  int64_t sms;         // multiProcessorCount
  int64_t smem_optin;  // sharedMemPerBlockOptin: static + dynamic shared bytes a block may use after opting in
};

struct LaunchConfig {
  int64_t block_x = 1, block_y = 1, block_z = 1;
  int64_t grid_x = 1, grid_y = 1, grid_z = 1;
  int64_t static_smem = 0;                  // the kernel's __shared__ arrays
  int64_t dynamic_smem = 0;                 // the launch's shared-memory argument
  int64_t smem_limit = kDefaultSmemBytes;   // the per-block budget static + dynamic was sized against
  bool opt_in = false;  // smem_limit is the device's opt-in one: the .cu raises the kernel's
                        // cudaFuncAttributeMaxDynamicSharedMemorySize to smem_limit - static_smem first
  std::string error;    // not empty: this shape cannot be launched, and the op raises this message

  int64_t threads() const { return block_x * block_y * block_z; }
  bool ok() const { return error.empty(); }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared bytes `need` on top of the kernel's static ones: the default budget when they fit, else the
// device's opt-in one. Returns false when neither holds them.
inline bool fit_shared(LaunchConfig& cfg, int64_t need, const DeviceLimits& dev) {
  cfg.dynamic_smem = need;
  cfg.opt_in = cfg.static_smem + need > kDefaultSmemBytes;
  cfg.smem_limit = cfg.opt_in ? dev.smem_optin : kDefaultSmemBytes;
  return cfg.static_smem + need <= cfg.smem_limit;
}

// The larger of the default and opt-in budgets: what the widest shape may use.
inline int64_t max_shared(const DeviceLimits& dev) {
  return dev.smem_optin > kDefaultSmemBytes ? dev.smem_optin : kDefaultSmemBytes;
}

// Grid-stride kernels: enough blocks for `items` at `per_block` each, at most `waves` per SM, at least one.
inline int64_t capped_blocks(int64_t items, int64_t per_block, int64_t waves, const DeviceLimits& dev) {
  const int64_t blocks = ceil_div(items, per_block), cap = dev.sms * waves;
  return blocks < 1 ? 1 : (blocks < cap ? blocks : cap);
}

// "float64" or "float32, float16 or bfloat16": the logits dtypes behind an accumulator width.
inline const char* acc_dtype_name(int64_t acc_bytes) {
  return acc_bytes == 8 ? "float64" : "float32, float16 or bfloat16";
}

}  // namespace fastcascade
