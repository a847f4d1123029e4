// Device code of the pixel (token) residual adapter (fastcascade/reference.py: _pixel_adapter).
//
// A block owns a tile of TT positions. Its threads compute the tile's hidden layer h = x W_d^T + b_d
// (one thread per (position, j)), keep act(h) after dropout in shared memory, then write
// y = x + s (a W_u^T + b_u) (one thread per (position, c)); the r-wide layer never reaches global
// memory. Backward recomputes h, writes grad_x and the (positions, r) factors g_h and a of the
// weight gradients, which are then two matrix products over all positions; d/ds sums per-block
// partials in block order. No atomics: bitwise reproducible. CUDA-core arithmetic, a first version
// for correctness: the tensor-core path is the Triton twin (bench/pixel_adapter_notes.md). Tiles, threads
// and shared bytes come from adapter/pixel_adapter_launch.h.
// Compiled by nvcc through pixel_adapter_cuda.cu and by the host compiler under the tests' CUDA
// emulation (tests/emulation/).
#pragma once
#include <ATen/OpMathType.h>

#include <cstdint>

#include "common/adapter_checks.h"
#include "common/adapter_math.h"
#include "common/device_shared.cuh"
#include "pixel_adapter/pixel_adapter_launch.h"

namespace fastcascade {

// Where positions and channels are: position t = (sample b, offset p), address b*sb + c*sc + p*sp.
struct PixelLayout {
  int64_t T, C, r, HW, sb, sc, sp;
};

inline PixelLayout pixel_layout(const AdapterShape& S) {
  if (S.channels_last) return {S.B * S.HW, S.C, S.r, S.B * S.HW, 0, 1, S.C};
  return {S.B * S.HW, S.C, S.r, S.HW, S.C * S.HW, S.HW, 1};
}

__device__ __forceinline__ int64_t pos_offset(const PixelLayout& L, int64_t t) {
  return (t / L.HW) * L.sb + (t % L.HW) * L.sp;
}

// h for the tile's (position, j) pairs; a = drop(act(h)) (and d = drop'(act'(h)) when D != nullptr).
// AP, DP: acc_t* (or the tests' checked views of shared memory); D may be a null acc_t*.
template <typename scalar_t, typename acc_t, typename AP, typename DP>
__device__ void tile_hidden(const scalar_t* __restrict__ x, const acc_t* __restrict__ wdT,
                            const acc_t* __restrict__ bd, const PixelLayout& L, int64_t t0, int64_t tt, int64_t act,
                            const AdapterDropout& drop, AP A, DP D) {
  for (int64_t k = threadIdx.x; k < tt * L.r; k += blockDim.x) {
    const int64_t i = k / L.r, j = k % L.r, t = t0 + i;
    const int64_t base = pos_offset(L, t);
    acc_t h = bd[j];
    for (int64_t c = 0; c < L.C; ++c) h += acc_t(x[base + c * L.sc]) * wdT[c * L.r + j];
    A[k] = drop.apply(adapter_act(h, act), t * L.r + j);
    if (D != nullptr) D[k] = drop.apply(adapter_act_grad(h, act), t * L.r + j);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kPixelThreads)
pixel_adapter_fwd_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ wdT,
                         const at::opmath_type<scalar_t>* __restrict__ bd,
                         const at::opmath_type<scalar_t>* __restrict__ wuT,
                         const at::opmath_type<scalar_t>* __restrict__ bu,
                         const at::opmath_type<scalar_t>* __restrict__ scale, PixelLayout L, int64_t tile,
                         int64_t act, AdapterDropout drop, scalar_t* __restrict__ y) {
  using acc_t = at::opmath_type<scalar_t>;
  FC_DYNAMIC_SHARED(unsigned char, smem_raw);
  auto A = FC_SHARED_CAST(acc_t, smem_raw);  // [tile][r]
  const int64_t t0 = blockIdx.x * tile, tt = min(tile, L.T - t0);
  tile_hidden(x, wdT, bd, L, t0, tt, act, drop, A, static_cast<acc_t*>(nullptr));
  __syncthreads();
  const acc_t s = scale != nullptr ? *scale : acc_t(1);
  for (int64_t k = threadIdx.x; k < tt * L.C; k += blockDim.x) {
    const int64_t i = k / L.C, c = k % L.C;
    acc_t u = bu[c];
    for (int64_t j = 0; j < L.r; ++j) u += A[i * L.r + j] * wuT[j * L.C + c];
    const int64_t off = pos_offset(L, t0 + i) + c * L.sc;
    y[off] = scalar_t(acc_t(x[off]) + s * u);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kPixelThreads)
pixel_adapter_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                         const at::opmath_type<scalar_t>* __restrict__ wdT,
                         const at::opmath_type<scalar_t>* __restrict__ bd,
                         const at::opmath_type<scalar_t>* __restrict__ wd,
                         const at::opmath_type<scalar_t>* __restrict__ wu,
                         const at::opmath_type<scalar_t>* __restrict__ scale, PixelLayout L, int64_t tile,
                         int64_t act, AdapterDropout drop, scalar_t* __restrict__ gx, at::opmath_type<scalar_t>* __restrict__ gh_out,
                         at::opmath_type<scalar_t>* __restrict__ a_out, double* __restrict__ gs_part) {
  using acc_t = at::opmath_type<scalar_t>;
  FC_DYNAMIC_SHARED(unsigned char, smem_raw);
  auto A = FC_SHARED_CAST(acc_t, smem_raw);  // [tile][r] each
  auto D = A + tile * L.r;
  auto GH = D + tile * L.r;
  FC_SHARED(double, red, kPixelThreads);  // counted as static bytes by pixel_adapter_launch
  const int64_t t0 = blockIdx.x * tile, tt = min(tile, L.T - t0);
  tile_hidden(x, wdT, bd, L, t0, tt, act, drop, A, D);
  __syncthreads();
  const acc_t s = scale != nullptr ? *scale : acc_t(1);
  double gs = 0;  // d/ds sum(grad_y * s (a W_u^T + b_u)) = sum a * (grad_y W_u) + b_u . sum grad_y (host)
  for (int64_t k = threadIdx.x; k < tt * L.r; k += blockDim.x) {  // g_h = s (grad_y W_u) * d
    const int64_t i = k / L.r, j = k % L.r, t = t0 + i;
    const int64_t base = pos_offset(L, t);
    acc_t ga = 0;
    for (int64_t c = 0; c < L.C; ++c) ga += acc_t(gy[base + c * L.sc]) * wu[c * L.r + j];
    gs += double(A[k]) * double(ga);
    GH[k] = s * ga * D[k];
    gh_out[t * L.r + j] = GH[k];
    a_out[t * L.r + j] = A[k];
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < tt * L.C; k += blockDim.x) {  // grad_x = grad_y + g_h W_d
    const int64_t i = k / L.C, c = k % L.C;
    const int64_t off = pos_offset(L, t0 + i) + c * L.sc;
    const acc_t g = acc_t(gy[off]);
    acc_t m = 0;
    for (int64_t j = 0; j < L.r; ++j) m += GH[i * L.r + j] * wd[j * L.C + c];
    gx[off] = scalar_t(g + m);
  }
  if (gs_part == nullptr) return;
  red[threadIdx.x] = gs;  // fixed-shape tree: the same order every run
  __syncthreads();
  for (int w = kPixelThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) gs_part[blockIdx.x] = red[0];
}

}  // namespace fastcascade
