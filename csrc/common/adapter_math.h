// Adapter activations and their derivatives, shared by the CPU and CUDA kernels
// (fastcascade/reference.py: relu, gelu in its erf form, silu).
#pragma once
#include <cstdint>

#include "common/math.h"

namespace fastcascade {

enum AdapterActivation : int64_t { kRelu = 0, kGelu = 1, kSilu = 2 };

template <typename T>
FC_HD T adapter_act(T h, int64_t act) {
  // relu as torch.relu: NaN stays NaN (h <= 0 is false for NaN)
  if (act == kRelu) return h <= T(0) ? T(0) : h;
  if (act == kGelu) return T(0.5) * h * (T(1) + fc_erf(h * T(0.70710678118654752440)));
  return h / (T(1) + fc_exp(-h));
}

template <typename T>
FC_HD T adapter_act_grad(T h, int64_t act) {
  // torch's relu backward passes the gradient wherever h <= 0 is false, NaN included
  if (act == kRelu) return h <= T(0) ? T(0) : T(1);
  if (act == kGelu) {
    const T cdf = T(0.5) * (T(1) + fc_erf(h * T(0.70710678118654752440)));
    const T pdf = fc_exp(T(-0.5) * h * h) * T(0.39894228040143267794);
    return cdf + h * pdf;
  }
  const T sig = T(1) / (T(1) + fc_exp(-h));
  return sig * (T(1) + h * (T(1) - sig));
}

// Dropout on the r-wide hidden vector, drawn inside the kernels from (seed, element index) with a
// counter-based hash: forward and backward, and every backend, redraw the identical mask, so nothing
// is stored and results are reproducible (fastcascade/reference.py: adapter_dropout_keep).
FC_HD uint32_t fc_mix32(uint32_t v) {  // lowbias32 (C. Wellons): a good 32-bit avalanche
  v ^= v >> 16;
  v *= 0x7feb352du;
  v ^= v >> 15;
  v *= 0x846ca68bu;
  v ^= v >> 16;
  return v;
}

// Keep element `index` of the hidden activations when its hash is at least `threshold` (= p * 2^32).
FC_HD bool adapter_dropout_keep(int64_t seed, int64_t index, uint32_t threshold) {
  const uint64_t i = static_cast<uint64_t>(index), sd = static_cast<uint64_t>(seed);
  const uint32_t h = fc_mix32(uint32_t(i) ^ fc_mix32(uint32_t(sd) ^ fc_mix32(uint32_t(i >> 32) + uint32_t(sd >> 32))));
  return h >= threshold;
}

// Dropout as the kernels apply it: v / (1 - p) where element `index` is kept, else 0.
struct AdapterDropout {
  int64_t seed;
  uint32_t threshold;  // p * 2^32
  double keep_scale;   // 1 / (1 - p)
  bool on;             // p > 0

  template <typename T>
  FC_HD T apply(T v, int64_t index) const {
    if (!on) return v;
    return adapter_dropout_keep(seed, index, threshold) ? v * T(keep_scale) : T(0);
  }
};

}  // namespace fastcascade
