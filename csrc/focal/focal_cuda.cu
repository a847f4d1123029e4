// Launch of the fused focal losses' CUDA kernels (focal_kernels.cuh holds the device code): guard,
// stream, the pass then the finalize kernel, launch checks. No atomics, no host sync.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "common/cuda_launch.cuh"
#include "common/checks.h"
#include "focal/focal_checks.h"
#include "focal/focal_kernels.cuh"
#include "focal/focal_launch.h"
#include "focal/focal_math.h"

namespace fastcascade {
namespace {

inline bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename scalar_t, typename target_t, bool NEED_GRAD, bool REDUCE>
void launch_sigmoid(const at::Tensor& logits, const at::Tensor& targets, int64_t N,
                    const SigmoidFocalParams<at::opmath_type<scalar_t>>& P, scalar_t* lout, scalar_t* gout,
                    at::opmath_type<scalar_t>* partials, int grid, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const target_t* t = targets.const_data_ptr<target_t>();
  const bool vec_ok = aligned_to(x, 16) && aligned_to(t, VEC * sizeof(target_t)) && aligned_to(lout, 16) &&
                      aligned_to(gout, 16);
  if (vec_ok)
    sigmoid_focal_kernel<scalar_t, target_t, true, NEED_GRAD, REDUCE>
        <<<grid, kFocalThreads, 0, stream>>>(x, t, N, P, lout, gout, partials);
  else
    sigmoid_focal_kernel<scalar_t, target_t, false, NEED_GRAD, REDUCE>
        <<<grid, kFocalThreads, 0, stream>>>(x, t, N, P, lout, gout, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                                  double alpha, double gamma, double label_smoothing,
                                                                  int64_t reduction, bool need_grad) {
  check_floating(logits, "logits");
  check_same_device(logits, "logits", targets, "targets");
  check_same_dense_layout(logits, "logits", targets, "targets");
  check_reduction(reduction);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.numel();
  at::Tensor loss = loss_output(logits, reduction, logits.options());
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  at::Tensor grad_scale = at::empty({}, focal_scale_options(logits));
  if (N == 0) {  // torch's convention: sum 0, mean NaN
    if (reduction != 0) loss.fill_(reduction == 1 ? NAN : 0.0);
    grad_scale.fill_(reduction == 1 ? INFINITY : 1.0);
    return {loss, grad, grad_scale};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int grid = static_cast<int>(
      sigmoid_focal_launch(N, logits.scalar_type() == at::kDouble ? 8 : 4, current_device_limits()).grid_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sigmoid_focal_cuda", [&] {
    using logit_t = scalar_t;
    using acc_t = at::opmath_type<logit_t>;
    const SigmoidFocalParams<acc_t> P{acc_t(alpha), acc_t(gamma), acc_t(label_smoothing), two_gamma_code(gamma)};
    at::Tensor partials = at::empty({reduction == 0 ? 0 : grid}, logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* pp = reduction == 0 ? nullptr : partials.mutable_data_ptr<acc_t>();
    logit_t* lout = reduction == 0 ? loss.mutable_data_ptr<logit_t>() : nullptr;
    logit_t* gout = need_grad ? grad.mutable_data_ptr<logit_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND4(at::kHalf, at::kBFloat16, at::kBool, at::kByte, targets.scalar_type(),
                                    "sigmoid_focal_cuda_targets", [&] {
      using target_t = scalar_t;
      if (need_grad && reduction != 0) launch_sigmoid<logit_t, target_t, true, true>(logits, targets, N, P, lout, gout, pp, grid, stream);
      else if (need_grad) launch_sigmoid<logit_t, target_t, true, false>(logits, targets, N, P, lout, gout, pp, grid, stream);
      else if (reduction != 0) launch_sigmoid<logit_t, target_t, false, true>(logits, targets, N, P, lout, gout, pp, grid, stream);
      else launch_sigmoid<logit_t, target_t, false, false>(logits, targets, N, P, lout, gout, pp, grid, stream);
    });
    if (reduction != 0) {
      finalize_kernel<logit_t, acc_t><<<1, kFocalFinalThreads, 0, stream>>>(
          pp, nullptr, grid, reduction == 1 ? double(N) : 1.0, loss.mutable_data_ptr<logit_t>(),
          grad_scale.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (reduction == 0) grad_scale.fill_(1.0);
  return {loss, grad, grad_scale};
}

// softmax_focal with class-probability targets (floating, the logits' shape), after softmax_focal_cuda's
// checks, under its device guard, on contiguous logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_focal_prob_cuda(const at::Tensor& logits,
                                                                       const at::Tensor& target_in,
                                                                       const std::optional<at::Tensor>& weight_in,
                                                                       double gamma, double label_smoothing,
                                                                       int64_t reduction, bool need_grad) {
  const int64_t N = logits.size(0), C = logits.size(1), S = logits.dim() == 3 ? logits.size(2) : 1;
  const double tol = prob_target_tolerance(target_in);
  const at::Tensor target = prob_target_for(target_in, logits).contiguous();
  const int64_t R = N * S;
  at::Tensor loss = reduction == 0 ? at::empty(prob_loss_shape(logits), logits.options()) : at::empty({}, logits.options());
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  at::Tensor grad_scale = at::empty({}, focal_scale_options(logits));
  if (R == 0) {  // torch's convention: sum 0, mean NaN (over no rows), and a zero gradient scale
    if (reduction != 0) loss.fill_(reduction == 1 ? NAN : 0.0);
    grad_scale.fill_(reduction == 1 ? 0.0 : 1.0);
    return {loss, grad, grad_scale};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int grid = static_cast<int>(
      softmax_focal_launch(R, logits.scalar_type() == at::kDouble ? 8 : 4, current_device_limits()).grid_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_focal_prob_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor weight = weight_in.has_value() ? weight_in->to(acc_opts).contiguous() : at::Tensor();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    at::Tensor parts = at::empty({reduction == 0 ? 0 : 2 * grid}, acc_opts);
    acc_t* lp = reduction == 0 ? nullptr : parts.mutable_data_ptr<acc_t>();
    acc_t* cp = reduction == 0 ? nullptr : lp + grid;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* lout = reduction == 0 ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gout = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t gm = acc_t(gamma), eps = acc_t(label_smoothing);
    auto launch = [&](const auto* r, auto need_grad_c, auto reduce_c) {
      using prob_t = std::remove_const_t<std::remove_pointer_t<decltype(r)>>;
      softmax_focal_prob_kernel<scalar_t, prob_t, decltype(need_grad_c)::value, decltype(reduce_c)::value>
          <<<grid, kFocalThreads, 0, stream>>>(x, r, w, R, C, S, gm, two_gamma_code(gamma), eps, acc_t(tol), lout,
                                               gout, lp, cp);
    };
    auto by_mode = [&](const auto* r) {
      using yes = std::true_type;
      using no = std::false_type;
      if (need_grad && reduction != 0) launch(r, yes{}, yes{});
      else if (need_grad) launch(r, yes{}, no{});
      else if (reduction != 0) launch(r, no{}, yes{});
      else launch(r, no{}, no{});
    };
    if (target.scalar_type() == logits.scalar_type()) by_mode(target.const_data_ptr<scalar_t>());
    else by_mode(target.const_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (reduction != 0) {
      // "mean" divides by the count of rows the pass added (NaN where a row is not a distribution)
      finalize_kernel<scalar_t, acc_t><<<1, kFocalFinalThreads, 0, stream>>>(
          lp, reduction == 1 ? cp : nullptr, grid, 1.0, loss.mutable_data_ptr<scalar_t>(),
          grad_scale.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (reduction == 0) grad_scale.fill_(1.0);
  return {loss, grad, grad_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_focal_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                                  const std::optional<at::Tensor>& weight_in, double gamma,
                                                                  double label_smoothing, int64_t ignore_index,
                                                                  int64_t reduction, bool need_grad) {
  check_floating(logits_in, "logits");
  check_same_device(logits_in, "logits", target_in, "target");
  check_reduction(reduction);
  TORCH_CHECK(logits_in.dim() == 2 || logits_in.dim() == 3, "logits must be (N, C) or (N, C, S), got ",
              logits_in.sizes());
  if (weight_in.has_value()) check_same_device(logits_in, "logits", *weight_in, "weight");
  check_softmax_focal_target(logits_in, target_in, weight_in);
  const int64_t N = logits_in.size(0), C = logits_in.size(1), S = logits_in.dim() == 3 ? logits_in.size(2) : 1;
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  if (target_in.is_floating_point())
    return softmax_focal_prob_cuda(logits, target_in, weight_in, gamma, label_smoothing, reduction, need_grad);
  const at::Tensor target = target_in.contiguous();
  const int64_t R = N * S;
  at::Tensor loss = loss_output(target, reduction, logits.options());
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  at::Tensor grad_scale = at::empty({}, focal_scale_options(logits));
  if (R == 0) {  // (C == 0 runs the kernel: every counted row is then out of range, so NaN)
    if (reduction != 0) loss.fill_(reduction == 1 ? NAN : 0.0);
    grad_scale.fill_(reduction == 1 ? 0.0 : 1.0);
    return {loss, grad, grad_scale};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int grid = static_cast<int>(
      softmax_focal_launch(R, logits.scalar_type() == at::kDouble ? 8 : 4, current_device_limits()).grid_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_focal_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor weight = weight_in.has_value() ? weight_in->to(acc_opts).contiguous() : at::Tensor();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    at::Tensor parts = at::empty({reduction == 0 ? 0 : 2 * grid}, acc_opts);
    acc_t* lp = reduction == 0 ? nullptr : parts.mutable_data_ptr<acc_t>();
    acc_t* cp = reduction == 0 ? nullptr : lp + grid;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    scalar_t* lout = reduction == 0 ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gout = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t gm = acc_t(gamma), eps = acc_t(label_smoothing);
    auto launch = [&](auto need_grad_c, auto reduce_c) {
      softmax_focal_kernel<scalar_t, decltype(need_grad_c)::value, decltype(reduce_c)::value>
          <<<grid, kFocalThreads, 0, stream>>>(x, t, w, R, C, S, gm, two_gamma_code(gamma), eps, ignore_index, lout,
                                          gout, lp, cp);
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (need_grad && reduction != 0) launch(yes{}, yes{});
    else if (need_grad) launch(yes{}, no{});
    else if (reduction != 0) launch(no{}, yes{});
    else launch(no{}, no{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (reduction != 0) {
      // "sum" divides by 1: counts are still summed but ignored (count_partials = nullptr).
      finalize_kernel<scalar_t, acc_t><<<1, kFocalFinalThreads, 0, stream>>>(
          lp, reduction == 1 ? cp : nullptr, grid, 1.0, loss.mutable_data_ptr<scalar_t>(),
          grad_scale.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (reduction == 0) grad_scale.fill_(1.0);
  return {loss, grad, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CUDA, m) {
  m.impl("sigmoid_focal", &sigmoid_focal_cuda);
  m.impl("softmax_focal", &softmax_focal_cuda);
}

}  // namespace fastcascade
