// CPU kernels of the fused Dice + softmax focal loss.
//
// logits (B, C, S) contiguous, so the S pixels of one class plane are adjacent: kLanes pixels at a time
// are loaded class by class, and every inner loop is a vector loop over pixels. Work is cut into fixed
// chunks of one image's pixels; each chunk writes its own partial sums and the partials are added in
// chunk order, so the results do not depend on the number of threads.
// at::Tensor methods and the per-operator headers below only (enforced where torch has per-operator headers)
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu.h"
#include "dice_focal/dice_focal_checks.h"
#include "dice_focal/dice_focal_math.h"

// Its own namespace: setup.py may compile several CPU sources as one translation unit.
namespace fastcascade::dice_focal_cpu {
namespace {

constexpr int64_t kChunk = 1024;         // pixels per partial
constexpr int64_t kMaxLaneClasses = 64;  // wider pixels take the per-pixel path

// Softmax of kLanes pixels, xb [C][kLanes]: pb gets p, ob gets 1 - p, lb gets log p, am the arg-max
// (dice_focal_math.h's PixelSoftmax, lane by lane).
FC_HD void lanes_softmax(const float* xb, int64_t C, float* pb, float* ob, float* lb, int32_t* am) {
  constexpr int L = kLanes;
  float mx[L], s[L], log_s[L], inv[L];
  lanes_softmax_terms(xb, C, mx, am, pb, s);
#pragma omp simd
  for (int l = 0; l < L; ++l) log_s[l] = fc_log1p(s[l]), inv[l] = 1.f / (1.f + s[l]);
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      const bool is_am = c == am[l];
      const float p = (is_am ? 1.f : pb[c * L + l]) * inv[l];
      lb[c * L + l] = fc_shifted(xb[c * L + l], mx[l]) - log_s[l];
      ob[c * L + l] = is_am ? s[l] * inv[l] : 1.f - p;
      pb[c * L + l] = p;
    }
}

// t: class per lane, or kDiceIgnored / kDiceBad. loss[l] gets the focal loss of kept lanes; inter and
// card [C][kLanes] accumulate lane-wise.
template <int TWO_GAMMA>
FC_HD void dice_focal_lanes_forward(const float* xb, const int32_t* t, int64_t C, const float* w, float gamma,
                                    float* loss, float* inter, float* card, float* pb, float* ob, float* lb) {
  constexpr int L = kLanes;
  int32_t am[L];
  lanes_softmax(xb, C, pb, ob, lb, am);
#pragma omp simd
  for (int l = 0; l < L; ++l) loss[l] = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float wc = w ? w[c] : 1.f;
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      const float p = pb[c * L + l];
      const bool on = c == t[l];
      const float f = on ? wc * focal_pow<float, TWO_GAMMA>(ob[c * L + l], gamma) : 0.f;
      loss[l] += fc_xmul(f, -lb[c * L + l]);
      const float keep = t[l] == kDiceBad ? NAN : (t[l] == kDiceIgnored ? 0.f : 1.f);
      inter[c * L + l] += on ? p : 0.f;
      card[c * L + l] += keep == 0.f ? 0.f : keep * p + (on ? 1.f : 0.f);
    }
  }
}

FC_CPU_CLONES void dice_focal_lanes_forward_f32(const float* xb, const int32_t* t, int64_t C, const float* w,
                                                float gamma, float* loss, float* inter, float* card, float* pb,
                                                float* ob, float* lb) {
  with_two_gamma(two_gamma_code(gamma), [&](auto k) FC_LAMBDA_INLINE {
    dice_focal_lanes_forward<decltype(k)::value>(xb, t, C, w, gamma, loss, inter, card, pb, ob, lb);
  });
}

// Gradient of kLanes pixels into gb [C][kLanes] (dice_focal_pixel_backward, lane by lane); lanes that are
// not kept are patched by the caller. alpha, beta: this image's Dice coefficients (C,); fs: focal scale.
template <int TWO_GAMMA>
FC_HD void dice_focal_lanes_backward(const float* xb, const int32_t* t, int64_t C, const float* w, float gamma,
                                     const float* alpha, const float* beta, float fs, float* gb, float* pb,
                                     float* ob, float* lb) {
  constexpr int L = kLanes;
  int32_t am[L];
  lanes_softmax(xb, C, pb, ob, lb, am);
  float a_am[L], rest_a[L], v_am[L], rest_v[L], p_am[L];
#pragma omp simd
  for (int l = 0; l < L; ++l) a_am[l] = rest_a[l] = v_am[l] = rest_v[l] = p_am[l] = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float wc = w ? w[c] : 1.f, al = alpha[c], be = beta[c];
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      const float p = pb[c * L + l], om = ob[c * L + l], lp = lb[c * L + l];
      const bool on = c == t[l], is_am = c == am[l];
      float u = om == 0.f ? -1.f : p * lp / om;
      u = p == 0.f ? 0.f : u;
      const float a = on ? fs * wc * focal_pow<float, TWO_GAMMA>(om, gamma) * (gamma * u - 1.f) : 0.f;
      const float v = al + (on ? be : 0.f);
      a_am[l] += is_am ? a : 0.f;
      rest_a[l] += is_am ? 0.f : a;
      v_am[l] += is_am ? v : 0.f;
      p_am[l] += is_am ? p : 0.f;
      rest_v[l] += is_am ? 0.f : p * v;
      gb[c * L + l] = a;  // a_c, turned into the gradient below
      lb[c * L + l] = v;  // log p is no longer needed: v_c
    }
  }
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      const float p = pb[c * L + l], om = ob[c * L + l], a = gb[c * L + l], v = lb[c * L + l];
      gb[c * L + l] = c == am[l] ? a * om - p * rest_a[l] + p * (v * om - rest_v[l])
                                 : a - p * (a_am[l] + rest_a[l]) + p * (v - (p_am[l] * v_am[l] + rest_v[l]));
    }
}

FC_CPU_CLONES void dice_focal_lanes_backward_f32(const float* xb, const int32_t* t, int64_t C, const float* w,
                                                 float gamma, const float* alpha, const float* beta, float fs,
                                                 float* gb, float* pb, float* ob, float* lb) {
  with_two_gamma(two_gamma_code(gamma), [&](auto k) FC_LAMBDA_INLINE {
    dice_focal_lanes_backward<decltype(k)::value>(xb, t, C, w, gamma, alpha, beta, fs, gb, pb, ob, lb);
  });
}

inline int32_t lane_code(int64_t t, int64_t ignore_index, int64_t C) {
  return t == ignore_index ? kDiceIgnored : (t >= 0 && t < C ? int32_t(t) : kDiceBad);
}

// Pixels [s0, s1) of image b: adds to lsum, csum and the per-class sums inter, card (C,).
template <typename scalar_t, typename acc_t>
void forward_chunk(const scalar_t* x, const int64_t* t, int64_t C, int64_t S, int64_t b, int64_t s0, int64_t s1,
                   int64_t ignore_index, const acc_t* w, acc_t gamma, acc_t& lsum, acc_t& csum, acc_t* inter,
                   acc_t* card) {
  const scalar_t* xi = x + b * C * S;
  const int64_t* ti = t + b * S;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (C <= kMaxLaneClasses) {
      constexpr int L = kLanes;
      alignas(64) float xb[kMaxLaneClasses * L], pb[kMaxLaneClasses * L], ob[kMaxLaneClasses * L],
          lb[kMaxLaneClasses * L], ib[kMaxLaneClasses * L], cb[kMaxLaneClasses * L], loss[L];
      int32_t tl[L];
      std::fill(ib, ib + C * L, 0.f);
      std::fill(cb, cb + C * L, 0.f);
      for (int64_t s = s0; s < s1; s += L) {
        const int nl = int(std::min<int64_t>(L, s1 - s));
        for (int64_t c = 0; c < C; ++c)  // lanes past the end repeat the last pixel, coded as ignored
          for (int l = 0; l < L; ++l) xb[c * L + l] = float(xi[c * S + s + std::min(l, nl - 1)]);
        for (int l = 0; l < L; ++l) tl[l] = l < nl ? lane_code(ti[s + l], ignore_index, C) : kDiceIgnored;
        dice_focal_lanes_forward_f32(xb, tl, C, w, gamma, loss, ib, cb, pb, ob, lb);
        for (int l = 0; l < nl; ++l) {
          const bool bad = tl[l] == kDiceBad, kept = tl[l] >= 0;
          lsum += bad ? NAN : (kept ? loss[l] : 0.f);
          csum += bad ? NAN : (kept ? (w ? w[tl[l]] : 1.f) : 0.f);
        }
      }
      for (int64_t c = 0; c < C; ++c)
        for (int l = 0; l < L; ++l) inter[c] += ib[c * L + l], card[c] += cb[c * L + l];
      return;
    }
  }
  const int two_gamma = two_gamma_code(gamma);
  for (int64_t s = s0; s < s1; ++s) {
    const int32_t code = lane_code(ti[s], ignore_index, C);
    if (code == kDiceIgnored) continue;
    if (code == kDiceBad) {
      lsum += acc_t(NAN), csum += acc_t(NAN);
      for (int64_t c = 0; c < C; ++c) inter[c] += acc_t(NAN), card[c] += acc_t(NAN);
      continue;
    }
    lsum += dice_focal_pixel_forward<acc_t>(xi + s, S, C, code, w, gamma, two_gamma, inter, card, 1);
    csum += w ? w[code] : acc_t(1);
  }
}

template <typename scalar_t, typename acc_t>
void backward_chunk(const scalar_t* x, const int64_t* t, int64_t C, int64_t S, int64_t b, int64_t s0, int64_t s1,
                    int64_t ignore_index, const acc_t* w, acc_t gamma, const acc_t* alpha, const acc_t* beta,
                    acc_t fs, scalar_t* g) {
  const scalar_t* xi = x + b * C * S;
  const int64_t* ti = t + b * S;
  scalar_t* gi = g + b * C * S;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (C <= kMaxLaneClasses) {
      constexpr int L = kLanes;
      alignas(64) float xb[kMaxLaneClasses * L], pb[kMaxLaneClasses * L], ob[kMaxLaneClasses * L],
          lb[kMaxLaneClasses * L], gb[kMaxLaneClasses * L];
      int32_t tl[L];
      for (int64_t s = s0; s < s1; s += L) {
        const int nl = int(std::min<int64_t>(L, s1 - s));
        for (int64_t c = 0; c < C; ++c)
          for (int l = 0; l < L; ++l) xb[c * L + l] = float(xi[c * S + s + std::min(l, nl - 1)]);
        for (int l = 0; l < L; ++l) tl[l] = l < nl ? lane_code(ti[s + l], ignore_index, C) : kDiceIgnored;
        dice_focal_lanes_backward_f32(xb, tl, C, w, gamma, alpha, beta, fs, gb, pb, ob, lb);
        for (int64_t c = 0; c < C; ++c)
          for (int l = 0; l < nl; ++l)
            gi[c * S + s + l] = scalar_t(tl[l] >= 0 ? gb[c * L + l] : (tl[l] == kDiceBad ? NAN : 0.f));
      }
      return;
    }
  }
  const int two_gamma = two_gamma_code(gamma);
  for (int64_t s = s0; s < s1; ++s) {
    const int32_t code = lane_code(ti[s], ignore_index, C);
    if (code < 0) {
      const acc_t v = code == kDiceBad ? acc_t(NAN) : acc_t(0);
      for (int64_t c = 0; c < C; ++c) gi[c * S + s] = scalar_t(v);
      continue;
    }
    dice_focal_pixel_backward<acc_t>(xi + s, S, C, code, w, gamma, two_gamma, alpha, beta, fs, gi + s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dice_focal_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const std::optional<at::Tensor>& weight_in,
    double gamma, double smooth, double lambda_dice, double lambda_focal, int64_t ignore_index,
    bool include_background, bool batch_dice) {
  const DiceFocalDims d = check_dice_focal_inputs(logits_in, target_in, weight_in);
  const at::Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const auto acc_opts = dice_focal_acc_options(logits);
  const int64_t nchunk = (d.S + kChunk - 1) / kChunk, nblocks = d.B * nchunk, P = 2 * d.C + 2;
  // partial sums per block (b, chunk): [focal sum, normaliser, inter (C), card (C)], added in double
  std::vector<double> part(nblocks * P, 0.0);
  at::Tensor w_acc = weight_in.has_value() ? weight_in->to(acc_opts).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dice_focal_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = w_acc.defined() ? w_acc.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<acc_t> inter(d.C), card(d.C);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = k / nchunk, s0 = (k % nchunk) * kChunk;
        acc_t lsum = 0, csum = 0;
        std::fill(inter.begin(), inter.end(), acc_t(0));
        std::fill(card.begin(), card.end(), acc_t(0));
        forward_chunk(x, t, d.C, d.S, b, s0, std::min(d.S, s0 + kChunk), ignore_index, w, acc_t(gamma), lsum, csum,
                      inter.data(), card.data());
        double* pk = part.data() + k * P;
        pk[0] = lsum, pk[1] = csum;
        for (int64_t c = 0; c < d.C; ++c) pk[2 + c] = inter[c], pk[2 + d.C + c] = card[c];
      }
    });
  });
  // ordered sums: chunks of each image in order
  std::vector<double> img(d.B * P, 0.0), focal(2, 0.0);
  for (int64_t k = 0; k < nblocks; ++k)
    for (int64_t j = 0; j < P; ++j) img[(k / nchunk) * P + j] += part[k * P + j];
  for (int64_t b = 0; b < d.B; ++b) focal[0] += img[b * P], focal[1] += img[b * P + 1];
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  // copies: the outputs own their memory and alias nothing
  const at::Tensor sums = at::from_blob(img.data(), {d.B, P}, dbl);
  const at::Tensor inter = sums.narrow(1, 2, d.C).to(acc_opts, false, true, at::MemoryFormat::Contiguous);
  const at::Tensor card = sums.narrow(1, 2 + d.C, d.C).to(acc_opts, false, true, at::MemoryFormat::Contiguous);
  const at::Tensor focal_stats = at::from_blob(focal.data(), {2}, dbl).to(acc_opts, false, true);
  const at::Tensor w = dice_class_weights(weight_in, d.C, include_background, acc_opts);
  const at::Tensor loss =
      dice_focal_combine(inter, card, focal_stats, w, smooth, lambda_dice, lambda_focal, batch_dice).to(logits.dtype());
  return {loss, inter, card, focal_stats};
}

at::Tensor dice_focal_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits_in,
                                   const at::Tensor& target_in, const std::optional<at::Tensor>& weight_in,
                                   const at::Tensor& inter, const at::Tensor& card, const at::Tensor& focal_stats,
                                   double gamma, double smooth, double lambda_dice, double lambda_focal,
                                   int64_t ignore_index, bool include_background, bool batch_dice) {
  const DiceFocalDims d = check_dice_focal_inputs(logits_in, target_in, weight_in);
  check_dice_focal_sums(d, inter, card);
  const at::Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const auto acc_opts = dice_focal_acc_options(logits);
  const at::Tensor w = dice_class_weights(weight_in, d.C, include_background, acc_opts);
  auto [coef, fs_t] = dice_focal_coefficients(inter.to(acc_opts), card.to(acc_opts), focal_stats.to(acc_opts), w,
                                              grad_loss, smooth, lambda_dice, lambda_focal, batch_dice);
  at::Tensor grad = at::empty_like(logits);
  const at::Tensor w_acc = weight_in.has_value() ? weight_in->to(acc_opts).contiguous() : at::Tensor();
  const int64_t nchunk = (d.S + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dice_focal_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = w_acc.defined() ? w_acc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* cf = coef.const_data_ptr<acc_t>();
    const acc_t fs = fs_t.const_data_ptr<acc_t>()[0];
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, d.B * nchunk, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = k / nchunk, s0 = (k % nchunk) * kChunk;
        backward_chunk(x, t, d.C, d.S, b, s0, std::min(d.S, s0 + kChunk), ignore_index, w, acc_t(gamma),
                       cf + b * 2 * d.C, cf + b * 2 * d.C + d.C, fs, g);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CPU, m) {
  m.impl("dice_focal", &dice_focal_cpu);
  m.impl("_dice_focal_backward", &dice_focal_backward_cpu);
}

}  // namespace fastcascade::dice_focal_cpu
