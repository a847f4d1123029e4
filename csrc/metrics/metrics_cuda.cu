// CUDA kernel of the metrics ops (fastcascade/reference.py: confusion_matrix). No host sync.
//
// Integer atomics are exact, so the counts are deterministic whatever the scheduling. Small C: each
// block counts into shared-memory histograms (one per warp when they fit, to spread the atomics of
// few classes), then adds each non-zero cell to the output once. Larger C: atomics on the int64
// output directly. Elements whose ids lie outside [0, C) are skipped (no memory fault, no sync); the
// Python API raises for them under FASTCASCADE_CHECK=1.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launch.cuh"
#include "metrics/metrics_launch.h"
#include "metrics/metrics_math.h"

namespace fastcascade {
namespace {

template <typename p_t, typename t_t>
__global__ void __launch_bounds__(kConfusionThreads)
confusion_kernel(const p_t* __restrict__ pred, const t_t* __restrict__ target, int64_t N, int64_t C,
                 bool has_ignore, int64_t ignore, int replicas, unsigned long long* __restrict__ out) {
  extern __shared__ uint32_t hist[];  // replicas x C * C, or unused (replicas == 0: global atomics)
  const int64_t cells = C * C;
  if (replicas > 0) {
    for (int64_t j = threadIdx.x; j < replicas * cells; j += blockDim.x) hist[j] = 0;
    __syncthreads();
  }
  uint32_t* mine = replicas > 0 ? hist + ((threadIdx.x >> 5) % replicas) * cells : nullptr;
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

at::Tensor confusion_matrix_cuda(const at::Tensor& pred_in, const at::Tensor& target_in, int64_t num_classes,
                                 std::optional<int64_t> ignore_index) {
  const int64_t N = check_confusion(pred_in, target_in, num_classes);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const int64_t C = num_classes;
  at::Tensor out = at::zeros({C, C}, pred_in.options().dtype(at::kLong));
  if (N == 0) return out;
  const at::Tensor pred = pred_in.contiguous().view({N}), target = target_in.contiguous().view({N});
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ConfusionLaunch L = confusion_launch(N, C, current_device_limits());
  const int replicas = static_cast<int>(L.replicas);
  AT_DISPATCH_INDEX_TYPES(pred.scalar_type(), "confusion_matrix_cuda", [&] {
    using p_t = index_t;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "confusion_matrix_cuda", [&] {
      confusion_kernel<p_t, index_t><<<grid_of(L.cfg), block_of(L.cfg), dynamic_smem_of(L.cfg), stream>>>(
          pred.const_data_ptr<p_t>(), target.const_data_ptr<index_t>(), N, C, ignore_index.has_value(),
          ignore_index.value_or(0), replicas, reinterpret_cast<unsigned long long*>(out.mutable_data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CUDA, m) { m.impl("confusion_matrix", &confusion_matrix_cuda); }

}  // namespace fastcascade
