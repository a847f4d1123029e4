// Adapter activations and their derivatives, shared by the CPU and CUDA kernels
// (fastcascade/reference.py: relu, gelu in its erf form, silu).
#pragma once
#include "common/math.h"

namespace fastcascade {

enum AdapterActivation : int64_t { kRelu = 0, kGelu = 1, kSilu = 2 };

template <typename T>
FC_HD T adapter_act(T h, int64_t act) {
  if (act == kRelu) return h > T(0) ? h : T(0);
  if (act == kGelu) return T(0.5) * h * (T(1) + fc_erf(h * T(0.70710678118654752440)));
  return h / (T(1) + fc_exp(-h));
}

template <typename T>
FC_HD T adapter_act_grad(T h, int64_t act) {
  if (act == kRelu) return h > T(0) ? T(1) : T(0);
  if (act == kGelu) {
    const T cdf = T(0.5) * (T(1) + fc_erf(h * T(0.70710678118654752440)));
    const T pdf = fc_exp(T(-0.5) * h * h) * T(0.39894228040143267794);
    return cdf + h * pdf;
  }
  const T sig = T(1) / (T(1) + fc_exp(-h));
  return sig * (T(1) + h * (T(1) - sig));
}

}  // namespace fastcascade
