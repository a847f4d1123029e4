// CPU kernels of the pooled residual adapter (fastcascade/reference.py: _pooled_adapter).
//
// One parallel pass over the samples does everything per sample: pool x, the two small matrix-vector
// products and the activation, then the broadcast add (forward), or the sum of grad_y, the chain
// back to the pooled vector, and grad_x (backward). The weight gradients sum over samples in sample
// order, parallel over output rows, so nothing depends on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "adapter/adapter_checks.h"
#include "adapter/adapter_math.h"
#include "common/cpu.h"

namespace fastcascade {
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

template <typename scalar_t>
void pooled_adapter_forward(const at::Tensor& x, const at::Tensor& down_w_in, const at::Tensor& down_b_in,
                            const at::Tensor& up_w_in, const at::Tensor& up_b_in,
                            const std::optional<at::Tensor>& scale, int64_t act, const AdapterShape& S,
                            at::Tensor& y, at::Tensor& pooled, at::Tensor& hidden) {
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
  const int64_t C = S.C, HW = S.HW, r = S.r;
  at::parallel_for(0, S.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> a(r), u(C);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* xb = xp + b * C * HW;
      scalar_t* yb = yp + b * C * HW;
      acc_t* m = pm + b * C;
      acc_t* h = ph + b * r;
      for (int64_t c = 0; c < C; ++c) m[c] = 0;
      if (S.channels_last) {
        for (int64_t i = 0; i < HW; ++i)
          for (int64_t c = 0; c < C; ++c) m[c] += acc_t(xb[i * C + c]);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          acc_t sum = 0;
          for (int64_t i = 0; i < HW; ++i) sum += acc_t(xb[c * HW + i]);
          m[c] = sum;
        }
      }
      for (int64_t c = 0; c < C; ++c) m[c] /= acc_t(HW);
      for (int64_t j = 0; j < r; ++j) h[j] = pbd[j];
      for (int64_t c = 0; c < C; ++c) axpy(r, m[c], wdT + c * r, h);  // h = W_d m + b_d
      for (int64_t j = 0; j < r; ++j) a[j] = adapter_act(h[j], act);
      for (int64_t c = 0; c < C; ++c) u[c] = pbu[c];
      for (int64_t j = 0; j < r; ++j) axpy(C, a[j], wuT + j * C, u.data());  // u = W_u a + b_u
      for (int64_t c = 0; c < C; ++c) u[c] *= s;
      if (S.channels_last) {
        for (int64_t i = 0; i < HW; ++i)
          for (int64_t c = 0; c < C; ++c) yb[i * C + c] = scalar_t(acc_t(xb[i * C + c]) + u[c]);
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < HW; ++i) yb[c * HW + i] = scalar_t(acc_t(xb[c * HW + i]) + u[c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_adapter_cpu(const at::Tensor& x, const at::Tensor& down_w,
                                                                  const at::Tensor& down_b, const at::Tensor& up_w,
                                                                  const at::Tensor& up_b,
                                                                  const std::optional<at::Tensor>& scale,
                                                                  int64_t activation) {
  const AdapterShape S = check_pooled_adapter(x, "x", down_w, up_w, activation);
  TORCH_CHECK(down_b.numel() == S.r && up_b.numel() == S.C, "down_b must have r = ", S.r, " and up_b C = ", S.C,
              " elements, got ", down_b.numel(), " and ", up_b.numel());
  check_adapter_scale(scale, x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor pooled = at::empty({S.B, S.C}, x.options().dtype(acc));
  at::Tensor hidden = at::empty({S.B, S.r}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_adapter_cpu", [&] {
    pooled_adapter_forward<scalar_t>(x, down_w, down_b, up_w, up_b, scale, activation, S, y, pooled, hidden);
  });
  return {y, pooled, hidden};
}

template <typename scalar_t>
void pooled_adapter_backward_impl(const at::Tensor& gy, const at::Tensor& pooled, const at::Tensor& hidden,
                                  const at::Tensor& down_w_in, const at::Tensor& up_w_in, const at::Tensor& up_b_in,
                                  const std::optional<at::Tensor>& scale, int64_t act, const AdapterShape& S,
                                  at::Tensor& gx, at::Tensor& gu_t, at::Tensor& gh_t, at::Tensor& a_t,
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
  const int64_t C = S.C, HW = S.HW, r = S.r;
  at::parallel_for(0, S.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> gsum(C), gm(C), v(C);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* gb = gp + b * C * HW;
      scalar_t* gxb = gxp + b * C * HW;
      const acc_t* h = ph + b * r;
      acc_t *gu = pgu + b * C, *gh = pgh + b * r, *a = pa + b * r;
      for (int64_t c = 0; c < C; ++c) gsum[c] = 0;
      if (S.channels_last) {
        for (int64_t i = 0; i < HW; ++i)
          for (int64_t c = 0; c < C; ++c) gsum[c] += acc_t(gb[i * C + c]);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          acc_t sum = 0;
          for (int64_t i = 0; i < HW; ++i) sum += acc_t(gb[c * HW + i]);
          gsum[c] = sum;
        }
      }
      for (int64_t j = 0; j < r; ++j) a[j] = adapter_act(h[j], act);
      if (want_gs) {  // d/ds of sum(gy * s u) = sum_c u_c gsum_c, u = up(a) without the scale
        for (int64_t c = 0; c < C; ++c) v[c] = pbu[c];
        for (int64_t j = 0; j < r; ++j) axpy(C, a[j], wuT + j * C, v.data());
        double part = 0;
        for (int64_t c = 0; c < C; ++c) part += double(v[c]) * double(gsum[c]);
        gs_part[b] = part;
      }
      for (int64_t c = 0; c < C; ++c) gu[c] = s * gsum[c];
      for (int64_t j = 0; j < r; ++j) gh[j] = 0;
      for (int64_t c = 0; c < C; ++c) axpy(r, gu[c], wu + c * r, gh);  // g_a = W_u^T g_u
      for (int64_t j = 0; j < r; ++j) gh[j] *= adapter_act_grad(h[j], act);
      for (int64_t c = 0; c < C; ++c) gm[c] = 0;
      for (int64_t j = 0; j < r; ++j) axpy(C, gh[j], wd + j * C, gm.data());  // g_m = W_d^T g_h
      for (int64_t c = 0; c < C; ++c) gm[c] /= acc_t(HW);
      if (S.channels_last) {
        for (int64_t i = 0; i < HW; ++i)
          for (int64_t c = 0; c < C; ++c) gxb[i * C + c] = scalar_t(acc_t(gb[i * C + c]) + gm[c]);
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < HW; ++i) gxb[c * HW + i] = scalar_t(acc_t(gb[c * HW + i]) + gm[c]);
      }
    }
  });
}

// out[i][j] = sum over b of p[b][i] * q[b][j], b in order (deterministic), parallel over i;
// out_bias[i] = sum over b of p[b][i].
template <typename acc_t>
void outer_sum(const acc_t* p, const acc_t* q, int64_t B, int64_t I, int64_t J, acc_t* out, acc_t* out_bias) {
  at::parallel_for(0, I, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      acc_t* o = out + i * J;
      for (int64_t j = 0; j < J; ++j) o[j] = 0;
      acc_t bias = 0;
      for (int64_t b = 0; b < B; ++b) {
        const acc_t pi = p[b * I + i];
        bias += pi;
        axpy(J, pi, q + b * J, o);
      }
      out_bias[i] = bias;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_adapter_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& down_w,
    const at::Tensor& up_w, const at::Tensor& up_b, const std::optional<at::Tensor>& scale, int64_t activation) {
  const AdapterShape S = check_pooled_adapter(grad_y, "grad_y", down_w, up_w, activation);
  TORCH_CHECK(pooled.sizes() == at::IntArrayRef({S.B, S.C}) && hidden.sizes() == at::IntArrayRef({S.B, S.r}),
              "pooled must be (B, C) and hidden (B, r), got ", pooled.sizes(), " and ", hidden.sizes());
  const auto acc = grad_y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = grad_y.options().dtype(acc);
  at::Tensor gx = at::empty_like(grad_y);
  at::Tensor gu = at::empty({S.B, S.C}, opts), gh = at::empty({S.B, S.r}, opts), a = at::empty({S.B, S.r}, opts);
  std::vector<double> gs_part(scale.has_value() ? S.B : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "pooled_adapter_backward_cpu", [&] {
    pooled_adapter_backward_impl<scalar_t>(grad_y, pooled, hidden, down_w, up_w, up_b, scale, activation, S, gx, gu,
                                           gh, a, gs_part);
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
  m.impl("pooled_adapter_backward", &pooled_adapter_backward_cpu);
}

}  // namespace fastcascade
