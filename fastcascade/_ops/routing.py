"""Routing ops (decisions, partition, gather / scatter rows, vote): fake kernels and autograd.

Decisions, partition and vote have integer outputs: nothing to differentiate. gather_rows and
scatter_rows are each the other's backward.
"""

from __future__ import annotations

import functools

import torch

from .common import acc_dtype


def _route_fake(logits, *_params):
    return logits.new_empty((logits.shape[0],), dtype=torch.int32)


def _partition_fake(branch, num_branches):
    # static shapes: order (N,) whatever the ids hold, so nothing data-dependent reaches the graph
    new = functools.partial(branch.new_empty, dtype=torch.int64)
    return new((branch.shape[0],)), new((num_branches,)), new((num_branches + 1,))


def _gather_rows_fake(x, index):
    return x.new_empty((index.shape[0],) + tuple(x.shape[1:]))


def _scatter_rows_fake(src, index, num_rows):
    return src.new_empty((num_rows,) + tuple(src.shape[1:]))


def _vote_fake(member_logits, mode, need_probs):
    _, N, C = member_logits.shape
    return (member_logits.new_empty((N,), dtype=torch.int64),
            member_logits.new_empty((N if need_probs else 0, C), dtype=acc_dtype(member_logits)))


def _gather_autograd(op):
    scatter = op("scatter_rows")

    def setup_context(ctx, inputs, output):
        x, index = inputs
        ctx.num_rows = x.shape[0]
        ctx.save_for_backward(index)

    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return scatter(grad.contiguous(), index, ctx.num_rows), None

    return backward, setup_context


def _scatter_autograd(op):
    gather = op("gather_rows")

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return gather(grad.contiguous(), index), None, None

    return backward, setup_context


FAKES = {"route_threshold": _route_fake, "route_argmax": _route_fake, "route_confident": _route_fake,
         "partition": _partition_fake, "gather_rows": _gather_rows_fake, "scatter_rows": _scatter_rows_fake,
         "vote": _vote_fake}
AUTOGRAD = {"gather_rows": _gather_autograd, "scatter_rows": _scatter_autograd}
