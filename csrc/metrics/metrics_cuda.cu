// Launch of the metrics ops' CUDA kernel (metrics_kernels.cuh holds the device code): guard, stream,
// launch check. No host sync.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launch.cuh"
#include "metrics/metrics_kernels.cuh"
#include "metrics/metrics_launch.h"
#include "metrics/metrics_math.h"

namespace fastcascade {
namespace {

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
