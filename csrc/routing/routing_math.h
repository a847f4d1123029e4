// Per-row decisions of the routing ops, shared by the CPU and CUDA kernels
// (fastcascade/reference.py: route_threshold, route_argmax, route_confident, vote).
#pragma once
#include <ATen/core/Tensor.h>

#include <cmath>
#include <limits>

#include "common/checks.h"
#include "common/math.h"

namespace fastcascade {

// The largest float <= c. For a float x, x > c (compared exactly) <=> x > round_down(c): the threshold
// test of fp16/bf16/fp32 logits runs in fp32 and decides exactly as the float64 comparison would.
inline float round_down_to_float(double c) {
  constexpr double fmax = std::numeric_limits<float>::max();
  if (c != c) return NAN;
  if (c > fmax) return c == INFINITY ? INFINITY : float(fmax);  // only +inf exceeds a finite c > fmax
  if (c < -fmax) return -INFINITY;                               // every float but -inf exceeds it
  const float f = static_cast<float>(c);
  return double(f) > c ? std::nextafter(f, -INFINITY) : f;
}

// First index of the row's maximum, NaN counting as the maximum (torch.argmax).
template <typename scalar_t, typename acc_t>
FC_HD int64_t row_argmax(const scalar_t* x, int64_t C) {
  acc_t best = acc_t(x[0]);
  int64_t arg = 0;
  for (int64_t c = 1; c < C; ++c) {
    const acc_t v = acc_t(x[c]);
    if (v > best || (v != v && best == best)) best = v, arg = c;
  }
  return arg;
}

// route_confident's test in float64: sum_c exp((x_c - max) / T), summed over c in order, <= 1 / tau.
template <typename scalar_t>
FC_HD bool row_confident(const scalar_t* x, int64_t C, double temperature, double max_sum) {
  double m = double(x[0]);
  for (int64_t c = 1; c < C; ++c) m = fc_max(m, double(x[c]));
  double s = 0;
  for (int64_t c = 0; c < C; ++c) s += fc_exp((double(x[c]) - m) / temperature);
  return s <= max_sum;
}

// vote: p (C, acc) += softmax(x) of one member, the exponentials summed over c in order.
template <typename scalar_t, typename acc_t>
FC_HD void add_softmax(const scalar_t* x, int64_t C, acc_t* p) {
  acc_t m = acc_t(x[0]);
  for (int64_t c = 1; c < C; ++c) m = fc_max(m, acc_t(x[c]));
  acc_t s = 0;
  for (int64_t c = 0; c < C; ++c) s += fc_exp(acc_t(x[c]) - m);
  for (int64_t c = 0; c < C; ++c) p[c] += fc_exp(acc_t(x[c]) - m) / s;
}

// The label among classes c with votes[c] == the most votes (every class when votes is null, soft
// voting): the largest summed probability, the lowest class id among equal ones.
template <typename acc_t>
FC_HD int64_t vote_pick(const acc_t* p, const int32_t* votes, int64_t C) {
  int32_t most = 0;
  if (votes)
    for (int64_t c = 0; c < C; ++c) most = votes[c] > most ? votes[c] : most;
  int64_t best = -1;
  for (int64_t c = 0; c < C; ++c) {
    if (votes && votes[c] != most) continue;
    if (best < 0 || p[c] > p[best]) best = c;
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Input checks shared by the CPU and CUDA ops (the Python API checks first and says more).

inline int64_t check_route_logits_1d(const at::Tensor& logits) {
  check_floating(logits, "logits");
  TORCH_CHECK(logits.dim() == 1 || (logits.dim() == 2 && logits.size(1) == 1), "logits must be (N,) or (N, 1), got ",
              logits.sizes());
  return logits.size(0);
}

inline void check_route_logits_2d(const at::Tensor& logits) {
  check_floating(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, "logits must be (N, C) with C >= 1, got ", logits.sizes());
}

inline void check_partition(const at::Tensor& branch, int64_t num_branches) {
  TORCH_CHECK(branch.scalar_type() == at::kInt || branch.scalar_type() == at::kLong,
              "branch must be int32 or int64, got ", branch.scalar_type());
  TORCH_CHECK(branch.dim() == 1, "branch must be (N,), got ", branch.sizes());
  TORCH_CHECK(num_branches >= 1, "num_branches must be >= 1, got ", num_branches);
}

inline void check_row_index(const at::Tensor& x, const char* xn, const at::Tensor& index) {
  TORCH_CHECK(x.dim() >= 1, xn, " must have at least one dimension (rows), got a 0-dim tensor");
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, "index must be int32 or int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.dim() == 1, "index must be (M,), got ", index.sizes());
  check_same_device(x, xn, index, "index");
}

inline void check_vote(const at::Tensor& member_logits, int64_t mode) {
  check_floating(member_logits, "member_logits");
  TORCH_CHECK(member_logits.dim() == 3 && member_logits.size(0) >= 1 && member_logits.size(2) >= 1,
              "member_logits must be (K, N, C) with K, C >= 1, got ", member_logits.sizes());
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (hard) or 1 (soft), got ", mode);
}

}  // namespace fastcascade
