// Launch of the pooled residual adapter's CUDA kernels (pooled_adapter_kernels.cuh holds the device code):
// guard, stream, the kernels, the weight gradients as two GEMMs (at::mm), launch checks.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/adapter_checks.h"
#include "pooled_adapter/pooled_adapter_kernels.cuh"
#include "pooled_adapter/pooled_adapter_launch.h"
#include "common/adapter_math.h"
#include "common/cuda_launch.cuh"

namespace fastcascade {
namespace {

template <typename T>
at::Tensor acc_copy(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<T>::value).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_adapter_cuda(const at::Tensor& x, const at::Tensor& down_w,
                                                                   const at::Tensor& down_b, const at::Tensor& up_w,
                                                                   const at::Tensor& up_b,
                                                                   const std::optional<at::Tensor>& scale,
                                                                   int64_t activation, double dropout, int64_t seed) {
  const AdapterShape D = check_pooled_adapter(x, "x", down_w, up_w, activation);
  const AdapterDropout drop = adapter_dropout(dropout, seed);
  TORCH_CHECK(down_b.numel() == D.r && up_b.numel() == D.C, "down_b must have r = ", D.r, " and up_b C = ", D.C,
              " elements, got ", down_b.numel(), " and ", up_b.numel());
  check_same_device(x, "x", down_b, "down_b");
  check_same_device(x, "x", up_b, "up_b");
  check_adapter_scale(scale, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor pooled = at::empty({D.B, D.C}, x.options().dtype(acc));
  at::Tensor hidden = at::empty({D.B, D.r}, x.options().dtype(acc));
  if (D.B == 0) return {y, pooled, hidden};
  const LaunchConfig cfg = pooled_adapter_launch(D.B, D.C, D.r, acc == at::kDouble ? 8 : 4, false,
                                                 current_device_limits());
  TORCH_CHECK(cfg.ok(), cfg.error);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_adapter_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor Wd = acc_copy<acc_t>(down_w), bd = acc_copy<acc_t>(down_b);
    const at::Tensor Wu = acc_copy<acc_t>(up_w), bu = acc_copy<acc_t>(up_b);
    const at::Tensor s = scale.has_value() ? acc_copy<acc_t>(*scale) : at::Tensor();
    prepare_launch(pooled_adapter_fwd_kernel<scalar_t>, cfg);
    pooled_adapter_fwd_kernel<scalar_t><<<grid_of(cfg), block_of(cfg), dynamic_smem_of(cfg), stream>>>(
        x.const_data_ptr<scalar_t>(), Wd.const_data_ptr<acc_t>(), bd.const_data_ptr<acc_t>(),
        Wu.const_data_ptr<acc_t>(), bu.const_data_ptr<acc_t>(), s.defined() ? s.const_data_ptr<acc_t>() : nullptr,
        D.C, D.HW, D.r, D.channels_last, activation, drop, y.mutable_data_ptr<scalar_t>(),
        pooled.mutable_data_ptr<acc_t>(), hidden.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, pooled, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_adapter_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& down_w,
    const at::Tensor& up_w, const at::Tensor& up_b, const std::optional<at::Tensor>& scale, int64_t activation,
    double dropout, int64_t seed) {
  const AdapterShape D = check_pooled_adapter(grad_y, "grad_y", down_w, up_w, activation);
  const AdapterDropout drop = adapter_dropout(dropout, seed);
  TORCH_CHECK(pooled.sizes() == at::IntArrayRef({D.B, D.C}) && hidden.sizes() == at::IntArrayRef({D.B, D.r}),
              "pooled must be (B, C) and hidden (B, r), got ", pooled.sizes(), " and ", hidden.sizes());
  TORCH_CHECK(up_b.numel() == D.C, "up_b must have C = ", D.C, " elements, got ", up_b.numel());
  check_same_device(grad_y, "grad_y", pooled, "pooled");
  check_same_device(grad_y, "grad_y", hidden, "hidden");
  check_same_device(grad_y, "grad_y", up_b, "up_b");
  check_adapter_scale(scale, grad_y);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const auto acc = grad_y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = grad_y.options().dtype(acc);
  at::Tensor gx = at::empty_like(grad_y);
  at::Tensor gu = at::empty({D.B, D.C}, opts), gh = at::empty({D.B, D.r}, opts), a = at::empty({D.B, D.r}, opts);
  at::Tensor gs_part = at::empty({scale.has_value() ? D.B : 0}, grad_y.options().dtype(at::kDouble));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (D.B > 0) {
    const LaunchConfig cfg = pooled_adapter_launch(D.B, D.C, D.r, acc == at::kDouble ? 8 : 4, true,
                                                   current_device_limits());
    TORCH_CHECK(cfg.ok(), cfg.error);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "pooled_adapter_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor Wd = acc_copy<acc_t>(down_w), Wu = acc_copy<acc_t>(up_w), bu = acc_copy<acc_t>(up_b);
      const at::Tensor Hd = acc_copy<acc_t>(hidden);
      const at::Tensor s = scale.has_value() ? acc_copy<acc_t>(*scale) : at::Tensor();
      prepare_launch(pooled_adapter_bwd_kernel<scalar_t>, cfg);
      pooled_adapter_bwd_kernel<scalar_t><<<grid_of(cfg), block_of(cfg), dynamic_smem_of(cfg), stream>>>(
          grad_y.const_data_ptr<scalar_t>(), Hd.const_data_ptr<acc_t>(), Wd.const_data_ptr<acc_t>(),
          Wu.const_data_ptr<acc_t>(), bu.const_data_ptr<acc_t>(), s.defined() ? s.const_data_ptr<acc_t>() : nullptr,
          D.C, D.HW, D.r, D.channels_last, activation, drop, gx.mutable_data_ptr<scalar_t>(),
          gu.mutable_data_ptr<acc_t>(),
          gh.mutable_data_ptr<acc_t>(), a.mutable_data_ptr<acc_t>(),
          scale.has_value() ? gs_part.mutable_data_ptr<double>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Weight gradients, sums over samples: g_up_w = gu^T a, g_down_w = gh^T pooled (B = 0: zeros).
  const at::Tensor M = pooled.to(acc).contiguous();
  const at::Tensor g_up_w = at::mm(gu.t(), a), g_up_b = gu.sum(0);
  const at::Tensor g_down_w = at::mm(gh.t(), M), g_down_b = gh.sum(0);
  // d/ds: the per-sample shares summed by torch's reduction, deterministic for a fixed length on one
  // device (a tree, not sample order: its bits can differ from the CPU's).
  at::Tensor g_scale =
      scale.has_value() ? gs_part.sum().to(scale->options()).reshape(scale->sizes()) : at::empty({0}, opts);
  return {gx, g_down_w.to(down_w.scalar_type()), g_down_b.to(down_w.scalar_type()), g_up_w.to(up_w.scalar_type()),
          g_up_b.to(up_b.scalar_type()), g_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CUDA, m) {
  m.impl("pooled_adapter", &pooled_adapter_cuda);
  m.impl("_pooled_adapter_backward", &pooled_adapter_backward_cuda);
}

}  // namespace fastcascade
