// Device code of the pooled residual adapter (fastcascade/reference.py: pooled_adapter).
//
// One block per sample does the whole per-sample chain in shared memory: pool x, the two small
// matrix-vector products and the activation, then the broadcast add (forward); or the sum of
// grad_y, the chain back to the pooled vector and grad_x (backward). The weight gradients are sums
// over samples of outer products: two (C x B) x (B x r) GEMMs (cuBLAS, through at::mm: a fixed
// algorithm for a shape on a device, so bitwise reproducible, and no atomics; fp32 follows
// torch.backends.cuda.matmul.allow_tf32 as torch's own matmuls do). Threads and shared
// bytes come from pooled_adapter/pooled_adapter_launch.h. A first version for correctness; bench/pooled_adapter_notes.md
// tracks the tuning.
// Compiled by nvcc through pooled_adapter_cuda.cu and by the host compiler under the tests' CUDA
// emulation (tests/emulation/).
#pragma once
#include <ATen/OpMathType.h>

#include <cstdint>

#include "common/adapter_math.h"
#include "common/device_shared.cuh"
#include "pooled_adapter/pooled_adapter_launch.h"

namespace fastcascade {

// Index of channel c, position i of a sample, in its [C][HW] or [HW][C] memory.
__device__ __forceinline__ int64_t at_ci(int64_t c, int64_t i, int64_t C, int64_t HW, bool cl) {
  return cl ? i * C + c : c * HW + i;
}

// Per-channel sums over HW of one sample into sums[C] (shared), one thread per channel.
template <typename scalar_t, typename Sums>
__device__ void channel_sums(const scalar_t* __restrict__ xb, int64_t C, int64_t HW, bool cl, Sums sums) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t s = 0;
    for (int64_t i = 0; i < HW; ++i) s += acc_t(xb[at_ci(c, i, C, HW, cl)]);
    sums[c] = s;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kPooledThreads)
pooled_adapter_fwd_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ wd,
                          const at::opmath_type<scalar_t>* __restrict__ bd,
                          const at::opmath_type<scalar_t>* __restrict__ wu,
                          const at::opmath_type<scalar_t>* __restrict__ bu,
                          const at::opmath_type<scalar_t>* __restrict__ scale, int64_t C, int64_t HW, int64_t r,
                          bool cl, int64_t act, AdapterDropout drop, scalar_t* __restrict__ y,
                          at::opmath_type<scalar_t>* __restrict__ pooled,
                          at::opmath_type<scalar_t>* __restrict__ hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  FC_DYNAMIC_SHARED(unsigned char, smem_raw);
  auto m = FC_SHARED_CAST(acc_t, smem_raw);  // [C]
  auto a = m + C;                            // [r]
  auto u = a + r;                            // [C]
  const int64_t b = blockIdx.x;
  const scalar_t* xb = x + b * C * HW;
  channel_sums(xb, C, HW, cl, m);
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    m[c] /= acc_t(HW);
    pooled[b * C + c] = m[c];
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
    acc_t v = bd[j];
    for (int64_t c = 0; c < C; ++c) v += wd[j * C + c] * m[c];
    hidden[b * r + j] = v;
    a[j] = drop.apply(adapter_act(v, act), b * r + j);
  }
  __syncthreads();
  const acc_t s = scale ? *scale : acc_t(1);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t v = bu[c];
    for (int64_t j = 0; j < r; ++j) v += wu[c * r + j] * a[j];
    u[c] = s * v;
  }
  __syncthreads();
  scalar_t* yb = y + b * C * HW;
  for (int64_t k = threadIdx.x; k < C * HW; k += blockDim.x) {
    const int64_t c = cl ? k % C : k / HW;
    yb[k] = scalar_t(acc_t(xb[k]) + u[c]);
  }
}

// Per sample: gsum = sum_hw grad_y, g_u = s gsum, g_h = (g_u W_u) * act'(h), grad_x = grad_y + (g_h W_d) / HW;
// stores g_u, g_h, a = act(h) and (with a scale) the sample's share of d/ds, sum_c u_c gsum_c.
template <typename scalar_t>
__global__ void __launch_bounds__(kPooledThreads)
pooled_adapter_bwd_kernel(const scalar_t* __restrict__ gy, const at::opmath_type<scalar_t>* __restrict__ hidden,
                          const at::opmath_type<scalar_t>* __restrict__ wd,
                          const at::opmath_type<scalar_t>* __restrict__ wu,
                          const at::opmath_type<scalar_t>* __restrict__ bu,
                          const at::opmath_type<scalar_t>* __restrict__ scale, int64_t C, int64_t HW, int64_t r,
                          bool cl, int64_t act, AdapterDropout drop, scalar_t* __restrict__ gx,
                          at::opmath_type<scalar_t>* __restrict__ gu_out,
                          at::opmath_type<scalar_t>* __restrict__ gh_out, at::opmath_type<scalar_t>* __restrict__ a_out,
                          double* __restrict__ gs_part) {
  using acc_t = at::opmath_type<scalar_t>;
  FC_DYNAMIC_SHARED(unsigned char, smem_raw);
  auto gsum = FC_SHARED_CAST(acc_t, smem_raw);  // [C]
  auto gm = gsum + C;                           // [C]
  auto a = gm + C;                              // [r]
  auto gh = a + r;                              // [r]
  const int64_t b = blockIdx.x;
  const scalar_t* gb = gy + b * C * HW;
  channel_sums(gb, C, HW, cl, gsum);
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
    a[j] = drop.apply(adapter_act(hidden[b * r + j], act), b * r + j);
    a_out[b * r + j] = a[j];
  }
  __syncthreads();
  const acc_t s = scale ? *scale : acc_t(1);
  if (scale && threadIdx.x == 0) {  // one thread, channels in order: deterministic
    double part = 0;
    for (int64_t c = 0; c < C; ++c) {
      acc_t v = bu[c];
      for (int64_t j = 0; j < r; ++j) v += wu[c * r + j] * a[j];
      part += double(v) * double(gsum[c]);
    }
    gs_part[b] = part;
  }
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) gu_out[b * C + c] = s * gsum[c];
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
    acc_t v = 0;
    for (int64_t c = 0; c < C; ++c) v += s * gsum[c] * wu[c * r + j];
    gh[j] = drop.apply(v * adapter_act_grad(hidden[b * r + j], act), b * r + j);
    gh_out[b * r + j] = gh[j];
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t v = 0;
    for (int64_t j = 0; j < r; ++j) v += gh[j] * wd[j * C + c];
    gm[c] = v / acc_t(HW);
  }
  __syncthreads();
  scalar_t* gxb = gx + b * C * HW;
  for (int64_t k = threadIdx.x; k < C * HW; k += blockDim.x) {
    const int64_t c = cl ? k % C : k / HW;
    gxb[k] = scalar_t(acc_t(gb[k]) + gm[c]);
  }
}

}  // namespace fastcascade
