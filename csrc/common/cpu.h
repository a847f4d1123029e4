// CPU-only helpers: function multiversioning and small vector kernels shared by the CPU ops.
#pragma once
#include <cstdint>

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

}  // namespace fastcascade
