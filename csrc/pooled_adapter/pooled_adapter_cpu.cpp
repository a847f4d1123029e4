// CPU kernels of the pooled residual adapter (fastcascade/reference.py: pooled_adapter).
//
// One parallel pass over the samples does everything per sample: pool x, the two small matrix-vector
// products and the activation, then the broadcast add (forward), or the sum of grad_y, the chain
// back to the pooled vector, and grad_x (backward). The weight gradients sum over samples in sample
// order, parallel over output rows, so nothing depends on the thread count.
// at::Tensor methods and the per-operator headers below only (enforced where torch has per-operator headers)
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>

#include <vector>

#include "common/adapter_checks.h"
#include "common/adapter_math.h"
#include "common/cpu.h"

// Its own namespace: setup.py may compile several CPU sources as one translation unit.
namespace fastcascade::pooled_adapter_cpu {
namespace {

template <typename acc_t>
at::Tensor acc_copy(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

template <typename acc_t>
acc_t scale_value(const std::optional<at::Tensor>& scale) {
  if (!scale.has_value()) return acc_t(1);
  TORCH_CHECK(scale->numel() == 1, "scale must be a 0-dim tensor, got ", scale->sizes());
  return scale->to(c10::CppTypeToScalarType<acc_t>::value).template item<acc_t>();  // a CPU tensor: no device sync
}

// Samples per block: their products share each weight row while it sits in L1.
constexpr int64_t kSampleBlock = 16;

// sums[c] = sum over the HW positions of channel c of one sample ([C][HW] or [HW][C] memory).
template <typename scalar_t, typename acc_t>
FC_HD void channel_sums(const scalar_t* xb, const AdapterShape& S, acc_t* sums) {
  const int64_t C = S.C, HW = S.HW;
  if (S.channels_last) {
    for (int64_t c = 0; c < C; ++c) sums[c] = 0;
    for (int64_t i = 0; i < HW; ++i)
      for (int64_t c = 0; c < C; ++c) sums[c] += acc_t(xb[i * C + c]);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      acc_t sum = 0;
      for (int64_t i = 0; i < HW; ++i) sum += acc_t(xb[c * HW + i]);
      sums[c] = sum;
    }
  }
}

template <typename scalar_t, typename acc_t>
FC_HD void channel_means(const scalar_t* xb, const AdapterShape& S, acc_t* means) {
  channel_sums(xb, S, means);
  for (int64_t c = 0; c < S.C; ++c) means[c] /= acc_t(S.HW);
}

// out = in + scale * v[c], broadcast over the HW positions of one sample.
template <typename scalar_t, typename acc_t>
FC_HD void add_channels(const scalar_t* in, const AdapterShape& S, const acc_t* v, acc_t scale, scalar_t* out) {
  const int64_t C = S.C, HW = S.HW;
  if (S.channels_last) {
    for (int64_t i = 0; i < HW; ++i)
      for (int64_t c = 0; c < C; ++c) out[i * C + c] = scalar_t(acc_t(in[i * C + c]) + scale * v[c]);
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) out[c * HW + i] = scalar_t(acc_t(in[c * HW + i]) + scale * v[c]);
  }
}

// Forward of samples [b0, b0 + kSampleBlock): pooled, hidden and y; a: [nb][r], u: [nb][C] scratch.
// One clone call per block, so everything inside runs with the block's ISA.
template <typename scalar_t, typename acc_t>
FC_CPU_CLONES void pooled_adapter_fwd_block(const scalar_t* xp, const acc_t* wdT, const acc_t* wuT, const acc_t* pbd,
                                            const acc_t* pbu, acc_t s, int64_t act, const AdapterDropout& drop,
                                            const AdapterShape& S, int64_t b0, scalar_t* yp, acc_t* pm, acc_t* ph,
                                            acc_t* a, acc_t* u) {
  const int64_t C = S.C, HW = S.HW, r = S.r, nb = std::min(kSampleBlock, S.B - b0);
  acc_t* m = pm + b0 * C;  // [nb][C]
  acc_t* h = ph + b0 * r;  // [nb][r]
  for (int64_t bb = 0; bb < nb; ++bb) channel_means(xp + (b0 + bb) * C * HW, S, m + bb * C);
  // h = W_d m + b_d and u = W_u act(h) + b_u for the block: each weight row serves nb samples
  for (int64_t bb = 0; bb < nb; ++bb)
    for (int64_t j = 0; j < r; ++j) h[bb * r + j] = pbd[j];
  for (int64_t c = 0; c < C; ++c)
    for (int64_t bb = 0; bb < nb; ++bb) axpy(r, m[bb * C + c], wdT + c * r, h + bb * r);
  for (int64_t i = 0; i < nb * r; ++i) a[i] = drop.apply(adapter_act(h[i], act), b0 * r + i);
  for (int64_t bb = 0; bb < nb; ++bb)
    for (int64_t c = 0; c < C; ++c) u[bb * C + c] = pbu[c];
  for (int64_t j = 0; j < r; ++j)
    for (int64_t bb = 0; bb < nb; ++bb) axpy(C, a[bb * r + j], wuT + j * C, u + bb * C);
  for (int64_t bb = 0; bb < nb; ++bb) {
    const int64_t off = (b0 + bb) * C * HW;
    add_channels(xp + off, S, u + bb * C, s, yp + off);
  }
}

template <typename scalar_t>
void pooled_adapter_forward(const at::Tensor& x, const at::Tensor& down_w_in, const at::Tensor& down_b_in,
                            const at::Tensor& up_w_in, const at::Tensor& up_b_in,
                            const std::optional<at::Tensor>& scale, int64_t act, const AdapterDropout& drop,
                            const AdapterShape& S, at::Tensor& y, at::Tensor& pooled, at::Tensor& hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  // Transposed copies, (C, r) and (r, C): the products below run as axpy over contiguous rows.
  const at::Tensor WdT = acc_copy<acc_t>(down_w_in.t()), bd = acc_copy<acc_t>(down_b_in);
  const at::Tensor WuT = acc_copy<acc_t>(up_w_in.t()), bu = acc_copy<acc_t>(up_b_in);
  const acc_t s = scale_value<acc_t>(scale);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const acc_t *wdT = WdT.const_data_ptr<acc_t>(), *wuT = WuT.const_data_ptr<acc_t>();
  const acc_t *pbd = bd.const_data_ptr<acc_t>(), *pbu = bu.const_data_ptr<acc_t>();
  acc_t *pm = pooled.mutable_data_ptr<acc_t>(), *ph = hidden.mutable_data_ptr<acc_t>();
  const int64_t nblocks = (S.B + kSampleBlock - 1) / kSampleBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> a(kSampleBlock * S.r), u(kSampleBlock * S.C);
    for (int64_t k = k0; k < k1; ++k)
      pooled_adapter_fwd_block(xp, wdT, wuT, pbd, pbu, s, act, drop, S, k * kSampleBlock, yp, pm, ph, a.data(),
                               u.data());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_adapter_cpu(const at::Tensor& x, const at::Tensor& down_w,
                                                                  const at::Tensor& down_b, const at::Tensor& up_w,
                                                                  const at::Tensor& up_b,
                                                                  const std::optional<at::Tensor>& scale,
                                                                  int64_t activation, double dropout, int64_t seed) {
  const AdapterShape S = check_pooled_adapter(x, "x", down_w, up_w, activation);
  const AdapterDropout drop = adapter_dropout(dropout, seed);
  TORCH_CHECK(down_b.numel() == S.r && up_b.numel() == S.C, "down_b must have r = ", S.r, " and up_b C = ", S.C,
              " elements, got ", down_b.numel(), " and ", up_b.numel());
  check_adapter_scale(scale, x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor pooled = at::empty({S.B, S.C}, x.options().dtype(acc));
  at::Tensor hidden = at::empty({S.B, S.r}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_adapter_cpu", [&] {
    pooled_adapter_forward<scalar_t>(x, down_w, down_b, up_w, up_b, scale, activation, drop, S, y, pooled, hidden);
  });
  return {y, pooled, hidden};
}

// Backward of samples [b0, b0 + kSampleBlock): grad_x, and g_u, g_h, act(h) and the d/ds shares for
// the weight gradients; scratch: 3 [nb][C] arrays.
template <typename scalar_t, typename acc_t>
FC_CPU_CLONES void pooled_adapter_bwd_block(const scalar_t* gp, const acc_t* ph, const acc_t* wd, const acc_t* wu,
                                            const acc_t* wuT, const acc_t* pbu, acc_t s, bool want_gs, int64_t act,
                                            const AdapterDropout& drop, const AdapterShape& S, int64_t b0, scalar_t* gxp, acc_t* pgu, acc_t* pgh,
                                            acc_t* pa, double* gs_part, acc_t* scratch) {
  const int64_t C = S.C, HW = S.HW, r = S.r, nb = std::min(kSampleBlock, S.B - b0);
  acc_t *gsum = scratch, *gm = scratch + kSampleBlock * C, *v = scratch + 2 * kSampleBlock * C;
  const acc_t* h = ph + b0 * r;                                    // [nb][r]
  acc_t *gu = pgu + b0 * C, *gh = pgh + b0 * r, *a = pa + b0 * r;  // [nb][C], [nb][r], [nb][r]
  for (int64_t bb = 0; bb < nb; ++bb) channel_sums(gp + (b0 + bb) * C * HW, S, gsum + bb * C);
  for (int64_t i = 0; i < nb * r; ++i) a[i] = drop.apply(adapter_act(h[i], act), b0 * r + i);
  if (want_gs) {  // d/ds of sum(gy * s u) = sum_c u_c gsum_c, u = up(a) without the scale
    for (int64_t bb = 0; bb < nb; ++bb)
      for (int64_t c = 0; c < C; ++c) v[bb * C + c] = pbu[c];
    for (int64_t j = 0; j < r; ++j)
      for (int64_t bb = 0; bb < nb; ++bb) axpy(C, a[bb * r + j], wuT + j * C, v + bb * C);
    for (int64_t bb = 0; bb < nb; ++bb) {
      double part = 0;
      for (int64_t c = 0; c < C; ++c) part += double(v[bb * C + c]) * double(gsum[bb * C + c]);
      gs_part[b0 + bb] = part;
    }
  }
  for (int64_t i = 0; i < nb * C; ++i) gu[i] = s * gsum[i];
  for (int64_t i = 0; i < nb * r; ++i) gh[i] = 0;
  for (int64_t c = 0; c < C; ++c)  // g_a = W_u^T g_u
    for (int64_t bb = 0; bb < nb; ++bb) axpy(r, gu[bb * C + c], wu + c * r, gh + bb * r);
  for (int64_t i = 0; i < nb * r; ++i) gh[i] = drop.apply(gh[i] * adapter_act_grad(h[i], act), b0 * r + i);
  for (int64_t i = 0; i < nb * C; ++i) gm[i] = 0;
  for (int64_t j = 0; j < r; ++j)  // g_m = W_d^T g_h
    for (int64_t bb = 0; bb < nb; ++bb) axpy(C, gh[bb * r + j], wd + j * C, gm + bb * C);
  for (int64_t bb = 0; bb < nb; ++bb) {
    const int64_t off = (b0 + bb) * C * HW;
    add_channels(gp + off, S, gm + bb * C, acc_t(1) / acc_t(HW), gxp + off);
  }
}

template <typename scalar_t>
void pooled_adapter_backward_impl(const at::Tensor& gy, const at::Tensor& pooled, const at::Tensor& hidden,
                                  const at::Tensor& down_w_in, const at::Tensor& up_w_in, const at::Tensor& up_b_in,
                                  const std::optional<at::Tensor>& scale, int64_t act, const AdapterDropout& drop,
                                  const AdapterShape& S, at::Tensor& gx, at::Tensor& gu_t, at::Tensor& gh_t, at::Tensor& a_t,
                                  std::vector<double>& gs_part) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor Wd = acc_copy<acc_t>(down_w_in), Wu = acc_copy<acc_t>(up_w_in), bu = acc_copy<acc_t>(up_b_in);
  const at::Tensor WuT = acc_copy<acc_t>(up_w_in.t());
  const at::Tensor Hd = acc_copy<acc_t>(hidden);
  const acc_t s = scale_value<acc_t>(scale);
  const bool want_gs = scale.has_value();
  const scalar_t* gp = gy.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  const acc_t *wd = Wd.const_data_ptr<acc_t>(), *wu = Wu.const_data_ptr<acc_t>(), *pbu = bu.const_data_ptr<acc_t>();
  const acc_t* wuT = WuT.const_data_ptr<acc_t>();
  const acc_t* ph = Hd.const_data_ptr<acc_t>();
  acc_t *pgu = gu_t.mutable_data_ptr<acc_t>(), *pgh = gh_t.mutable_data_ptr<acc_t>(), *pa = a_t.mutable_data_ptr<acc_t>();
  const int64_t nblocks = (S.B + kSampleBlock - 1) / kSampleBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> scratch(3 * kSampleBlock * S.C);
    for (int64_t k = k0; k < k1; ++k)
      pooled_adapter_bwd_block(gp, ph, wd, wu, wuT, pbu, s, want_gs, act, drop, S, k * kSampleBlock, gxp, pgu, pgh, pa,
                               gs_part.data(), scratch.data());
  });
}

// out[i][j] = sum over b of p[b][i] * q[b][j], b in order (deterministic), parallel over blocks of i;
// out_bias[i] = sum over b of p[b][i].
constexpr int64_t kOuterRows = 16;  // output rows per task: each q row serves all of them from L1

template <typename acc_t>
FC_CPU_CLONES void outer_sum_rows(const acc_t* p, const acc_t* q, int64_t B, int64_t I, int64_t J, int64_t i0,
                                  acc_t* out, acc_t* out_bias) {
  const int64_t i1 = std::min(I, i0 + kOuterRows);
  for (int64_t i = i0; i < i1; ++i) {
    out_bias[i] = 0;
    for (int64_t j = 0; j < J; ++j) out[i * J + j] = 0;
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t pi = p[b * I + i];
      out_bias[i] += pi;
      axpy(J, pi, q + b * J, out + i * J);
    }
}

template <typename acc_t>
void outer_sum(const acc_t* p, const acc_t* q, int64_t B, int64_t I, int64_t J, acc_t* out, acc_t* out_bias) {
  at::parallel_for(0, (I + kOuterRows - 1) / kOuterRows, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) outer_sum_rows(p, q, B, I, J, t * kOuterRows, out, out_bias);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_adapter_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& down_w,
    const at::Tensor& up_w, const at::Tensor& up_b, const std::optional<at::Tensor>& scale, int64_t activation,
    double dropout, int64_t seed) {
  const AdapterShape S = check_pooled_adapter(grad_y, "grad_y", down_w, up_w, activation);
  const AdapterDropout drop = adapter_dropout(dropout, seed);
  TORCH_CHECK(pooled.sizes() == at::IntArrayRef({S.B, S.C}) && hidden.sizes() == at::IntArrayRef({S.B, S.r}),
              "pooled must be (B, C) and hidden (B, r), got ", pooled.sizes(), " and ", hidden.sizes());
  const auto acc = grad_y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = grad_y.options().dtype(acc);
  at::Tensor gx = at::empty_like(grad_y);
  at::Tensor gu = at::empty({S.B, S.C}, opts), gh = at::empty({S.B, S.r}, opts), a = at::empty({S.B, S.r}, opts);
  std::vector<double> gs_part(scale.has_value() ? S.B : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "pooled_adapter_backward_cpu", [&] {
    pooled_adapter_backward_impl<scalar_t>(grad_y, pooled, hidden, down_w, up_w, up_b, scale, activation, drop, S,
                                           gx, gu, gh, a, gs_part);
  });
  at::Tensor g_up_w = at::empty({S.C, S.r}, opts), g_up_b = at::empty({S.C}, opts);
  at::Tensor g_down_w = at::empty({S.r, S.C}, opts), g_down_b = at::empty({S.r}, opts);
  const at::Tensor M = pooled.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "pooled_adapter_weight_grads_cpu", [&] {
    outer_sum(gu.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), S.B, S.C, S.r,
              g_up_w.mutable_data_ptr<scalar_t>(), g_up_b.mutable_data_ptr<scalar_t>());
    outer_sum(gh.const_data_ptr<scalar_t>(), M.const_data_ptr<scalar_t>(), S.B, S.r, S.C,
              g_down_w.mutable_data_ptr<scalar_t>(), g_down_b.mutable_data_ptr<scalar_t>());
  });
  at::Tensor g_scale = at::empty({0}, opts);
  if (scale.has_value()) {
    double total = 0;
    for (double v : gs_part) total += v;
    g_scale = at::full(scale->sizes(), total, scale->options());
  }
  return {gx, g_down_w.to(down_w.scalar_type()), g_down_b.to(down_w.scalar_type()), g_up_w.to(up_w.scalar_type()),
          g_up_b.to(up_b.scalar_type()), g_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CPU, m) {
  m.impl("pooled_adapter", &pooled_adapter_cpu);
  m.impl("_pooled_adapter_backward", &pooled_adapter_backward_cpu);
}

}  // namespace fastcascade::pooled_adapter_cpu
