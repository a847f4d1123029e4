"""Residual bottleneck adapters (Rebuffi et al. 2017; Houlsby et al. 2019) and the model surgery
around them: insert adapters into a backbone, freeze it (BatchNorm statistics included), count and
group its parameters, and save / load only the trained part with a fingerprint of the backbone.

The adapter math lives in fastcascade.reference (pooled_adapter, pixel_adapter). ResidualAdapter
runs the fused ops fastcascade::pooled_adapter and fastcascade::pixel_adapter (CPU and CUDA C++,
Triton), dropout included (its mask drawn in the kernels from a seed).

Name matching. freeze_backbone and param_groups select parameters by *components* of their
qualified names: an entry matches when it equals one or more whole dot-separated components, so
"fc" matches "fc.weight" and "head.fc.bias" but not ConvNeXt's "stages.0.blocks.1.mlp.fc1.weight",
and "head" does not match EfficientNet's "conv_head.weight" (both belong to the backbone).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import operator
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import _IncompatibleKeys

from . import _ops, reference

__all__ = [
    "AdaptedBlock",
    "ParameterCount",
    "ResidualAdapter",
    "adapter_state_dict",
    "add_adapters",
    "default_adapter_sites",
    "freeze_backbone",
    "load_adapter_state_dict",
    "param_groups",
    "trainable_parameters",
]

ADAPTER_KINDS = ("pooled", "pixel")
META_KEY = "__fastcascade__"
FORMAT = 1
DEFAULT_TRAINABLE = ("adapter", "head", "fc", "classifier")
DEFAULT_LR = {"adapter": 1e-4, "head": 5e-4, "backbone": 1e-6}
_LIST_NAMES = "list them with [name for name, _ in model.named_modules()]"


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= 1, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _check_backend(backend) -> None:
    if backend not in _ops.BACKENDS:
        raise ValueError(f"backend must be one of {_ops.BACKENDS}, got {backend!r}")


def _matches(name: str, entries: Iterable[str]) -> bool:
    """True when some entry equals a run of whole dot-separated components of name."""
    padded = f".{name}."
    return any(f".{e}." in padded for e in entries)


# ---------------------------------------------------------------------------------------------
# the module


class ResidualAdapter(nn.Module):
    """Residual bottleneck adapter: the identity plus a small learned correction.

    kind="pooled", x (B, C, H, W) in any memory format (see reference.pooled_adapter):

        y = x + scale * up_proj(dropout(act(down_proj(mean_hw(x)))))[:, :, None, None]

    kind="pixel", a 1x1-conv bottleneck at every position (see reference.pixel_adapter), for x of
    shape (B, C, H, W) when x is 4-D with x.shape[1] == channels, else tokens (..., C):

        y = x + scale * up_proj(dropout(act(down_proj(x))))      along the channel dim

    down_proj is nn.Linear(C, r), up_proj nn.Linear(r, C); both weights ~ N(0, init_std), biases
    zero, so an untrained adapter is the identity up to ~init_std. scale is 1, or a learned scalar
    parameter (initialised to 1) when learn_scale=True. Dropout acts only in training. y has x's
    shape, dtype and memory format; the math runs in x's dtype (parameters cast to it).

    Args:
        channels: C (>= 1). bottleneck: r (>= 1). kind: "pooled" | "pixel".
        activation: "relu" | "gelu" | "silu". dropout: in [0, 1). init_std: > 0.
        backend: "auto" | "cpu" | "cuda" | "triton" | "torch" (as for the losses). Both kinds run fused
            ops, which draw the dropout mask inside the kernel from a seed taken from torch's CPU
            generator (so torch.manual_seed reproduces a training step); "torch" runs the reference,
            whose dropout is F.dropout's.
    """

    def __init__(self, channels: int, bottleneck: int = 64, kind: str = "pooled", activation: str = "relu",
                 dropout: float = 0.0, init_std: float = 1e-3, learn_scale: bool = False,
                 backend: str = "auto", *, device=None, dtype=None):
        super().__init__()
        channels = _positive_int(channels, "channels")
        bottleneck = _positive_int(bottleneck, "bottleneck")
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"kind must be one of {ADAPTER_KINDS}, got {kind!r}")
        if activation not in reference.ADAPTER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {reference.ADAPTER_ACTIVATIONS}, got {activation!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 < init_std < float("inf"):
            raise ValueError(f"init_std must be > 0 (with both projections at zero no gradient reaches "
                             f"either), got {init_std}")
        _check_backend(backend)
        self.channels, self.bottleneck, self.kind, self.activation = channels, bottleneck, kind, activation
        self.dropout, self.init_std, self.backend = float(dropout), float(init_std), backend
        self.down_proj = nn.Linear(channels, bottleneck, device=device, dtype=dtype)
        self.up_proj = nn.Linear(bottleneck, channels, device=device, dtype=dtype)
        if learn_scale:
            self.scale = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        else:
            self.register_parameter("scale", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.down_proj.weight, 0.0, self.init_std)
            nn.init.normal_(self.up_proj.weight, 0.0, self.init_std)
            self.down_proj.bias.zero_()
            self.up_proj.bias.zero_()
            if self.scale is not None:
                self.scale.fill_(1.0)

    def channel_dim(self, x: torch.Tensor) -> int:
        """Where the channels of x are: 1 for (B, C, H, W), -1 for tokens (..., C). Raises ValueError
        naming the expected and the actual shape when x does not fit this adapter."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        C = self.channels
        if self.kind == "pooled":
            if x.dim() == 4 and x.shape[1] == C:
                return 1
            hint = ""
            if x.dim() == 4 and x.shape[-1] == C:
                hint = " (channels in the last dim? permute to (B, C, H, W), or use kind='pixel')"
            elif x.dim() != 4 and x.dim() >= 1 and x.shape[-1] == C:
                hint = " (tokens? use kind='pixel')"
            raise ValueError(f"ResidualAdapter(channels={C}, kind='pooled') expects x of shape "
                             f"(B, {C}, H, W), got {tuple(x.shape)}{hint}")
        if x.dim() == 4 and x.shape[1] == C:
            return 1
        if x.dim() >= 1 and x.shape[-1] == C:
            return -1
        raise ValueError(f"ResidualAdapter(channels={C}, kind='pixel') expects x of shape (B, {C}, H, W) or "
                         f"tokens (..., {C}), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdim = self.channel_dim(x)
        if x.device != self.down_proj.weight.device:
            raise ValueError(f"x is on {x.device} but the adapter's parameters are on "
                             f"{self.down_proj.weight.device}")
        p = self.dropout if self.training else 0.0
        w = (self.down_proj.weight, self.down_proj.bias, self.up_proj.weight, self.up_proj.bias)
        backend = self._backend_for(x)
        if backend == "torch":
            if self.kind == "pooled":
                return reference._pooled_adapter(x, *w, self.activation, self.scale, p)
            return reference._pixel_adapter(x, *w, self.activation, self.scale, cdim, p)
        act = _ops.ADAPTER_ACTIVATION_CODES[self.activation]
        # the mask's seed comes from torch's CPU generator: torch.manual_seed reproduces it, no device sync
        seed = int(torch.randint(0, 2**62, ())) if p > 0 else 0
        if cdim == 1 and not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        if self.kind == "pooled":
            return _ops.adapter_op("pooled_adapter", backend)(x, *w, self.scale, act, p, seed)[0]
        op = _ops.adapter_op("pixel_adapter", backend)
        if cdim == 1:
            return op(x, *w, self.scale, act, p, seed)
        return op(x.reshape(-1, self.channels).contiguous(), *w, self.scale, act, p, seed).view(x.shape)

    def _backend_for(self, x: torch.Tensor) -> str:
        _check_backend(self.backend)
        return _ops.resolve_backend(self.backend, x.device)

    def extra_repr(self) -> str:
        s = (f"channels={self.channels}, bottleneck={self.bottleneck}, kind={self.kind!r}, "
             f"activation={self.activation!r}")
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s + (", learn_scale=True" if self.scale is not None else "")


class AdaptedBlock(nn.Module):
    """A module followed by an adapter: forward(*args, **kw) = adapter(block(*args, **kw)).

    add_adapters puts one in place of each chosen module, so the original's parameters and buffers
    move from "<name>.<key>" to "<name>.block.<key>" and the adapter's are "<name>.adapter.<key>".
    A state_dict of the unadapted model still loads (keys without "block." are mapped to it), e.g.
    model.load_state_dict(pretrained, strict=False) reports only the adapter keys as missing.
    """

    def __init__(self, block: nn.Module, adapter: nn.Module):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.block(*args, **kwargs))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = (prefix + "block.", prefix + "adapter.")
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
            new = prefix + "block." + key[len(prefix):]
            if new not in state_dict:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# ---------------------------------------------------------------------------------------------
# surgery


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
        fixed = {n: _positive_int(c, f"channels[{n!r}]") for n, c in channels.items()}
    elif channels is not None:
        c = _positive_int(channels, "channels")
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


def _hold_eval(m: nn.Module) -> None:
    m.train = _HoldEval(m)
    m.train(m.training)


def _release(m: nn.Module) -> None:
    if isinstance(m.__dict__.get("train"), _HoldEval):
        del m.__dict__["train"]


def _held_norms(model: nn.Module) -> list[str]:
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
            _release(m)
            own = list(m.parameters(recurse=False))
            frozen = not any(p.requires_grad for p in own) if own else not _matches(name, trainable)
            if m.track_running_stats and frozen:
                _hold_eval(m)
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
# adapter-only checkpoints


def _trainable_keys(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> set[str]:
    """State-dict keys of the trained part: parameters with requires_grad, and the buffers of modules
    that have at least one such parameter (e.g. BatchNorm statistics inside a trainable head)."""
    keys, cache = set(), {}
    for key in sd:
        owner, _, attr = key.rpartition(".")
        if owner not in cache:
            cache[owner] = model.get_submodule(owner)
        m = cache[owner]
        p = m._parameters.get(attr)
        if p is not None:
            if p.requires_grad:
                keys.add(key)
        elif attr in m._buffers and any(q.requires_grad for q in m.parameters(recurse=False)):
            keys.add(key)
    return keys


def _digest(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _records(sd: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, list]:
    return {k: [list(sd[k].shape), str(sd[k].dtype), _digest(k, sd[k])] for k in sorted(keys)}


def _fingerprint(records: Mapping[str, list]) -> str:
    text = "\n".join(f"{k} {r[2]}" for k, r in sorted(records.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _architecture(records: Mapping[str, list]) -> str:
    text = "\n".join(f"{k} {r[0]} {r[1]}" for k, r in sorted(records.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def adapter_state_dict(model: nn.Module) -> dict:
    """The trained part of model (a copy), with a fingerprint of the frozen rest.

    Holds every parameter with requires_grad=True and the buffers of the modules that own one
    (cloned, so later training steps cannot change a kept checkpoint), plus, under the reserved key
    "__fastcascade__", {"format": 1, "fingerprint", "architecture", "backbone", "held_eval"}:
    "backbone" maps every other state_dict entry (frozen parameters AND buffers such as frozen
    BatchNorm running statistics) to [shape, dtype, sha256 of name, shape, dtype and raw bytes];
    "fingerprint" is the sha256 of those records (exact: any changed bit changes it),
    "architecture" the sha256 of the names, shapes and dtypes only; "held_eval" names the frozen
    normalisation layers held in eval mode. Every entry of model.state_dict() is therefore either
    saved bitwise or verified bitwise at load. Save it with torch.save; it loads with
    torch.load(weights_only=True).
    """
    sd = model.state_dict(keep_vars=True)
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    keys = _trainable_keys(model, sd)
    if not keys:
        raise ValueError("adapter_state_dict: model has no trainable parameters (all requires_grad=False)")
    out = {k: sd[k].detach().clone() for k in sorted(keys)}
    records = _records(sd, (k for k in sd if k not in keys))
    out[META_KEY] = {"format": FORMAT, "fingerprint": _fingerprint(records),
                     "architecture": _architecture(records), "backbone": records,
                     "held_eval": _held_norms(model)}
    return out


def _few(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return f"{keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_adapter_state_dict(model: nn.Module, state: Mapping, strict: bool = True, *,
                            check_backbone: bool = True, restore_freeze: bool = True) -> _IncompatibleKeys:
    """Load an adapter_state_dict into model (built the same way: same architecture, same add_adapters
    call), after checking that model's backbone is bitwise the one the checkpoint was trained on.

    Raises ValueError, before changing anything, when
      - state is not an adapter_state_dict, or of an unknown format;
      - (strict) the architecture differs: checkpoint keys missing from model, model entries unknown to
        the checkpoint, or different shapes / dtypes (all listed);
      - (check_backbone) a backbone tensor differs in value (frozen weights or BatchNorm statistics),
        naming both fingerprints and the differing tensors. With strict=False only the entries
        present in both are compared and loaded.
    restore_freeze=True then sets requires_grad as when saved (True for the loaded parameters, False
    for the backbone's) and holds the same normalisation layers in eval mode (see freeze_backbone), so the
    loaded model behaves as the saved one in train mode too. Returns (missing_keys, unexpected_keys)
    as nn.Module.load_state_dict does (both empty when strict).
    """
    if not isinstance(state, Mapping) or META_KEY not in state:
        raise ValueError(f"state is not an adapter_state_dict (no {META_KEY!r} entry); to load a full "
                         f"state_dict use model.load_state_dict")
    meta = state[META_KEY]
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, Mapping) else meta
        raise ValueError(f"unsupported adapter_state_dict format {fmt!r} (this fastcascade reads format "
                         f"{FORMAT})")
    tensors = {k: v for k, v in state.items() if k != META_KEY}
    saved_backbone = meta["backbone"]
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    unexpected = [k for k in tensors if k not in sd]
    backbone_keys = [k for k in sd if k not in tensors]
    missing = [k for k in backbone_keys if k not in saved_backbone]  # in model, unknown to the checkpoint
    absent = [k for k in saved_backbone if k not in sd]  # checkpoint's backbone entries model lacks
    bad = [k for k, v in tensors.items() if k in sd and (v.shape != sd[k].shape or v.dtype != sd[k].dtype)]
    records = _records(sd, backbone_keys)
    fp_saved, fp_now = meta["fingerprint"], _fingerprint(records)
    fps = f"fingerprint {fp_saved[:12]} (checkpoint) vs {fp_now[:12]} (this model)"
    bad += [k for k in backbone_keys if k in saved_backbone and saved_backbone[k][:2] != records[k][:2]]
    if bad or (strict and (unexpected or missing or absent)):
        parts = []
        if unexpected:
            parts.append(f"checkpoint tensors this model lacks: {_few(unexpected)}")
        if absent:
            parts.append(f"checkpoint backbone entries this model lacks: {_few(absent)}")
        if missing:
            parts.append(f"model entries the checkpoint does not know: {_few(missing)}")
        if bad:
            parts.append(f"different shape or dtype: {_few(bad)}")
        raise ValueError(f"load_adapter_state_dict: the model's architecture differs from the one the "
                         f"checkpoint was saved from ({fps}; architecture {meta['architecture'][:12]} vs "
                         f"{_architecture(records)[:12]}): " + "; ".join(parts)
                         + ". Build the model exactly as before (same backbone, same add_adapters call) "
                           "before loading.")
    if check_backbone:
        differ = [k for k in records if k in saved_backbone and saved_backbone[k][2] != records[k][2]]
        if differ:
            hint = ""
            stats = ("running_mean", "running_var", "num_batches_tracked")
            if all(k.rpartition(".")[2] in stats for k in differ):
                hint = (" Only normalisation running statistics differ: they moved while one of the two models "
                        "ran in train mode with its BatchNorm layers not held in eval (freeze_backbone holds "
                        "them).")
            raise ValueError(f"load_adapter_state_dict: the backbone weights differ from the ones these adapters "
                             f"were trained on ({fps}): {len(differ)} of {len(records)} backbone tensors differ, "
                             f"e.g. {_few(differ, 5)}.{hint} Load the same backbone weights first (or pass "
                             f"check_backbone=False to load anyway).")
    load = {k: v for k, v in tensors.items() if k in sd}
    model.load_state_dict(load, strict=False)
    if restore_freeze:
        for name, p in model.named_parameters():
            if name in load or name in saved_backbone:  # entries the checkpoint does not know keep theirs
                p.requires_grad_(name in load)
        held = set(meta.get("held_eval", ()))
        for name, m in model.named_modules():
            if isinstance(m, _NormBase):
                _release(m)
                if name in held:
                    _hold_eval(m)
    if strict:
        return _IncompatibleKeys([], [])
    return _IncompatibleKeys(sorted(missing), sorted(unexpected))


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
