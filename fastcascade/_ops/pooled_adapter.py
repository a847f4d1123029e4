"""Pooled residual adapter (pooled_adapter, _pooled_adapter_backward): fake kernels and autograd.

The forward returns (y, pooled, hidden); pooled and hidden are saved for the backward op only.
"""

from __future__ import annotations

import torch

from .common import acc_dtype


def _forward_fake(x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed):
    B, C, r = x.shape[0], x.shape[1], down_w.shape[0]
    acc = acc_dtype(x)
    return torch.empty_like(x), x.new_empty((B, C), dtype=acc), x.new_empty((B, r), dtype=acc)


def _backward_fake(grad_y, pooled, hidden, down_w, up_w, up_b, scale, activation, dropout, seed):
    g_scale = scale.new_empty(scale.shape) if scale is not None else grad_y.new_empty((0,), dtype=acc_dtype(grad_y))
    return (torch.empty_like(grad_y), down_w.new_empty(down_w.shape), down_w.new_empty((down_w.shape[0],)),
            up_w.new_empty(up_w.shape), up_b.new_empty(up_b.shape), g_scale)


def _autograd(op):
    backward_op = op("_pooled_adapter_backward")

    def setup_context(ctx, inputs, output):
        x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed = inputs
        ctx.args = (activation, dropout, seed)
        ctx.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.has_scale = scale is not None
        ctx.mark_non_differentiable(output[1], output[2])  # pooled, hidden: saved for backward only
        ctx.save_for_backward(output[1], output[2], down_w, up_w, up_b, scale)

    def backward(ctx, grad_y, _grad_pooled, _grad_hidden):
        pooled, hidden, down_w, up_w, up_b, scale = ctx.saved_tensors
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        gx, gdw, gdb, guw, gub, gs = backward_op(grad_y.contiguous(memory_format=fmt), pooled, hidden, down_w, up_w,
                                                 up_b, scale if ctx.has_scale else None, *ctx.args)
        return gx, gdw, gdb, guw, gub, (gs if ctx.has_scale else None), None, None, None

    return backward, setup_context


FAKES = {"pooled_adapter": _forward_fake, "_pooled_adapter_backward": _backward_fake}
AUTOGRAD = {"pooled_adapter": _autograd}
