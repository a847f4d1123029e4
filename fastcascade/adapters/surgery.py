"""Model surgery around adapters: insert them into a backbone (add_adapters), freeze the backbone with
its BatchNorm statistics (freeze_backbone), count (trainable_parameters) and group (param_groups) the
parameters.

Name matching. freeze_backbone and param_groups select parameters by *components* of their
qualified names: an entry matches when it equals one or more whole dot-separated components, so
"fc" matches "fc.weight" and "head.fc.bias" but not ConvNeXt's "stages.0.blocks.1.mlp.fc1.weight",
and "head" does not match EfficientNet's "conv_head.weight" (both belong to the backbone).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .._checks import positive_int
from .module import AdaptedBlock, ResidualAdapter

__all__ = ["ParameterCount", "add_adapters", "default_adapter_sites", "freeze_backbone", "param_groups",
           "trainable_parameters"]

DEFAULT_TRAINABLE = ("adapter", "head", "fc", "classifier")
DEFAULT_LR = {"adapter": 1e-4, "head": 5e-4, "backbone": 1e-6}
_LIST_NAMES = "list them with [name for name, _ in model.named_modules()]"


def _matches(name: str, entries: Iterable[str]) -> bool:
    """True when some entry equals a run of whole dot-separated components of name."""
    padded = f".{name}."
    return any(f".{e}." in padded for e in entries)


def default_adapter_sites(model: nn.Module) -> list[str]:
    """Where add_adapters puts adapters by default: after each stage of a ResNet (timm or
    torchvision: layer1..layer4), of a timm EfficientNet (blocks.0..blocks.N) or of a timm ConvNeXt
    (stages.0..stages.3)."""
    children = dict(model.named_children())
    layers = []
    while f"layer{len(layers) + 1}" in children:
        layers.append(f"layer{len(layers) + 1}")
    if layers:
        return layers
    blocks = children.get("blocks")
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and "conv_stem" in children:
        return [f"blocks.{name}" for name, _ in blocks.named_children()]
    stages = children.get("stages")
    if isinstance(stages, (nn.Sequential, nn.ModuleList)):
        return [f"stages.{name}" for name, _ in stages.named_children()]
    raise ValueError(f"add_adapters: no default adapter sites for {type(model).__name__} (known: ResNet "
                     f"layer1..layer4, EfficientNet blocks.N, ConvNeXt stages.N); pass where= a list of module "
                     f"names or a regex; {_LIST_NAMES}")


def _adapter_owned(model: nn.Module) -> tuple[set[str], set[str]]:
    """(names of modules that are adapters or inside one, names of modules already adapted)."""
    inside, adapted = set(), set()
    for name, m in model.named_modules():
        if isinstance(m, ResidualAdapter):
            inside.update(n for n, _ in m.named_modules(prefix=name))
        if isinstance(m, AdaptedBlock):
            inside.add(name)
            adapted.add(f"{name}.block" if name else "block")
            adapted.add(name)
    return inside, adapted


def _resolve_where(model: nn.Module, where) -> list[str]:
    inside, adapted = _adapter_owned(model)
    all_names = [n for n, _ in model.named_modules() if n]
    candidates = [n for n in all_names if n not in inside and n not in adapted]
    if where is None:
        names = default_adapter_sites(model)
    elif isinstance(where, str):
        try:
            pattern = re.compile(where)
        except re.error as e:
            raise ValueError(f"where={where!r} is not a valid regular expression ({e})") from None
        names = [n for n in candidates if pattern.fullmatch(n)]
        if not names:
            close = difflib.get_close_matches(where, candidates, n=5, cutoff=0.4)
            raise ValueError(f"where={where!r} matches no module name of {type(model).__name__} "
                             f"(re.fullmatch); close names: {close}; {_LIST_NAMES}")
    else:
        names = list(dict.fromkeys(where))
        if not names:
            raise ValueError("where is empty: give module names, a regex, or None for the default sites")
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"where must hold module names (str), got {n!r}")
    known = set(all_names)
    for n in names:
        if n in adapted:
            raise ValueError(f"{n!r} already has an adapter (it is, or is the block of, an AdaptedBlock)")
        if n in inside:
            raise ValueError(f"{n!r} is part of an adapter; adapters go after backbone modules")
        if n not in known:
            close = difflib.get_close_matches(n, candidates, n=5, cutoff=0.4)
            raise ValueError(f"where: no module named {n!r} in {type(model).__name__}; close names: {close}; "
                             f"{_LIST_NAMES}")
    return names


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _default_example_input(model: nn.Module) -> torch.Tensor:
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, in_chans, 64, 64, generator=gen).to(device=device, dtype=dtype)


def _infer_channels(model: nn.Module, names: list[str], kind: str, example_input) -> dict[str, int]:
    """One dummy forward (eval mode, no grad) with forward hooks on the named modules; every module's
    train/eval flag is restored afterwards."""
    outputs: dict[str, tuple] = {}

    def recorder(name):
        def hook(module, args, out):
            t = _first_tensor(out)
            outputs.setdefault(name, (None, type(out).__name__) if t is None else (tuple(t.shape), None))
        return hook

    x = _default_example_input(model) if example_input is None else example_input
    args = x if isinstance(x, tuple) else (x,)
    modes = {m: m.training for m in model.modules()}
    hooks = [model.get_submodule(n).register_forward_hook(recorder(n)) for n in names]
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception as e:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise ValueError(f"add_adapters infers channels from a dummy forward with input {shapes}, which "
                         f"failed ({type(e).__name__}: {e}); pass example_input= (a tensor or a tuple of args) "
                         f"or channels= (an int or a dict name -> int)") from e
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    channels = {}
    for n in names:
        if n not in outputs:
            raise ValueError(f"add_adapters: module {n!r} did not run in the dummy forward; pass channels=")
        shape, other = outputs[n]
        if shape is None:
            raise ValueError(f"add_adapters: module {n!r} returns {other}, not a tensor; an adapter needs "
                             f"one")
        if kind == "pooled":
            if len(shape) != 4:
                raise ValueError(f"kind='pooled' needs a (B, C, H, W) output, but {n!r} gives shape {shape}; "
                                 f"use kind='pixel'")
            channels[n] = shape[1]
        else:
            channels[n] = shape[1] if len(shape) == 4 else shape[-1]
    return channels


def add_adapters(model: nn.Module, where: str | Iterable[str] | None = None, bottleneck: int = 64,
                 kind: str = "pooled", *, channels: int | Mapping[str, int] | None = None,
                 example_input: torch.Tensor | tuple | None = None, **kw) -> list[str]:
    """Insert a ResidualAdapter after each chosen module, in place; returns the chosen names.

    Each chosen module `name` is replaced by AdaptedBlock(original, adapter): its forward is
    adapter(original(x)); the original's state_dict keys move under "<name>.block." and the
    adapter's are "<name>.adapter." (AdaptedBlock still loads state_dicts of the unadapted model).

    Args:
        where: module names (model.named_modules()), or one regex string matched with re.fullmatch
            against them, or None for default_adapter_sites(model) (stages of timm/torchvision ResNets,
            timm EfficientNet, timm ConvNeXt). Unknown names raise ValueError with close matches.
        bottleneck, kind, **kw: ResidualAdapter arguments (activation, dropout, init_std, learn_scale,
            backend).
        channels: each module's output channels; by default inferred from one dummy forward with
            forward hooks (eval mode, torch.no_grad, every module's train/eval flag restored) on
            example_input, by default a (1, in_chans, 64, 64) tensor on the model's device and
            dtype (in_chans of the first Conv2d). A 4-D output is read as (B, C, H, W), other
            outputs as (..., C) (kind="pixel" only).
    Adapters are created on the device and dtype of the module they follow. Returns the names as
    they were before the surgery (nested choices are allowed: inner modules are wrapped first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ResidualAdapter(1, bottleneck, kind, **kw)  # argument errors before any work
    names = _resolve_where(model, where)
    if isinstance(channels, Mapping):
        unknown = sorted(set(channels) - set(names))
        if unknown:
            raise ValueError(f"channels names modules that are not chosen by where: {unknown}")
        fixed = {n: positive_int(c, f"channels[{n!r}]") for n, c in channels.items()}
    elif channels is not None:
        c = positive_int(channels, "channels")
        fixed = {n: c for n in names}
    else:
        fixed = {}
    need = [n for n in names if n not in fixed]
    found = _infer_channels(model, need, kind, example_input) if need else {}
    chans = {**found, **fixed}

    adapters = {}
    for n in names:
        block = model.get_submodule(n)
        ref = next(block.parameters(), None)
        if ref is None:
            ref = next(model.parameters(), None)
        adapter = ResidualAdapter(chans[n], bottleneck, kind, **kw)
        if ref is not None:
            adapter.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        adapters[n] = adapter
    for n in sorted(names, key=lambda s: s.count("."), reverse=True):
        parent_name, _, attr = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, AdaptedBlock(getattr(parent, attr), adapters[n]))
    return names


# ---------------------------------------------------------------------------------------------
# freezing


class _HoldEval:
    """Stands in for train() on a frozen normalisation layer: the layer stays in eval mode (uses its
    running statistics and never updates them) while all its parameters have requires_grad=False,
    whatever calls train(); it trains normally again once any of them is unfrozen. A plain object
    (not a closure or bound method) so that deepcopy, pickle and torch.save(model) keep it."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True):
        m = self.module
        hold = not any(p.requires_grad for p in m.parameters(recurse=False))
        return type(m).train(m, bool(mode) and not hold)

    def __repr__(self) -> str:
        return f"<fastcascade frozen-norm train() of {type(self.module).__name__}>"


def hold_eval(m: nn.Module) -> None:
    m.train = _HoldEval(m)
    m.train(m.training)


def release_eval(m: nn.Module) -> None:
    if isinstance(m.__dict__.get("train"), _HoldEval):
        del m.__dict__["train"]


def held_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m.__dict__.get("train"), _HoldEval)]


def freeze_backbone(model: nn.Module, trainable: Iterable[str] = DEFAULT_TRAINABLE) -> ParameterCount:
    """Freeze every parameter whose qualified name matches none of `trainable` (whole dot-separated
    components, see the module docstring); the matching ones get requires_grad=True.

    Frozen normalisation layers with running statistics (BatchNorm*, SyncBatchNorm, timm
    BatchNormAct2d; "frozen": all their parameters frozen, or for affine=False ones a name that
    matches no entry) are held in eval mode: their train() is replaced by one that keeps
    training=False, so model.train(), model.eval() and any wrapper's train() cannot make them use
    batch statistics or move running_mean / running_var / num_batches_tracked. Setting requires_grad
    back to True on a layer's parameters releases it at the next train() call. Calling this again
    re-applies the rule from scratch. Returns trainable_parameters(model).
    """
    if isinstance(trainable, str):
        trainable = (trainable,)
    trainable = tuple(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(_matches(name, trainable))
    for name, m in model.named_modules():
        if isinstance(m, _NormBase):
            release_eval(m)
            own = list(m.parameters(recurse=False))
            frozen = not any(p.requires_grad for p in own) if own else not _matches(name, trainable)
            if m.track_running_stats and frozen:
                hold_eval(m)
    return trainable_parameters(model)


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Parameter counts (shared parameters counted once); percent = 100 * trainable / total."""

    trainable: int
    frozen: int
    total: int
    percent: float

    def __str__(self) -> str:
        return (f"{self.trainable:,} trainable of {self.total:,} parameters ({self.percent:.2f}%), "
                f"{self.frozen:,} frozen")


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable (requires_grad) and frozen parameter counts of model, and the trainable percentage."""
    t = f = 0
    for p in model.parameters():
        if p.requires_grad:
            t += p.numel()
        else:
            f += p.numel()
    total = t + f
    return ParameterCount(t, f, total, 100.0 * t / total if total else 0.0)


# ---------------------------------------------------------------------------------------------
# optimizer groups


def param_groups(model: nn.Module, lr: float | Mapping[str, float] | None = None,
                 weight_decay: float | Mapping[str, float] | None = None, *,
                 adapter: Iterable[str] = ("adapter",), head: Iterable[str] = ("head", "fc", "classifier"),
                 include_frozen: bool = True) -> list[dict]:
    """Optimizer parameter groups for discriminative learning rates, named "adapter", "head", "backbone".

    A parameter is "adapter" when its name matches an entry of `adapter`, else "head" when it matches
    one of `head` (whole dot-separated components, see the module docstring), else "backbone".
    lr: one float for all groups, or a dict over the group names; names it leaves out take
    DEFAULT_LR = {"adapter": 1e-4, "head": 5e-4, "backbone": 1e-6}. weight_decay: None (the
    optimizer's default), one float, or a dict (groups it leaves out keep the default).
    include_frozen=True (default) puts frozen parameters in their groups too, so a freeze-then-
    unfreeze schedule only toggles requires_grad (and freeze_backbone's BatchNorm hold follows):
    optimizers skip parameters whose .grad is None. Empty groups are left out; each group has a
    "name" key. Use as torch.optim.AdamW(param_groups(model)).
    """
    groups = ("adapter", "head", "backbone")
    if lr is None:
        lrs = dict(DEFAULT_LR)
    elif isinstance(lr, Mapping):
        unknown = sorted(set(lr) - set(groups))
        if unknown:
            raise ValueError(f"lr has unknown group names {unknown}; groups are {groups}")
        lrs = {**DEFAULT_LR, **lr}
    else:
        lrs = dict.fromkeys(groups, float(lr))
    for g, v in lrs.items():
        if not v >= 0:
            raise ValueError(f"lr[{g!r}] must be >= 0, got {v}")
    if isinstance(weight_decay, Mapping):
        unknown = sorted(set(weight_decay) - set(groups))
        if unknown:
            raise ValueError(f"weight_decay has unknown group names {unknown}; groups are {groups}")
        wds = dict(weight_decay)
    elif weight_decay is not None:
        wds = dict.fromkeys(groups, float(weight_decay))
    else:
        wds = {}
    adapter, head = tuple(adapter), tuple(head)
    params: dict[str, list] = {g: [] for g in groups}
    for name, p in model.named_parameters():
        if not include_frozen and not p.requires_grad:
            continue
        g = "adapter" if _matches(name, adapter) else "head" if _matches(name, head) else "backbone"
        params[g].append(p)
    out = []
    for g in groups:
        if params[g]:
            group = {"name": g, "params": params[g], "lr": lrs[g]}
            if g in wds:
                group["weight_decay"] = wds[g]
            out.append(group)
    return out
