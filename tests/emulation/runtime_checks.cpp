// Toy kernels that exercise the emulation runtime itself (tests/test_cuda_emulation.py): each either
// shows a CUDA semantics the runtime must reproduce, or a fault it must report.
#include <string>

#include "cuda_emulation.h"
#include "common/device_shared.cuh"

namespace {

// Each thread writes its slot, then reads its right neighbour's: with the barrier every schedule
// reads the neighbour's value; without it the result depends on the order threads run in.
__global__ void neighbour_kernel(bool barrier, int* out) {
  FC_SHARED(int, slot, 64);
  slot[threadIdx.x] = int(threadIdx.x) + 1;
  if (barrier) __syncthreads();
  out[threadIdx.x] = slot[(threadIdx.x + 1) % blockDim.x];
}

// Warp operations: out[4 i + k] for thread i.
__global__ void warp_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  out[4 * threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 3);
  const unsigned peers = __match_any_sync(0xffffffffu, lane % 4);
  out[4 * threadIdx.x + 1] = int(peers);
  out[4 * threadIdx.x + 2] = __popc(peers);
  __syncwarp();
  out[4 * threadIdx.x + 3] = int(__shfl_down_sync(0xffffffffu, double(lane) * 0.5, 16) * 2);
}

// Lanes 16..31 return before a full-mask shuffle.
__global__ void exited_lane_kernel(int* out) {
  if ((threadIdx.x & 31) >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
}

// A thread that returns early still lets the barrier complete.
__global__ void early_return_kernel(int* out) {
  FC_SHARED(int, slot, 64);
  if (threadIdx.x % 3 == 0) return;
  slot[threadIdx.x] = 7;
  __syncthreads();
  out[threadIdx.x] = slot[threadIdx.x];
}

// Half a warp waits in __syncwarp while the other half waits at __syncthreads.
__global__ void deadlock_kernel(int*) {
  if ((threadIdx.x & 31) < 16) __syncwarp();
  else __syncthreads();
}

__global__ void static_out_of_range_kernel(int* out) {
  FC_SHARED(int, slot, 32);
  slot[threadIdx.x] = 1;  // launched with 64 threads
  out[threadIdx.x] = 0;
}

__global__ void dynamic_out_of_range_kernel(int n, int* out) {
  FC_DYNAMIC_SHARED(float, buf);
  if (threadIdx.x == 0) buf[n] = 1.f;
  out[0] = 0;
}

// A shared array read before anything is written reads the poison.
__global__ void poison_kernel(float* f, unsigned* u) {
  FC_SHARED(float, fs, 4);
  FC_SHARED(unsigned, us, 4);
  FC_DYNAMIC_SHARED(double, ds);
  f[threadIdx.x] = fs[threadIdx.x];
  u[threadIdx.x] = us[threadIdx.x];
  f[4 + threadIdx.x] = float(ds[threadIdx.x]);
  fs[threadIdx.x] = 1.f;  // the next block must see poison again
  us[threadIdx.x] = 1u;
  ds[threadIdx.x] = 1.0;
}

// Indices and atomics: every thread of a 3-d grid of 3-d blocks counts itself.
__global__ void index_kernel(unsigned long long* total, unsigned* per_block, int* seen) {
  const int block = int(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
  const int thread = int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  const int nthreads = int(blockDim.x * blockDim.y * blockDim.z);
  atomicAdd(total, 1ull);
  atomicAdd(per_block + block, 1u);
  seen[block * nthreads + thread] += 1;
}

// Reads one element past the end of `in` (n elements): a fault under the guarded buffers.
__global__ void read_past_end_kernel(const float* in, int n, float* out) {
  if (threadIdx.x == 0) out[0] = in[n];
}

using fc_emu::guarded;

fc_emu::LaunchShape shape(fc_emu::dim3 grid, fc_emu::dim3 block, size_t dyn = 0) {
  fc_emu::LaunchShape s;
  s.grid = grid;
  s.block = block;
  s.dynamic_smem = dyn;
  return s;
}

}  // namespace

extern "C" {

const char* fc_emu_runtime_error() { return fc_emu::last_error().c_str(); }

// which: 0 neighbour with barrier, 1 neighbour without, 2 warp ops, 3 exited lane, 4 early return,
// 5 deadlock, 6 static out of range, 7 dynamic out of range, 8 poison, 9 indices and atomics,
// 10 static shared beyond the launch configuration's count, 11 a global read past the end of out2 (4 floats). out: int32 of the size the test reads.
int fc_emu_runtime_check(int which, int schedule, uint64_t seed, void* out, void* out2, void* out3) {
  return guarded([&] {
    const fc_emu::Options o{static_cast<fc_emu::Schedule>(schedule), seed};
    int* io = static_cast<int*>(out);
    switch (which) {
      case 0: return fc_emu::launch(shape(1, 64), o, &neighbour_kernel, true, io);
      case 1: return fc_emu::launch(shape(1, 64), o, &neighbour_kernel, false, io);
      case 2: return fc_emu::launch(shape(1, 64), o, &warp_kernel, io);
      case 3: return fc_emu::launch(shape(1, 64), o, &exited_lane_kernel, io);
      case 4: return fc_emu::launch(shape(1, 64), o, &early_return_kernel, io);
      case 5: return fc_emu::launch(shape(1, 64), o, &deadlock_kernel, io);
      case 6: return fc_emu::launch(shape(1, 64), o, &static_out_of_range_kernel, io);
      case 7: return fc_emu::launch(shape(1, 32, 16 * sizeof(float)), o, &dynamic_out_of_range_kernel, 16, io);
      case 8:
        return fc_emu::launch(shape(2, 4, 4 * sizeof(double)), o, &poison_kernel, static_cast<float*>(out),
                              static_cast<unsigned*>(out2));
      case 9:
        return fc_emu::launch(shape(fc_emu::dim3(3, 2, 2), fc_emu::dim3(8, 3, 2)), o, &index_kernel,
                              static_cast<unsigned long long*>(out), static_cast<unsigned*>(out2),
                              static_cast<int*>(out3));
      case 10: {
        fc_emu::LaunchShape s = shape(1, 64);
        s.static_smem = 16;  // the kernel holds 64 ints
        return fc_emu::launch(s, o, &neighbour_kernel, true, io);
      }
      case 11:
        return fc_emu::launch(shape(1, 32), o, &read_past_end_kernel, static_cast<const float*>(out2), 4,
                              static_cast<float*>(out));
      default: throw fc_emu::Error("no runtime check " + std::to_string(which));
    }
  });
}

}  // extern "C"
