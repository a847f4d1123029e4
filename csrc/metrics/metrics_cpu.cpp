// CPU kernel of the metrics ops (fastcascade/reference.py: confusion_matrix).
//
// A fixed number of chunks, each counting into its own C x C histogram, then one sum in chunk order:
// integer counts, so the result is exact whatever the thread count. Ids outside [0, C) raise (no sync
// to avoid here); each chunk remembers its first such element, so the error names the first one.
// at::Tensor methods and the per-operator headers below only (enforced where torch has per-operator headers)
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "metrics/metrics_math.h"

// Its own namespace: setup.py may compile several CPU sources as one translation unit.
namespace fastcascade::metrics_cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;          // elements per chunk (one chunk below that)
constexpr int64_t kMaxPrivateCells = 1 << 24;  // per-chunk histograms in all (128 MiB of int64)
constexpr int64_t kReplicas = 4;               // a power of two
constexpr int64_t kReplicaMaxCells = 4096;     // replicas while they fit in L1/L2 (4 x 32 KiB)

template <typename p_t, typename t_t>
void confusion_count(const p_t* pred, const t_t* target, int64_t N, int64_t C, bool has_ignore, int64_t ignore,
                     int64_t* out) {
  const int64_t cells = C * C;
  // Few cells: kReplicas histograms per chunk, element i counting into replica i % kReplicas, so runs
  // of one cell (a good classifier's diagonal) are not one chain of dependent increments.
  const int64_t R = cells <= kReplicaMaxCells ? kReplicas : 1;
  const int64_t nchunks = std::max<int64_t>(
      1, std::min({int64_t(at::get_num_threads()), N / kChunk, kMaxPrivateCells / (R * cells)}));
  std::vector<int64_t> hist(nchunks * R * cells, 0);
  std::vector<int64_t> first_bad(nchunks, std::numeric_limits<int64_t>::max());
  auto chunk_begin = [&](int64_t k) { return k * N / nchunks; };
  at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t* h = hist.data() + k * R * cells;
      for (int64_t i = chunk_begin(k); i < chunk_begin(k + 1); ++i) {
        const int64_t cell = confusion_cell(int64_t(target[i]), int64_t(pred[i]), C, has_ignore, ignore);
        if (cell >= 0) ++h[(R == 1 ? 0 : (i & (kReplicas - 1)) * cells) + cell];
        else if (cell == kBad && first_bad[k] > i) first_bad[k] = i;
      }
    }
  });
  const int64_t bad = *std::min_element(first_bad.begin(), first_bad.end());
  if (bad != std::numeric_limits<int64_t>::max()) {
    const int64_t t = int64_t(target[bad]), p = int64_t(pred[bad]);
    const bool t_bad = t < 0 || t >= C;
    TORCH_CHECK(false, "confusion_matrix: ", t_bad ? "target" : "pred", " holds ", t_bad ? t : p, " at element ", bad,
                ", outside [0, num_classes = ", C, ")", has_ignore && t_bad ? " and not ignore_index" : "");
  }
  for (int64_t k = 0; k < nchunks * R; ++k)
    for (int64_t j = 0; j < cells; ++j) out[j] += hist[k * cells + j];
}

at::Tensor confusion_matrix_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, int64_t num_classes,
                                std::optional<int64_t> ignore_index) {
  const int64_t N = check_confusion(pred_in, target_in, num_classes);
  const at::Tensor pred = pred_in.contiguous().view({N}), target = target_in.contiguous().view({N});
  at::Tensor out = at::zeros({num_classes, num_classes}, pred.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(pred.scalar_type(), "confusion_matrix_cpu", [&] {
    using p_t = index_t;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "confusion_matrix_cpu", [&] {
      confusion_count(pred.const_data_ptr<p_t>(), target.const_data_ptr<index_t>(), N, num_classes,
                      ignore_index.has_value(), ignore_index.value_or(0), out.mutable_data_ptr<int64_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CPU, m) { m.impl("confusion_matrix", &confusion_matrix_cpu); }

}  // namespace fastcascade::metrics_cpu
