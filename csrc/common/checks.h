// Input checks shared by every backend of every op: each names the argument and what was expected.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace fastcascade {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(), " and ",
              b.device());
}

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// Elementwise ops read their inputs as flat memory: same shape, no gaps or overlaps, and the same
// strides wherever they matter (a size-1 dimension's stride places nothing).
inline void check_same_dense_layout(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), an, " and ", bn, " must have the same shape, got ", a.sizes(), " and ",
              b.sizes());
  bool same = true;
  for (int64_t d = 0; d < a.dim(); ++d) same = same && (a.size(d) <= 1 || a.stride(d) == b.stride(d));
  TORCH_CHECK(same && a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense(), an, " and ", bn,
              " must be dense with identical strides (the Python API arranges this)");
}

// 0 none, 1 mean, 2 sum: the loss output of a reduction over `like`'s elements.
inline at::Tensor loss_output(const at::Tensor& like_none, int64_t reduction, const at::TensorOptions& opts) {
  return reduction == 0 ? at::empty_like(like_none, opts) : at::empty({}, opts);
}

}  // namespace fastcascade
