// CUDA kernels of the pixel (token) residual adapter (fastcascade/reference.py: _pixel_adapter).
//
// A block owns a tile of TT positions. Its threads compute the tile's hidden layer h = x W_d^T + b_d
// (one thread per (position, j)), keep act(h) after dropout in shared memory, then write
// y = x + s (a W_u^T + b_u) (one thread per (position, c)); the r-wide layer never reaches global
// memory. Backward recomputes h, writes grad_x and the (positions, r) factors g_h and a of the
// weight gradients, which are then two matrix products over all positions; d/ds sums per-block
// partials in block order. No atomics: bitwise reproducible. CUDA-core arithmetic, a first version
// for correctness: the tensor-core path is the Triton twin (bench/pixel_adapter_notes.md). Tiles, threads
// and shared bytes come from adapter/pixel_adapter_launch.h.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/adapter_checks.h"
#include "common/adapter_math.h"
#include "pixel_adapter/pixel_adapter_launch.h"
#include "common/cuda_launch.cuh"

namespace fastcascade {
namespace {

// Where positions and channels are: position t = (sample b, offset p), address b*sb + c*sc + p*sp.
struct PixelLayout {
  int64_t T, C, r, HW, sb, sc, sp;
};

PixelLayout pixel_layout(const AdapterShape& S) {
  if (S.channels_last) return {S.B * S.HW, S.C, S.r, S.B * S.HW, 0, 1, S.C};
  return {S.B * S.HW, S.C, S.r, S.HW, S.C * S.HW, S.HW, 1};
}

__device__ __forceinline__ int64_t pos_offset(const PixelLayout& L, int64_t t) {
  return (t / L.HW) * L.sb + (t % L.HW) * L.sp;
}

// h for the tile's (position, j) pairs; a = drop(act(h)) (and d = drop'(act'(h)) when D != nullptr).
template <typename scalar_t, typename acc_t>
__device__ void tile_hidden(const scalar_t* __restrict__ x, const acc_t* __restrict__ wdT,
                            const acc_t* __restrict__ bd, const PixelLayout& L, int64_t t0, int64_t tt, int64_t act,
                            const AdapterDropout& drop, acc_t* A, acc_t* D) {
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
  extern __shared__ unsigned char smem_raw[];
  acc_t* A = reinterpret_cast<acc_t*>(smem_raw);  // [tile][r]
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
  extern __shared__ unsigned char smem_raw[];
  acc_t* A = reinterpret_cast<acc_t*>(smem_raw);  // [tile][r] each
  acc_t* D = A + tile * L.r;
  acc_t* GH = D + tile * L.r;
  __shared__ double red[kPixelThreads];  // counted as static bytes by pixel_adapter_launch
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
