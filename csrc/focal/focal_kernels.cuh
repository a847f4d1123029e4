// Device code of the fused focal losses: compiled by nvcc through focal_cuda.cu and by the host
// compiler under the tests' CUDA emulation (tests/emulation/).
//
// One pass over the inputs writes the loss and the gradient. Sums are two-stage: each block of a
// grid whose size depends only on the problem and the device writes one partial (fixed-order
// warp-shuffle tree), then one block adds the partials in a fixed order. No atomics.
#pragma once
#include <ATen/OpMathType.h>

#include <cstdint>

#include "common/cuda_reduce.cuh"
#include "common/device_shared.cuh"
#include "focal/focal_launch.h"
#include "focal/focal_math.h"

namespace fastcascade {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ---------------------------------------------------------------------------------------------
// sigmoid focal

// Thread i handles elements [i VEC, (i + 1) VEC) at each step, whether or not the loads are 16-byte
// vectors (VEC_LOAD, when every pointer is aligned), so the summation order, and so the bits of the
// result, do not depend on where the tensors sit in memory.
template <typename scalar_t, typename target_t, bool VEC_LOAD, bool NEED_GRAD, bool REDUCE>
__global__ void __launch_bounds__(kFocalThreads)
sigmoid_focal_kernel(const scalar_t* __restrict__ x, const target_t* __restrict__ t, int64_t N,
                     SigmoidFocalParams<at::opmath_type<scalar_t>> P, scalar_t* __restrict__ loss_none,
                     scalar_t* __restrict__ grad, at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  acc_t acc = acc_t(0);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = N / VEC;
  for (int64_t i = tid; i < nvec; i += stride) {
    Pack<scalar_t, VEC> xv, lv, gv;
    Pack<target_t, VEC> tv;
    if constexpr (VEC_LOAD) {
      xv = reinterpret_cast<const Pack<scalar_t, VEC>*>(x)[i];
      tv = reinterpret_cast<const Pack<target_t, VEC>*>(t)[i];
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) xv.v[k] = x[i * VEC + k], tv.v[k] = t[i * VEC + k];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t g;
      const acc_t l = sigmoid_focal_elem<acc_t, NEED_GRAD, kGammaRuntime>(acc_t(xv.v[k]), acc_t(tv.v[k]), P, &g);
      if (NEED_GRAD) gv.v[k] = scalar_t(g);
      if (REDUCE) acc += l;
      else lv.v[k] = scalar_t(l);
    }
    if constexpr (VEC_LOAD) {
      if (NEED_GRAD) reinterpret_cast<Pack<scalar_t, VEC>*>(grad)[i] = gv;
      if (!REDUCE) reinterpret_cast<Pack<scalar_t, VEC>*>(loss_none)[i] = lv;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (NEED_GRAD) grad[i * VEC + k] = gv.v[k];
        if (!REDUCE) loss_none[i * VEC + k] = lv.v[k];
      }
    }
  }
#if FC_MUTATION(TAIL_OFF_BY_ONE)
  for (int64_t i = nvec * VEC + tid; i < N - 1; i += stride) {  // mutant: the tail's last element is left out
#else
  for (int64_t i = nvec * VEC + tid; i < N; i += stride) {  // tail of fewer than VEC elements
#endif
    acc_t g;
    const acc_t l = sigmoid_focal_elem<acc_t, NEED_GRAD, kGammaRuntime>(acc_t(x[i]), acc_t(t[i]), P, &g);
    if (NEED_GRAD) grad[i] = scalar_t(g);
    if (REDUCE) acc += l;
    else loss_none[i] = scalar_t(l);
  }
  if (REDUCE) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  }
}

// loss = (sum of partials) / denominator, where the denominator is the sum of count_partials when
// given, else host_denominator; grad_scale = 1 / denominator, or 0 when it is 0 (torch's rule for
// "mean" over only ignored rows). Added in double, in a fixed order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFocalFinalThreads)
finalize_kernel(const acc_t* __restrict__ partials, const acc_t* __restrict__ count_partials, int n,
                double host_denominator, scalar_t* __restrict__ loss, acc_t* __restrict__ grad_scale) {
  double s = 0, c = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s += double(partials[i]);
    if (count_partials) c += double(count_partials[i]);
  }
  s = block_sum(s);
  if (count_partials) c = block_sum(c);
  if (threadIdx.x == 0) {
    const double denom = count_partials ? c : host_denominator;
    *loss = scalar_t(s / denom);
    *grad_scale = denom != 0.0 ? acc_t(1.0 / denom) : acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------
// softmax focal: one thread per row (o, s); the row's C logits sit at stride S.

// The grid-stride loop over rows and the block sums both softmax focal kernels share: row_loss(off, &count)
// returns row r's loss (off = its first logit's offset) and sets the row's count towards "mean".
template <typename acc_t, typename scalar_t, bool REDUCE, typename RowLoss>
__device__ __forceinline__ void softmax_focal_rows(int64_t R, int64_t C, int64_t S, RowLoss row_loss,
                                                   scalar_t* __restrict__ loss_none,
                                                   acc_t* __restrict__ loss_partials,
                                                   acc_t* __restrict__ count_partials) {
  acc_t lsum = 0, csum = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < R; r += stride) {
    acc_t count;
    const acc_t l = row_loss(r, (r / S) * C * S + r % S, &count);
    if (REDUCE) {
      lsum += l;
      csum += count;
    } else {
      loss_none[r] = scalar_t(l);
    }
  }
  if (REDUCE) {
    lsum = block_sum(lsum);
    csum = block_sum(csum);
    if (threadIdx.x == 0) {
      loss_partials[blockIdx.x] = lsum;
      count_partials[blockIdx.x] = csum;
    }
  }
}

template <typename scalar_t, bool NEED_GRAD, bool REDUCE>
__global__ void __launch_bounds__(kFocalThreads)
softmax_focal_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ target,
                     const at::opmath_type<scalar_t>* __restrict__ weight, int64_t R, int64_t C, int64_t S,
                     at::opmath_type<scalar_t> gamma, int two_gamma, at::opmath_type<scalar_t> eps,
                     int64_t ignore_index,
                     scalar_t* __restrict__ loss_none, scalar_t* __restrict__ grad,
                     at::opmath_type<scalar_t>* __restrict__ loss_partials,
                     at::opmath_type<scalar_t>* __restrict__ count_partials) {
  using acc_t = at::opmath_type<scalar_t>;
  softmax_focal_rows<acc_t, scalar_t, REDUCE>(
      R, C, S,
      [&](int64_t r, int64_t off, acc_t* count) {
        return softmax_focal_row<acc_t, NEED_GRAD>(x + off, S, C, target[r], ignore_index, weight, gamma, two_gamma,
                                                   eps, NEED_GRAD ? grad + off : grad, count);
      },
      loss_none, loss_partials, count_partials);
}

// softmax focal with class-probability targets r in the logits' layout (row (o, s), class c at
// (o C + c) S + s): one thread per row, as softmax_focal_kernel. A row that is not a distribution
// (prob_row_ok within tol) gives NaN; every other row counts 1 towards "mean".
template <typename scalar_t, typename prob_t, bool NEED_GRAD, bool REDUCE>
__global__ void __launch_bounds__(kFocalThreads)
softmax_focal_prob_kernel(const scalar_t* __restrict__ x, const prob_t* __restrict__ r,
                          const at::opmath_type<scalar_t>* __restrict__ weight, int64_t R, int64_t C, int64_t S,
                          at::opmath_type<scalar_t> gamma, int two_gamma, at::opmath_type<scalar_t> eps,
                          at::opmath_type<scalar_t> tol, scalar_t* __restrict__ loss_none, scalar_t* __restrict__ grad,
                          at::opmath_type<scalar_t>* __restrict__ loss_partials,
                          at::opmath_type<scalar_t>* __restrict__ count_partials) {
  using acc_t = at::opmath_type<scalar_t>;
  softmax_focal_rows<acc_t, scalar_t, REDUCE>(
      R, C, S,
      [&](int64_t, int64_t off, acc_t* count) {
        return softmax_focal_prob_row<acc_t, NEED_GRAD>(x + off, r + off, S, C, weight, gamma, two_gamma, eps, tol,
                                                        NEED_GRAD ? grad + off : grad, count);
      },
      loss_none, loss_partials, count_partials);
}

}  // namespace fastcascade
