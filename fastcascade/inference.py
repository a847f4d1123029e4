"""The inference form of a model or a cascade: a verified copy in eval mode with batch norm folded away.

    served = fc.inference_form(model, example)      # the original is left as it was and still trains
    served = fc.inference_form(cascade, example)    # a copy of the whole cascade, trunk and heads together

The copy is made with copy.deepcopy, so a module that the original reaches twice (a trunk segment that is
also a child of the flat model, a head two stages share) is one module in the copy too, and is folded once.
Every nn.Sequential of the copy that lists a convolution right before its batch norm (Conv1d/2d/3d then
BatchNorm1d/2d/3d of the same dimension, or SyncBatchNorm), or nn.Linear before BatchNorm1d, gets the pair
replaced by one module with the normalisation folded into its weights and bias (torch.nn.utils.fusion) and
an nn.Identity. A Sequential only lists its children; a forward that applies them in another order or skips
some is caught by the check that follows, which runs the original (in eval mode, its modes restored after)
and the copy on `example`:

* a model: every tensor of its output (a tensor, or tuples / lists / dicts of them);
* a fastcascade.Cascade: every trunk segment's features and every stage's (every ensemble member's) logits
  on every row, as fastcascade.cascade.dense_outputs computes them. Logits are compared to the tolerance,
  not the decisions taken on them: a row whose logit sits within rounding of a threshold may take the other
  branch in the copy, as it may between two batch sizes of the original.

A difference beyond ``atol * max(1, largest |output| of that part) + rtol * |output|`` raises RuntimeError
naming the part and the largest difference. The copy's parameters have requires_grad False: it is for
inference (no autograd bookkeeping; an optimizer built on it by mistake sees nothing to train).

torch.compile is not applied: on one CPU thread it made the demo's small CNN and its gate cascade slower (about
0.8x at 128 and 512 rows) or no faster (2,048 rows), after 16-36 s of compilation on the first call
(bench/inference_notes.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ._checks import model_input
from .cascade.cost import eval_mode
from .cascade.dense import dense_outputs
from .cascade.runner import Cascade
from .cascade.trunk import trunk_features

__all__ = ["inference_form"]

# (layer, batch norm) pairs that fold: a convolution before the batch norm of its dimension (SyncBatchNorm
# takes any), nn.Linear before BatchNorm1d over its outputs
_PAIRS = ((nn.Conv1d, (nn.BatchNorm1d, nn.SyncBatchNorm)), (nn.Conv2d, (nn.BatchNorm2d, nn.SyncBatchNorm)),
          (nn.Conv3d, (nn.BatchNorm3d, nn.SyncBatchNorm)), (nn.Linear, (nn.BatchNorm1d,)))


def inference_form(model: nn.Module, example: torch.Tensor, *, rtol: float = 1e-3,
                   atol: float = 1e-4) -> nn.Module:
    """A copy of `model` (an nn.Module or a fastcascade.Cascade) for inference: eval mode, every Conv / Linear
    followed by its batch norm in an nn.Sequential folded into one layer, parameters without gradients,
    checked against the original on `example`.

    Args:
        model: the module or cascade; left unchanged (weights, modes, gradients).
        example: an input batch (N >= 1 rows) on the model's device; uint8 pixels are read as float in
            [0, 1] (x / 255), as fastcascade.evaluate and the cost functions read them.
        rtol, atol: the check's tolerance; a part's outputs agree when
            |copy - original| <= atol * max(1, max |original|) + rtol * |original|, elementwise.

    Returns the copy. Raises RuntimeError naming the part (the output, a trunk segment, a stage) whose
    outputs changed beyond the tolerance, with the largest difference."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a fastcascade.Cascade, got {type(model).__name__}")
    x = _example(example)
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {v!r}")
    try:
        served = copy.deepcopy(model)
    except Exception as e:  # a tensor attribute that is not a leaf, a handle, a lock: say which step failed
        raise TypeError(f"model: inference_form copies it with copy.deepcopy, which failed: {e}") from e
    served.eval()
    with torch.no_grad():
        folded = fold_batchnorms(served)
    served.requires_grad_(False)
    _verify(model, served, x, rtol, atol, folded)
    return served


def _example(example) -> torch.Tensor:
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a tensor (an input batch of the model), got {type(example).__name__}")
    if example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"example must hold at least one row, got shape {tuple(example.shape)}")
    return model_input(example)


def fold_batchnorms(module: nn.Module) -> int:
    """Fold, in place, every eval-mode batch norm listed right after its Conv / Linear in an nn.Sequential of
    module (see the module docstring); returns how many pairs were folded. A pair that two Sequentials list
    is folded once and the folded layer shared. Unchecked: inference_form checks the outputs after."""
    folded: dict[tuple[int, int], nn.Module] = {}
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            layer, bn = seq[i], seq[i + 1]
            if not _foldable(layer, bn):
                continue
            key = (id(layer), id(bn))
            if key not in folded:
                fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
                folded[key] = fuse(layer, bn)
            seq[i], seq[i + 1] = folded[key], nn.Identity().eval()
    return len(folded)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    # exact layer types: a subclass may transform its weight in forward (weight standardisation), which a
    # fold would break
    for kind, norms in _PAIRS:
        if type(layer) is kind and isinstance(bn, norms):
            width = layer.out_features if kind is nn.Linear else layer.out_channels
            return (not layer.training and not bn.training and bn.running_mean is not None
                    and bn.running_var is not None and bn.num_features == width)
    return False


def _verify(model: nn.Module, served: nn.Module, x: torch.Tensor, rtol: float, atol: float, folded: int) -> None:
    with torch.no_grad(), eval_mode(model):
        if isinstance(model, Cascade):
            want, got = _cascade_parts(model, x), _cascade_parts(served, x)
        else:
            want, got = _tensors(model(x), "the output"), _tensors(served(x), "the output")
    why = (f"after folding {folded} batch norms (does the model's forward apply the layers of an nn.Sequential "
           f"in another order than it lists them?)" if folded else "though no batch norm was folded (is the "
           "model's forward random in eval mode?)")
    if want.keys() != got.keys():
        raise RuntimeError(f"inference_form: the copy's outputs are {sorted(got)}, the original's {sorted(want)} {why}")
    for part, ref in want.items():
        new = got[part]
        if isinstance(ref, torch.Tensor) and isinstance(new, torch.Tensor) and ref.shape == new.shape:
            ref, new = ref.double(), new.double()
            diff = (new - ref).abs()
            scale = max(1.0, ref.nan_to_num(0.0, 0.0, 0.0).abs().max().item() if ref.numel() else 0.0)
            ok = (diff <= atol * scale + rtol * ref.abs()) | (new == ref) | (new.isnan() & ref.isnan())
            if bool(ok.all()):
                continue
            worst = diff[~ok].nan_to_num(float("inf")).max().item()
            raise RuntimeError(f"inference_form: {part} changed by up to {worst:.3g} (rtol {rtol}, atol {atol}) {why}")
        if not (isinstance(ref, torch.Tensor) or isinstance(new, torch.Tensor)) and ref == new:
            continue
        raise RuntimeError(f"inference_form: {part} differs in the copy: {_describe(new)} against the original's "
                           f"{_describe(ref)} {why}")


def _cascade_parts(cascade: Cascade, x: torch.Tensor) -> dict:
    parts = {f"trunk segment {name!r}": f for name, f in zip(cascade.segments, trunk_features(cascade.trunk, x))}
    parts.update({f"stage {name!r}": out for name, out in dense_outputs(cascade, x).items()})
    return parts


def _tensors(out, where: str) -> dict:
    """{where: leaf} for every leaf of a model's output: tensors, or tuples / lists / dicts of them."""
    if isinstance(out, (tuple, list)):
        return {k: v for i, o in enumerate(out) for k, v in _tensors(o, f"{where}[{i}]").items()}
    if isinstance(out, dict):
        return {k: v for key, o in out.items() for k, v in _tensors(o, f"{where}[{key!r}]").items()}
    return {where: out}


def _describe(v) -> str:
    return f"a tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)
