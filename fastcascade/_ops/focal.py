"""Fused focal losses (sigmoid_focal, softmax_focal): fake kernels and autograd.

The forward already wrote d loss / d logits (need_grad=True); backward multiplies it by the upstream
gradient (and by grad_scale, the 1 / normaliser of "mean", a device tensor of the same pass).
"""

from __future__ import annotations

import torch

from .common import acc_dtype


def _grad_output(logits: torch.Tensor, need_grad: bool) -> torch.Tensor:
    return torch.empty_like(logits) if need_grad else logits.new_empty((0,))


def _sigmoid_focal_fake(logits, targets, alpha, gamma, label_smoothing, reduction, need_grad):
    loss = torch.empty_like(logits) if reduction == 0 else logits.new_empty(())
    return loss, _grad_output(logits, need_grad), logits.new_empty((), dtype=acc_dtype(logits))


def _softmax_focal_fake(logits, target, weight, gamma, label_smoothing, ignore_index, reduction, need_grad):
    loss = logits.new_empty(target.shape) if reduction == 0 else logits.new_empty(())
    return loss, _grad_output(logits, need_grad), logits.new_empty((), dtype=acc_dtype(logits))


def _fused_autograd(reduction_arg: int, need_grad_arg: int, n_inputs: int, unsqueeze_none: bool):
    """(backward, setup_context): backward(g) = grad_logits * g * grad_scale."""

    def setup_context(ctx, inputs, output):
        ctx.reduction = inputs[reduction_arg]
        ctx.need_grad = inputs[need_grad_arg]
        ctx.save_for_backward(output[1], output[2])

    def backward(ctx, grad_loss, _grad_grad, _grad_scale):
        if not ctx.need_grad:
            raise RuntimeError("fastcascade loss op was called with need_grad=False; call it with need_grad=True")
        grad_logits, grad_scale = ctx.saved_tensors
        if ctx.reduction == 0:
            g = grad_loss.unsqueeze(1) if unsqueeze_none else grad_loss
        else:
            g = grad_loss * grad_scale
        return (grad_logits * g.to(grad_logits.dtype),) + (None,) * (n_inputs - 1)

    return backward, setup_context


FAKES = {"sigmoid_focal": _sigmoid_focal_fake, "softmax_focal": _softmax_focal_fake}
# (index of `reduction`, index of `need_grad`, number of inputs, the "none" loss lacks the class dim)
AUTOGRAD = {
    "sigmoid_focal": lambda op: _fused_autograd(5, 6, 7, False),
    "softmax_focal": lambda op: _fused_autograd(6, 7, 8, True),
}
