"""Adapter-only checkpoints: save the trained part of a model with a fingerprint of its frozen backbone,
and load it back only into the same backbone (adapter_state_dict, load_adapter_state_dict)."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import _IncompatibleKeys

from .._checks import few, listed
from .._io import checksum, checksum_problem
from .surgery import held_norms, hold_eval, release_eval

__all__ = ["adapter_state_dict", "load_adapter_state_dict"]

META_KEY = "__fastcascade__"
#: 2 adds "tensors" (the saved tensors' names, shapes, dtypes) and "checksum"; format 1 still loads, with a
#: warning (its integrity cannot be checked)
FORMAT = 2
_META_ENTRIES = {"format": int, "fingerprint": str, "architecture": str, "backbone": Mapping,
                 "held_eval": (list, tuple), "tensors": Mapping, "checksum": str}


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


def _architecture_digest(records: Mapping[str, list]) -> str:
    text = "\n".join(f"{k} {r[0]} {r[1]}" for k, r in sorted(records.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def adapter_state_dict(model: nn.Module) -> dict:
    """The trained part of model (a copy), with a fingerprint of the frozen rest.

    Holds every parameter with requires_grad=True and the buffers of the modules that own one
    (cloned, so later training steps cannot change a kept checkpoint), plus, under the reserved key
    "__fastcascade__", {"format": 2, "fingerprint", "architecture", "backbone", "held_eval", "tensors",
    "checksum"}: "tensors" maps the saved tensors to [shape, dtype]; "checksum" is
    fastcascade._io.checksum of the saved tensors and the other entries (a flipped bit anywhere is
    refused at load);
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
    meta = {"format": FORMAT, "fingerprint": _fingerprint(records),
            "architecture": _architecture_digest(records), "backbone": records,
            "held_eval": held_norms(model),
            "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in out.items()}}
    meta["checksum"] = checksum({**out, META_KEY: meta}, "adapter_state_dict")
    out[META_KEY] = meta
    return out


def _check_state(state: Mapping) -> None:
    """ValueError naming what is missing or wrong in a damaged adapter state, or that it does not match its
    checksum; a warning for format 1 (no checksum)."""
    meta = state[META_KEY]
    fmt = meta.get("format") if isinstance(meta, Mapping) else meta
    if not isinstance(meta, Mapping) or fmt not in (1, FORMAT):
        raise ValueError(f"unsupported adapter_state_dict format {fmt!r} (this fastcascade reads formats 1 and "
                         f"{FORMAT})")
    needed = {k: t for k, t in _META_ENTRIES.items() if fmt == FORMAT or k not in ("tensors", "checksum")}
    missing = [k for k in needed if k not in meta]
    wrong = [f"{k!r} ({type(meta[k]).__name__})" for k, t in needed.items()
             if k in meta and not isinstance(meta[k], t)]
    if missing or wrong:
        raise ValueError(f"the adapter state is damaged: its {META_KEY!r} entry "
                         + "; ".join(([f"lacks {missing}"] if missing else [])
                                     + ([f"has entries of the wrong type: {', '.join(wrong)}"] if wrong else []))
                         + "; save it again with adapter_state_dict")
    bad = [k for k, r in meta["backbone"].items() if not (isinstance(r, (list, tuple)) and len(r) == 3)]
    if bad:
        raise ValueError(f"the adapter state is damaged: backbone records {few(sorted(bad), 8, as_list=True)} are "
                         f"not [shape, dtype, digest]")
    if fmt == 1:
        warnings.warn("adapter_state_dict format 1 has no checksum, so damage to it cannot be detected; save it "
                      "again with adapter_state_dict to add one", stacklevel=3)
        return
    tensors = {k: v for k, v in state.items() if k != META_KEY}
    saved_names = meta["tensors"]
    absent = [k for k in saved_names if k not in tensors]
    extra = [k for k in tensors if k not in saved_names]
    not_tensors = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if absent or extra or not_tensors:
        raise ValueError("the adapter state is damaged or was edited: it " + listed((
            (f"lacks {len(absent)} of the {len(saved_names)} tensors it was saved with", sorted(absent)),
            ("holds entries it was not saved with", sorted(extra)),
            ("holds non-tensors", sorted(not_tensors))), as_list=True))
    problem = checksum_problem({**tensors, META_KEY: {k: v for k, v in meta.items() if k != "checksum"}},
                               meta["checksum"])
    if problem:
        raise ValueError(f"the adapter state is damaged: {problem}; nothing was loaded")


def load_adapter_state_dict(model: nn.Module, state: Mapping, strict: bool = True, *,
                            check_backbone: bool = True, restore_freeze: bool = True) -> _IncompatibleKeys:
    """Load an adapter_state_dict into model (built the same way: same architecture, same add_adapters
    call), after checking that model's backbone is bitwise the one the checkpoint was trained on.

    Raises ValueError, before changing anything, when
      - state is not an adapter_state_dict, or of an unknown format;
      - state is damaged: entries missing (named), tensors missing or added since it was saved (named),
        or content that does not match its checksum (format 1, without a checksum, loads with a warning);
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
    _check_state(state)
    meta = state[META_KEY]
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
        parts = listed((("checkpoint tensors this model lacks", sorted(unexpected)),
                        ("checkpoint backbone entries this model lacks", sorted(absent)),
                        ("model entries the checkpoint does not know", sorted(missing)),
                        ("different shape or dtype", sorted(bad))), as_list=True)
        raise ValueError(f"load_adapter_state_dict: the model's architecture differs from the one the "
                         f"checkpoint was saved from ({fps}; architecture {meta['architecture'][:12]} vs "
                         f"{_architecture_digest(records)[:12]}): " + parts
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
                             f"e.g. {few(sorted(differ), 5, as_list=True)}.{hint} Load the same backbone weights first (or pass "
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
                release_eval(m)
                if name in held:
                    hold_eval(m)
    if strict:
        return _IncompatibleKeys([], [])
    return _IncompatibleKeys(sorted(missing), sorted(unexpected))
