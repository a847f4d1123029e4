"""The adapter modules: ResidualAdapter (pooled or pixel bottleneck, running the fused ops) and
AdaptedBlock (a block followed by its adapter)."""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import _ops, reference
from .._checks import check_backend, positive_int

__all__ = ["AdaptedBlock", "ResidualAdapter"]

ADAPTER_KINDS = ("pooled", "pixel")

# Pixels per sample, per unit of bottleneck r, from which backend "auto" runs the fused CPU pooled
# adapter: its products (B C r multiply-adds each, in plain loops) lose to the reference's GEMMs when
# few pixels share them, its single pass over x wins when many do. Measured crossover (one thread,
# 512 samples, C = 64..512, r = 16..128; bench/README.md "Pooled adapter, CPU"): between r/4 and r/2
# pixels; r/2 so that "auto" is never slower than the reference.
CPU_POOLED_PIXELS_PER_R = 1 / 2


def cpu_pooled_is_faster(hw: int, r: int) -> bool:
    """Whether backend "auto" runs the fused CPU pooled adapter (else the reference, whose GEMMs win)."""
    return hw >= CPU_POOLED_PIXELS_PER_R * r


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
            whose dropout is F.dropout's. On the CPU, "auto" runs the pooled kind's reference when a
            sample has fewer than r / 2 pixels (H W < r / 2: there the reference's GEMMs are faster).
    """

    def __init__(self, channels: int, bottleneck: int = 64, kind: str = "pooled", activation: str = "relu",
                 dropout: float = 0.0, init_std: float = 1e-3, learn_scale: bool = False,
                 backend: str = "auto", *, device=None, dtype=None):
        super().__init__()
        channels = positive_int(channels, "channels")
        bottleneck = positive_int(bottleneck, "bottleneck")
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"kind must be one of {ADAPTER_KINDS}, got {kind!r}")
        if activation not in reference.ADAPTER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {reference.ADAPTER_ACTIVATIONS}, got {activation!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 < init_std < float("inf"):
            raise ValueError(f"init_std must be > 0 (with both projections at zero no gradient reaches "
                             f"either), got {init_std}")
        check_backend(backend)
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
                return reference.pooled_adapter(x, *w, self.activation, self.scale, p)
            return reference.pixel_adapter(x, *w, self.activation, self.scale, cdim, p)
        act = _ops.ADAPTER_ACTIVATION_CODES[self.activation]
        # the mask's seed comes from torch's CPU generator: torch.manual_seed reproduces it, no device sync
        seed = int(torch.randint(0, 2**62, ())) if p > 0 else 0
        if cdim == 1 and not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        if self.kind == "pooled":
            return _ops.op("pooled_adapter", backend)(x, *w, self.scale, act, p, seed)[0]
        op = _ops.op("pixel_adapter", backend)
        if cdim == 1:
            return op(x, *w, self.scale, act, p, seed)
        return op(x.reshape(-1, self.channels).contiguous(), *w, self.scale, act, p, seed).view(x.shape)

    def _backend_for(self, x: torch.Tensor) -> str:
        check_backend(self.backend)
        backend = _ops.resolve_backend(self.backend, x.device)
        auto = self.backend == "auto" and (os.environ.get("FASTCASCADE_BACKEND") or "auto") == "auto"
        if auto and backend == "cpu" and self.kind == "pooled" and x.dim() == 4 and not cpu_pooled_is_faster(
                x.shape[2] * x.shape[3], self.bottleneck):
            return "torch"
        return backend

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
