// Output options shared by the CPU and CUDA focal-loss backends.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastcascade {

// The 0-dim grad_scale of the focal ops (1 / the "mean" normaliser): float64 for float64 logits, so
// their gradients keep float64 precision, else float32.
inline at::TensorOptions focal_scale_options(const at::Tensor& logits) {
  return logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

}  // namespace fastcascade
