// The ops' CUDA chains run under the emulation (cuda_emulation.h), with a C interface for ctypes
// (tests/emulation/__init__.py). The kernels come from csrc/<stem>/<stem>_kernels.cuh, the text nvcc
// compiles; the launch configurations from csrc/<stem>/<stem>_launch.h with the DeviceLimits the test
// names. What this file re-writes of each <stem>_cuda.cu is the host sequence between launches: the
// partials' allocation, the choice of the vector path, the finalize launch and the empty-input values.
//
// Every buffer is the caller's, exactly as large as the op allocates it; partials between kernels
// are allocated here at their exact size and poisoned with NaN.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda_emulation.h"
// the kernels, after the emulation
#include "focal/focal_kernels.cuh"
#include "metrics/metrics_kernels.cuh"
#ifndef FC_EMU_NARROW  // the mutation builds need metrics and focal only
#include "common/adapter_checks.h"  // adapter_dropout
#include "dice_focal/dice_focal_kernels.cuh"
#include "pixel_adapter/pixel_adapter_kernels.cuh"
#include "pooled_adapter/pooled_adapter_kernels.cuh"
#include "routing/routing_kernels.cuh"
#endif

namespace {

using namespace fastcascade;

// dtype codes shared with tests/emulation/__init__.py
enum Code : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kU8 = 4, kBool = 5, kI32 = 6, kI64 = 7 };

template <typename T> struct Tag { using type = T; };

// FC_EMU_NARROW (the mutation builds): metrics and focal, float32 and int64 only, to keep their compile short.
template <typename F>
void with_logits(int code, F&& f) {
  switch (code) {
    case kF32: return f(Tag<float>{});
#ifndef FC_EMU_NARROW
    case kF64: return f(Tag<double>{});
    case kF16: return f(Tag<c10::Half>{});
    case kBF16: return f(Tag<c10::BFloat16>{});
#endif
    default: throw fc_emu::Error("logits dtype code " + std::to_string(code) + " is not built");
  }
}

// Sigmoid targets: float32, uint8, bool, or the logits' own dtype.
template <typename logit_t, typename F>
void with_targets(int code, F&& f) {
  switch (code) {
    case kF32: return f(Tag<float>{});
#ifndef FC_EMU_NARROW
    case kU8: return f(Tag<uint8_t>{});
    case kBool: return f(Tag<bool>{});
#endif
    default:
      if constexpr (!std::is_same_v<logit_t, float>) {
#ifndef FC_EMU_NARROW
        if ((code == kF64 && std::is_same_v<logit_t, double>) || (code == kF16 && std::is_same_v<logit_t, c10::Half>) ||
            (code == kBF16 && std::is_same_v<logit_t, c10::BFloat16>))
          return f(Tag<logit_t>{});
#endif
      }
      throw fc_emu::Error("targets dtype code " + std::to_string(code) + " is not built with these logits");
  }
}

template <typename F>
void with_ids(int code, F&& f) {
  switch (code) {
    case kI64: return f(Tag<int64_t>{});
#ifndef FC_EMU_NARROW
    case kI32: return f(Tag<int32_t>{});
#endif
    default: throw fc_emu::Error("id dtype code " + std::to_string(code) + " is not built");
  }
}

fc_emu::LaunchShape shape_of(const LaunchConfig& c) {
  if (!c.ok()) throw fc_emu::Error("launch configuration: " + c.error);
  fc_emu::LaunchShape s;
  s.grid = fc_emu::dim3(unsigned(c.grid_x), unsigned(c.grid_y), unsigned(c.grid_z));
  s.block = fc_emu::dim3(unsigned(c.block_x), unsigned(c.block_y), unsigned(c.block_z));
  s.dynamic_smem = size_t(c.dynamic_smem);
  s.static_smem = c.static_smem;
  s.smem_limit = c.smem_limit;
  return s;
}

fc_emu::Options options(int schedule, uint64_t seed) {
  if (schedule < 0 || schedule > 2) throw fc_emu::Error("schedule must be 0, 1 or 2, got " + std::to_string(schedule));
  return {static_cast<fc_emu::Schedule>(schedule), seed};
}

template <typename T>
std::vector<T> poisoned(int64_t n) {
  return std::vector<T>(size_t(n), T(NAN));
}

bool aligned_to(const void* p, int64_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

using fc_emu::guarded;

}  // namespace

extern "C" {

const char* fc_emu_error() { return fc_emu::last_error().c_str(); }

// The last launch's static shared bytes are checked inside launch(); this reports the pass kernel's grid.
int fc_emu_confusion(int p_code, const void* pred, int t_code, const void* target, int64_t N, int64_t C, int has_ignore,
                     int64_t ignore, int64_t sms, int64_t smem_optin, int schedule, uint64_t seed, int64_t* out) {
  return guarded([&] {
    if (N == 0) return;  // out holds the zeros the op allocates
    const ConfusionLaunch L = confusion_launch(N, C, DeviceLimits{sms, smem_optin});
    with_ids(p_code, [&](auto pt) {
      using p_t = typename decltype(pt)::type;
      with_ids(t_code, [&](auto tt) {
        using t_t = typename decltype(tt)::type;
        fc_emu::launch(shape_of(L.cfg), options(schedule, seed), &confusion_kernel<p_t, t_t>,
                       static_cast<const p_t*>(pred), static_cast<const t_t*>(target), N, C, bool(has_ignore), ignore,
                       int(L.replicas), reinterpret_cast<unsigned long long*>(out));
      });
    });
  });
}

// focal_cuda.cu's sigmoid_focal_cuda after its checks: loss (N elements for reduction 0, else one),
// grad (N elements, or null), grad_scale (one acc_t).
int fc_emu_sigmoid_focal(int x_code, const void* x_in, int t_code, const void* t_in, int64_t N, double alpha,
                         double gamma, double eps, int reduction, int need_grad, int64_t sms, int64_t smem_optin,
                         int schedule, uint64_t seed, void* loss, void* grad, void* grad_scale) {
  return guarded([&] {
    with_logits(x_code, [&](auto xt) {
      using logit_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<logit_t>;
      acc_t* gs = static_cast<acc_t*>(grad_scale);
      logit_t* lo = static_cast<logit_t*>(loss);
      if (N == 0) {
        if (reduction != 0) *lo = logit_t(reduction == 1 ? NAN : 0.0);
        *gs = acc_t(reduction == 1 ? INFINITY : 1.0);
        return;
      }
      const DeviceLimits dev{sms, smem_optin};
      const LaunchConfig pass = sigmoid_focal_launch(N, sizeof(acc_t) == 8 ? 8 : 4, dev);
      const int grid = int(pass.grid_x);
      const SigmoidFocalParams<acc_t> P{acc_t(alpha), acc_t(gamma), acc_t(eps), two_gamma_code(gamma)};
      std::vector<acc_t> partials = poisoned<acc_t>(reduction == 0 ? 0 : grid);
      acc_t* pp = reduction == 0 ? nullptr : partials.data();
      logit_t* lout = reduction == 0 ? lo : nullptr;
      logit_t* gout = need_grad ? static_cast<logit_t*>(grad) : nullptr;
      const fc_emu::Options o = options(schedule, seed);
      with_targets<logit_t>(t_code, [&](auto tt) {
        using target_t = typename decltype(tt)::type;
        constexpr int VEC = 16 / sizeof(logit_t);
        const logit_t* x = static_cast<const logit_t*>(x_in);
        const target_t* t = static_cast<const target_t*>(t_in);
        const bool vec_ok = aligned_to(x, 16) && aligned_to(t, VEC * sizeof(target_t)) && aligned_to(lout, 16) &&
                            aligned_to(gout, 16);
        auto go = [&](auto vec_c, auto grad_c, auto reduce_c) {
          fc_emu::launch(shape_of(pass), o,
                         &sigmoid_focal_kernel<logit_t, target_t, decltype(vec_c)::value, decltype(grad_c)::value,
                                               decltype(reduce_c)::value>,
                         x, t, N, P, lout, gout, pp);
        };
        using yes = std::true_type;
        using no = std::false_type;
        auto by_mode = [&](auto vec_c) {
          if (need_grad && reduction != 0) go(vec_c, yes{}, yes{});
          else if (need_grad) go(vec_c, yes{}, no{});
          else if (reduction != 0) go(vec_c, no{}, yes{});
          else go(vec_c, no{}, no{});
        };
        if (vec_ok) by_mode(yes{});
        else by_mode(no{});
      });
      if (reduction != 0)
        fc_emu::launch(shape_of(focal_finalize_launch()), o, &finalize_kernel<logit_t, acc_t>, pp,
                       static_cast<const acc_t*>(nullptr), grid, reduction == 1 ? double(N) : 1.0, lo, gs);
      else
        *gs = acc_t(1);
    });
  });
}

// focal_cuda.cu's softmax_focal_cuda after its checks, on contiguous (N, C, S) logits and (N, S) int64
// targets; weight (C acc_t, or null) already in the accumulator dtype, as the .cu converts it.
int fc_emu_softmax_focal(int x_code, const void* x_in, const int64_t* target, const void* weight, int64_t N, int64_t C,
                         int64_t S, double gamma, double eps, int64_t ignore_index, int reduction, int need_grad,
                         int64_t sms, int64_t smem_optin, int schedule, uint64_t seed, void* loss, void* grad,
                         void* grad_scale) {
  return guarded([&] {
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* gs = static_cast<acc_t*>(grad_scale);
      scalar_t* lo = static_cast<scalar_t*>(loss);
      const int64_t R = N * S;
      if (R == 0) {
        if (reduction != 0) *lo = scalar_t(reduction == 1 ? NAN : 0.0);
        *gs = acc_t(reduction == 1 ? 0.0 : 1.0);
        return;
      }
      const LaunchConfig pass = softmax_focal_launch(R, sizeof(acc_t) == 8 ? 8 : 4, DeviceLimits{sms, smem_optin});
      const int grid = int(pass.grid_x);
      std::vector<acc_t> parts = poisoned<acc_t>(reduction == 0 ? 0 : 2 * grid);
      acc_t* lp = reduction == 0 ? nullptr : parts.data();
      acc_t* cp = reduction == 0 ? nullptr : lp + grid;
      const scalar_t* x = static_cast<const scalar_t*>(x_in);
      const acc_t* w = static_cast<const acc_t*>(weight);
      scalar_t* lout = reduction == 0 ? lo : nullptr;
      scalar_t* gout = need_grad ? static_cast<scalar_t*>(grad) : nullptr;
      const acc_t gm = acc_t(gamma), ep = acc_t(eps);
      const fc_emu::Options o = options(schedule, seed);
      auto go = [&](auto grad_c, auto reduce_c) {
        fc_emu::launch(shape_of(pass), o,
                       &softmax_focal_kernel<scalar_t, decltype(grad_c)::value, decltype(reduce_c)::value>, x, target,
                       w, R, C, S, gm, two_gamma_code(gamma), ep, ignore_index, lout, gout, lp, cp);
      };
      using yes = std::true_type;
      using no = std::false_type;
      if (need_grad && reduction != 0) go(yes{}, yes{});
      else if (need_grad) go(yes{}, no{});
      else if (reduction != 0) go(no{}, yes{});
      else go(no{}, no{});
      if (reduction != 0)
        fc_emu::launch(shape_of(focal_finalize_launch()), o, &finalize_kernel<scalar_t, acc_t>,
                       static_cast<const acc_t*>(lp), static_cast<const acc_t*>(reduction == 1 ? cp : nullptr), grid,
                       1.0, lo, gs);
      else
        *gs = acc_t(1);
    });
  });
}

// focal_cuda.cu's softmax_focal_prob_cuda after its checks, on contiguous (N, C, S) logits and probability
// targets of the same layout, in the logits' dtype or float32 (r_code), as the .cu converts them; tol as
// prob_target_tolerance gives it.
int fc_emu_softmax_focal_prob(int x_code, const void* x_in, int r_code, const void* r_in, const void* weight,
                              int64_t N, int64_t C, int64_t S, double gamma, double eps, double tol, int reduction,
                              int need_grad, int64_t sms, int64_t smem_optin, int schedule, uint64_t seed, void* loss,
                              void* grad, void* grad_scale) {
  return guarded([&] {
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* gs = static_cast<acc_t*>(grad_scale);
      scalar_t* lo = static_cast<scalar_t*>(loss);
      const int64_t R = N * S;
      if (R == 0) {
        if (reduction != 0) *lo = scalar_t(reduction == 1 ? NAN : 0.0);
        *gs = acc_t(reduction == 1 ? 0.0 : 1.0);
        return;
      }
      const LaunchConfig pass = softmax_focal_launch(R, sizeof(acc_t) == 8 ? 8 : 4, DeviceLimits{sms, smem_optin});
      const int grid = int(pass.grid_x);
      std::vector<acc_t> parts = poisoned<acc_t>(reduction == 0 ? 0 : 2 * grid);
      acc_t* lp = reduction == 0 ? nullptr : parts.data();
      acc_t* cp = reduction == 0 ? nullptr : lp + grid;
      const scalar_t* x = static_cast<const scalar_t*>(x_in);
      const acc_t* w = static_cast<const acc_t*>(weight);
      scalar_t* lout = reduction == 0 ? lo : nullptr;
      scalar_t* gout = need_grad ? static_cast<scalar_t*>(grad) : nullptr;
      const acc_t gm = acc_t(gamma), ep = acc_t(eps), tl = acc_t(tol);
      const fc_emu::Options o = options(schedule, seed);
      auto run = [&](auto rt) {
        using prob_t = typename decltype(rt)::type;
        const prob_t* r = static_cast<const prob_t*>(r_in);
        auto go = [&](auto grad_c, auto reduce_c) {
          fc_emu::launch(shape_of(pass), o,
                         &softmax_focal_prob_kernel<scalar_t, prob_t, decltype(grad_c)::value, decltype(reduce_c)::value>,
                         x, r, w, R, C, S, gm, two_gamma_code(gamma), ep, tl, lout, gout, lp, cp);
        };
        using yes = std::true_type;
        using no = std::false_type;
        if (need_grad && reduction != 0) go(yes{}, yes{});
        else if (need_grad) go(yes{}, no{});
        else if (reduction != 0) go(no{}, yes{});
        else go(no{}, no{});
      };
      if (r_code == x_code) run(Tag<scalar_t>{});
      else if (r_code == kF32) run(Tag<float>{});
      else throw fc_emu::Error("probability dtype code " + std::to_string(r_code) + " is neither float32 nor the logits'");
      if (reduction != 0)
        fc_emu::launch(shape_of(focal_finalize_launch()), o, &finalize_kernel<scalar_t, acc_t>,
                       static_cast<const acc_t*>(lp), static_cast<const acc_t*>(reduction == 1 ? cp : nullptr), grid,
                       1.0, lo, gs);
      else
        *gs = acc_t(1);
    });
  });
}

#ifndef FC_EMU_NARROW
// routing_cuda.cu's route_threshold_cuda: c = logit_threshold, x (N,) contiguous.
int fc_emu_route_threshold(int x_code, const void* x, int64_t N, double c, int64_t sms, int64_t smem_optin,
                           int schedule, uint64_t seed, int32_t* out) {
  return guarded([&] {
    if (N == 0) return;
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      fc_emu::launch(shape_of(route_rows_launch(N, DeviceLimits{sms, smem_optin})), options(schedule, seed),
                     &route_threshold_kernel<scalar_t>, static_cast<const scalar_t*>(x), N, c,
                     round_down_to_float(c), out);
    });
  });
}

// route_argmax_cuda (temperature <= 0) or route_confident_cuda: x (N, C) contiguous.
int fc_emu_route_rows(int x_code, const void* x, int64_t N, int64_t C, double temperature, double max_sum,
                      int64_t sms, int64_t smem_optin, int schedule, uint64_t seed, int32_t* out) {
  return guarded([&] {
    if (N == 0) return;
    const fc_emu::LaunchShape s = shape_of(route_rows_launch(N, DeviceLimits{sms, smem_optin}));
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      const scalar_t* xp = static_cast<const scalar_t*>(x);
      if (temperature <= 0)
        fc_emu::launch(s, options(schedule, seed), &route_argmax_kernel<scalar_t>, xp, N, C, out);
      else
        fc_emu::launch(s, options(schedule, seed), &route_confident_kernel<scalar_t>, xp, N, C, temperature, max_sum,
                       out);
    });
  });
}

// partition_cuda's counting-sort path: the count pass, the exclusive scan of the (bin, tile) table
// (torch's cumsum on the device; a host loop here), the place pass, the offsets kernel.
int fc_emu_partition(int id_code, const void* branch, int64_t N, int64_t B, int64_t sms, int64_t smem_optin,
                     int schedule, uint64_t seed, int64_t* order, int64_t* counts, int64_t* offsets) {
  return guarded([&] {
    if (N == 0) return;  // the op returns zeros without a launch
    const DeviceLimits dev{sms, smem_optin};
    const PartitionLaunch L = partition_launch(N, B, dev);
    if (L.by_sort) throw fc_emu::Error("partition: " + std::to_string(B) + " branches take the sort path (no kernel)");
    const fc_emu::Options o = options(schedule, seed);
    std::vector<int64_t> table(size_t((B + 1) * L.ntiles), int64_t(0x5a5a5a5a5a5a5a5a));  // poison
    with_ids(id_code, [&](auto it) {
      using idx_t = typename decltype(it)::type;
      const idx_t* b = static_cast<const idx_t*>(branch);
      fc_emu::launch(shape_of(L.cfg), o, &partition_tiles_kernel<idx_t, false>, b, N, B, L.ntiles, table.data(),
                     static_cast<int64_t*>(nullptr));
      int64_t run = 0;
      for (int64_t& v : table) {
        const int64_t c = v;
        v = run;
        run += c;
      }
      fc_emu::launch(shape_of(L.cfg), o, &partition_tiles_kernel<idx_t, true>, b, N, B, L.ntiles, table.data(), order);
    });
    fc_emu::launch(shape_of(route_rows_launch(B + 1, dev)), o, &partition_offsets_kernel,
                   static_cast<const int64_t*>(table.data()), B, L.ntiles, counts, offsets);
  });
}

// launch_copy_rows of routing_cuda.cu: gather (src_idx given) or scatter (dst_idx given).
int fc_emu_copy_rows(int id_code, const void* src, int64_t src_rows, const void* src_idx, void* dst, int64_t dst_rows,
                     const void* dst_idx, int64_t M, int64_t row_bytes, int64_t sms, int64_t smem_optin, int schedule,
                     uint64_t seed) {
  return guarded([&] {
    if (M == 0 || row_bytes == 0) return;
    const auto sp = reinterpret_cast<uintptr_t>(src), dp = reinterpret_cast<uintptr_t>(dst);
    const CopyRowsLaunch L =
        copy_rows_launch(M, row_bytes, int64_t(sp % 16), int64_t(dp % 16), DeviceLimits{sms, smem_optin});
    const fc_emu::Options o = options(schedule, seed);
    with_ids(id_code, [&](auto it) {
      using idx_t = typename decltype(it)::type;
      auto go = [&](auto vec_tag) {
        using vec_t = decltype(vec_tag);
        fc_emu::launch(shape_of(L.cfg), o, &copy_rows_kernel<vec_t, idx_t>, static_cast<const vec_t*>(src), src_rows,
                       static_cast<const idx_t*>(src_idx), static_cast<vec_t*>(dst), dst_rows,
                       static_cast<const idx_t*>(dst_idx), M, L.row_vecs);
      };
      switch (L.vec) {
        case 16: return go(uint4{});
        case 8: return go(uint2{});
        case 4: return go(uint32_t{});
        case 2: return go(uint16_t{});
        default: return go(uint8_t{});
      }
    });
  });
}

// vote_cuda: x (K, N, C) contiguous; sum (N, C) acc_t; votes (N, C) int32 for mode 0 (hard), else null.
int fc_emu_vote(int x_code, const void* x, int64_t K, int64_t N, int64_t C, int need_probs, int64_t sms,
                int64_t smem_optin, int schedule, uint64_t seed, void* sum, int32_t* votes, int64_t* labels) {
  return guarded([&] {
    if (N == 0) return;
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<scalar_t>;
      fc_emu::launch(shape_of(route_rows_launch(N, DeviceLimits{sms, smem_optin})), options(schedule, seed),
                     &vote_kernel<scalar_t>, static_cast<const scalar_t*>(x), K, N, C, static_cast<acc_t*>(sum), votes,
                     bool(need_probs), labels);
    });
  });
}

// dice_focal_cuda's kernels: the forward pass into per-(image, chunk) partials, then the chunks added per
// image into sums (B, 2C + 2), which the caller allocates as zeros like the op. What follows in the .cu
// (dice_focal_combine, in ATen) is not device code.
int fc_emu_dice_focal_forward(int x_code, const void* x, const int64_t* target, const void* weight, int64_t B,
                              int64_t C, int64_t S, double gamma, int64_t ignore_index, int64_t sms,
                              int64_t smem_optin, int schedule, uint64_t seed, void* sums) {
  return guarded([&] {
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<scalar_t>;
      const DiceForwardLaunch L =
          dice_focal_forward_launch(B, C, S, sizeof(acc_t) == 8 ? 8 : 4, DeviceLimits{sms, smem_optin});
      const LaunchConfig chunks = dice_focal_chunks_launch(B);
      const int64_t nchunk = L.nchunk, P = 2 * C + 2;
      if (!L.cfg.ok()) throw fc_emu::Error(L.cfg.error);
      if (nchunk == 0 || B == 0) return;
      std::vector<acc_t> partials = poisoned<acc_t>(B * nchunk * P);
      const fc_emu::Options o = options(schedule, seed);
      fc_emu::launch(shape_of(L.cfg), o, &dice_focal_forward_kernel<scalar_t>, static_cast<const scalar_t*>(x), target,
                     static_cast<const acc_t*>(weight), C, S, nchunk, acc_t(gamma), two_gamma_code(gamma),
                     ignore_index, partials.data());
      fc_emu::launch(shape_of(chunks), o, &dice_focal_chunks_kernel<acc_t>, static_cast<const acc_t*>(partials.data()),
                     nchunk, P, static_cast<acc_t*>(sums));
    });
  });
}

// dice_focal_backward_cuda's kernel, given the Dice coefficients coef (B, 2C) and the focal scale (one
// acc_t) that the .cu computes in ATen.
int fc_emu_dice_focal_backward(int x_code, const void* x, const int64_t* target, const void* weight, const void* coef,
                               const void* focal_scale, int64_t B, int64_t C, int64_t S, double gamma,
                               int64_t ignore_index, int64_t sms, int64_t smem_optin, int schedule, uint64_t seed,
                               void* grad) {
  return guarded([&] {
    const int64_t R = B * S;
    if (R == 0) return;
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<scalar_t>;
      fc_emu::launch(shape_of(dice_focal_backward_launch(B, S, DeviceLimits{sms, smem_optin})),
                     options(schedule, seed), &dice_focal_backward_kernel<scalar_t>, static_cast<const scalar_t*>(x),
                     target, static_cast<const acc_t*>(weight), static_cast<const acc_t*>(coef),
                     static_cast<const acc_t*>(focal_scale), R, C, S, acc_t(gamma), two_gamma_code(gamma),
                     ignore_index, static_cast<scalar_t*>(grad));
    });
  });
}

// pooled_adapter_cuda's kernel: x (B, C, H, W) in [C][HW] or (cl) [HW][C] memory; the weights, biases and
// scale (or null) already in the accumulator dtype, as the .cu copies them.
int fc_emu_pooled_adapter_forward(int x_code, const void* x, const void* wd, const void* bd, const void* wu,
                                  const void* bu, const void* scale, int64_t B, int64_t C, int64_t HW, int64_t r,
                                  int cl, int64_t act, double dropout, int64_t seed_drop, int64_t sms,
                                  int64_t smem_optin, int schedule, uint64_t seed, void* y, void* pooled,
                                  void* hidden) {
  return guarded([&] {
    const AdapterDropout drop = adapter_dropout(dropout, seed_drop);
    if (B == 0) return;
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<scalar_t>;
      const LaunchConfig cfg =
          pooled_adapter_launch(B, C, r, sizeof(acc_t) == 8 ? 8 : 4, false, DeviceLimits{sms, smem_optin});
      fc_emu::launch(shape_of(cfg), options(schedule, seed), &pooled_adapter_fwd_kernel<scalar_t>,
                     static_cast<const scalar_t*>(x), static_cast<const acc_t*>(wd), static_cast<const acc_t*>(bd),
                     static_cast<const acc_t*>(wu), static_cast<const acc_t*>(bu), static_cast<const acc_t*>(scale), C,
                     HW, r, bool(cl), act, drop, static_cast<scalar_t*>(y), static_cast<acc_t*>(pooled),
                     static_cast<acc_t*>(hidden));
    });
  });
}

// pooled_adapter_backward_cuda's kernel; the weight gradients (at::mm over its outputs) are the caller's.
int fc_emu_pooled_adapter_backward(int x_code, const void* gy, const void* hidden, const void* wd, const void* wu,
                                   const void* bu, const void* scale, int64_t B, int64_t C, int64_t HW, int64_t r,
                                   int cl, int64_t act, double dropout, int64_t seed_drop, int64_t sms,
                                   int64_t smem_optin, int schedule, uint64_t seed, void* gx, void* gu, void* gh,
                                   void* a, double* gs_part) {
  return guarded([&] {
    const AdapterDropout drop = adapter_dropout(dropout, seed_drop);
    if (B == 0) return;
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<scalar_t>;
      const LaunchConfig cfg =
          pooled_adapter_launch(B, C, r, sizeof(acc_t) == 8 ? 8 : 4, true, DeviceLimits{sms, smem_optin});
      fc_emu::launch(shape_of(cfg), options(schedule, seed), &pooled_adapter_bwd_kernel<scalar_t>,
                     static_cast<const scalar_t*>(gy), static_cast<const acc_t*>(hidden),
                     static_cast<const acc_t*>(wd), static_cast<const acc_t*>(wu), static_cast<const acc_t*>(bu),
                     static_cast<const acc_t*>(scale), C, HW, r, bool(cl), act, drop, static_cast<scalar_t*>(gx),
                     static_cast<acc_t*>(gu), static_cast<acc_t*>(gh), static_cast<acc_t*>(a), gs_part);
    });
  });
}

// pixel_adapter_cuda's kernel: x (B, C, H, W) contiguous or channels_last, or (T, C) as (1, C, T, 1)
// channels_last; wdT (C, r) and wuT (r, C) transposed, biases and scale in the accumulator dtype.
int fc_emu_pixel_adapter_forward(int x_code, const void* x, const void* wdT, const void* bd, const void* wuT,
                                 const void* bu, const void* scale, int64_t B, int64_t C, int64_t HW, int64_t r,
                                 int cl, int64_t act, double dropout, int64_t seed_drop, int64_t sms,
                                 int64_t smem_optin, int schedule, uint64_t seed, void* y) {
  return guarded([&] {
    const PixelLayout L = pixel_layout(AdapterShape{B, C, HW, r, bool(cl)});
    const AdapterDropout drop = adapter_dropout(dropout, seed_drop);
    if (L.T == 0) return;
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<scalar_t>;
      const PixelLaunch P = pixel_adapter_launch(L.T, L.r, sizeof(acc_t) == 8 ? 8 : 4, false,
                                                 DeviceLimits{sms, smem_optin});
      fc_emu::launch(shape_of(P.cfg), options(schedule, seed), &pixel_adapter_fwd_kernel<scalar_t>,
                     static_cast<const scalar_t*>(x), static_cast<const acc_t*>(wdT), static_cast<const acc_t*>(bd),
                     static_cast<const acc_t*>(wuT), static_cast<const acc_t*>(bu), static_cast<const acc_t*>(scale), L,
                     P.tile, act, drop, static_cast<scalar_t*>(y));
    });
  });
}

// The backward's grid (pixel_adapter_launch): the length of its gs_part.
int64_t fc_emu_pixel_adapter_grid(int64_t T, int64_t r, int64_t acc_bytes, int64_t sms, int64_t smem_optin) {
  return pixel_adapter_launch(T, r, acc_bytes, true, DeviceLimits{sms, smem_optin}).cfg.grid_x;
}

// pixel_adapter_backward_cuda's kernel: gx, gh and a (T, r), and gs_part (one double per block, or null
// without a scale; the caller allocates zeros({grid}) as the .cu does).
int fc_emu_pixel_adapter_backward(int x_code, const void* gy, const void* x, const void* wdT, const void* bd,
                                  const void* wd, const void* wu, const void* scale, int64_t B, int64_t C, int64_t HW,
                                  int64_t r, int cl, int64_t act, double dropout, int64_t seed_drop, int64_t sms,
                                  int64_t smem_optin, int schedule, uint64_t seed, void* gx, void* gh, void* a,
                                  double* gs_part) {
  return guarded([&] {
    const PixelLayout L = pixel_layout(AdapterShape{B, C, HW, r, bool(cl)});
    const AdapterDropout drop = adapter_dropout(dropout, seed_drop);
    with_logits(x_code, [&](auto xt) {
      using scalar_t = typename decltype(xt)::type;
      using acc_t = at::opmath_type<scalar_t>;
      const PixelLaunch P = pixel_adapter_launch(L.T, L.r, sizeof(acc_t) == 8 ? 8 : 4, true,
                                                 DeviceLimits{sms, smem_optin});
      if (L.T == 0) return;
      fc_emu::launch(shape_of(P.cfg), options(schedule, seed), &pixel_adapter_bwd_kernel<scalar_t>,
                     static_cast<const scalar_t*>(gy), static_cast<const scalar_t*>(x), static_cast<const acc_t*>(wdT),
                     static_cast<const acc_t*>(bd), static_cast<const acc_t*>(wd), static_cast<const acc_t*>(wu),
                     static_cast<const acc_t*>(scale), L, P.tile, act, drop, static_cast<scalar_t*>(gx),
                     static_cast<acc_t*>(gh), static_cast<acc_t*>(a), gs_part);
    });
  });
}

#endif  // FC_EMU_NARROW

}  // extern "C"
