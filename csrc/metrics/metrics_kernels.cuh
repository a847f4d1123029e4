// Device code of the metrics ops (fastcascade/reference.py: confusion_matrix): compiled by nvcc through
// metrics_cuda.cu and by the host compiler under the tests' CUDA emulation (tests/emulation/).
//
// Integer atomics are exact, so the counts are deterministic whatever the scheduling. Small C: each
// block counts into shared-memory histograms (one per warp when they fit, to spread the atomics of
// few classes), then adds each non-zero cell to the output once. Larger C: atomics on the int64
// output directly. Elements whose ids lie outside [0, C) are skipped (no memory fault, no sync); the
// Python API raises for them under FASTCASCADE_CHECK=1.
#pragma once
#include <cstdint>

#include "common/device_shared.cuh"
#include "metrics/metrics_launch.h"
#include "metrics/metrics_math.h"

namespace fastcascade {

template <typename p_t, typename t_t>
__global__ void __launch_bounds__(kConfusionThreads)
confusion_kernel(const p_t* __restrict__ pred, const t_t* __restrict__ target, int64_t N, int64_t C,
                 bool has_ignore, int64_t ignore, int replicas, unsigned long long* __restrict__ out) {
  FC_DYNAMIC_SHARED(uint32_t, hist);  // replicas x C * C, or unused (replicas == 0: global atomics)
  const int64_t cells = C * C;
  if (replicas > 0) {
#if !FC_MUTATION(HIST_NOT_ZEROED)
    for (int64_t j = threadIdx.x; j < replicas * cells; j += blockDim.x) hist[j] = 0;
#endif
    __syncthreads();
  }
  auto mine = replicas > 0 ? hist + ((threadIdx.x >> 5) % replicas) * cells : nullptr;
  const int64_t step = int64_t(gridDim.x) * blockDim.x * kConfusionUnroll;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x * kConfusionUnroll + threadIdx.x; base < N; base += step) {
    int64_t t[kConfusionUnroll], p[kConfusionUnroll];
#pragma unroll
    for (int u = 0; u < kConfusionUnroll; ++u) {
      const int64_t i = base + int64_t(u) * blockDim.x;
      t[u] = i < N ? int64_t(target[i]) : -1;
      p[u] = i < N ? int64_t(pred[i]) : -1;
    }
#pragma unroll
    for (int u = 0; u < kConfusionUnroll; ++u) {
      const int64_t cell = confusion_cell(t[u], p[u], C, has_ignore, ignore);
      if (cell < 0) continue;
      if (mine) atomicAdd(mine + cell, 1u);
      else atomicAdd(out + cell, 1ull);
    }
  }
  if (replicas > 0) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < cells; j += blockDim.x) {
      unsigned long long s = 0;
      for (int r = 0; r < replicas; ++r) s += hist[r * cells + j];
      if (s) atomicAdd(out + j, s);
    }
  }
}

}  // namespace fastcascade
