"""Dice + softmax focal (dice_focal, _dice_focal_backward): fake kernels and autograd.

The forward returns the loss and the per-class sums the backward needs; the backward is an op of its
own (one more pass over the logits), given those sums. Under backward(create_graph=True) the gradient is
recomputed through the reference instead, as a graph (second derivatives).
"""

from __future__ import annotations

import torch

from .. import reference
from .common import NO_IGNORE_INDEX, acc_dtype, graph_grads, refuse_constant_grads


def _forward_fake(logits, target, weight, gamma, smooth, lambda_dice, lambda_focal, ignore_index,
                  include_background, batch_dice):
    B, C = logits.shape[0], logits.shape[1]
    acc = acc_dtype(logits)
    return (logits.new_empty(()), logits.new_empty((B, C), dtype=acc), logits.new_empty((B, C), dtype=acc),
            logits.new_empty((2,), dtype=acc))


def _backward_fake(grad_loss, logits, target, weight, inter, card, focal_stats, gamma, smooth,
                   lambda_dice, lambda_focal, ignore_index, include_background, batch_dice):
    return logits.new_empty(logits.shape)


def _reference(logits, target, weight, gamma, smooth, lambda_dice, lambda_focal, ignore_index, include_background,
               batch_dice):
    return reference.dice_focal_loss(logits.to(acc_dtype(logits)), target, weight, gamma, lambda_dice, lambda_focal,
                                     smooth, include_background, None if ignore_index == NO_IGNORE_INDEX else ignore_index,
                                     batch_dice)


def _autograd(op):
    backward_op = op("_dice_focal_backward")

    def setup_context(ctx, inputs, output):
        logits, target, weight = inputs[:3]
        ctx.params = inputs[3:]
        ctx.mark_non_differentiable(output[1], output[2], output[3])  # the sums: saved for backward only
        ctx.save_for_backward(logits, target, weight, output[1], output[2], output[3])

    def backward(ctx, grad_loss, _grad_inter, _grad_card, _grad_stats):
        refuse_constant_grads(ctx, {2: "weight"})
        logits, target, weight, inter, card, focal_stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            (grad,) = graph_grads(lambda x: _reference(x, target, weight, *ctx.params), (logits,),
                                  ctx.needs_input_grad[:1], grad_loss)
            return (grad,) + (None,) * 9
        grad = backward_op(grad_loss, logits, target, weight, inter, card, focal_stats, *ctx.params)
        return (grad,) + (None,) * 9

    return backward, setup_context


FAKES = {"dice_focal": _forward_fake, "_dice_focal_backward": _backward_fake}
AUTOGRAD = {"dice_focal": _autograd}
