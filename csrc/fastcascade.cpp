// Every fastcascade op schema, in one place. Backends live in csrc/<stem>/<stem>_{cpu.cpp,cuda.cu};
// fake kernels and autograd are registered in fastcascade/_ops/<stem>.py (docs/adding-an-op.md).
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fastcascade, m) {
  // Fused focal losses. One pass writes the loss and (need_grad) d loss_i / d logits, unscaled;
  // grad_scale is a 0-dim device tensor, fp32 (fp64 for fp64 logits): 1/normaliser for "mean", else 1, so that
  // backward(g) = grad_logits * g * grad_scale. reduction: 0 none, 1 mean, 2 sum.
  m.def("sigmoid_focal(Tensor logits, Tensor targets, float alpha, float gamma, float label_smoothing, "
        "int reduction, bool need_grad) -> (Tensor loss, Tensor grad_logits, Tensor grad_scale)");
  // logits (N, C) or (N, C, S); target int64 (N,) or (N, S).
  m.def("softmax_focal(Tensor logits, Tensor target, Tensor? weight, float gamma, float label_smoothing, "
        "int ignore_index, int reduction, bool need_grad) -> (Tensor loss, Tensor grad_logits, Tensor grad_scale)");

  // Pooled residual adapter on x (B, C, H, W), contiguous or channels_last; activation 0 relu,
  // 1 gelu (erf), 2 silu; scale None (1) or a 0-dim tensor. y keeps x's layout and dtype;
  // pooled = mean_hw(x) (B, C) and hidden = down(pooled) (B, r), pre-activation, in fp32 (fp64 for
  // fp64 x): what the backward needs, B (C + r) numbers instead of anything per pixel.
  // dropout: p in [0, 1) on act(hidden), the mask drawn in the kernels from (seed, b * r + j), as for the
  // pixel adapter below.
  m.def("pooled_adapter(Tensor x, Tensor down_w, Tensor down_b, Tensor up_w, Tensor up_b, Tensor? scale, "
        "int activation, float dropout, int seed) -> (Tensor y, Tensor pooled, Tensor hidden)");
  m.def("_pooled_adapter_backward(Tensor grad_y, Tensor pooled, Tensor hidden, Tensor down_w, Tensor up_w, "
        "Tensor up_b, Tensor? scale, int activation, float dropout, int seed) -> (Tensor grad_x, "
        "Tensor grad_down_w, Tensor grad_down_b, Tensor grad_up_w, Tensor grad_up_b, Tensor grad_scale)");

  // Pixel (token) residual adapter, y = x + scale * up(drop(act(down(x)))) at every position; x is
  // (B, C, H, W), contiguous or channels_last, or tokens (T, C), contiguous. No (positions x r) tensor
  // is written: backward recomputes the hidden activations from x. dropout: p in [0, 1) on the hidden
  // activations, the mask drawn in the kernels from (seed, position * r + j), so backward and every
  // backend redraw the same one (fastcascade/reference.py: adapter_dropout_keep).
  m.def("pixel_adapter(Tensor x, Tensor down_w, Tensor down_b, Tensor up_w, Tensor up_b, Tensor? scale, "
        "int activation, float dropout, int seed) -> Tensor");
  m.def("_pixel_adapter_backward(Tensor grad_y, Tensor x, Tensor down_w, Tensor down_b, Tensor up_w, Tensor up_b, "
        "Tensor? scale, int activation, float dropout, int seed) -> (Tensor grad_x, Tensor grad_down_w, "
        "Tensor grad_down_b, Tensor grad_up_w, Tensor grad_up_b, Tensor grad_scale)");

  // ---- routing -------------------------------------------------------------------------
  // Decisions: an int32 branch id per row. route_threshold: 1 where logit > logit_threshold (compared
  // exactly; the API passes T log(t / (1 - t)) computed in float64); logits (N,) or (N, 1).
  m.def("route_threshold(Tensor logits, float logit_threshold) -> Tensor");
  // First maximum of each row of logits (N, C), NaN counting as the maximum (torch.argmax).
  m.def("route_argmax(Tensor logits) -> Tensor");
  // 1 ("exit") where sum_c exp((x_c - max_c x) / temperature) <= max_sum (= 1 / tau), in float64.
  m.def("route_confident(Tensor logits, float temperature, float max_sum) -> Tensor");
  // Stable counting sort of branch (N,) int32/int64 into num_branches bins: order (N,) int64 lists the
  // rows bin by bin, each bin's rows in index order; counts (B,), offsets (B + 1,) int64. Ids outside
  // [0, B): CPU raises; CUDA places them after offsets[B], counted in no bin.
  m.def("partition(Tensor branch, int num_branches) -> (Tensor order, Tensor counts, Tensor offsets)");
  // out[i] = x[index[i]] along dim 0, any dtype; each is the other's backward.
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  // out (num_rows, ...) zeros, out[index[i]] = src[i]; index must not repeat a row.
  m.def("scatter_rows(Tensor src, Tensor index, int num_rows) -> Tensor");
  // member_logits (K, N, C); mode 0 hard (majority of argmax, ties by summed probability, then lowest
  // id), 1 soft (argmax of summed probability). labels int64 (N,); probs (N, C) mean softmax in fp32
  // (fp64 for fp64 input) when need_probs, else (0, C).
  m.def("vote(Tensor member_logits, int mode, bool need_probs) -> (Tensor labels, Tensor probs)");

  // ---- metrics -------------------------------------------------------------------------
  // int64 (C, C) counts of (target, pred) pairs, rows = target, columns = prediction (scikit-learn's
  // convention); pred and target int32/int64 of one shape (flattened). Elements whose target equals
  // ignore_index are skipped. Ids outside [0, C): CPU raises; CUDA skips them (no sync).
  m.def("confusion_matrix(Tensor pred, Tensor target, int num_classes, int? ignore_index) -> Tensor");
  // ---- dice focal ----------------------------------------------------------------------
  // Dice + softmax focal on logits (B, C, S), target int64 (B, S). One pass computes the loss (logits
  // dtype) and the sums the backward needs, in fp32 (fp64 for fp64 logits): per image b and class c
  // inter (B, C) = sum p_c [t == c] and card (B, C) = sum p_c + [t == c] over kept pixels, and
  // focal_stats (2,) = [sum of focal losses, sum of w_t]. A target equal to ignore_index counts in
  // neither term; one outside [0, C) makes the sums NaN. batch_dice adds the images' sums before the
  // Dice ratio; include_background=false leaves class 0 out of the Dice term.
  m.def("dice_focal(Tensor logits, Tensor target, Tensor? weight, float gamma, float smooth, float lambda_dice, "
        "float lambda_focal, int ignore_index, bool include_background, bool batch_dice) "
        "-> (Tensor loss, Tensor inter, Tensor card, Tensor focal_stats)");
  // One more pass (softmax recomputed) writes d loss / d logits, scaled by grad_loss (0-dim).
  m.def("_dice_focal_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor inter, "
        "Tensor card, Tensor focal_stats, float gamma, float smooth, float lambda_dice, float lambda_focal, "
        "int ignore_index, bool include_background, bool batch_dice) -> Tensor");
}

namespace fastcascade {
void define_launch_config(pybind11::module_& m);  // common/launch_cpu.cpp
}

// Build facts the Python side checks at import, and the CUDA kernels' launch arithmetic (for tests).
PYBIND11_MODULE(_C, mod) {
  fastcascade::define_launch_config(mod);
#ifdef FASTCASCADE_WITH_CUDA
  mod.attr("with_cuda") = true;
#else
  mod.attr("with_cuda") = false;
#endif
}
