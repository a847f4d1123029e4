// Launch of the pixel (token) residual adapter's CUDA kernels (pixel_adapter_kernels.cuh holds the
// device code): guard, stream, the kernels, the weight gradients as two matrix products (at::mm) and
// d/ds from the per-block partials, launch checks.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/adapter_checks.h"
#include "common/adapter_math.h"
#include "pixel_adapter/pixel_adapter_kernels.cuh"
#include "pixel_adapter/pixel_adapter_launch.h"
#include "common/cuda_launch.cuh"

namespace fastcascade {
namespace {

template <typename T>
at::Tensor acc_copy(const at::Tensor& t) {
  return t.detach().to(c10::CppTypeToScalarType<T>::value).contiguous();
}

at::Tensor pixel_adapter_cuda(const at::Tensor& x, const at::Tensor& down_w, const at::Tensor& down_b,
                              const at::Tensor& up_w, const at::Tensor& up_b, const std::optional<at::Tensor>& scale,
                              int64_t activation, double dropout, int64_t seed) {
  const AdapterShape S = check_pixel_adapter(x, "x", down_w, up_w, activation, dropout);
  TORCH_CHECK(down_b.numel() == S.r && up_b.numel() == S.C, "down_b must have r = ", S.r, " and up_b C = ", S.C,
              " elements, got ", down_b.numel(), " and ", up_b.numel());
  check_same_device(x, "x", down_b, "down_b");
  check_same_device(x, "x", up_b, "up_b");
  check_adapter_scale(scale, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const PixelLayout L = pixel_layout(S);
  if (L.T == 0) return y;
  const PixelLaunch P = pixel_adapter_launch(L.T, L.r, x.scalar_type() == at::kDouble ? 8 : 4, false,
                                             current_device_limits());
  TORCH_CHECK(P.cfg.ok(), P.cfg.error);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_adapter_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor WdT = acc_copy<acc_t>(down_w.t()), bd = acc_copy<acc_t>(down_b);
    const at::Tensor WuT = acc_copy<acc_t>(up_w.t()), bu = acc_copy<acc_t>(up_b);
    const at::Tensor s = scale.has_value() ? acc_copy<acc_t>(*scale) : at::Tensor();
    prepare_launch(pixel_adapter_fwd_kernel<scalar_t>, P.cfg);
    pixel_adapter_fwd_kernel<scalar_t><<<grid_of(P.cfg), block_of(P.cfg), dynamic_smem_of(P.cfg), stream>>>(
        x.const_data_ptr<scalar_t>(), WdT.const_data_ptr<acc_t>(), bd.const_data_ptr<acc_t>(),
        WuT.const_data_ptr<acc_t>(), bu.const_data_ptr<acc_t>(), s.defined() ? s.const_data_ptr<acc_t>() : nullptr,
        L, P.tile, activation, adapter_dropout(dropout, seed), y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_adapter_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& down_w, const at::Tensor& down_b,
    const at::Tensor& up_w, const at::Tensor& up_b, const std::optional<at::Tensor>& scale, int64_t activation,
    double dropout, int64_t seed) {
  const AdapterShape S = check_pixel_adapter(x, "x", down_w, up_w, activation, dropout);
  check_same_layout(grad_y, "grad_y", x, S);
  check_same_device(x, "x", down_b, "down_b");
  check_same_device(x, "x", up_b, "up_b");
  check_adapter_scale(scale, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const PixelLayout L = pixel_layout(S);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(acc);
  const PixelLaunch P = pixel_adapter_launch(L.T, L.r, acc == at::kDouble ? 8 : 4, true, current_device_limits());
  TORCH_CHECK(P.cfg.ok(), P.cfg.error);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gh = at::empty({L.T, L.r}, opts), a = at::empty({L.T, L.r}, opts);
  at::Tensor gs_part;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_adapter_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor Wd = acc_copy<acc_t>(down_w), WdT = acc_copy<acc_t>(down_w.t()), bd = acc_copy<acc_t>(down_b);
    const at::Tensor Wu = acc_copy<acc_t>(up_w);
    const at::Tensor s = scale.has_value() ? acc_copy<acc_t>(*scale) : at::Tensor();
    prepare_launch(pixel_adapter_bwd_kernel<scalar_t>, P.cfg);
    gs_part = at::zeros({scale.has_value() ? P.cfg.grid_x : 0}, x.options().dtype(at::kDouble));
    if (L.T == 0) return;
    pixel_adapter_bwd_kernel<scalar_t><<<grid_of(P.cfg), block_of(P.cfg), dynamic_smem_of(P.cfg), stream>>>(
        grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), WdT.const_data_ptr<acc_t>(),
        bd.const_data_ptr<acc_t>(), Wd.const_data_ptr<acc_t>(), Wu.const_data_ptr<acc_t>(),
        s.defined() ? s.const_data_ptr<acc_t>() : nullptr,
        L, P.tile, activation, adapter_dropout(dropout, seed), gx.mutable_data_ptr<scalar_t>(), gh.mutable_data_ptr<acc_t>(), a.mutable_data_ptr<acc_t>(),
        scale.has_value() ? gs_part.mutable_data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // (positions, C) views of grad_y and x, positions in (B, H, W) order as the rows of gh and a
  const at::Tensor g2 = (x.dim() == 4 ? grad_y.movedim(1, -1) : grad_y).detach().reshape({L.T, L.C}).to(acc);
  const at::Tensor x2 = (x.dim() == 4 ? x.movedim(1, -1) : x).detach().reshape({L.T, L.C}).to(acc);
  const at::Tensor s = scale.has_value() ? scale->detach().to(acc) : at::ones({}, opts);
  const at::Tensor g_sum = g2.sum(0);
  const at::Tensor g_up_w = at::mm(g2.t(), a).mul_(s), g_up_b = g_sum * s;
  const at::Tensor g_down_w = at::mm(gh.t(), x2), g_down_b = gh.sum(0);
  const at::Tensor bias_share = at::dot(g_sum.to(at::kDouble), up_b.detach().to(at::kDouble));
  at::Tensor g_scale = scale.has_value()
                           ? (gs_part.sum() + bias_share).to(scale->options()).reshape(scale->sizes())
                           : at::empty({0}, opts);
  return {gx, g_down_w.to(down_w.scalar_type()), g_down_b.to(down_b.scalar_type()), g_up_w.to(up_w.scalar_type()),
          g_up_b.to(up_b.scalar_type()), g_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CUDA, m) {
  m.impl("pixel_adapter", &pixel_adapter_cuda);
  m.impl("_pixel_adapter_backward", &pixel_adapter_backward_cuda);
}

}  // namespace fastcascade
