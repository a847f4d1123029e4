// CUDA kernels of the fused Dice + softmax focal loss.
//
// Forward: a grid of (chunk, image) blocks, each over a fixed chunk of one image's pixels, one thread
// per pixel at a time (a pixel's C logits sit at stride S, so a warp's loads are coalesced). Every
// thread accumulates its own per-class sums in shared memory; the block then adds them in a fixed
// order and writes one partial per (image, chunk); a second kernel adds the chunks of each image in
// order. No atomics, no host sync: the same inputs give the same bits on the same device. Threads,
// shared bytes and grids come from dice/dice_focal_launch.h.
// Backward: one thread per pixel recomputes the softmax and writes the gradient.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launch.cuh"
#include "common/cuda_reduce.cuh"
#include "common/checks.h"
#include "dice_focal/dice_focal_launch.h"
#include "dice_focal/dice_focal_checks.h"
#include "dice_focal/dice_focal_math.h"

namespace fastcascade {
namespace {

// partials[(b * nchunk + chunk) * P + j], P = 2C + 2: [focal sum, normaliser, inter (C), card (C)].
// The per-thread class sums are rows dice_acc_ld(blockDim.x) apart (dice_focal_launch.h: no bank conflicts).
template <typename scalar_t>
__global__ void __launch_bounds__(kDiceMaxThreads)
dice_focal_forward_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ target,
                          const at::opmath_type<scalar_t>* __restrict__ weight, int64_t C, int64_t S, int64_t nchunk,
                          at::opmath_type<scalar_t> gamma, int two_gamma, int64_t ignore_index,
                          at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* acc = reinterpret_cast<acc_t*>(smem_raw);  // [2C][ld]: thread i owns column i
  const int T = blockDim.x, tid = threadIdx.x;
  const int ld = static_cast<int>(dice_acc_ld(T));
  const int64_t b = blockIdx.y, chunk = blockIdx.x;
  for (int64_t j = 0; j < 2 * C; ++j) acc[j * ld + tid] = acc_t(0);
  acc_t* inter = acc + tid;
  acc_t* card = acc + C * ld + tid;
  const scalar_t* xb = x + b * C * S;
  const int64_t* tb = target + b * S;
  const int64_t s1 = min(S, (chunk + 1) * kDiceChunk);
  acc_t lsum = 0, csum = 0;
  for (int64_t s = chunk * kDiceChunk + tid; s < s1; s += T) {
    const int64_t t = tb[s];
    if (t == ignore_index) continue;
    if (t < 0 || t >= C) {  // NaN everywhere, never an out-of-range index
      lsum += acc_t(NAN), csum += acc_t(NAN);
      for (int64_t c = 0; c < C; ++c) inter[c * ld] += acc_t(NAN), card[c * ld] += acc_t(NAN);
      continue;
    }
    lsum += dice_focal_pixel_forward<acc_t>(xb + s, S, C, t, weight, gamma, two_gamma, inter, card, ld);
    csum += weight ? weight[t] : acc_t(1);
  }
  lsum = block_sum(lsum);  // (its barriers also publish every thread's acc column)
  csum = block_sum(csum);
  acc_t* out = partials + (b * nchunk + chunk) * (2 * C + 2);
  if (tid == 0) out[0] = lsum, out[1] = csum;
  for (int64_t j = tid; j < 2 * C; j += T) {
    acc_t v = 0;
    for (int i = 0; i < T; ++i) v += acc[j * ld + i];
    out[2 + j] = v;
  }
}

// sums[b, j] = sum over chunks, in order, of partials[b, chunk, j] (added in double).
template <typename acc_t>
__global__ void dice_focal_chunks_kernel(const acc_t* __restrict__ partials, int64_t nchunk, int64_t P,
                                         acc_t* __restrict__ sums) {
  const int64_t b = blockIdx.x;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) {
    double v = 0;
    for (int64_t k = 0; k < nchunk; ++k) v += double(partials[(b * nchunk + k) * P + j]);
    sums[b * P + j] = acc_t(v);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kDiceBackwardThreads)
dice_focal_backward_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ target,
                           const at::opmath_type<scalar_t>* __restrict__ weight,
                           const at::opmath_type<scalar_t>* __restrict__ coef,
                           const at::opmath_type<scalar_t>* __restrict__ focal_scale, int64_t R, int64_t C, int64_t S,
                           at::opmath_type<scalar_t> gamma, int two_gamma, int64_t ignore_index,
                           scalar_t* __restrict__ grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t fs = *focal_scale;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < R; r += stride) {
    const int64_t b = r / S, off = b * C * S + r % S, t = target[r];
    if (t == ignore_index || t < 0 || t >= C) {
      const scalar_t v = scalar_t(t == ignore_index ? acc_t(0) : acc_t(NAN));
      for (int64_t c = 0; c < C; ++c) grad[off + c * S] = v;
      continue;
    }
    const acc_t* cf = coef + b * 2 * C;
    dice_focal_pixel_backward<acc_t>(x + off, S, C, t, weight, gamma, two_gamma, cf, cf + C, fs, grad + off);
  }
}

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
