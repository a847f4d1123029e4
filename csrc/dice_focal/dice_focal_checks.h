// Input checks of the Dice + focal ops, shared by the CPU and CUDA backends.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "common/checks.h"

namespace fastcascade {

struct DiceFocalDims {
  int64_t B, C, S;
};

// logits (B, C, S) float; target int64 (B, S) on the logits' device; weight (C,) on that device too.
inline DiceFocalDims check_dice_focal_inputs(const at::Tensor& logits, const at::Tensor& target,
                                             const std::optional<at::Tensor>& weight) {
  check_floating(logits, "logits");
  check_same_device(logits, "logits", target, "target");
  TORCH_CHECK(logits.dim() == 3, "logits must be (B, C, S), got ", logits.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  const DiceFocalDims d{logits.size(0), logits.size(1), logits.size(2)};
  TORCH_CHECK(target.dim() == 2 && target.size(0) == d.B && target.size(1) == d.S,
              "target must have shape (B, S) = (", d.B, ", ", d.S, ") matching logits ", logits.sizes(), ", got ",
              target.sizes());
  TORCH_CHECK(d.C >= 1, "logits must have at least one class, got ", logits.sizes());
  if (weight.has_value()) {
    check_same_device(logits, "logits", *weight, "weight");
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == d.C, "weight must have shape (C,) = (", d.C, ",), got ",
                weight->sizes());
  }
  return d;
}

// The forward's per-class sums, as the backward receives them: inter and card (B, C).
inline void check_dice_focal_sums(const DiceFocalDims& d, const at::Tensor& inter, const at::Tensor& card) {
  TORCH_CHECK(inter.sizes() == card.sizes() && inter.dim() == 2 && inter.size(0) == d.B && inter.size(1) == d.C,
              "inter and card must have shape (B, C) = (", d.B, ", ", d.C, "), got ", inter.sizes(), " and ",
              card.sizes());
}

// The sums accumulate in float64 for float64 logits, float32 otherwise.
inline at::TensorOptions dice_focal_acc_options(const at::Tensor& logits) {
  return logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

}  // namespace fastcascade
