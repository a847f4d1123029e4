// CPU kernels of the pixel (token) residual adapter (fastcascade/reference.py: _pixel_adapter).
//
// Positions are processed in tiles of kTile rows: a tile of x is loaded into an fp32 [rows][C]
// buffer, and the bottleneck runs on it as two small matrix products (at::addmm on the buffers, so
// the arithmetic is the BLAS kernel's), activation and dropout in between, then the residual add is
// stored in x's layout. The r-wide hidden activations never leave the tile; backward recomputes
// them from x. Weight gradients are summed per fixed group of tiles, then over groups in order, so
// the result does not depend on the thread count.
// at::Tensor methods and the per-operator headers below only (enforced where torch has per-operator headers)
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "common/adapter_checks.h"
#include "common/adapter_math.h"

// Its own namespace: setup.py may compile several CPU sources as one translation unit.
namespace fastcascade::pixel_adapter_cpu {
namespace {

constexpr int64_t kTile = 128;       // positions per tile
constexpr int64_t kWeightGroups = 32;  // fixed partial sums for the weight gradients

// The positions of x as tiles: x is B' "samples" of P positions each, [C][P] (planar) or [P][C].
// Channels-last memory is one run of B*HW positions (B' = 1), so tiles may span samples there.
struct Tiling {
  int64_t samples, positions, tiles_per_sample;
  explicit Tiling(const AdapterShape& S)
      : samples(S.channels_last ? 1 : S.B), positions(S.channels_last ? S.B * S.HW : S.HW),
        tiles_per_sample((positions + kTile - 1) / kTile) {}
  int64_t tiles() const { return samples * tiles_per_sample; }
};

// rows[i][c] = x at position p0 + i of sample b, for nb positions.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* x, const AdapterShape& S, const Tiling& T, int64_t b, int64_t p0, int64_t nb,
               acc_t* rows) {
  const int64_t C = S.C;
  if (S.channels_last) {
    const scalar_t* src = x + p0 * C;
    for (int64_t i = 0; i < nb * C; ++i) rows[i] = acc_t(src[i]);
  } else {
    const scalar_t* src = x + b * C * T.positions + p0;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < nb; ++i) rows[i * C + c] = acc_t(src[c * T.positions + i]);
  }
}

// out at the tile's positions = base[i][c] + s * v[i][c] (base, v: [nb][C] buffers).
template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* base, const acc_t* v, acc_t s, const AdapterShape& S, const Tiling& T, int64_t b,
                int64_t p0, int64_t nb, scalar_t* out) {
  const int64_t C = S.C;
  if (S.channels_last) {
    scalar_t* dst = out + p0 * C;
    for (int64_t i = 0; i < nb * C; ++i) dst[i] = scalar_t(base[i] + s * v[i]);
  } else {
    scalar_t* dst = out + b * C * T.positions + p0;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < nb; ++i) dst[c * T.positions + i] = scalar_t(base[i * C + c] + s * v[i * C + c]);
  }
}

// a = drop(act(h)) in place of a copy; element (row t, j) has dropout index t * r + j.
template <typename acc_t>
void activate(const acc_t* h, int64_t nb, int64_t r, int64_t act, int64_t row0, const AdapterDropout& drop, acc_t* a) {
  for (int64_t i = 0; i < nb * r; ++i) a[i] = drop.apply(adapter_act(h[i], act), row0 * r + i);
}

template <typename acc_t>
struct Weights {  // fp32 (fp64 for fp64 x) copies in the layouts the products want; detached, since
                 // the out= products below refuse arguments that require grad
  at::Tensor wdT, bd, wu, wuT, wd, bu;
  acc_t s;
  Weights(const at::Tensor& down_w, const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
          const std::optional<at::Tensor>& scale) {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    wd = down_w.detach().to(acc).contiguous();  // (r, C)
    wdT = wd.t().contiguous();         // (C, r)
    wu = up_w.detach().to(acc).contiguous();    // (C, r)
    wuT = wu.t().contiguous();         // (r, C)
    bd = down_b.detach().to(acc).contiguous();
    bu = up_b.detach().to(acc).contiguous();
    s = scale.has_value() ? scale->to(acc).template item<acc_t>() : acc_t(1);  // a CPU tensor: no sync
  }
};

template <typename scalar_t>
void pixel_forward(const at::Tensor& x, const Weights<at::opmath_type<scalar_t>>& W, int64_t act,
                   const AdapterDropout& drop, const AdapterShape& S, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tiling T(S);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, T.tiles(), 1, [&](int64_t k0, int64_t k1) {
    at::Tensor X = at::empty({kTile, S.C}, opts), H = at::empty({kTile, S.r}, opts);
    at::Tensor A = at::empty({kTile, S.r}, opts), U = at::empty({kTile, S.C}, opts);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / T.tiles_per_sample, p0 = (k % T.tiles_per_sample) * kTile;
      const int64_t nb = std::min(kTile, T.positions - p0);
      at::Tensor Xn = X.narrow(0, 0, nb), Hn = H.narrow(0, 0, nb), An = A.narrow(0, 0, nb), Un = U.narrow(0, 0, nb);
      load_tile(xp, S, T, b, p0, nb, Xn.mutable_data_ptr<acc_t>());
      at::addmm_out(Hn, W.bd, Xn, W.wdT);  // h = x W_d^T + b_d
      activate(Hn.const_data_ptr<acc_t>(), nb, S.r, act, b * T.positions + p0, drop, An.mutable_data_ptr<acc_t>());
      at::addmm_out(Un, W.bu, An, W.wuT);  // u = a W_u^T + b_u
      store_tile(Xn.const_data_ptr<acc_t>(), Un.const_data_ptr<acc_t>(), W.s, S, T, b, p0, nb, yp);
    }
  });
}

at::Tensor pixel_adapter_cpu(const at::Tensor& x, const at::Tensor& down_w, const at::Tensor& down_b,
                             const at::Tensor& up_w, const at::Tensor& up_b, const std::optional<at::Tensor>& scale,
                             int64_t activation, double dropout, int64_t seed) {
  const AdapterShape S = check_pixel_adapter(x, "x", down_w, up_w, activation, dropout);
  TORCH_CHECK(down_b.numel() == S.r && up_b.numel() == S.C, "down_b must have r = ", S.r, " and up_b C = ", S.C,
              " elements, got ", down_b.numel(), " and ", up_b.numel());
  check_adapter_scale(scale, x);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_adapter_cpu", [&] {
    const Weights<at::opmath_type<scalar_t>> W(down_w, down_b, up_w, up_b, scale);
    pixel_forward<scalar_t>(x, W, activation, adapter_dropout(dropout, seed), S, y);
  });
  return y;
}

// Per group of tiles: the weight-gradient partial sums, each tile added in tile order.
template <typename acc_t>
struct GradPartials {
  at::Tensor g_down_w, g_down_b, g_up_w, g_up_b;  // (G, r, C), (G, r), (G, C, r), (G, C)
  std::vector<double> g_scale;                    // (G)
  GradPartials(int64_t groups, const AdapterShape& S, const at::TensorOptions& opts)
      : g_down_w(at::zeros({groups, S.r, S.C}, opts)), g_down_b(at::zeros({groups, S.r}, opts)),
        g_up_w(at::zeros({groups, S.C, S.r}, opts)), g_up_b(at::zeros({groups, S.C}, opts)), g_scale(groups, 0.0) {}
};

template <typename scalar_t>
void pixel_backward(const at::Tensor& gy, const at::Tensor& x, const Weights<at::opmath_type<scalar_t>>& W,
                    bool want_gs, int64_t act, const AdapterDropout& drop, const AdapterShape& S, at::Tensor& gx,
                    GradPartials<at::opmath_type<scalar_t>>& part) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tiling T(S);
  const int64_t tiles = T.tiles(), groups = part.g_scale.size();
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = gy.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    at::Tensor X = at::empty({kTile, S.C}, opts), G = at::empty({kTile, S.C}, opts), U = at::empty({kTile, S.C}, opts);
    at::Tensor H = at::empty({kTile, S.r}, opts), A = at::empty({kTile, S.r}, opts), GH = at::empty({kTile, S.r}, opts);
    for (int64_t g = g0; g < g1; ++g) {
      at::Tensor pdw = part.g_down_w[g], pdb = part.g_down_b[g], puw = part.g_up_w[g], pub = part.g_up_b[g];
      for (int64_t k = g * tiles / groups; k < (g + 1) * tiles / groups; ++k) {
        const int64_t b = k / T.tiles_per_sample, p0 = (k % T.tiles_per_sample) * kTile;
        const int64_t nb = std::min(kTile, T.positions - p0), row0 = b * T.positions + p0;
        at::Tensor Xn = X.narrow(0, 0, nb), Gn = G.narrow(0, 0, nb), Un = U.narrow(0, 0, nb);
        at::Tensor Hn = H.narrow(0, 0, nb), An = A.narrow(0, 0, nb), GHn = GH.narrow(0, 0, nb);
        load_tile(xp, S, T, b, p0, nb, Xn.mutable_data_ptr<acc_t>());
        load_tile(gp, S, T, b, p0, nb, Gn.mutable_data_ptr<acc_t>());
        at::addmm_out(Hn, W.bd, Xn, W.wdT);
        activate(Hn.const_data_ptr<acc_t>(), nb, S.r, act, row0, drop, An.mutable_data_ptr<acc_t>());
        // g_u = s gy; g_a = g_u W_u; g_h = g_a * drop'(.) * act'(h); gx = gy + g_h W_d
        at::mm_out(GHn, Gn, W.wu);  // gy W_u, then scaled in place into g_h
        acc_t* gh = GHn.mutable_data_ptr<acc_t>();
        const acc_t* h = Hn.const_data_ptr<acc_t>();
        if (want_gs) {  // d/ds sum(gy * s (a W_u^T + b_u)) = sum a * (gy W_u) + b_u . sum gy (the latter below)
          const acc_t* aq = An.const_data_ptr<acc_t>();
          double sum = 0;
          for (int64_t i = 0; i < nb * S.r; ++i) sum += double(aq[i]) * double(gh[i]);
          part.g_scale[g] += sum;
        }
        for (int64_t i = 0; i < nb * S.r; ++i)
          gh[i] = drop.apply(W.s * gh[i] * adapter_act_grad(h[i], act), row0 * S.r + i);
        at::mm_out(Un, GHn, W.wd);
        store_tile(Gn.const_data_ptr<acc_t>(), Un.const_data_ptr<acc_t>(), acc_t(1), S, T, b, p0, nb, gxp);
        // weight gradients: g_W_u += s gy^T a, g_W_d += g_h^T x (the scale applied once at the end)
        puw.addmm_(Gn.t(), An);
        pub.add_(Gn.sum(0));
        pdw.addmm_(GHn.t(), Xn);
        pdb.add_(GHn.sum(0));
      }
    }
  });
}

// parts[0] + parts[1] + ... in that order.
at::Tensor ordered_sum(const at::Tensor& parts) {
  at::Tensor total = parts[0].clone();
  for (int64_t g = 1; g < parts.size(0); ++g) total.add_(parts[g]);
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_adapter_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& down_w, const at::Tensor& down_b,
    const at::Tensor& up_w, const at::Tensor& up_b, const std::optional<at::Tensor>& scale, int64_t activation,
    double dropout, int64_t seed) {
  const AdapterShape S = check_pixel_adapter(x, "x", down_w, up_w, activation, dropout);
  check_same_layout(grad_y, "grad_y", x, S);
  check_adapter_scale(scale, x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(acc);
  const int64_t tiles = Tiling(S).tiles(), groups = std::max<int64_t>(1, std::min(kWeightGroups, tiles));
  at::Tensor gx = at::empty_like(x);
  at::Tensor g_down_w, g_down_b, g_up_w, g_up_b, g_scale = at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_adapter_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Weights<acc_t> W(down_w, down_b, up_w, up_b, scale);
    GradPartials<acc_t> part(groups, S, opts);
    if (x.numel() > 0)
      pixel_backward<scalar_t>(grad_y, x, W, scale.has_value(), activation, adapter_dropout(dropout, seed), S, gx, part);
    // fixed-order sums over the groups
    g_down_w = ordered_sum(part.g_down_w);
    g_down_b = ordered_sum(part.g_down_b);
    g_up_w = ordered_sum(part.g_up_w).mul_(W.s);
    g_up_b = ordered_sum(part.g_up_b).mul_(W.s);
    if (scale.has_value()) {
      double total = 0;
      for (double v : part.g_scale) total += v;
      const at::Tensor g_sum = ordered_sum(part.g_up_b);  // sum gy over positions
      total += at::dot(g_sum.to(at::kDouble), W.bu.to(at::kDouble)).item<double>();
      g_scale = at::full(scale->sizes(), total, scale->options());
    }
  });
  return {gx, g_down_w.to(down_w.scalar_type()), g_down_b.to(down_b.scalar_type()), g_up_w.to(up_w.scalar_type()),
          g_up_b.to(up_b.scalar_type()), g_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcascade, CPU, m) {
  m.impl("pixel_adapter", &pixel_adapter_cpu);
  m.impl("_pixel_adapter_backward", &pixel_adapter_backward_cpu);
}

}  // namespace fastcascade::pixel_adapter_cpu
