"""Pixel / token residual adapter (pixel_adapter, _pixel_adapter_backward): fake kernels and autograd.

Nothing but the inputs is saved: the backward op recomputes the hidden layer from x. Under
backward(create_graph=True) the gradients are recomputed through the reference instead, as a graph.
"""

from __future__ import annotations

import torch

from .. import reference
from .common import ADAPTER_ACTIVATION_CODES, acc_dtype, graph_grads

_ACTIVATIONS = {code: name for name, code in ADAPTER_ACTIVATION_CODES.items()}


def _forward_fake(x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed):
    return torch.empty_like(x)


def _backward_fake(grad_y, x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed):
    g_scale = scale.new_empty(scale.shape) if scale is not None else x.new_empty((0,), dtype=acc_dtype(x))
    return (torch.empty_like(x), down_w.new_empty(down_w.shape), down_b.new_empty(down_b.shape),
            up_w.new_empty(up_w.shape), up_b.new_empty(up_b.shape), g_scale)


def _reference(x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed):
    acc = acc_dtype(x)
    return reference.pixel_adapter(x.to(acc), down_w.to(acc), down_b.to(acc), up_w.to(acc), up_b.to(acc),
                                   _ACTIVATIONS[activation], None if scale is None else scale.to(acc),
                                   1 if x.dim() == 4 else -1, dropout, seed if dropout > 0 else None)


def _autograd(op):
    backward_op = op("_pixel_adapter_backward")

    def setup_context(ctx, inputs, output):
        x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed = inputs
        ctx.args = (activation, dropout, seed)
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        ctx.has_scale = scale is not None
        ctx.save_for_backward(x, down_w, down_b, up_w, up_b, scale)

    def backward(ctx, grad_y):
        x, down_w, down_b, up_w, up_b, scale = ctx.saved_tensors
        scale = scale if ctx.has_scale else None
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
            grads = graph_grads(lambda *a: _reference(*a, *ctx.args), (x, down_w, down_b, up_w, up_b, scale),
                                ctx.needs_input_grad[:6], grad_y)
            return (*grads, None, None, None)
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        gx, gdw, gdb, guw, gub, gs = backward_op(grad_y.contiguous(memory_format=fmt), x, down_w, down_b, up_w, up_b,
                                                 scale, *ctx.args)
        return gx, gdw, gdb, guw, gub, (gs if ctx.has_scale else None), None, None, None

    return backward, setup_context


FAKES = {"pixel_adapter": _forward_fake, "_pixel_adapter_backward": _backward_fake}
AUTOGRAD = {"pixel_adapter": _autograd}
