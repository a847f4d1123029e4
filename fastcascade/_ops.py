"""Loads fastcascade._C and registers, for every op, its fake kernel and its autograd formula.

Also decides which backend runs a call ("auto" | "cpu" | "cuda" | "triton" | "torch").
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
_REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall ."


def _load_extension():
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            "fastcascade._C is not built: install the package (`pip install --no-build-isolation .`) and "
            "import it from outside the source tree."
        ) from None
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fastcascade._C was built for torch {_build_info.TORCH_VERSION} but torch {torch.__version__} is "
            f"installed. Rebuild fastcascade against this torch: {_REBUILD}"
        )
    if importlib.util.find_spec(f"{__package__}._C") is None:
        raise ImportError(
            f"fastcascade._C is not built next to {os.path.dirname(__file__)}: when that is the source tree, "
            "import the installed package from elsewhere, or build in place (python setup.py build_ext --inplace)."
        )
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(f"fastcascade._C failed to load ({e}). {_REBUILD}") from e
    return _C, _build_info


_C, BUILD_INFO = _load_extension()
CUDA_COMPILED: bool = bool(_C.with_cuda)

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None
_triton_ops_loaded = False


def load_triton_ops() -> None:
    """Imports the Triton kernels, which registers the *_triton ops, and gives them the fake kernels and
    autograd of their C++ twins. Importing Triton takes about a second, so this runs at import only
    where Triton is likely to be used (a visible GPU, TRITON_INTERPRET=1, FASTCASCADE_BACKEND=triton)
    and otherwise on first use."""
    global _triton_ops_loaded
    if _triton_ops_loaded:
        return
    from .kernels import adapter, dice_focal, focal, metrics, pixel_adapter, routing  # noqa: F401

    for qualname, fake, reduction_arg, need_grad_arg, n_inputs, unsqueeze_none in _FOCAL_OPS:
        _register(qualname + "_triton", fake, reduction_arg, need_grad_arg, n_inputs, unsqueeze_none)
    _register_pooled_adapter("_triton")
    _register_pixel_adapter("_triton")
    _register_routing("_triton")
    _register_metrics("_triton")
    _register_dice_focal("_triton")
    _triton_ops_loaded = True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs a call on `device`. FASTCASCADE_BACKEND replaces "auto"."""
    if backend == "auto":
        backend = os.environ.get("FASTCASCADE_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = device.type
    if backend == "auto":
        if dev == "cpu":
            return "cpu"
        if dev == "cuda":
            # Triton first: its kernels are verified (interpreter) and the CUDA C++ ones are not yet
            # measured on a GPU; revisit with bench/README.md's GPU table.
            return "triton" if HAS_TRITON else ("cuda" if CUDA_COMPILED else "torch")
        return "torch"
    if backend == "cpu" and dev != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if dev != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not CUDA_COMPILED:
            raise RuntimeError(
                "this fastcascade build has no CUDA kernels (built without a CUDA toolkit). Rebuild with one: "
                f"FASTCASCADE_FORCE_CUDA=1 {_REBUILD}  (or use backend='triton' or 'torch')"
            )
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors runs only under TRITON_INTERPRET=1")
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}")
    return backend


def focal_op(name: str, backend: str):
    """The registered op for a fused loss: the C++ op (CPU or CUDA dispatch) or its Triton twin."""
    if backend == "triton":
        load_triton_ops()
        return getattr(torch.ops.fastcascade, f"{name}_triton")
    return getattr(torch.ops.fastcascade, name)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by each op's C++ and Triton registrations.


def _grad_output(logits: torch.Tensor, need_grad: bool, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like) if need_grad else logits.new_empty((0,))


def _sigmoid_focal_fake(logits, targets, alpha, gamma, label_smoothing, reduction, need_grad):
    loss = torch.empty_like(logits) if reduction == 0 else logits.new_empty(())
    return loss, _grad_output(logits, need_grad, logits), logits.new_empty((), dtype=torch.float32)


def _softmax_focal_fake(logits, target, weight, gamma, label_smoothing, ignore_index, reduction, need_grad):
    loss = logits.new_empty(target.shape) if reduction == 0 else logits.new_empty(())
    grad = logits.new_empty(logits.shape) if need_grad else logits.new_empty((0,))
    return loss, grad, logits.new_empty((), dtype=torch.float32)


def _make_autograd(reduction_arg: int, need_grad_arg: int, n_inputs: int, unsqueeze_none: bool):
    """backward(g) = grad_logits * g * grad_scale: the forward already wrote d loss / d logits."""

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


def _register(qualname: str, fake, reduction_arg: int, need_grad_arg: int, n_inputs: int, unsqueeze_none: bool):
    torch.library.register_fake(qualname)(fake)
    backward, setup_context = _make_autograd(reduction_arg, need_grad_arg, n_inputs, unsqueeze_none)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------
# pooled adapter

ADAPTER_ACTIVATION_CODES = {"relu": 0, "gelu": 1, "silu": 2}


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _pooled_adapter_fake(x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed):
    B, C, r = x.shape[0], x.shape[1], down_w.shape[0]
    acc = _acc_dtype(x)
    return torch.empty_like(x), x.new_empty((B, C), dtype=acc), x.new_empty((B, r), dtype=acc)


def _pooled_adapter_backward_fake(grad_y, pooled, hidden, down_w, up_w, up_b, scale, activation, dropout, seed):
    g_scale = scale.new_empty(scale.shape) if scale is not None else grad_y.new_empty((0,), dtype=_acc_dtype(grad_y))
    return (torch.empty_like(grad_y), down_w.new_empty(down_w.shape), down_w.new_empty((down_w.shape[0],)),
            up_w.new_empty(up_w.shape), up_b.new_empty(up_b.shape), g_scale)


def _register_pooled_adapter(suffix: str):
    backward_op = getattr(torch.ops.fastcascade, f"pooled_adapter_backward{suffix}")

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

    torch.library.register_fake(f"fastcascade::pooled_adapter{suffix}")(_pooled_adapter_fake)
    torch.library.register_fake(f"fastcascade::pooled_adapter_backward{suffix}")(_pooled_adapter_backward_fake)
    torch.library.register_autograd(f"fastcascade::pooled_adapter{suffix}", backward, setup_context=setup_context)


def _pixel_adapter_fake(x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed):
    return torch.empty_like(x)


def _pixel_adapter_backward_fake(grad_y, x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed):
    g_scale = scale.new_empty(scale.shape) if scale is not None else x.new_empty((0,), dtype=_acc_dtype(x))
    return (torch.empty_like(x), down_w.new_empty(down_w.shape), down_b.new_empty(down_b.shape),
            up_w.new_empty(up_w.shape), up_b.new_empty(up_b.shape), g_scale)


def _register_pixel_adapter(suffix: str):
    backward_op = getattr(torch.ops.fastcascade, f"pixel_adapter_backward{suffix}")

    def setup_context(ctx, inputs, output):
        x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed = inputs
        ctx.args = (activation, dropout, seed)
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        ctx.has_scale = scale is not None
        ctx.save_for_backward(x, down_w, down_b, up_w, up_b, scale)  # backward recomputes the hidden layer

    def backward(ctx, grad_y):
        x, down_w, down_b, up_w, up_b, scale = ctx.saved_tensors
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        gx, gdw, gdb, guw, gub, gs = backward_op(grad_y.contiguous(memory_format=fmt), x, down_w, down_b, up_w, up_b,
                                                 scale if ctx.has_scale else None, *ctx.args)
        return gx, gdw, gdb, guw, gub, (gs if ctx.has_scale else None), None, None, None

    torch.library.register_fake(f"fastcascade::pixel_adapter{suffix}")(_pixel_adapter_fake)
    torch.library.register_fake(f"fastcascade::pixel_adapter_backward{suffix}")(_pixel_adapter_backward_fake)
    torch.library.register_autograd(f"fastcascade::pixel_adapter{suffix}", backward, setup_context=setup_context)


def adapter_op(name: str, backend: str):
    """The registered adapter op: C++ (CPU) or its Triton twin."""
    if backend == "triton":
        load_triton_ops()
        return getattr(torch.ops.fastcascade, f"{name}_triton")
    return getattr(torch.ops.fastcascade, name)


# (op, fake kernel, index of `reduction`, index of `need_grad`, number of inputs, loss "none" lacks dim 1)
_FOCAL_OPS = [
    ("fastcascade::sigmoid_focal", _sigmoid_focal_fake, 5, 6, 7, False),
    ("fastcascade::softmax_focal", _softmax_focal_fake, 6, 7, 8, True),
]
for _op in _FOCAL_OPS:
    _register(*_op)
_register_pooled_adapter("")
_register_pixel_adapter("")


# ---------------------------------------------------------------------------------------------
# routing (issue 4): decisions, partition, gather / scatter rows, vote

VOTE_MODES = {"hard": 0, "soft": 1}


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
            member_logits.new_empty((N if need_probs else 0, C), dtype=_acc_dtype(member_logits)))


def _register_routing(suffix: str):
    """Fake kernels of every routing op; autograd of gather_rows and scatter_rows, each the other's
    backward (the decisions, partition and vote have integer outputs: nothing to differentiate)."""
    ops = torch.ops.fastcascade
    gather, scatter = getattr(ops, f"gather_rows{suffix}"), getattr(ops, f"scatter_rows{suffix}")
    for name, fake in [("route_threshold", _route_fake), ("route_argmax", _route_fake),
                       ("route_confident", _route_fake), ("partition", _partition_fake),
                       ("gather_rows", _gather_rows_fake), ("scatter_rows", _scatter_rows_fake),
                       ("vote", _vote_fake)]:
        torch.library.register_fake(f"fastcascade::{name}{suffix}")(fake)

    def gather_setup(ctx, inputs, output):
        x, index = inputs
        ctx.num_rows = x.shape[0]
        ctx.save_for_backward(index)

    def gather_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return scatter(grad.contiguous(), index, ctx.num_rows), None

    def scatter_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def scatter_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return gather(grad.contiguous(), index), None, None

    torch.library.register_autograd(f"fastcascade::gather_rows{suffix}", gather_backward, setup_context=gather_setup)
    torch.library.register_autograd(f"fastcascade::scatter_rows{suffix}", scatter_backward,
                                    setup_context=scatter_setup)


def routing_op(name: str, backend: str):
    """The registered routing op: C++ (CPU or CUDA dispatch) or its Triton twin."""
    if backend == "triton":
        load_triton_ops()
        return getattr(torch.ops.fastcascade, f"{name}_triton")
    return getattr(torch.ops.fastcascade, name)


_register_routing("")


# ---------------------------------------------------------------------------------------------
# metrics (issue 5): confusion matrix


def _confusion_matrix_fake(pred, target, num_classes, ignore_index):
    return pred.new_empty((num_classes, num_classes), dtype=torch.int64)


def _register_metrics(suffix: str):
    """Fake kernels of the metrics ops; integer outputs, so no autograd."""
    torch.library.register_fake(f"fastcascade::confusion_matrix{suffix}")(_confusion_matrix_fake)


def metrics_op(name: str, backend: str):
    """The registered metrics op: C++ (CPU or CUDA dispatch) or its Triton twin."""
    if backend == "triton":
        load_triton_ops()
        return getattr(torch.ops.fastcascade, f"{name}_triton")
    return getattr(torch.ops.fastcascade, name)


_register_metrics("")


# ---------------------------------------------------------------------------------------------
# dice focal (issue 6): the forward returns the loss and the sums the backward needs; the backward is
# an op of its own (one more pass over the logits), given those sums.

NO_IGNORE_INDEX = -(2**63)  # ignore_index=None: no int64 target equals it


def _dice_focal_fake(logits, target, weight, gamma, smooth, lambda_dice, lambda_focal, ignore_index,
                     include_background, batch_dice):
    B, C = logits.shape[0], logits.shape[1]
    acc = _acc_dtype(logits)
    return (logits.new_empty(()), logits.new_empty((B, C), dtype=acc), logits.new_empty((B, C), dtype=acc),
            logits.new_empty((2,), dtype=acc))


def _dice_focal_backward_fake(grad_loss, logits, target, weight, inter, card, focal_stats, gamma, smooth,
                              lambda_dice, lambda_focal, ignore_index, include_background, batch_dice):
    return logits.new_empty(logits.shape)


def _register_dice_focal(suffix: str):
    backward_op = getattr(torch.ops.fastcascade, f"dice_focal_backward{suffix}")

    def setup_context(ctx, inputs, output):
        logits, target, weight = inputs[:3]
        ctx.params = inputs[3:]
        ctx.mark_non_differentiable(output[1], output[2], output[3])  # the sums: saved for backward only
        ctx.save_for_backward(logits, target, weight, output[1], output[2], output[3])

    def backward(ctx, grad_loss, _grad_inter, _grad_card, _grad_stats):
        logits, target, weight, inter, card, focal_stats = ctx.saved_tensors
        grad = backward_op(grad_loss, logits, target, weight, inter, card, focal_stats, *ctx.params)
        return (grad,) + (None,) * 9

    torch.library.register_fake(f"fastcascade::dice_focal{suffix}")(_dice_focal_fake)
    torch.library.register_fake(f"fastcascade::dice_focal_backward{suffix}")(_dice_focal_backward_fake)
    torch.library.register_autograd(f"fastcascade::dice_focal{suffix}", backward, setup_context=setup_context)


_register_dice_focal("")

# Last, once every op above is registered: on a GPU (or under the interpreter) the Triton twins load now.
if HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
                   or os.environ.get("FASTCASCADE_BACKEND") == "triton"):
    load_triton_ops()
