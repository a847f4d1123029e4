// Launching with a LaunchConfig (common/launch.h) on the current device.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common/launch.h"

namespace fastcascade {

inline DeviceLimits current_device_limits() {
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  return {p->multiProcessorCount, static_cast<int64_t>(p->sharedMemPerBlockOptin)};
}

inline dim3 grid_of(const LaunchConfig& c) {
  return dim3(static_cast<unsigned>(c.grid_x), static_cast<unsigned>(c.grid_y), static_cast<unsigned>(c.grid_z));
}

inline dim3 block_of(const LaunchConfig& c) {
  return dim3(static_cast<unsigned>(c.block_x), static_cast<unsigned>(c.block_y), static_cast<unsigned>(c.block_z));
}

inline size_t dynamic_smem_of(const LaunchConfig& c) { return static_cast<size_t>(c.dynamic_smem); }

// Before launching `kernel` with c: raise the error of a shape c cannot launch, and where c opts in,
// lift the kernel's dynamic shared-memory cap to the whole opt-in budget (one value per kernel, so
// concurrent callers with different shapes never lower it under each other).
template <typename Kernel>
void prepare_launch(Kernel* kernel, const LaunchConfig& c) {
  TORCH_CHECK(c.ok(), c.error);
  if (c.opt_in)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(c.smem_limit - c.static_smem)));
}

}  // namespace fastcascade
