// CUDA kernels of the pooled residual adapter (fastcascade/reference.py: pooled_adapter).
//
// One block per sample does the whole per-sample chain in shared memory: pool x, the two small
// matrix-vector products and the activation, then the broadcast add (forward); or the sum of
// grad_y, the chain back to the pooled vector and grad_x (backward). The weight gradients are sums
// over samples of outer products: two (C x B) x (B x r) GEMMs (cuBLAS, through at::mm: a fixed
// algorithm for a shape on a device, so bitwise reproducible, and no atomics; fp32 follows
// torch.backends.cuda.matmul.allow_tf32 as torch's own matmuls do). Threads and shared
// bytes come from pooled_adapter/pooled_adapter_launch.h. A first version for correctness; bench/pooled_adapter_notes.md
// tracks the tuning.
#include <ATen/ATen.h>  // CUDA files keep all of ATen: the common headers now include only what the C++ files need
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/adapter_checks.h"
#include "pooled_adapter/pooled_adapter_launch.h"
#include "common/adapter_math.h"
#include "common/cuda_launch.cuh"

namespace fastcascade {
namespace {

// Index of channel c, position i of a sample, in its [C][HW] or [HW][C] memory.
__device__ __forceinline__ int64_t at_ci(int64_t c, int64_t i, int64_t C, int64_t HW, bool cl) {
  return cl ? i * C + c : c * HW + i;
}

// Per-channel sums over HW of one sample into sums[C] (shared), one thread per channel.
template <typename scalar_t, typename acc_t>
__device__ void channel_sums(const scalar_t* __restrict__ xb, int64_t C, int64_t HW, bool cl, acc_t* sums) {
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
  extern __shared__ unsigned char smem_raw[];
  acc_t* m = reinterpret_cast<acc_t*>(smem_raw);  // [C]
  acc_t* a = m + C;                               // [r]
  acc_t* u = a + r;                               // [C]
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
  extern __shared__ unsigned char smem_raw[];
  acc_t* gsum = reinterpret_cast<acc_t*>(smem_raw);  // [C]
  acc_t* gm = gsum + C;                              // [C]
  acc_t* a = gm + C;                                 // [r]
  acc_t* gh = a + r;                                 // [r]
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
