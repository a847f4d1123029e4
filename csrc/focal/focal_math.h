// The focal-loss formulas, shared by the CPU and CUDA kernels (fastcascade/reference.py states them
// plainly). Written in log space and without m^(gamma-1), so saturated and infinite logits give no
// NaN for any gamma >= 0.
#pragma once
#include <type_traits>

#include "common/math.h"

namespace fastcascade {

// x - mx for the softmax kernels (mx the row's maximum), 0 where x == mx: also when both are +inf or
// -inf, where the difference would be NaN. NaN stays NaN.
template <typename T> FC_HD T fc_shifted(T x, T mx) { return x == mx ? T(0) : x - mx; }

// TWO_GAMMA code of a runtime gamma: 2 gamma when that is an integer in [0, kMaxTwoGamma], else -1.
constexpr int kMaxTwoGamma = 10;
inline int two_gamma_code(double gamma) {
  const double g2 = 2.0 * gamma;
  return (g2 >= 0.0 && g2 <= kMaxTwoGamma && g2 == double(int(g2))) ? int(g2) : -1;
}

// Calls f(std::integral_constant<int, K>) with K = two_gamma (a two_gamma_code) when that is in
// [0, kMaxTwoGamma], else K = -1 (generic pow): one instantiation per common gamma.
template <int K = 0, typename F>
FC_HD void with_two_gamma(int two_gamma, F&& f) {
  if constexpr (K > kMaxTwoGamma) {
    f(std::integral_constant<int, -1>{});
  } else if (two_gamma == K) {
    f(std::integral_constant<int, K>{});
  } else {
    with_two_gamma<K + 1>(two_gamma, f);
  }
}

template <typename T>
struct SigmoidFocalParams {
  T alpha;             // < 0: no alpha term
  T gamma;
  T eps;               // label smoothing: t -> t (1 - eps) + eps / 2
  int two_gamma = -1;  // two_gamma_code(gamma), for focal_pow<T, kGammaRuntime>
};

// m^gamma, by products and a square root when 2 gamma is a small integer (the common 0, 1, 2, 2.5,
// ...): exact, and cheaper than exp(gamma log m), which dominates the CPU loop otherwise.
//   TWO_GAMMA >= 0: gamma = TWO_GAMMA / 2 at compile time (the CPU's vector loops);
//   kGammaRuntime:  a warp-uniform branch on two_gamma (the CUDA kernels and the scalar CPU rows);
//   -1:             exp(gamma log m).
constexpr int kGammaRuntime = -2;
template <typename T, int TWO_GAMMA>
FC_HD T focal_pow(T m, T gamma, int two_gamma = -1) {
  if constexpr (TWO_GAMMA == -1) {
    return fc_pow(m, gamma);
  } else if constexpr (TWO_GAMMA == kGammaRuntime) {
    if (two_gamma < 0) return fc_pow(m, gamma);
    T r = T(1);
    for (int i = 0; i < two_gamma / 2; ++i) r *= m;
    return two_gamma % 2 == 1 ? r * std::sqrt(m) : r;
  } else {
    T r = T(1);
    for (int i = 0; i < TWO_GAMMA / 2; ++i) r *= m;
    if constexpr (TWO_GAMMA % 2 == 1) r *= std::sqrt(m);
    return r;
  }
}

// Loss of one element and, if NEED_GRAD, d loss / d x.
//   p = sigmoid(x), ce = BCE-with-logits(x, t), m = 1 - p_t = p (1 - t) + (1 - p) t,
//   loss = alpha_t ce m^gamma,
//   d loss/dx = alpha_t m^gamma [(p - t) + gamma ce r (1 - 2t)],  r = p (1 - p) / m  in [0, 1].
// A raw target outside [0, 1] (or NaN) is invalid input: loss and gradient are NaN.
template <typename T, bool NEED_GRAD, int TWO_GAMMA = -1>
FC_HD T sigmoid_focal_elem(T x, T t_raw, const SigmoidFocalParams<T>& P, T* grad) {
  const bool bad = !(t_raw >= T(0) && t_raw <= T(1));
  const T t = t_raw * (T(1) - P.eps) + T(0.5) * P.eps;
  const T e = fc_exp(-(x < T(0) ? -x : x));    // exp(-|x|) in [0, 1]
  const T l1p = fc_log1p(e);
  const T sp_pos = fc_max(x, T(0)) + l1p;      // softplus(x)  = -log(1 - p)
  const T sp_neg = fc_max(-x, T(0)) + l1p;     // softplus(-x) = -log(p)
  const T r1 = T(1) / (T(1) + e);              // sigmoid(|x|)
  const T r0 = e * r1;                         // sigmoid(-|x|)
  const T p = x >= T(0) ? r1 : r0;
  const T q = x >= T(0) ? r0 : r1;
  const T ce = fc_xmul(T(1) - t, sp_pos) + fc_xmul(t, sp_neg);
  const T m = p * (T(1) - t) + q * t;
  const T mg = focal_pow<T, TWO_GAMMA>(m, P.gamma, P.two_gamma);
  const T at = P.alpha >= T(0) ? P.alpha * t + (T(1) - P.alpha) * (T(1) - t) : T(1);
  if (NEED_GRAD) {
    const T r = m > T(0) ? p * q / m : (t > T(0.5) ? p : q);
    const T cr = r == T(0) ? T(0) : ce * r;
    const T g = at * mg * ((p - t) + P.gamma * cr * (T(1) - T(2) * t));
    *grad = bad ? T(NAN) : g;
  }
  const T loss = at * ce * mg;
  return bad ? T(NAN) : loss;
}

// The coefficients q_c of a softmax-focal row: class-index targets, q_c = (1 - eps)[c == t] + eps / C
template <typename T>
struct IndexQ {
  int64_t t;
  T on, off;
  FC_HD T operator()(int64_t c) const { return c == t ? on : off; }
};

// ... and class-probability targets r (at r[c * stride]), q_c = (1 - eps) r_c + eps / C
template <typename T, typename R>
struct ProbQ {
  const R* r;
  int64_t stride;
  T keep, add;
  FC_HD T operator()(int64_t c) const { return T(r[c * stride]) * keep + add; }
};

// Whether C probabilities at r[c * stride] form a distribution: every entry >= 0 and the sum within
// tol of 1 (NaN fails both). tol: prob_target_tolerance (focal_checks.h), as
// fastcascade.reference.probability_tolerance.
template <typename T, typename R>
FC_HD bool prob_row_ok(const R* r, int64_t stride, int64_t C, T tol) {
  bool ok = true;
  T s = T(0);
  for (int64_t c = 0; c < C; ++c) {
    const T v = T(r[c * stride]);
    ok = ok && v >= T(0);
    s += v;
  }
  const T d = s - T(1);
  return ok && d <= tol && -d <= tol;
}

// A row of NaN: the loss, the gradient and the count of an invalid target.
template <typename T, bool NEED_GRAD, typename G>
FC_HD T softmax_focal_nan_row(int64_t C, int64_t stride, G* grad, T* count) {
  const T nan = T(NAN);
  if (NEED_GRAD)
    for (int64_t c = 0; c < C; ++c) grad[c * stride] = G(nan);
  *count = nan;
  return nan;
}

// The loss of one softmax-focal row, C logits at x[c * stride], given its coefficients q_c (IndexQ or ProbQ):
//   loss = -sum_c w_c q_c (1 - p_c)^gamma log p_c,
//   d loss/dx_j = a_j - p_j sum_c a_c,  a_c = w_c q_c (1 - p_c)^gamma (gamma u_c - 1),
//   u_c = p_c log p_c / (1 - p_c) in [-1, 0].
// two_gamma = two_gamma_code(gamma).
template <typename T, bool NEED_GRAD, typename X, typename W, typename G, typename Q>
FC_HD T softmax_focal_terms(const X* x, int64_t stride, int64_t C, const W* weight, T gamma, int two_gamma,
                            const Q& q, G* grad) {
  // log-sum-exp = mx + log1p(sum over c != argmax of exp(x_c - mx)): the arg-max term (exactly 1) is
  // left out of the sum, so log p of a confident class keeps its relative precision.
  T mx = T(x[0]);
  int64_t am = 0;
  for (int64_t c = 1; c < C; ++c) {
    const T v = T(x[c * stride]);
    if (v > mx) mx = v, am = c;
  }
  // x - mx is taken as 0 where x == mx: also for x = mx = +-inf, where the difference would be NaN (a
  // row [inf, 0] is then p = [1, 0], [inf, inf] is [1/2, 1/2], as fastcascade/reference.py has them)
  T s = T(0);
  for (int64_t c = 0; c < C; ++c) s += c == am ? T(0) : fc_exp(fc_shifted(T(x[c * stride]), mx));
  const T log_s = fc_log1p(s);  // log p_c = (x_c - mx) - log_s: never form mx + log_s, which rounds
  const T inv = T(1) / (T(1) + s);
  // grad_j = a_j - p_j A with A = a_am + rest (rest: the sum over c != am). For the arg-max class this
  // cancels when p -> 1, so it is formed as a_am (1 - p_am) - p_am rest instead.
  T loss = T(0), a_am = T(0), rest = T(0);
  for (int64_t pass = 0; pass < (NEED_GRAD ? 2 : 1); ++pass) {
    for (int64_t c = 0; c < C; ++c) {
      const T d = fc_shifted(T(x[c * stride]), mx);
      const T lp = d - log_s;
      const T wq = (weight ? T(weight[c]) : T(1)) * q(c);
      // 1 - p without expm1: only the arg-max class can have p > 1/2, and its 1 - p is s / (1 + s).
      const T p = c == am ? inv : fc_exp(d) * inv;
      const T om = c == am ? s * inv : T(1) - p;
      const T f = wq * focal_pow<T, kGammaRuntime>(om, gamma, two_gamma);
      if (pass == 0) loss += fc_xmul(f, -lp);
      if (NEED_GRAD) {
        T u = om == T(0) ? T(-1) : p * lp / om;
        u = p == T(0) ? T(0) : u;
        const T a = f * (gamma * u - T(1));
        if (pass == 0) (c == am ? a_am : rest) += a;
        else grad[c * stride] = G(c == am ? a * om - p * rest : a - p * (a_am + rest));
      }
    }
  }
  return loss;
}

// One softmax-focal row with a class-index target t (softmax_focal_terms with IndexQ).
// Ignored rows give loss 0, grad 0 and count 0; a target outside [0, C) gives NaN (never an index).
// Returns the loss; *count gets w_t (the row's share of the "mean" normaliser).
template <typename T, bool NEED_GRAD, typename X, typename W, typename G>
FC_HD T softmax_focal_row(const X* x, int64_t stride, int64_t C, int64_t t, int64_t ignore_index,
                          const W* weight, T gamma, int two_gamma, T eps, G* grad, T* count) {
  if (t == ignore_index) {
    if (NEED_GRAD)
      for (int64_t c = 0; c < C; ++c) grad[c * stride] = G(0);
    *count = T(0);
    return T(0);
  }
  if (t < 0 || t >= C) return softmax_focal_nan_row<T, NEED_GRAD>(C, stride, grad, count);
  const T q_off = eps / T(C);
  const IndexQ<T> q{t, T(1) - eps + q_off, q_off};
  *count = weight ? T(weight[t]) : T(1);
  return softmax_focal_terms<T, NEED_GRAD>(x, stride, C, weight, gamma, two_gamma, q, grad);
}

// One softmax-focal row with class-probability targets r[c * stride] (the logits' layout). A row that
// is not a distribution (prob_row_ok, within tol) gives NaN. *count gets 1: F.cross_entropy's "mean"
// over probabilities divides by the number of rows.
template <typename T, bool NEED_GRAD, typename X, typename R, typename W, typename G>
FC_HD T softmax_focal_prob_row(const X* x, const R* r, int64_t stride, int64_t C, const W* weight, T gamma,
                               int two_gamma, T eps, T tol, G* grad, T* count) {
  if (!prob_row_ok<T>(r, stride, C, tol)) return softmax_focal_nan_row<T, NEED_GRAD>(C, stride, grad, count);
  const ProbQ<T, R> q{r, stride, T(1) - eps, eps / T(C)};
  *count = T(1);
  return softmax_focal_terms<T, NEED_GRAD>(x, stride, C, weight, gamma, two_gamma, q, grad);
}

}  // namespace fastcascade
