"""Pooled residual adapter (pooled_adapter, _pooled_adapter_backward): fake kernels and autograd.

The forward returns (y, pooled, hidden), saving pooled and hidden for the backward op. pooled = mean_hw(x)
is differentiable: under backward(create_graph=True) the gradients are recomputed from it through the
reference, as a graph (second derivatives without saving x).
"""

from __future__ import annotations

import torch

from .. import reference
from .common import ADAPTER_ACTIVATION_CODES, acc_dtype, graph_grads

_ACTIVATIONS = {code: name for name, code in ADAPTER_ACTIVATION_CODES.items()}


def _forward_fake(x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed):
    B, C, r = x.shape[0], x.shape[1], down_w.shape[0]
    acc = acc_dtype(x)
    return torch.empty_like(x), x.new_empty((B, C), dtype=acc), x.new_empty((B, r), dtype=acc)


def _backward_fake(grad_y, pooled, hidden, down_w, up_w, up_b, scale, activation, dropout, seed):
    g_scale = scale.new_empty(scale.shape) if scale is not None else grad_y.new_empty((0,), dtype=acc_dtype(grad_y))
    return (torch.empty_like(grad_y), down_w.new_empty(down_w.shape), down_w.new_empty((down_w.shape[0],)),
            up_w.new_empty(up_w.shape), up_b.new_empty(up_b.shape), g_scale)


def _branch(m, down_w, down_b, up_w, up_b, scale, activation, dropout, seed):
    """The adapter branch on the pooled means m (B, C), through the reference (a 1x1 image: its mean is m)."""
    acc = m.dtype
    m4 = m[:, :, None, None]
    y = reference.pooled_adapter(m4, down_w.to(acc), down_b.to(acc), up_w.to(acc), up_b.to(acc),
                                 _ACTIVATIONS[activation], None if scale is None else scale.to(acc), dropout,
                                 seed if dropout > 0 else None)
    return (y - m4)[:, :, 0, 0]


def _autograd(op):
    backward_op = op("_pooled_adapter_backward")

    def setup_context(ctx, inputs, output):
        x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed = inputs
        ctx.args = (activation, dropout, seed)
        ctx.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.has_scale = scale is not None
        ctx.x_shape, ctx.x_dtype, ctx.hw = x.shape, x.dtype, x.shape[2] * x.shape[3]
        # pooled = mean_hw(x) is a differentiable output (the double-backward path differentiates through it,
        # so x itself need not be saved); hidden is saved for the backward op only
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], output[2], down_w, down_b, up_w, up_b, scale)

    def backward(ctx, grad_y, grad_pooled, _grad_hidden):
        pooled, hidden, down_w, down_b, up_w, up_b, scale = ctx.saved_tensors
        scale = scale if ctx.has_scale else None
        need = ctx.needs_input_grad
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        if grad_y is None:  # only pooled was used: d pooled / d x = 1 / HW, nothing else
            gx = None
        elif torch.is_grad_enabled():  # create_graph=True: differentiable gradients, through pooled to x
            s = grad_y.sum((2, 3), dtype=pooled.dtype)
            gm, *grads = graph_grads(lambda *a: _branch(*a, *ctx.args), (pooled, down_w, down_b, up_w, up_b, scale),
                                     (need[0],) + tuple(need[1:6]), s)
            gx = grad_y + (gm / ctx.hw).to(grad_y.dtype)[:, :, None, None] if need[0] else None
        else:
            gx, *grads = backward_op(grad_y.contiguous(memory_format=fmt), pooled, hidden, down_w, up_w, up_b, scale,
                                     *ctx.args)
            grads[-1] = grads[-1] if ctx.has_scale else None
        if grad_y is None:
            grads = [None] * 5
        if grad_pooled is not None and need[0]:
            gp = (grad_pooled / ctx.hw).to(ctx.x_dtype)[:, :, None, None]
            gx = gp.expand(ctx.x_shape).contiguous(memory_format=fmt) if gx is None else gx + gp
        return (gx, *grads, None, None, None)

    return backward, setup_context


FAKES = {"pooled_adapter": _forward_fake, "_pooled_adapter_backward": _backward_fake}
AUTOGRAD = {"pooled_adapter": _autograd}
