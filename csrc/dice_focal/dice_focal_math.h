// The Dice + softmax focal loss, shared by the CPU and CUDA kernels (fastcascade/reference.py states
// it plainly). The focal part is softmax_focal_row's (focal/focal_math.h) with no label smoothing:
// same log-sum-exp without the arg-max term, same 1 - p, same gradient with the arg-max class formed
// without cancellation. The Dice part needs, per image b and class c,
//   inter[b, c] = sum_pixels p_c [t == c],   card[b, c] = sum_pixels p_c + [t == c]   (kept pixels),
// and its gradient, once those sums are known, is linear in p and y per class:
//   d dice / d p_c(pixel) = alpha[b, c] + beta[b, c] [t == c]       (dice_focal_coefficients below).
#pragma once
#include <ATen/TensorOperators.h>  // t * u, 1.0 - t (all of ATen/Functions.h unless per-operator headers)
#include <ATen/core/Tensor.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "focal/focal_math.h"

namespace fastcascade {

// Per-pixel target codes of the lane kernels: a class, or one of these.
constexpr int32_t kDiceIgnored = -1;  // ignore_index, or a lane past the end: counts nowhere
constexpr int32_t kDiceBad = -2;      // outside [0, C): NaN in every sum and in the gradient

// Softmax of one pixel's C logits at x[c * stride]: the arg-max, s = sum over c != am of exp(x_c - mx),
// log(1 + s), 1 / (1 + s). p_c = exp(x_c - mx) / (1 + s) (exactly 1 / (1 + s) for c = am) and
// 1 - p_am = s / (1 + s), as softmax_focal_row forms them.
template <typename T, typename X>
struct PixelSoftmax {
  T mx, log_s, inv, s;
  int64_t am;
  FC_HD PixelSoftmax(const X* x, int64_t stride, int64_t C) {
    mx = T(x[0]);
    am = 0;
    for (int64_t c = 1; c < C; ++c) {
      const T v = T(x[c * stride]);
      if (v > mx) mx = v, am = c;
    }
    s = T(0);
    for (int64_t c = 0; c < C; ++c) s += c == am ? T(0) : fc_exp(fc_shifted(T(x[c * stride]), mx));
    log_s = fc_log1p(s);
    inv = T(1) / (T(1) + s);
  }
  // d = fc_shifted(x_c, mx) (x_c - mx, 0 where x_c == mx); returns p_c, sets *om = 1 - p_c and *lp = log p_c.
  FC_HD T p(int64_t c, T d, T* om, T* lp) const {
    *lp = d - log_s;
    const T pc = c == am ? inv : fc_exp(d) * inv;
    *om = c == am ? s * inv : T(1) - pc;
    return pc;
  }
};

// Forward of one kept pixel with target t in [0, C): returns its focal loss (weight w_t, no smoothing)
// and adds p_c to card[c * acc_stride] (and 1 to card[t]), p_t to inter[t * acc_stride].
// A: T* (or the tests' checked view of shared memory, csrc/common/device_shared.cuh).
template <typename T, typename X, typename W, typename A>
FC_HD T dice_focal_pixel_forward(const X* x, int64_t stride, int64_t C, int64_t t, const W* weight, T gamma,
                                 int two_gamma, A inter, A card, int64_t acc_stride) {
  const PixelSoftmax<T, X> sm(x, stride, C);
  T loss = T(0);
  for (int64_t c = 0; c < C; ++c) {
    T om, lp;
    const T p = sm.p(c, fc_shifted(T(x[c * stride]), sm.mx), &om, &lp);
    card[c * acc_stride] += c == t ? p + T(1) : p;
    if (c == t) {
      inter[c * acc_stride] += p;
      const T f = (weight ? T(weight[c]) : T(1)) * focal_pow<T, kGammaRuntime>(om, gamma, two_gamma);
      loss += fc_xmul(f, -lp);
    }
  }
  return loss;
}

// Gradient of one kept pixel with target t in [0, C):
//   grad_j = fs (a_j - p_j sum_c a_c) + p_j (v_j - sum_c p_c v_c),
//   a_c = [c == t] w_t (1 - p_t)^gamma (gamma u_t - 1) (softmax_focal_row's, eps = 0), fs = the focal
//   scale (lambda_focal g / normaliser), v_c = alpha[c] + beta[c] [c == t] (the Dice coefficients).
// For the arg-max class both brackets cancel as p -> 1, so they are formed from 1 - p_am and the sums
// over the other classes: fs (a_am (1 - p_am) - p_am rest_a) + p_am (v_am (1 - p_am) - rest_v).
template <typename T, typename X, typename W, typename G>
FC_HD void dice_focal_pixel_backward(const X* x, int64_t stride, int64_t C, int64_t t, const W* weight, T gamma,
                                     int two_gamma, const T* alpha, const T* beta, T fs, G* grad) {
  const PixelSoftmax<T, X> sm(x, stride, C);
  T a_am = T(0), rest_a = T(0), v_am = T(0), rest_v = T(0);
  for (int64_t pass = 0; pass < 2; ++pass) {
    for (int64_t c = 0; c < C; ++c) {
      T om, lp;
      const T p = sm.p(c, fc_shifted(T(x[c * stride]), sm.mx), &om, &lp);
      T a = T(0);
      if (c == t) {
        const T f = (weight ? T(weight[c]) : T(1)) * focal_pow<T, kGammaRuntime>(om, gamma, two_gamma);
        T u = om == T(0) ? T(-1) : p * lp / om;
        u = p == T(0) ? T(0) : u;
        a = fs * f * (gamma * u - T(1));
      }
      const T v = alpha[c] + (c == t ? beta[c] : T(0));
      if (pass == 0) {
        if (c == sm.am) a_am = a, v_am = v;
        else rest_a += a, rest_v += p * v;
      } else {
        grad[c * stride] = G(c == sm.am ? a * om - p * rest_a + p * (v * om - rest_v)
                                        : a - p * (a_am + rest_a) + p * (v - (sm.inv * v_am + rest_v)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: the (B, C)-sized arithmetic that turns the pass's sums into the loss and the backward's
// coefficients. ATen ops on the sums' device: no host sync, and the same code for CPU and CUDA.

// Class weights of the Dice term (acc dtype): weight or ones, class 0 zeroed without the background.
inline at::Tensor dice_class_weights(const std::optional<at::Tensor>& weight, int64_t C, bool include_background,
                                     const at::TensorOptions& acc_opts) {
  at::Tensor w = weight.has_value() ? weight->to(acc_opts).clone() : at::ones({C}, acc_opts);
  if (!include_background && C > 0) w.narrow(0, 0, 1).zero_();
  return w;
}

// Per-image sums (B, C) -> per-group sums (G, C): G = 1 (summed over the batch, in a fixed order) or B.
inline std::pair<at::Tensor, at::Tensor> dice_groups(const at::Tensor& inter, const at::Tensor& card, bool batch_dice) {
  if (!batch_dice) return {inter, card};
  return {inter.sum(0, true), card.sum(0, true)};
}

// loss = lambda_dice dice + lambda_focal focal; a term whose lambda is 0 is left out (so Dice alone stays
// finite where the focal mean is undefined, every pixel ignored). focal_stats = [sum, normaliser].
inline at::Tensor dice_focal_combine(const at::Tensor& inter, const at::Tensor& card, const at::Tensor& focal_stats,
                                     const at::Tensor& w, double smooth, double lambda_dice, double lambda_focal,
                                     bool batch_dice) {
  at::Tensor loss = at::zeros({}, inter.options());
  if (lambda_dice != 0.0) {
    auto [ig, cg] = dice_groups(inter, card, batch_dice);
    const at::Tensor dice_gc = 1.0 - (2.0 * ig + smooth) / (cg + smooth);
    loss = loss + lambda_dice * ((dice_gc * w).sum(1) / w.sum()).mean();
  }
  if (lambda_focal != 0.0) loss = loss + lambda_focal * (focal_stats[0] / focal_stats[1]);
  return loss;
}

// The backward's coefficients for upstream gradient g (0-dim): coef (B, 2, C) = [alpha; beta] per image
// (d loss / d p_c = alpha_c + beta_c y_c, Dice part), and fs (1,) = g lambda_focal / normaliser, 0 when
// the normaliser is 0 (torch's rule for a mean over nothing).
inline std::pair<at::Tensor, at::Tensor> dice_focal_coefficients(const at::Tensor& inter, const at::Tensor& card,
                                                                 const at::Tensor& focal_stats, const at::Tensor& w,
                                                                 const at::Tensor& g, double smooth,
                                                                 double lambda_dice, double lambda_focal,
                                                                 bool batch_dice) {
  const int64_t B = inter.size(0);
  const at::Tensor gg = g.to(inter.scalar_type());
  auto [ig, cg] = dice_groups(inter, card, batch_dice);
  const double G = double(ig.size(0));
  const at::Tensor den = cg + smooth;
  const at::Tensor scale = gg * lambda_dice * w / (w.sum() * G);  // (C,)
  const at::Tensor alpha = scale * (2.0 * ig + smooth) / (den * den);
  const at::Tensor beta = -2.0 * scale / den;
  at::Tensor coef = at::stack({alpha, beta}, 1).expand({B, 2, inter.size(1)}).contiguous();
  if (lambda_dice == 0.0) coef.zero_();
  const at::Tensor cnt = focal_stats.narrow(0, 1, 1);
  at::Tensor fs = at::where(cnt != 0, gg * lambda_focal / cnt, at::zeros_like(cnt));
  return {coef, fs.contiguous()};
}

}  // namespace fastcascade
