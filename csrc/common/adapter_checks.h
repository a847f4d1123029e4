// Input checks of the pooled-adapter ops, shared by the CPU and CUDA backends.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "common/adapter_math.h"
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

// Pixel adapter: x (B, C, H, W) as for the pooled adapter, or tokens (T, C) contiguous, seen as one
// channels-last "sample" of T positions. Dropout p in [0, 1).
inline AdapterShape check_pixel_adapter(const at::Tensor& x, const char* xn, const at::Tensor& down_w,
                                        const at::Tensor& up_w, int64_t activation, double dropout) {
  TORCH_CHECK(dropout >= 0 && dropout < 1, "dropout must be in [0, 1), got ", dropout);
  if (x.dim() != 2) return check_pooled_adapter(x, xn, down_w, up_w, activation);
  check_floating(x, xn);
  TORCH_CHECK(x.is_contiguous(), xn, " (tokens (T, C)) must be contiguous (the Python API arranges this)");
  const at::Tensor as_image = x.view({1, x.size(0), 1, x.size(1)}).permute({0, 3, 1, 2});  // (1, C, T, 1)
  AdapterShape S = check_pooled_adapter(as_image, xn, down_w, up_w, activation);
  S.channels_last = true;  // a (1, C, T, 1) view of (T, C) memory is channels_last even when C = 1
  return S;
}

// grad_y of a pixel adapter: x's shape and dtype, and memory laid out as x's (S from x).
inline void check_same_layout(const at::Tensor& g, const char* gn, const at::Tensor& x, const AdapterShape& S) {
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(), gn, " must have x's shape and dtype ",
              x.sizes(), " ", x.scalar_type(), ", got ", g.sizes(), " ", g.scalar_type());
  const bool same = x.dim() == 2 || !S.channels_last ? g.is_contiguous()
                                                      : g.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(same, gn, " must be laid out as x (", S.channels_last ? "channels_last" : "contiguous", ")");
  check_same_device(x, "x", g, gn);
}

// The dropout threshold on 32-bit hashes: keep an element when its hash >= p * 2^32.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

inline AdapterDropout adapter_dropout(double p, int64_t seed) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout must be in [0, 1), got ", p);
  return {seed, dropout_threshold(p), 1.0 / (1.0 - p), p > 0};
}

inline void check_adapter_scale(const std::optional<at::Tensor>& scale, const at::Tensor& x) {
  if (!scale.has_value()) return;
  TORCH_CHECK(scale->numel() == 1, "scale must hold one value (a 0-dim tensor), got shape ", scale->sizes());
  check_same_device(x, "x", *scale, "scale");
}

}  // namespace fastcascade
