// Input checks of the pooled-adapter ops, shared by the CPU and CUDA backends.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace fastcascade {

struct AdapterShape {
  int64_t B, C, HW, r;
  bool channels_last;  // per-sample memory is [HW][C] rather than [C][HW]
};

// x (or grad_y): (B, C, H, W), contiguous or channels_last; down_w (r, C); up_w (C, r); C, r >= 1.
inline AdapterShape check_pooled_adapter(const at::Tensor& x, const char* xn, const at::Tensor& down_w,
                                         const at::Tensor& up_w, int64_t activation) {
  check_floating(x, xn);
  TORCH_CHECK(x.dim() == 4, xn, " must be (B, C, H, W), got ", x.sizes());
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.is_contiguous() || cl, xn, " must be contiguous or channels_last (the Python API arranges this)");
  const int64_t C = x.size(1), r = down_w.size(0);
  TORCH_CHECK(down_w.dim() == 2 && down_w.size(1) == C, "down_w must be (r, C) with C = ", C, ", got ",
              down_w.sizes());
  TORCH_CHECK(up_w.dim() == 2 && up_w.size(0) == C && up_w.size(1) == r, "up_w must be (C, r) = (", C, ", ", r,
              "), got ", up_w.sizes());
  TORCH_CHECK(activation >= 0 && activation <= 2, "activation must be 0 (relu), 1 (gelu) or 2 (silu), got ",
              activation);
  TORCH_CHECK(C > 0 && r > 0, "pooled_adapter needs C >= 1 and r >= 1, got C = ", C, ", r = ", r);
  check_same_device(x, xn, down_w, "down_w");
  check_same_device(x, xn, up_w, "up_w");
  return {x.size(0), C, x.size(2) * x.size(3), r, cl};
}

inline void check_adapter_scale(const std::optional<at::Tensor>& scale, const at::Tensor& x) {
  if (!scale.has_value()) return;
  TORCH_CHECK(scale->numel() == 1, "scale must hold one value (a 0-dim tensor), got shape ", scale->sizes());
  check_same_device(x, "x", *scale, "scale");
}

}  // namespace fastcascade
