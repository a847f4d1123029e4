// Output options shared by the CPU and CUDA focal-loss backends.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace fastcascade {

// The 0-dim grad_scale of the focal ops (1 / the "mean" normaliser): float64 for float64 logits, so
// their gradients keep float64 precision, else float32.
inline at::TensorOptions focal_scale_options(const at::Tensor& logits) {
  return logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// softmax_focal's target and weight, for logits (N, C) or (N, C, S): int64 class indices (N,) / (N, S), or
// floating class probabilities of the logits' shape; weight (C,).
inline void check_softmax_focal_target(const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight) {
  const int64_t N = logits.size(0), C = logits.size(1), S = logits.dim() == 3 ? logits.size(2) : 1;
  if (target.is_floating_point()) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "target of class probabilities must have the logits' shape ",
                logits.sizes(), ", got ", target.sizes());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64 class indices or floating class "
                "probabilities, got ", target.scalar_type());
    TORCH_CHECK(target.numel() == N * S && target.size(0) == N,
                "target must have shape (N,) or (N, S) matching logits ", logits.sizes(), ", got ", target.sizes());
  }
  if (weight.has_value())
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == C, "weight must have shape (C,) = (", C, ",), got ",
                weight->sizes());
}

// How far from 1 a row of probability targets of this dtype may sum, as
// fastcascade.reference.probability_tolerance: 16-bit targets round each entry to 8 or 11 bits.
inline double prob_target_tolerance(const at::Tensor& target) {
  return target.element_size() == 2 ? 1e-2 : 1e-3;
}

// Probability targets as the kernels read them: in the logits' dtype or float32 (exact for 16-bit ones).
inline at::Tensor prob_target_for(const at::Tensor& target, const at::Tensor& logits) {
  return target.scalar_type() == logits.scalar_type() ? target : target.to(at::kFloat);
}

// The "none" loss of probability targets: one per row, (N,) or (N, S).
inline std::vector<int64_t> prob_loss_shape(const at::Tensor& logits) {
  if (logits.dim() == 3) return {logits.size(0), logits.size(2)};
  return {logits.size(0)};
}

}  // namespace fastcascade
