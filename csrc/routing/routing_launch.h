// Launch arithmetic of the routing CUDA kernels (common/launch.h): routing/routing_cuda.cu launches
// with it, tests/test_cuda_launch.py sweeps it.
#pragma once
#include "common/launch.h"

namespace fastcascade {

constexpr int64_t kRouteThreads = 256;
constexpr int64_t kPartitionTile = 512;                        // rows per warp in partition
constexpr int64_t kPartitionTileWarps = kRouteThreads / 32;
constexpr int64_t kPartitionMaxSmemBins = 1024;                // branches + 1 that fit the per-warp counters
constexpr int64_t kRouteWaves = 16;                            // grid-stride kernels: blocks per SM, at most

// One thread per row, grid-stride: route_threshold, route_argmax, route_confident, vote,
// partition_offsets.
inline LaunchConfig route_rows_launch(int64_t N, const DeviceLimits& dev) {
  LaunchConfig cfg;
  cfg.block_x = kRouteThreads;
  cfg.grid_x = capped_blocks(N, kRouteThreads, kRouteWaves, dev);
  return cfg;
}

// partition's count and place passes: one warp per tile of kPartitionTile rows, each warp with
// B + 1 int32 counters in shared memory. More bins than kPartitionMaxSmemBins take the sort path
// (no launch of these kernels): by_sort.
struct PartitionLaunch {
  LaunchConfig cfg;
  int64_t ntiles = 0;
  bool by_sort = false;
};

inline PartitionLaunch partition_launch(int64_t N, int64_t B, const DeviceLimits& dev) {
  PartitionLaunch L;
  L.by_sort = B + 1 > kPartitionMaxSmemBins;
  L.ntiles = ceil_div(N, kPartitionTile);
  L.cfg.block_x = kRouteThreads;
  L.cfg.grid_x = ceil_div(L.ntiles, kPartitionTileWarps);
  L.cfg.dynamic_smem = L.by_sort ? 0 : kPartitionTileWarps * (B + 1) * int64_t(sizeof(int32_t));
  return L;
}

// gather_rows / scatter_rows: rows of row_bytes copied as vectors of vec bytes, the widest (up to 16)
// that divides the row length and both base addresses (given by their offsets modulo 16); block_x
// threads walk a row's vectors, block_y the rows.
struct CopyRowsLaunch {
  LaunchConfig cfg;
  int64_t vec = 1, row_vecs = 0;
};

inline CopyRowsLaunch copy_rows_launch(int64_t M, int64_t row_bytes, int64_t src_offset, int64_t dst_offset,
                                       const DeviceLimits& dev) {
  CopyRowsLaunch L;
  int64_t vec = 16;
  while (vec > 1 && (row_bytes % vec != 0 || src_offset % vec != 0 || dst_offset % vec != 0)) vec /= 2;
  L.vec = vec;
  L.row_vecs = row_bytes / vec;
  int64_t tx = 1;
  while (tx < L.row_vecs && tx < kRouteThreads) tx *= 2;
  L.cfg.block_x = tx;
  L.cfg.block_y = kRouteThreads / tx;
  L.cfg.grid_x = capped_blocks(M, kRouteThreads / tx, kRouteWaves, dev);
  return L;
}

}  // namespace fastcascade
