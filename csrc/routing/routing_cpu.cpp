// CPU kernels of the routing ops (fastcascade/reference.py: route_*, partition, gather_rows,
// scatter_rows, vote).
//
// Decisions are per row and parallel over rows. partition is a counting sort over a fixed number of
// chunks: per-chunk histograms, one exclusive scan in (branch, chunk) order, then each chunk places
// its rows; a stable counting sort has one answer, so the thread count cannot change it. gather and
// scatter are one row-copy loop parameterised by which side is indexed. Values a CUDA kernel would
// drop (branch ids, indices out of range, duplicate scatter targets) raise here: no sync to avoid.
// at::Tensor methods and the per-operator headers below only (enforced where torch has per-operator headers)
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "routing/routing_math.h"

// Its own namespace: setup.py may compile several CPU sources as one translation unit.
namespace fastcascade::routing_cpu {
namespace {

constexpr int64_t kRowGrain = 4096;         // rows per parallel task for the per-row decisions
constexpr int64_t kPartitionChunk = 65536;  // rows per counting-sort chunk (one chunk below that)
constexpr int64_t kCopyGrainBytes = 65536;  // bytes per parallel task of a row copy
constexpr int64_t kHugePage = int64_t(2) << 20;
// glibc (64-bit) serves a request this large with a fresh mmap at every call (its dynamic mmap threshold
// stops growing at 32 MiB) and unmaps it on free, so every 4 KiB page of such an output faults on its
// first write: ~27 ms of a 64 MiB gather's ~41 on a 2-core VM (bench/routing_notes.md). Smaller outputs
// come back from the heap already mapped; advising them would only split the heap's mapping. (A large
// free heap chunk can serve a big request too: then the advice reaches only its pages not yet touched.)
constexpr int64_t kFreshMappingBytes = int64_t(32) << 20;

at::Tensor route_threshold_cpu(const at::Tensor& logits, double logit_threshold) {
  const int64_t N = check_route_logits_1d(logits);
  const at::Tensor x = logits.reshape({N}).contiguous();
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kInt));
  int32_t* o = out.mutable_data_ptr<int32_t>();
  const float c32 = round_down_to_float(logit_threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "route_threshold_cpu", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        if constexpr (std::is_same_v<scalar_t, double>) o[i] = p[i] > logit_threshold;
        else o[i] = float(p[i]) > c32;
      }
    });
  });
  return out;
}

at::Tensor route_argmax_cpu(const at::Tensor& logits) {
  check_route_logits_2d(logits);
  const at::Tensor x = logits.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kInt));
  int32_t* o = out.mutable_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "route_argmax_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = int32_t(row_argmax<scalar_t, acc_t>(p + i * C, C));
    });
  });
  return out;
}

at::Tensor route_confident_cpu(const at::Tensor& logits, double temperature, double max_sum) {
  check_route_logits_2d(logits);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const at::Tensor x = logits.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kInt));
  int32_t* o = out.mutable_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "route_confident_cpu", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = row_confident(p + i * C, C, temperature, max_sum);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// partition

template <typename idx_t>
void counting_sort(const idx_t* b, int64_t N, int64_t B, int64_t* order, int64_t* counts, int64_t* offsets) {
  // More chunks than threads buys nothing; a histogram per chunk costs B slots.
  const int64_t nchunks = B > N ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / kPartitionChunk));
  std::vector<int64_t> next(nchunks * B, 0);  // [chunk][branch]: a count, then the chunk's next slot
  auto chunk_begin = [&](int64_t k) { return k * N / nchunks; };
  at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t i = chunk_begin(k); i < chunk_begin(k + 1); ++i) ++next[k * B + b[i]];
  });
  int64_t run = 0;
  for (int64_t j = 0; j < B; ++j) {
    offsets[j] = run;
    for (int64_t k = 0; k < nchunks; ++k) {
      const int64_t c = next[k * B + j];
      next[k * B + j] = run;
      run += c;
    }
    counts[j] = run - offsets[j];
  }
  offsets[B] = run;
  at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t i = chunk_begin(k); i < chunk_begin(k + 1); ++i) order[next[k * B + b[i]]++] = i;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partition_cpu(const at::Tensor& branch_in, int64_t num_branches) {
  check_partition(branch_in, num_branches);
  const at::Tensor branch = branch_in.contiguous();
  const int64_t N = branch.size(0), B = num_branches;
  const auto opts = branch.options().dtype(at::kLong);
  at::Tensor order = at::empty({N}, opts), counts = at::empty({B}, opts), offsets = at::empty({B + 1}, opts);
  AT_DISPATCH_INDEX_TYPES(branch.scalar_type(), "partition_cpu", [&] {
    const index_t* b = branch.const_data_ptr<index_t>();
    for (int64_t i = 0; i < N; ++i)
      TORCH_CHECK(b[i] >= 0 && b[i] < B, "partition: branch holds ", int64_t(b[i]), " at row ", i,
                  ", outside [0, num_branches = ", B, ")");
    counting_sort(b, N, B, order.mutable_data_ptr<int64_t>(), counts.mutable_data_ptr<int64_t>(),
                  offsets.mutable_data_ptr<int64_t>());
  });
  return {order, counts, offsets};
}

// ---------------------------------------------------------------------------------------------
// gather_rows / scatter_rows: dst[dst_idx[i] or i] = src[src_idx[i] or i], rows of row_bytes bytes.

// An output of at least kFreshMappingBytes, allocated and not yet written: ask for 2 MiB pages on its
// aligned interior, so its first touch (the row copy, in parallel) takes one fault per 2 MiB instead of
// 512. Advice only: where transparent huge pages are off (or not Linux) nothing changes, and a failed
// madvise leaves 4 KiB pages.
at::Tensor empty_for_first_touch(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t n = int64_t(out.nbytes());
  if (n >= kFreshMappingBytes) {
    const auto p = reinterpret_cast<std::uintptr_t>(out.mutable_data_ptr());
    const auto mask = ~std::uintptr_t(kHugePage - 1);
    const std::uintptr_t begin = (p + kHugePage - 1) & mask, end = (p + n) & mask;
    if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

template <typename idx_t>
void copy_rows(const char* src, const idx_t* src_idx, char* dst, const idx_t* dst_idx, int64_t M, int64_t row_bytes) {
  if (row_bytes == 0) return;
  at::parallel_for(0, M, std::max<int64_t>(1, kCopyGrainBytes / row_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = src_idx ? int64_t(src_idx[i]) : i, d = dst_idx ? int64_t(dst_idx[i]) : i;
      std::memcpy(dst + d * row_bytes, src + s * row_bytes, row_bytes);
    }
  });
}

int64_t row_bytes_of(const at::Tensor& t) {
  int64_t n = t.element_size();
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

template <typename idx_t>
void check_index_range(const idx_t* idx, int64_t M, int64_t rows, const char* op) {
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, op, ": index holds ", int64_t(idx[i]), " at position ", i,
                ", outside [0, ", rows, ")");
}

at::Tensor gather_rows_cpu(const at::Tensor& x_in, const at::Tensor& index_in) {
  check_row_index(x_in, "x", index_in);
  const at::Tensor x = x_in.contiguous(), index = index_in.contiguous();
  const int64_t M = index.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = M;
  at::Tensor out = empty_for_first_touch(shape, x.options());
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "gather_rows_cpu", [&] {
    const index_t* idx = index.const_data_ptr<index_t>();
    check_index_range(idx, M, x.size(0), "gather_rows");
    copy_rows<index_t>(static_cast<const char*>(x.const_data_ptr()), idx, static_cast<char*>(out.mutable_data_ptr()),
                       nullptr, M, row_bytes_of(x));
  });
  return out;
}

at::Tensor scatter_rows_cpu(const at::Tensor& src_in, const at::Tensor& index_in, int64_t num_rows) {
  check_row_index(src_in, "src", index_in);
  TORCH_CHECK(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  TORCH_CHECK(index_in.size(0) == src_in.size(0), "index must have one entry per row of src (", src_in.size(0),
              "), got ", index_in.size(0));
  const at::Tensor src = src_in.contiguous(), index = index_in.contiguous();
  const int64_t M = index.size(0);
  std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
  shape[0] = num_rows;
  at::Tensor out = empty_for_first_touch(shape, src.options());
  out.zero_();  // rows no index names stay zero
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "scatter_rows_cpu", [&] {
    const index_t* idx = index.const_data_ptr<index_t>();
    check_index_range(idx, M, num_rows, "scatter_rows");
    std::vector<uint8_t> hit(num_rows, 0);  // two sources for one row would race (and on CUDA, do)
    for (int64_t i = 0; i < M; ++i) {
      TORCH_CHECK(!hit[idx[i]], "scatter_rows: index holds row ", int64_t(idx[i]),
                  " twice (duplicate indices are not supported: index must be injective, as partition's order is)");
      hit[idx[i]] = 1;
    }
    copy_rows<index_t>(static_cast<const char*>(src.const_data_ptr()), nullptr,
                       static_cast<char*>(out.mutable_data_ptr()), idx, M, row_bytes_of(src));
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// vote

std::tuple<at::Tensor, at::Tensor> vote_cpu(const at::Tensor& member_logits, int64_t mode, bool need_probs) {
  check_vote(member_logits, mode);
  const at::Tensor x = member_logits.contiguous();
  const int64_t K = x.size(0), N = x.size(1), C = x.size(2);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor labels = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor probs = at::empty({need_probs ? N : 0, C}, x.options().dtype(acc));
  int64_t* lab = labels.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vote_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    acc_t* pout = need_probs ? probs.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, N, std::max<int64_t>(1, kRowGrain / (K * C)), [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> sum(C);
      std::vector<int32_t> votes(C);
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        std::fill(votes.begin(), votes.end(), 0);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* row = p + (k * N + i) * C;
          add_softmax<scalar_t, acc_t>(row, C, sum.data());
          if (mode == 0) ++votes[row_argmax<scalar_t, acc_t>(row, C)];
        }
        lab[i] = vote_pick(sum.data(), mode == 0 ? votes.data() : nullptr, C);
        if (pout)
          for (int64_t c = 0; c < C; ++c) pout[i * C + c] = sum[c] / acc_t(K);
      }
    });
  });
  return {labels, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CPU, m) {
  m.impl("route_threshold", &route_threshold_cpu);
  m.impl("route_argmax", &route_argmax_cpu);
  m.impl("route_confident", &route_confident_cpu);
  m.impl("partition", &partition_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("vote", &vote_cpu);
}

}  // namespace fastcascade::routing_cpu
