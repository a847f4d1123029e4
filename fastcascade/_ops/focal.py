"""Fused focal losses (sigmoid_focal, softmax_focal): fake kernels and autograd.

softmax_focal's target is int64 class indices (N,) / (N, S) or floating class probabilities of the
logits' shape (N, C) / (N, C, S); the kernels tell them apart by dtype, as F.cross_entropy does.

The forward already wrote d loss / d logits (need_grad=True); backward multiplies it by the upstream
gradient (and by grad_scale, the 1 / normaliser of "mean", a device tensor of the same pass). Under
backward(create_graph=True) the gradient is recomputed through the reference instead, as a graph.
"""

from __future__ import annotations

import torch

from .. import reference
from .common import REDUCTION_CODES, acc_dtype, graph_grads, refuse_constant_grads

_REDUCTIONS = {code: name for name, code in REDUCTION_CODES.items()}


def _grad_output(logits: torch.Tensor, need_grad: bool) -> torch.Tensor:
    return torch.empty_like(logits) if need_grad else logits.new_empty((0,))


def _sigmoid_focal_fake(logits, targets, alpha, gamma, label_smoothing, reduction, need_grad):
    loss = torch.empty_like(logits) if reduction == 0 else logits.new_empty(())
    return loss, _grad_output(logits, need_grad), logits.new_empty((), dtype=acc_dtype(logits))


def _softmax_focal_fake(logits, target, weight, gamma, label_smoothing, ignore_index, reduction, need_grad):
    # class indices (N,) / (N, S), or class probabilities of the logits' shape (N, C) / (N, C, S)
    rows = (logits.shape[0],) + tuple(logits.shape[2:]) if target.is_floating_point() else target.shape
    loss = logits.new_empty(rows) if reduction == 0 else logits.new_empty(())
    return loss, _grad_output(logits, need_grad), logits.new_empty((), dtype=acc_dtype(logits))


def _sigmoid_reference(logits, targets, alpha, gamma, label_smoothing, reduction, _need_grad):
    x = logits.to(acc_dtype(logits))
    return reference.sigmoid_focal_loss(x, targets, None if alpha < 0 else alpha, gamma, _REDUCTIONS[reduction],
                                        label_smoothing)


def _softmax_reference(logits, target, weight, gamma, label_smoothing, ignore_index, reduction, _need_grad):
    x = logits.to(acc_dtype(logits))
    return reference.softmax_focal_loss(x, target, gamma, weight, ignore_index, label_smoothing,
                                        _REDUCTIONS[reduction])


def _sigmoid_inputs(inputs):
    logits, targets, alpha, gamma, label_smoothing, reduction, need_grad = inputs
    return (logits, targets), (alpha, gamma, label_smoothing, reduction, need_grad)


def _softmax_inputs(inputs):
    logits, target, weight, gamma, label_smoothing, ignore_index, reduction, need_grad = inputs
    return (logits, target, weight), (gamma, label_smoothing, ignore_index, reduction, need_grad)


def _fused_autograd(unpack, ref, constants: dict, unsqueeze_none: bool):
    """(backward, setup_context): backward(g) = grad_logits * g * grad_scale; with create_graph=True the
    gradient is recomputed through the reference as a graph (second derivatives). unpack(inputs) names the
    op's inputs: (tensors, with logits first; scalar parameters, ending with reduction and need_grad);
    constants: index -> name of the tensors that get no gradient; unsqueeze_none: the "none" loss lacks the
    class dim of the logits."""

    def setup_context(ctx, inputs, output):
        tensors, params = unpack(inputs)
        ctx.n_inputs = len(inputs)
        ctx.params = params
        ctx.reduction, ctx.need_grad = params[-2], params[-1]
        # d loss / d logits and the normaliser are saved for backward only: no gradient flows into them
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(output[1], output[2], *tensors)

    def backward(ctx, grad_loss, _grad_grad, _grad_scale):
        refuse_constant_grads(ctx, constants)
        if not ctx.need_grad:
            raise RuntimeError("fastcascade loss op was called with need_grad=False; call it with need_grad=True")
        grad_logits, grad_scale, logits, *others = ctx.saved_tensors
        nones = (None,) * (ctx.n_inputs - 1)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            (grad,) = graph_grads(lambda x: ref(x, *others, *ctx.params), (logits,), ctx.needs_input_grad[:1],
                                  grad_loss)
            return (grad,) + nones
        if ctx.reduction == 0:
            g = grad_loss.unsqueeze(1) if unsqueeze_none else grad_loss
        else:
            g = grad_loss * grad_scale
        return (grad_logits * g.to(grad_logits.dtype),) + nones

    return backward, setup_context


FAKES = {"sigmoid_focal": _sigmoid_focal_fake, "softmax_focal": _softmax_focal_fake}
AUTOGRAD = {
    "sigmoid_focal": lambda op: _fused_autograd(_sigmoid_inputs, _sigmoid_reference, {1: "targets"}, False),
    "softmax_focal": lambda op: _fused_autograd(_softmax_inputs, _softmax_reference, {1: "target", 2: "weight"},
                                                True),
}
