// CPU kernels of the fused focal losses.
//
// Work is cut into fixed-size blocks; each block writes one partial sum and the partials are added
// in block order, so results do not depend on the number of threads. float32 math runs through
// branch-free functions (common/math.h) in loops that the compiler vectorises; on x86-64 an AVX2+FMA
// clone (x86-64-v3) is picked at load time when the CPU has it.
// at::Tensor methods and the per-operator headers below only (enforced where torch has per-operator headers)
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "focal/focal_checks.h"
#include "common/cpu.h"
#include "focal/focal_math.h"

// Its own namespace: setup.py may compile several CPU sources as one translation unit.
namespace fastcascade::focal_cpu {
namespace {

constexpr int64_t kBlock = 2048;     // elements per partial (sigmoid)
constexpr int64_t kRowBlock = 256;   // rows per partial (softmax)
constexpr int64_t kGrainBlocks = 16; // blocks per parallel task at least

template <bool NEED_GRAD, int TWO_GAMMA>
FC_HD void sigmoid_focal_span(const float* x, const float* t, int64_t n, SigmoidFocalParams<float> P,
                              float* loss, float* grad) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float g;
    loss[i] = sigmoid_focal_elem<float, NEED_GRAD, TWO_GAMMA>(x[i], t[i], P, &g);
    if (NEED_GRAD) grad[i] = g;
  }
}


FC_CPU_CLONES void sigmoid_focal_span_f32(const float* x, const float* t, int64_t n, SigmoidFocalParams<float> P,
                                          float* loss, float* grad, bool need_grad) {
  with_two_gamma(two_gamma_code(P.gamma), [&](auto k) FC_LAMBDA_INLINE {
    if (need_grad) sigmoid_focal_span<true, decltype(k)::value>(x, t, n, P, loss, grad);
    else sigmoid_focal_span<false, decltype(k)::value>(x, t, n, P, loss, grad);
  });
}

// ---------------------------------------------------------------------------------------------
// softmax focal, float32: kLanes rows at a time, classes outer and rows inner, so every inner loop
// is a vector loop over rows. Same formulas as softmax_focal_row (focal_math.h).

constexpr int64_t kMaxLaneClasses = 64;  // wider rows take the per-row path

// xb, gb, pb, ab: [C][kLanes]; pb holds exp(x - max), then p; gb holds 1 - p until the gradient
// overwrites it. t: class per lane, -1 when the lane is ignored or out of range (the caller patches
// those rows afterwards). With PROBS, qb ([C][kLanes]) holds the coefficients q_c of probability
// targets instead, (1 - eps) r_c + eps / C (t unused).
template <bool NEED_GRAD, int TWO_GAMMA, bool PROBS>
FC_HD void softmax_focal_lanes(const float* xb, const int32_t* t, const float* qb, int64_t C, const float* w,
                               float gamma, float eps, float* loss, float* gb, float* pb, float* ab) {
  constexpr int L = kLanes;
  float mx[L], s[L], log_s[L], inv[L], a_am[L], rest[L];
  int32_t am[L];
  lanes_softmax_terms(xb, C, mx, am, pb, s);
#pragma omp simd
  for (int l = 0; l < L; ++l) {
    log_s[l] = fc_log1p(s[l]);
    inv[l] = 1.f / (1.f + s[l]);
    loss[l] = a_am[l] = rest[l] = 0.f;
  }
  const float q_off = eps / float(C), q_on = 1.f - eps + q_off;
  for (int64_t c = 0; c < C; ++c) {
    const float wc = w ? w[c] : 1.f;
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      const bool is_am = c == am[l];
      const float lp = fc_shifted(xb[c * L + l], mx[l]) - log_s[l];
      const float p = (is_am ? 1.f : pb[c * L + l]) * inv[l];
      const float om = is_am ? s[l] * inv[l] : 1.f - p;
      const float q = PROBS ? qb[c * L + l] : (c == t[l] ? q_on : q_off);
      const float f = wc * q * focal_pow<float, TWO_GAMMA>(om, gamma);
      loss[l] += fc_xmul(f, -lp);
      if (NEED_GRAD) {
        float u = om == 0.f ? -1.f : p * lp / om;
        u = p == 0.f ? 0.f : u;
        const float a = f * (gamma * u - 1.f);
        a_am[l] += is_am ? a : 0.f;
        rest[l] += is_am ? 0.f : a;
        pb[c * L + l] = p;
        ab[c * L + l] = a;
        gb[c * L + l] = om;
      }
    }
  }
  if (NEED_GRAD)
    for (int64_t c = 0; c < C; ++c)
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        const float p = pb[c * L + l], a = ab[c * L + l], om = gb[c * L + l];
        gb[c * L + l] = c == am[l] ? a * om - p * rest[l] : a - p * (a_am[l] + rest[l]);
      }
}

FC_CPU_CLONES void softmax_focal_lanes_f32(const float* xb, const int32_t* t, int64_t C, const float* w, float gamma,
                                           float eps, float* loss, float* gb, float* pb, float* ab, bool need_grad) {
  with_two_gamma(two_gamma_code(gamma), [&](auto k) FC_LAMBDA_INLINE {
    if (need_grad) softmax_focal_lanes<true, decltype(k)::value, false>(xb, t, nullptr, C, w, gamma, eps, loss, gb, pb, ab);
    else softmax_focal_lanes<false, decltype(k)::value, false>(xb, t, nullptr, C, w, gamma, eps, loss, gb, pb, ab);
  });
}

FC_CPU_CLONES void softmax_focal_prob_lanes_f32(const float* xb, const float* qb, int64_t C, const float* w,
                                                float gamma, float eps, float* loss, float* gb, float* pb, float* ab,
                                                bool need_grad) {
  with_two_gamma(two_gamma_code(gamma), [&](auto k) FC_LAMBDA_INLINE {
    if (need_grad) softmax_focal_lanes<true, decltype(k)::value, true>(xb, nullptr, qb, C, w, gamma, eps, loss, gb, pb, ab);
    else softmax_focal_lanes<false, decltype(k)::value, true>(xb, nullptr, qb, C, w, gamma, eps, loss, gb, pb, ab);
  });
}

// Sum of n floats in a fixed order: 16 interleaved lanes (vectorisable), then the lanes in order.
FC_CPU_CLONES float block_sum_f32(const float* v, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += v[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += v[i];
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

template <typename src_t, typename dst_t>
inline void convert(const src_t* src, int64_t n, dst_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(static_cast<float>(src[i]));
}

double ordered_sum(const std::vector<double>& partials) {
  double s = 0.0;
  for (double p : partials) s += p;
  return s;
}

// float32 arithmetic for float16 / bfloat16 / float32 logits.
template <typename scalar_t, typename target_t>
void sigmoid_focal_f32(const scalar_t* x, const target_t* t, int64_t N, SigmoidFocalParams<float> P, bool need_grad,
                       scalar_t* loss_none, scalar_t* grad, std::vector<double>* partials) {
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float xb[kBlock], tb[kBlock], lb[kBlock], gb[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, n = std::min(kBlock, N - i0);
      const float* xp = xb;
      if constexpr (kF32) xp = x + i0;
      else convert(x + i0, n, xb);
      const float* tp = tb;
      if constexpr (std::is_same_v<target_t, float>) tp = t + i0;
      else convert(t + i0, n, tb);
      float* lp = lb;
      if constexpr (kF32) if (!partials) lp = loss_none + i0;
      float* gp = gb;
      if constexpr (kF32) if (need_grad) gp = grad + i0;
      sigmoid_focal_span_f32(xp, tp, n, P, lp, gp, need_grad);
      if (partials) (*partials)[b] = block_sum_f32(lp, n);
      if constexpr (!kF32) {
        if (!partials) convert(lb, n, loss_none + i0);
        if (need_grad) convert(gb, n, grad + i0);
      }
    }
  });
}

// float64: libm arithmetic, for gradcheck and reference-grade use.
template <typename target_t>
void sigmoid_focal_f64(const double* x, const target_t* t, int64_t N, SigmoidFocalParams<double> P, bool need_grad,
                       double* loss_none, double* grad, std::vector<double>* partials) {
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, i1 = std::min(N, i0 + kBlock);
      double s = 0.0;
      for (int64_t i = i0; i < i1; ++i) {
        const double ti = static_cast<double>(t[i]);
        double g = 0.0;
        const double l = need_grad ? sigmoid_focal_elem<double, true>(x[i], ti, P, &g)
                                   : sigmoid_focal_elem<double, false>(x[i], ti, P, &g);
        if (need_grad) grad[i] = g;
        if (partials) s += l;
        else loss_none[i] = l;
      }
      if (partials) (*partials)[b] = s;
    }
  });
}

template <typename logit_t, typename target_t>
void sigmoid_focal_run(const logit_t* x, const target_t* t, int64_t N, double alpha, double gamma, double eps,
                       bool need_grad, logit_t* loss_none, logit_t* grad, std::vector<double>* partials) {
  if constexpr (std::is_same_v<logit_t, double>) {
    sigmoid_focal_f64(x, t, N, SigmoidFocalParams<double>{alpha, gamma, eps}, need_grad, loss_none, grad, partials);
  } else {
    const SigmoidFocalParams<float> P{float(alpha), float(gamma), float(eps)};
    sigmoid_focal_f32(x, t, N, P, need_grad, loss_none, grad, partials);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                                 double alpha, double gamma, double label_smoothing,
                                                                 int64_t reduction, bool need_grad) {
  check_floating(logits, "logits");
  check_same_dense_layout(logits, "logits", targets, "targets");
  check_reduction(reduction);
  const int64_t N = logits.numel();
  at::Tensor loss = loss_output(logits, reduction, logits.options());
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  std::vector<double> partials(reduction == 0 ? 0 : (N + kBlock - 1) / kBlock);
  std::vector<double>* pp = reduction == 0 ? nullptr : &partials;

  // Strides are identical and dense, so both tensors are walked as flat memory (any layout).
  const void* xraw = logits.const_data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sigmoid_focal_cpu", [&] {
    using logit_t = scalar_t;
    auto* x = static_cast<const logit_t*>(xraw);
    auto* lout = reduction == 0 ? loss.mutable_data_ptr<logit_t>() : nullptr;
    auto* gout = need_grad ? grad.mutable_data_ptr<logit_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND4(at::kHalf, at::kBFloat16, at::kBool, at::kByte, targets.scalar_type(),
                                    "sigmoid_focal_cpu_targets", [&] {
      sigmoid_focal_run(x, targets.const_data_ptr<scalar_t>(), N, alpha, gamma, label_smoothing, need_grad, lout,
                        gout, pp);
    });
  });
  if (reduction != 0) {
    const double s = ordered_sum(partials);
    loss.fill_(reduction == 1 ? s / double(N) : s);
  }
  at::Tensor grad_scale = at::full({}, reduction == 1 ? 1.0 / double(N) : 1.0, focal_scale_options(logits));
  return {loss, grad, grad_scale};
}

// Rows [r0, r1): loss (when lout), gradient (when need_grad), and the row-ordered sums of loss and count.
template <typename scalar_t, typename acc_t>
void softmax_focal_block(const scalar_t* x, const int64_t* t, int64_t r0, int64_t r1, int64_t C, int64_t S,
                         int64_t ignore_index, const acc_t* w, acc_t gamma, acc_t eps, bool need_grad, scalar_t* g,
                         scalar_t* lout, acc_t& lsum, acc_t& csum) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (C <= kMaxLaneClasses) {
      constexpr int L = kLanes;
      float xb[kMaxLaneClasses * L], gb[kMaxLaneClasses * L], pb[kMaxLaneClasses * L], ab[kMaxLaneClasses * L];
      float lb[L];
      int32_t tl[L];
      for (int64_t r = r0; r < r1; r += L) {
        const int nl = int(std::min<int64_t>(L, r1 - r));
        for (int l = 0; l < L; ++l) {  // lanes past the end repeat the last row; their results are dropped
          const int64_t row = r + std::min(l, nl - 1), off = (row / S) * C * S + row % S;
          for (int64_t c = 0; c < C; ++c) xb[c * L + l] = float(x[off + c * S]);
          const int64_t tt = t[row];
          tl[l] = (tt != ignore_index && tt >= 0 && tt < C) ? int32_t(tt) : -1;
        }
        softmax_focal_lanes_f32(xb, tl, C, w, gamma, eps, lb, gb, pb, ab, need_grad);
        for (int l = 0; l < nl; ++l) {
          const int64_t row = r + l, off = (row / S) * C * S + row % S, tt = t[row];
          const bool ignored = tt == ignore_index, bad = !ignored && tl[l] < 0;
          const float lv = ignored ? 0.f : (bad ? NAN : lb[l]);
          if (lout) lout[row] = scalar_t(lv);
          lsum += lv;
          csum += ignored ? 0.f : (bad ? NAN : (w ? w[tt] : 1.f));
          if (need_grad)
            for (int64_t c = 0; c < C; ++c) g[off + c * S] = scalar_t(ignored ? 0.f : (bad ? NAN : gb[c * L + l]));
        }
      }
      return;
    }
  }
  const int two_gamma = two_gamma_code(gamma);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = (r / S) * C * S + r % S;
    acc_t count;
    const acc_t l = need_grad ? softmax_focal_row<acc_t, true>(x + off, S, C, t[r], ignore_index, w, gamma, two_gamma,
                                                               eps, g + off, &count)
                              : softmax_focal_row<acc_t, false>(x + off, S, C, t[r], ignore_index, w, gamma, two_gamma,
                                                                eps, g, &count);
    if (lout) lout[r] = scalar_t(l);
    lsum += l;
    csum += count;
  }
}

// Rows [r0, r1) with class-probability targets r (the logits' layout): as softmax_focal_block. A row that is
// not a distribution (prob_row_ok within tol) gives NaN loss, gradient and count; every other row counts 1.
template <typename scalar_t, typename acc_t, typename prob_t>
void softmax_focal_prob_block(const scalar_t* x, const prob_t* r, int64_t r0, int64_t r1, int64_t C, int64_t S,
                              const acc_t* w, acc_t gamma, acc_t eps, acc_t tol, bool need_grad, scalar_t* g,
                              scalar_t* lout, acc_t& lsum, acc_t& csum) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (C <= kMaxLaneClasses) {
      constexpr int L = kLanes;
      float xb[kMaxLaneClasses * L], qb[kMaxLaneClasses * L], gb[kMaxLaneClasses * L], pb[kMaxLaneClasses * L],
          ab[kMaxLaneClasses * L];
      float lb[L];
      bool ok[L];
      const float keep = 1.f - eps, add = eps / float(C);
      for (int64_t row0 = r0; row0 < r1; row0 += L) {
        const int nl = int(std::min<int64_t>(L, r1 - row0));
        for (int l = 0; l < L; ++l) {  // lanes past the end repeat the last row; their results are dropped
          const int64_t row = row0 + std::min(l, nl - 1), off = (row / S) * C * S + row % S;
          // one read of the row: logits, probabilities, and prob_row_ok's test (same order, same float sum)
          bool nonneg = true;
          float sum = 0.f;
          for (int64_t c = 0; c < C; ++c) {
            xb[c * L + l] = float(x[off + c * S]);
            const float v = float(r[off + c * S]);
            qb[c * L + l] = v;
            nonneg = nonneg && v >= 0.f;
            sum += v;
          }
          const float d = sum - 1.f;
          ok[l] = nonneg && d <= float(tol) && -d <= float(tol);
        }
        // q = (1 - eps) r + eps / C; an invalid row's lane computes whatever it computes (no traps:
        // -fno-trapping-math) and is patched to NaN below
        for (int64_t i = 0; i < C * L; ++i) qb[i] = qb[i] * keep + add;
        softmax_focal_prob_lanes_f32(xb, qb, C, w, gamma, eps, lb, gb, pb, ab, need_grad);
        for (int l = 0; l < nl; ++l) {
          const int64_t row = row0 + l, off = (row / S) * C * S + row % S;
          const float lv = ok[l] ? lb[l] : NAN;
          if (lout) lout[row] = scalar_t(lv);
          lsum += lv;
          csum += ok[l] ? 1.f : NAN;
          if (need_grad)
            for (int64_t c = 0; c < C; ++c) g[off + c * S] = scalar_t(ok[l] ? gb[c * L + l] : NAN);
        }
      }
      return;
    }
  }
  const int two_gamma = two_gamma_code(gamma);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t off = (row / S) * C * S + row % S;
    acc_t count;
    const acc_t l = need_grad ? softmax_focal_prob_row<acc_t, true>(x + off, r + off, S, C, w, gamma, two_gamma, eps,
                                                                    tol, g + off, &count)
                              : softmax_focal_prob_row<acc_t, false>(x + off, r + off, S, C, w, gamma, two_gamma, eps,
                                                                     tol, g, &count);
    if (lout) lout[row] = scalar_t(l);
    lsum += l;
    csum += count;
  }
}

// softmax_focal with class-probability targets (floating, the logits' shape): logits and target contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_focal_prob_cpu(const at::Tensor& logits, const at::Tensor& target_in,
                                                                      const std::optional<at::Tensor>& weight_in,
                                                                      double gamma, double label_smoothing,
                                                                      int64_t reduction, bool need_grad) {
  const int64_t N = logits.size(0), C = logits.size(1), S = logits.dim() == 3 ? logits.size(2) : 1;
  const double tol = prob_target_tolerance(target_in);
  const at::Tensor target = prob_target_for(target_in, logits).contiguous();
  const int64_t R = N * S, nblocks = (R + kRowBlock - 1) / kRowBlock;
  at::Tensor loss = reduction == 0 ? at::empty(prob_loss_shape(logits), logits.options()) : at::empty({}, logits.options());
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  std::vector<double> loss_part(reduction == 0 ? 0 : nblocks), count_part(reduction == 0 ? 0 : nblocks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_focal_prob_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor weight;
    if (weight_in.has_value()) weight = weight_in->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* lout = reduction == 0 ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t gm = acc_t(gamma), eps = acc_t(label_smoothing);
    auto run = [&](auto* r) {
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          acc_t lsum = 0, csum = 0;
          softmax_focal_prob_block(x, r, b * kRowBlock, std::min(R, (b + 1) * kRowBlock), C, S, w, gm, eps,
                                   acc_t(tol), need_grad, g, lout, lsum, csum);
          if (reduction != 0) {
            loss_part[b] = lsum;
            count_part[b] = csum;
          }
        }
      });
    };
    if (target.scalar_type() == logits.scalar_type()) run(target.const_data_ptr<scalar_t>());
    else run(target.const_data_ptr<float>());
  });
  double denom = 1.0;
  if (reduction != 0) {
    const double s = ordered_sum(loss_part);
    denom = reduction == 1 ? ordered_sum(count_part) : 1.0;
    loss.fill_(s / denom);
  }
  at::Tensor grad_scale = at::full({}, denom != 0.0 ? 1.0 / denom : 0.0, focal_scale_options(logits));
  return {loss, grad, grad_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_focal_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                                 const std::optional<at::Tensor>& weight_in, double gamma,
                                                                 double label_smoothing, int64_t ignore_index,
                                                                 int64_t reduction, bool need_grad) {
  check_floating(logits_in, "logits");
  check_reduction(reduction);
  TORCH_CHECK(logits_in.dim() == 2 || logits_in.dim() == 3, "logits must be (N, C) or (N, C, S), got ",
              logits_in.sizes());
  check_softmax_focal_target(logits_in, target_in, weight_in);
  if (target_in.is_floating_point())
    return softmax_focal_prob_cpu(logits_in.contiguous(), target_in, weight_in, gamma, label_smoothing, reduction,
                                  need_grad);
  const int64_t N = logits_in.size(0), C = logits_in.size(1), S = logits_in.dim() == 3 ? logits_in.size(2) : 1;
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  using acc_vec = std::vector<double>;
  const int64_t R = N * S, nblocks = (R + kRowBlock - 1) / kRowBlock;
  at::Tensor loss = loss_output(target, reduction, logits.options());
  at::Tensor grad = need_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  acc_vec loss_part(reduction == 0 ? 0 : nblocks), count_part(reduction == 0 ? 0 : nblocks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_focal_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor weight;
    if (weight_in.has_value()) weight = weight_in->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    scalar_t* g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* lout = reduction == 0 ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t gm = acc_t(gamma), eps = acc_t(label_smoothing);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t lsum = 0, csum = 0;
        softmax_focal_block(x, t, b * kRowBlock, std::min(R, (b + 1) * kRowBlock), C, S, ignore_index, w, gm, eps,
                            need_grad, g, lout, lsum, csum);
        if (reduction != 0) {
          loss_part[b] = lsum;
          count_part[b] = csum;
        }
      }
    });
  });
  double denom = 1.0;
  if (reduction != 0) {
    const double s = ordered_sum(loss_part);
    denom = reduction == 1 ? ordered_sum(count_part) : 1.0;
    loss.fill_(s / denom);
  }
  // As torch: when nothing counts ("mean" over only ignored rows) the loss is NaN and the gradient 0.
  at::Tensor grad_scale = at::full({}, denom != 0.0 ? 1.0 / denom : 0.0, focal_scale_options(logits));
  return {loss, grad, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CPU, m) {
  m.impl("sigmoid_focal", &sigmoid_focal_cpu);
  m.impl("softmax_focal", &softmax_focal_cpu);
}

}  // namespace fastcascade::focal_cpu
