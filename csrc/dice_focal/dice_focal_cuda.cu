// Launch of the fused Dice + softmax focal loss's CUDA kernels (dice_focal_kernels.cuh holds the device
// code): guard, stream, the forward and chunk kernels then the combination in ATen, the backward
// kernel, launch checks. No atomics, no host sync.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launch.cuh"
#include "common/checks.h"
#include "dice_focal/dice_focal_kernels.cuh"
#include "dice_focal/dice_focal_launch.h"
#include "dice_focal/dice_focal_checks.h"
#include "dice_focal/dice_focal_math.h"

namespace fastcascade {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dice_focal_cuda(
    const at::Tensor& logits_in, const at::Tensor& target_in, const std::optional<at::Tensor>& weight_in,
    double gamma, double smooth, double lambda_dice, double lambda_focal, int64_t ignore_index,
    bool include_background, bool batch_dice) {
  const DiceFocalDims d = check_dice_focal_inputs(logits_in, target_in, weight_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const auto acc_opts = dice_focal_acc_options(logits);
  const int64_t acc_size = logits.scalar_type() == at::kDouble ? 8 : 4;
  const DiceForwardLaunch L = dice_focal_forward_launch(d.B, d.C, d.S, acc_size, current_device_limits());
  TORCH_CHECK(L.cfg.ok(), L.cfg.error);
  const LaunchConfig chunks = dice_focal_chunks_launch(d.B);
  const int64_t nchunk = L.nchunk, P = 2 * d.C + 2;
  at::Tensor sums = at::zeros({d.B, P}, acc_opts);
  const at::Tensor w_acc = weight_in.has_value() ? weight_in->to(acc_opts).contiguous() : at::Tensor();
  if (nchunk > 0 && d.B > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor partials = at::empty({d.B * nchunk * P}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dice_focal_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* w = w_acc.defined() ? w_acc.const_data_ptr<acc_t>() : nullptr;
      prepare_launch(dice_focal_forward_kernel<scalar_t>, L.cfg);
      dice_focal_forward_kernel<scalar_t><<<grid_of(L.cfg), block_of(L.cfg), dynamic_smem_of(L.cfg), stream>>>(
          logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), w, d.C, d.S, nchunk,
          acc_t(gamma), two_gamma_code(gamma), ignore_index, partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dice_focal_chunks_kernel<acc_t><<<grid_of(chunks), block_of(chunks), 0, stream>>>(
          partials.const_data_ptr<acc_t>(), nchunk, P, sums.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor inter = sums.narrow(1, 2, d.C).contiguous().clone();
  const at::Tensor card = sums.narrow(1, 2 + d.C, d.C).contiguous().clone();
  const at::Tensor focal_stats = sums.narrow(1, 0, 2).sum(0);
  const at::Tensor w = dice_class_weights(weight_in, d.C, include_background, acc_opts);
  const at::Tensor loss =
      dice_focal_combine(inter, card, focal_stats, w, smooth, lambda_dice, lambda_focal, batch_dice).to(logits.dtype());
  return {loss, inter, card, focal_stats};
}

at::Tensor dice_focal_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits_in,
                                    const at::Tensor& target_in, const std::optional<at::Tensor>& weight_in,
                                    const at::Tensor& inter, const at::Tensor& card, const at::Tensor& focal_stats,
                                    double gamma, double smooth, double lambda_dice, double lambda_focal,
                                    int64_t ignore_index, bool include_background, bool batch_dice) {
  const DiceFocalDims d = check_dice_focal_inputs(logits_in, target_in, weight_in);
  check_dice_focal_sums(d, inter, card);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const auto acc_opts = dice_focal_acc_options(logits);
  const at::Tensor w = dice_class_weights(weight_in, d.C, include_background, acc_opts);
  auto [coef, fs] = dice_focal_coefficients(inter.to(acc_opts), card.to(acc_opts), focal_stats.to(acc_opts), w,
                                            grad_loss, smooth, lambda_dice, lambda_focal, batch_dice);
  at::Tensor grad = at::empty_like(logits);
  const int64_t R = d.B * d.S;
  if (R == 0) return grad;
  const at::Tensor w_acc = weight_in.has_value() ? weight_in->to(acc_opts).contiguous() : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const LaunchConfig cfg = dice_focal_backward_launch(d.B, d.S, current_device_limits());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dice_focal_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* wp = w_acc.defined() ? w_acc.const_data_ptr<acc_t>() : nullptr;
    dice_focal_backward_kernel<scalar_t><<<grid_of(cfg), block_of(cfg), 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), wp, coef.const_data_ptr<acc_t>(),
        fs.const_data_ptr<acc_t>(), R, d.C, d.S, acc_t(gamma), two_gamma_code(gamma), ignore_index,
        grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CUDA, m) {
  m.impl("dice_focal", &dice_focal_cuda);
  m.impl("_dice_focal_backward", &dice_focal_backward_cuda);
}

}  // namespace fastcascade
