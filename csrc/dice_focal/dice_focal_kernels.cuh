// Device code of the fused Dice + softmax focal loss: compiled by nvcc through dice_focal_cuda.cu and by
// the host compiler under the tests' CUDA emulation (tests/emulation/).
//
// Forward: a grid of (chunk, image) blocks, each over a fixed chunk of one image's pixels, one thread
// per pixel at a time (a pixel's C logits sit at stride S, so a warp's loads are coalesced). Every
// thread accumulates its own per-class sums in shared memory; the block then adds them in a fixed
// order and writes one partial per (image, chunk); a second kernel adds the chunks of each image in
// order. No atomics, no host sync: the same inputs give the same bits on the same device. Threads,
// shared bytes and grids come from dice_focal/dice_focal_launch.h.
// Backward: one thread per pixel recomputes the softmax and writes the gradient.
#pragma once
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>

#include "common/cuda_reduce.cuh"
#include "common/device_shared.cuh"
#include "dice_focal/dice_focal_launch.h"
#include "dice_focal/dice_focal_math.h"
#include "focal/focal_math.h"

namespace fastcascade {

// partials[(b * nchunk + chunk) * P + j], P = 2C + 2: [focal sum, normaliser, inter (C), card (C)].
// The per-thread class sums are rows dice_acc_ld(blockDim.x) apart (dice_focal_launch.h: no bank conflicts).
template <typename scalar_t>
__global__ void __launch_bounds__(kDiceMaxThreads)
dice_focal_forward_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ target,
                          const at::opmath_type<scalar_t>* __restrict__ weight, int64_t C, int64_t S, int64_t nchunk,
                          at::opmath_type<scalar_t> gamma, int two_gamma, int64_t ignore_index,
                          at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  FC_DYNAMIC_SHARED(unsigned char, smem_raw);
  auto acc = FC_SHARED_CAST(acc_t, smem_raw);  // [2C][ld]: thread i owns column i
  const int T = blockDim.x, tid = threadIdx.x;
  const int ld = static_cast<int>(dice_acc_ld(T));
  const int64_t b = blockIdx.y, chunk = blockIdx.x;
  for (int64_t j = 0; j < 2 * C; ++j) acc[j * ld + tid] = acc_t(0);
  auto inter = acc + tid;
  auto card = acc + C * ld + tid;
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

}  // namespace fastcascade
