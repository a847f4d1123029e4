// A host emulation of CUDA's execution model, for the tests: it runs fastcascade's __global__ functions
// (csrc/<stem>/<stem>_kernels.cuh, the text nvcc compiles) on the CPU, and only what those kernels use.
//
//   - A grid runs block after block; every thread of a block is a fiber (ucontext) with its own
//     threadIdx. Fibers switch only at __syncthreads and warp operations, and the schedule picks which
//     runnable thread resumes next: forward always resumes the lowest-numbered one, reverse the highest,
//     random a seeded uniform choice (blocks run in the same order). Forward and reverse let a thread
//     (and so its warp) run as far ahead of the others as the barriers allow, which is where a missing
//     barrier shows: a warp reaches the next use of a shared array before another has read it.
//   - __syncthreads is a barrier over the block's live threads (a thread that returned has arrived).
//   - Warp operations have 32-lane semantics; every lane their mask names must take part with the
//     same operation and mask (an exited, absent or diverged lane is an error, not a guess).
//   - Shared memory (FC_SHARED / FC_DYNAMIC_SHARED, csrc/common/device_shared.cuh) is poisoned with
//     0xFF bytes at the start of every block (a NaN for every float type, all ones otherwise) and
//     every index is checked against its array: static arrays against their count, the dynamic one
//     against the launch's byte count. A launch also fails when its static shared bytes exceed what
//     its launch configuration counts.
// Errors throw fc_emu::Error from the launch (never from inside a fiber), naming block and thread.
// Not modelled: blocks running at the same time (they run one after another), interleavings between
// two synchronisation points (a thread runs from one to the next uninterrupted), the memory model, and
// the rounding of device intrinsics (the host's math functions run instead). Global memory bounds are
// the Python side's (tests/emulation/__init__.py: guard pages in a subprocess).
// Never shipped: nothing under csrc/ includes this file, and FASTCASCADE_EMULATION is defined only here.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef FASTCASCADE_EMULATION
#define FASTCASCADE_EMULATION 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace fc_emu {

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum class Schedule : int { forward = 0, reverse = 1, random = 2 };

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 64 * 1024;  // kernels keep a few hundred bytes of locals per thread

// Memory one pool hands out forever: stacks (with a guard page below each, so an overflow faults instead
// of corrupting a neighbour) and shared arrays. Reused launch after launch.
inline char* map_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw Error("emulation: cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);
  return static_cast<char*>(p) + page;
}

enum class State { ready, barrier, warp, done };
enum class WarpOp { none, shfl_down, syncwarp, match_any };

inline const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::shfl_down: return "__shfl_down_sync";
    case WarpOp::syncwarp: return "__syncwarp";
    case WarpOp::match_any: return "__match_any_sync";
    default: return "none";
  }
}

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid;
  int linear = 0;
  State state = State::ready;
};

struct Warp {
  WarpOp op = WarpOp::none;
  unsigned mask = 0, arrived = 0;
  uint64_t value[kWarp] = {}, result[kWarp] = {};
  int arg[kWarp] = {};
};

// A static __shared__ array: one per declaration (and per template instantiation), re-poisoned at
// the start of every block.
struct SharedSlot {
  unsigned char* bytes;
  size_t size;
};

struct Runtime {
  // the launch
  dim3 grid, block;
  uint3 block_idx;
  unsigned char* dynamic = nullptr;
  size_t dynamic_bytes = 0, dynamic_capacity = 0;
  std::vector<const SharedSlot*> statics;  // every slot ever made: poisoned per block
  std::vector<const SharedSlot*> touched;  // the slots this launch used
  // the block
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  std::vector<Warp> warps;
  std::set<int> ready;  // fibers that can resume
  int live = 0, at_barrier = 0;
  Fiber* cur = nullptr;
  ucontext_t main_ctx;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;
  bool running = false;

  std::string where(const Fiber& f) const {
    std::ostringstream s;
    s << "block (" << block_idx.x << ", " << block_idx.y << ", " << block_idx.z << ") thread (" << f.tid.x << ", "
      << f.tid.y << ", " << f.tid.z << ")";
    return s.str();
  }
  [[noreturn]] void fail(const std::string& what) { throw Error(where(*cur) + ": " + what); }
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}
inline Fiber& self() {
  Runtime& r = rt();
  if (!r.running || r.cur == nullptr) throw Error("emulation: device code called outside a launch");
  return *r.cur;
}

// Gives control back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
  Runtime& r = rt();
  Fiber& f = *r.cur;
  swapcontext(&f.ctx, &r.main_ctx);
}

inline void release_barrier_if_complete() {
  Runtime& r = rt();
  if (r.at_barrier == 0 || r.at_barrier != r.live) return;
  for (Fiber& g : r.fibers)
    if (g.state == State::barrier) {
      g.state = State::ready;
      r.ready.insert(g.linear);
    }
  r.at_barrier = 0;
}

inline void syncthreads() {
  Runtime& r = rt();
  Fiber& f = self();
  const Warp& w = r.warps[f.linear / kWarp];
  if (w.arrived != 0)
    r.fail(std::string("__syncthreads while lanes of its warp wait in ") + op_name(w.op) + " for it");
  f.state = State::barrier;
  ++r.at_barrier;
  release_barrier_if_complete();
  yield();
}

// One warp-wide operation: this lane deposits its operand, and the last lane of the mask to arrive
// computes every lane's result. All lanes then resume in schedule order.
template <typename T>
T warp_collective(WarpOp op, unsigned mask, T v, int arg) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp operands of at most 8 bytes");
  Runtime& r = rt();
  Fiber& f = self();
  const int lane = f.linear % kWarp, wi = f.linear / kWarp;
  Warp& w = r.warps[wi];
  const int lanes = std::min<int>(kWarp, static_cast<int>(r.fibers.size()) - wi * kWarp);
  std::ostringstream m;
  m << op_name(op) << "(mask 0x" << std::hex << mask << ")";
  if (!(mask >> lane & 1u)) r.fail(m.str() + " called by lane " + std::to_string(lane) + ", which the mask does not name");
  for (int l = 0; l < kWarp; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (l >= lanes) r.fail(m.str() + " names lane " + std::to_string(l) + ", which the block does not have");
    if (r.fibers[wi * kWarp + l].state == State::done)
      r.fail(m.str() + " names lane " + std::to_string(l) + ", which has exited");
  }
  if (w.arrived != 0 && (w.op != op || w.mask != mask)) {
    std::ostringstream o;
    o << m.str() << " while other lanes of the warp wait in " << op_name(w.op) << "(mask 0x" << std::hex << w.mask
      << ")";
    r.fail(o.str());
  }
  w.op = op;
  w.mask = mask;
  w.arrived |= 1u << lane;
  std::memcpy(&w.value[lane], &v, sizeof(T));
  w.arg[lane] = arg;
  f.state = State::warp;
  if (w.arrived == mask) {
    for (int l = 0; l < kWarp; ++l) {
      if (!(mask >> l & 1u)) continue;
      if (op == WarpOp::shfl_down) {
        const int src = l + w.arg[l];
        if (src < kWarp && !(mask >> src & 1u))
          r.fail(m.str() + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                 ", which the mask does not name");
        w.result[l] = src < kWarp ? w.value[src] : w.value[l];
      } else if (op == WarpOp::match_any) {
        unsigned same = 0;
        for (int k = 0; k < kWarp; ++k)
          if ((mask >> k & 1u) && std::memcmp(&w.value[k], &w.value[l], sizeof(T)) == 0) same |= 1u << k;
        w.result[l] = same;
      }
      r.fibers[wi * kWarp + l].state = State::ready;
      r.ready.insert(wi * kWarp + l);
    }
    w.arrived = 0;
    w.op = WarpOp::none;
  }
  yield();
  T out;
  std::memcpy(&out, &w.result[lane], sizeof(T));
  return out;
}

// ---------------------------------------------------------------------------------------------
// shared memory: checked views

template <typename T>
class Shared {
 public:
  Shared(std::nullptr_t = nullptr) {}
  Shared(T* base, int64_t count, const char* name) : base_(base), count_(count), name_(name) {}
  T& operator[](int64_t i) const { return *at(i); }
  T& operator*() const { return *at(0); }
  Shared operator+(int64_t d) const { return Shared(base_, count_, name_, off_ + d); }
  explicit operator bool() const { return base_ != nullptr; }
  bool operator==(std::nullptr_t) const { return base_ == nullptr; }
  bool operator!=(std::nullptr_t) const { return base_ != nullptr; }
  // the bytes from this view's position to the end of its array (FC_SHARED_CAST)
  unsigned char* bytes() const { return reinterpret_cast<unsigned char*>(at(0)); }
  int64_t bytes_left() const { return (count_ - off_) * int64_t(sizeof(T)); }
  const char* name() const { return name_; }
  T* at(int64_t i) const {
    const int64_t k = off_ + i;
    if (base_ == nullptr) rt().fail(std::string("shared array ") + name_ + " is a null view");
    if (k < 0 || k >= count_)
      rt().fail("shared array " + std::string(name_) + "[" + std::to_string(count_) + "] indexed at " +
                std::to_string(k));
    return base_ + k;
  }

 private:
  Shared(T* base, int64_t count, const char* name, int64_t off) : base_(base), count_(count), off_(off), name_(name) {}
  T* base_ = nullptr;
  int64_t count_ = 0, off_ = 0;
  const char* name_ = "(null)";
};

template <typename T>
struct StaticShared {
  SharedSlot slot;
  int64_t count;
  const char* name;
  StaticShared(int64_t count_, const char* name_) : count(count_), name(name_) {
    slot.size = static_cast<size_t>(count_) * sizeof(T);
    slot.bytes = static_cast<unsigned char*>(::operator new(slot.size, std::align_val_t(16)));
    std::memset(slot.bytes, 0xFF, slot.size);
    rt().statics.push_back(&slot);
  }
  Shared<T> view() {
    Runtime& r = rt();
    if (std::find(r.touched.begin(), r.touched.end(), &slot) == r.touched.end()) r.touched.push_back(&slot);
    return Shared<T>(reinterpret_cast<T*>(slot.bytes), count, name);
  }
};

// A typed view of shared bytes: as many whole elements as lie between the view and the array's end,
// at an address aligned for T (nvcc's reinterpret_cast would fault on a misaligned one).
template <typename T, typename U>
Shared<T> shared_cast(const Shared<U>& p) {
  unsigned char* b = p.bytes();
  if (reinterpret_cast<uintptr_t>(b) % alignof(T) != 0)
    rt().fail(std::string("shared array ") + p.name() + " cast to a misaligned element type");
  return Shared<T>(reinterpret_cast<T*>(b), p.bytes_left() / int64_t(sizeof(T)), p.name());
}

template <typename T>
Shared<T> dynamic_shared(const char* name) {
  Runtime& r = rt();
  return Shared<T>(reinterpret_cast<T*>(r.dynamic), static_cast<int64_t>(r.dynamic_bytes / sizeof(T)), name);
}

// ---------------------------------------------------------------------------------------------
// launching

struct LaunchShape {
  dim3 grid, block;
  size_t dynamic_smem = 0;
  int64_t static_smem = -1;  // the launch configuration's count of static shared bytes; < 0: not checked
  int64_t smem_limit = -1;   // its budget for static + dynamic; < 0: not checked
};

struct Options {
  Schedule schedule = Schedule::forward;
  uint64_t seed = 0;
};

namespace detail {
inline void fiber_entry() {
  Runtime& r = rt();
  Fiber& f = *r.cur;
  try {
    r.body(r.body_arg);
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = e.what();
  } catch (...) {
    if (r.error.empty()) r.error = r.where(f) + ": unknown exception";
  }
  if (r.error.empty()) {  // a lane that leaves while its warp waits for it in a collective
    const Warp& w = r.warps[f.linear / kWarp];
    if (w.arrived != 0 && (w.mask >> (f.linear % kWarp) & 1u))
      r.error = r.where(f) + ": exited while lanes of its warp wait for it in " + op_name(w.op);
  }
  f.state = State::done;
  --r.live;
  release_barrier_if_complete();
  swapcontext(&f.ctx, &r.main_ctx);  // never resumed
}

inline std::vector<int> order(std::vector<int> ids, Schedule s, std::mt19937_64& rng) {
  if (s == Schedule::reverse) std::reverse(ids.begin(), ids.end());
  if (s == Schedule::random) std::shuffle(ids.begin(), ids.end(), rng);
  return ids;
}

inline void run_block(Runtime& r, const Options& o, std::mt19937_64& rng) {
  const int n = static_cast<int>(r.block.x * r.block.y * r.block.z);
  for (const SharedSlot* s : r.statics) std::memset(s->bytes, 0xFF, s->size);
  if (r.dynamic_bytes) std::memset(r.dynamic, 0xFF, r.dynamic_bytes);
  while (static_cast<int>(r.stacks.size()) < n) r.stacks.push_back(map_stack());
  r.fibers.assign(n, Fiber{});
  r.warps.assign((n + kWarp - 1) / kWarp, Warp{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.linear = i;
    f.tid = {static_cast<unsigned>(i % r.block.x), static_cast<unsigned>(i / r.block.x % r.block.y),
             static_cast<unsigned>(i / (r.block.x * r.block.y))};
    f.stack = r.stacks[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  r.live = n;
  r.at_barrier = 0;
  r.ready.clear();
  for (int i = 0; i < n; ++i) r.ready.insert(i);
  while (r.live > 0) {
    if (r.ready.empty()) {
      std::ostringstream s;
      s << "deadlock in block (" << r.block_idx.x << ", " << r.block_idx.y << ", " << r.block_idx.z << "): "
        << r.at_barrier << " of " << r.live << " live threads wait at __syncthreads, the others in warp operations";
      throw Error(s.str());
    }
    std::set<int>::iterator it;
    if (o.schedule == Schedule::forward) {
      it = r.ready.begin();
    } else if (o.schedule == Schedule::reverse) {
      it = std::prev(r.ready.end());
    } else {
      // a uniform pick; walking the set is cheap next to a context switch at these block sizes
      it = std::next(r.ready.begin(), std::uniform_int_distribution<size_t>(0, r.ready.size() - 1)(rng));
    }
    const int i = *it;
    r.ready.erase(it);
    r.cur = &r.fibers[i];
    swapcontext(&r.main_ctx, &r.fibers[i].ctx);
    r.cur = nullptr;
    if (!r.error.empty()) throw Error(r.error);
  }
}

template <typename Tuple, typename Kernel>
struct Call {
  Kernel kernel;
  Tuple args;
  static void run(void* p) {
    auto* c = static_cast<Call*>(p);
    std::apply(c->kernel, c->args);
  }
};
}  // namespace detail

// kernel<<<s.grid, s.block, s.dynamic_smem>>>(args...), the arguments converted to the kernel's
// parameter types and copied once, as CUDA does.
template <typename... Params, typename... Args>
void launch(const LaunchShape& s, const Options& o, void (*kernel)(Params...), Args&&... args) {
  Runtime& r = rt();
  if (r.running) throw Error("emulation: a launch inside a launch");
  const int64_t threads = int64_t(s.block.x) * s.block.y * s.block.z;
  if (threads < 1 || threads > 1024) throw Error("launch: block of " + std::to_string(threads) + " threads");
  if (s.grid.x < 1 || s.grid.y < 1 || s.grid.z < 1) throw Error("launch: empty grid");
  if (s.grid.y > 65535 || s.grid.z > 65535) throw Error("launch: grid y or z above 65535");
  using Tuple = std::tuple<std::decay_t<Params>...>;
  detail::Call<Tuple, void (*)(Params...)> call{kernel, Tuple(std::forward<Args>(args)...)};
  if (s.dynamic_smem > r.dynamic_capacity) {
    ::operator delete(r.dynamic, std::align_val_t(16));
    r.dynamic = static_cast<unsigned char*>(::operator new(s.dynamic_smem, std::align_val_t(16)));
    r.dynamic_capacity = s.dynamic_smem;
  }
  r.dynamic_bytes = s.dynamic_smem;
  r.grid = s.grid;
  r.block = s.block;
  r.body = &decltype(call)::run;
  r.body_arg = &call;
  r.error.clear();
  r.touched.clear();
  r.running = true;
  std::mt19937_64 rng(o.seed);
  std::vector<int> blocks(int64_t(s.grid.x) * s.grid.y * s.grid.z);
  std::iota(blocks.begin(), blocks.end(), 0);
  try {
    for (int b : detail::order(blocks, o.schedule, rng)) {
      r.block_idx = {static_cast<unsigned>(b % s.grid.x), static_cast<unsigned>(b / s.grid.x % s.grid.y),
                     static_cast<unsigned>(b / (int64_t(s.grid.x) * s.grid.y))};
      detail::run_block(r, o, rng);
    }
  } catch (...) {
    r.running = false;
    throw;
  }
  r.running = false;
  int64_t static_bytes = 0;
  for (const SharedSlot* slot : r.touched) static_bytes += static_cast<int64_t>(slot->size);
  if (s.static_smem >= 0 && static_bytes > s.static_smem)
    throw Error("launch: the kernel holds " + std::to_string(static_bytes) +
                " bytes of static shared memory, its launch configuration counts " + std::to_string(s.static_smem));
  if (s.smem_limit >= 0 && static_bytes + int64_t(s.dynamic_smem) > s.smem_limit)
    throw Error("launch: " + std::to_string(static_bytes) + " static + " + std::to_string(s.dynamic_smem) +
                " dynamic shared bytes exceed the budget of " + std::to_string(s.smem_limit));
}

// The C entry points of a library built on this runtime: run f, turn an exception into return code 1
// and keep its message for last_error() (one per shared library: the Python side reads it after a 1).
inline std::string& last_error() {
  static std::string error;
  return error;
}

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error() = e.what();
    return 1;
  }
}

}  // namespace fc_emu

// ---------------------------------------------------------------------------------------------
// the device names the kernels use

#define threadIdx (::fc_emu::self().tid)
#define blockIdx (::fc_emu::rt().block_idx)
#define blockDim (::fc_emu::rt().block)
#define gridDim (::fc_emu::rt().grid)

using fc_emu::dim3;

// the vector types the kernels copy with
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

inline void __syncthreads() { fc_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  fc_emu::warp_collective<int>(fc_emu::WarpOp::syncwarp, mask, 0, 0);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) fc_emu::rt().fail("__shfl_down_sync: only width 32 is emulated");
  return fc_emu::warp_collective<T>(fc_emu::WarpOp::shfl_down, mask, v, static_cast<int>(delta));
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  return static_cast<unsigned>(fc_emu::warp_collective<uint64_t>(fc_emu::WarpOp::match_any, mask,
                                                                   static_cast<uint64_t>(v), 0));
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }

// Fibers switch only at barriers and warp operations, so a read-modify-write is atomic here.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
template <typename T, typename V>
T atomicAdd(fc_emu::Shared<T> p, V v) {
  static_assert(std::is_same_v<T, unsigned> || std::is_same_v<T, unsigned long long>,
                "atomicAdd is emulated for unsigned 32- and 64-bit integers");
  return atomicAdd(p.at(0), static_cast<T>(v));
}

using std::max;
using std::min;

// Shared arrays (csrc/common/device_shared.cuh expands to these under FASTCASCADE_EMULATION).
#define FC_EMU_SHARED(type, name, count)                                         \
  static ::fc_emu::StaticShared<type> fc_emu_slot_##name((count), #name);       \
  const ::fc_emu::Shared<type> name = fc_emu_slot_##name.view()
#define FC_EMU_DYNAMIC_SHARED(type, name) const ::fc_emu::Shared<type> name = ::fc_emu::dynamic_shared<type>(#name)
