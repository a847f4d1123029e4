// CPU-only helpers: function multiversioning and small vector kernels shared by the CPU ops.
#pragma once
#include <cstdint>

#include "common/math.h"

// x86-64: each FC_CPU_CLONES function gets an AVX2+FMA (x86-64-v3) clone picked at load time when
// the CPU has it, besides the baseline one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FC_CPU_CLONES
#endif
// A lambda called inside a clone must be inlined into it, or it is compiled for the baseline ISA.
#define FC_LAMBDA_INLINE __attribute__((always_inline))

namespace fastcascade {

// y[i] += a * x[i]: the inner loop of the CPU matrix-vector products (no reduction across i, so it
// vectorises without reassociating any sum). Inline: call it from an FC_CPU_CLONES function, whose
// ISA it takes (a clone per call costs a dispatch per short row).
template <typename T>
inline __attribute__((always_inline)) void axpy(int64_t n, T a, const T* __restrict__ x, T* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Rows processed together by the CPU softmax kernels, stored class-major: x[c * kLanes + lane].
constexpr int kLanes = 16;

// The softmax terms of kLanes rows of C logits, shared by the softmax-focal and Dice+focal kernels:
// am = the first argmax, mx = the maximum, e[c * kLanes + l] = exp(x - mx), and s = the sum of e over
// the classes other than the argmax (its term is 1), so 1 + s is the partition function and p_am =
// 1 / (1 + s), 1 - p_am = s / (1 + s) without cancellation. Inline: it takes the ISA of its caller.
inline __attribute__((always_inline)) void lanes_softmax_terms(const float* xb, int64_t C, float* mx, int32_t* am,
                                                              float* e, float* s) {
  constexpr int L = kLanes;
#pragma omp simd
  for (int l = 0; l < L; ++l) mx[l] = xb[l], am[l] = 0, s[l] = 0.f;
  for (int64_t c = 1; c < C; ++c)
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      const float v = xb[c * L + l];
      const bool gt = v > mx[l];
      am[l] = gt ? int32_t(c) : am[l];
      mx[l] = gt ? v : mx[l];
    }
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      const float xv = xb[c * L + l];
      const float v = fc_exp(xv == mx[l] ? 0.f : xv - mx[l]);  // 1 where x == mx, infinite ones too
      e[c * L + l] = v;
      s[l] += c == am[l] ? 0.f : v;
    }
}

}  // namespace fastcascade
