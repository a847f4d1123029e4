// Shared by the CPU and CUDA metrics kernels (fastcascade/reference.py: confusion_matrix).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "common/checks.h"
#include "common/math.h"

namespace fastcascade {

// The (target, pred) cell of a C x C confusion matrix, row-major (rows = target), or -1 for an element
// that counts nowhere: target == ignore (kSkip) or an id outside [0, C) (kBad, which the CPU reports).
constexpr int64_t kSkip = -1, kBad = -2;

FC_HD int64_t confusion_cell(int64_t t, int64_t p, int64_t C, bool has_ignore, int64_t ignore) {
  if (has_ignore && t == ignore) return kSkip;
  // one unsigned compare per id catches negatives too
  if (static_cast<uint64_t>(t) >= static_cast<uint64_t>(C) || static_cast<uint64_t>(p) >= static_cast<uint64_t>(C))
    return kBad;
  return t * C + p;
}

inline int64_t check_confusion(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes) {
  for (auto [t, n] : {std::pair<const at::Tensor&, const char*>{pred, "pred"}, {target, "target"}})
    TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, n, " must be int32 or int64, got ",
                t.scalar_type());
  TORCH_CHECK(pred.sizes() == target.sizes(), "pred and target must have the same shape, got ", pred.sizes(), " and ",
              target.sizes());
  check_same_device(pred, "pred", target, "target");
  TORCH_CHECK(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  // C * C int64 cells; beyond 2^31 cells (16 GiB) it is surely a mistake, and products below stay in int64
  TORCH_CHECK(num_classes <= 46340, "num_classes must be <= 46340 (C * C cells), got ", num_classes);
  return pred.numel();
}

}  // namespace fastcascade
