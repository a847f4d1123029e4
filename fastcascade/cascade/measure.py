"""Measuring a latency model (fastcascade.LatencyModel, see fastcascade.cascade.latency): every part of a
cascade timed on n rows, in turns, and the runner's own time; steady_allocator for CPU timings that hold.

    fc.steady_allocator()                                      # on the CPU, once per process
    lat = fc.measure_latency(cascade, val_x[:256], batch_sizes=(1, 16, 64, 256, 512))
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import routing
from .._checks import model_input, positive_int
from .buckets import row_bucket
from .cost import eval_mode
from .latency import (
    DEFAULT_BATCH_SIZES,
    LatencyModel,
    PartTiming,
    beyond_root,
    environment,
    latency_parts,
    node_gathers,
    padded_parts,
)
from .tree import Ensemble, Leaf, Stage

__all__ = ["measure_latencies", "measure_latency", "steady_allocator"]

_STEADY = {"applied": None}


def steady_allocator() -> bool:
    """Make CPU timings hold from one call to the next: fix glibc malloc's thresholds for this process (keep
    freed memory mapped up to 1 GiB: M_TRIM_THRESHOLD; serve every block from the heap: M_MMAP_THRESHOLD 32 MiB
    and M_MMAP_MAX 0). By default glibc adapts the thresholds as blocks are freed, so whether a tensor of a few
    MiB lands in fresh memory (and pays a page fault every 4 KiB) depends on the calls before it: the demo's flat
    model measured 27 and 55 us per block at 512 rows in one process, depending on what ran first. And glibc caps
    the mmap threshold at 32 MiB, so without M_MMAP_MAX 0 every larger tensor (the demo's stem output at 2,048
    rows) is mapped fresh and faults its pages in on every call, at a cost that varies with the kernel's state:
    37 against 29 us per block for the flat model at 2,048 rows. Returns True where applied (Linux with glibc),
    False elsewhere (nothing changed); jemalloc or tcmalloc (LD_PRELOAD) are steady too."""
    if _STEADY["applied"] is None:
        ok = False
        try:
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None)
            if mallopt is not None:  # M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3, M_MMAP_MAX = -4; 1 on success
                ok = mallopt(-1, 1 << 30) == 1 and mallopt(-3, 32 << 20) == 1 and mallopt(-4, 0) == 1
        except OSError:
            ok = False
        _STEADY["applied"] = ok
    return _STEADY["applied"]


class _Inputs:
    """Every part's input on the example's rows, computed once."""

    def __init__(self, cascade, x: torch.Tensor):
        self.x, self.feats, self.logits = x, [], {}
        h = x
        for seg in (cascade.trunk or {}).values():
            h = seg(h)
            self.feats.append(h)
        for node in cascade.nodes:
            p = cascade.plan[node.name]
            inp = x if p.tap < 0 else self.feats[p.tap]
            self.logits[node.name] = None if isinstance(node, Ensemble) else node.outputs(inp)
        # a branch's rows: an ascending subset of its parent's, as partition orders them
        self.subset = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0)).to(x.device)

    def segment_input(self, k: int) -> torch.Tensor:
        return self.x if k == 0 else self.feats[k - 1]

    def rows(self, n: int) -> torch.Tensor:
        return self.subset[:n].sort().values


def _route(cascade, node: Stage, logits, labels, exits, node_id):
    """What Cascade.predict does after a stage's module, short of gathering the children's rows: decide,
    partition, the host transfer of the branch sizes, every branch's row ids, a leaf's labels written."""
    be = cascade.backend
    ids = torch.arange(logits.shape[0], device=logits.device)
    part = routing.partition(node.rule.decide(logits, be), len(node.kids), backend=be)
    counts = part.counts.tolist()
    sorted_ids, start = ids[part.order], 0
    for b, child in enumerate(node.kids):
        k = counts[b]
        if k and isinstance(child, Leaf):
            sub = sorted_ids[start:start + k]
            labels.index_fill_(0, sub, child.label)
            exits.index_fill_(0, sub, node_id)
        start += k


def _cascade_calls(cascade, inputs: _Inputs) -> dict:
    """part name -> fn(n): one call of the part on n rows of its input."""
    x, be, fns = inputs.x, cascade.backend, {}
    dev = x.device

    def call(n):
        cascade._check_input(x[:n])
        cascade._new_output(n, dev, False)

    fns["call"] = call
    for k, (name, seg) in enumerate((cascade.trunk or {}).items()):
        fns[name] = lambda n, s=seg, k=k: s(inputs.segment_input(k)[:n])
    for node_id, node in enumerate(cascade.nodes):
        p = cascade.plan[node.name]
        inp = x if p.tap < 0 else inputs.feats[p.tap]
        carried, reads_x = node_gathers(cascade, node.name)
        sources = [inputs.feats[k] for k in carried] + ([x] if reads_x else [])
        if sources:
            def gather(n, sources=sources):
                rows = inputs.rows(n)
                for f in sources:
                    routing.gather_rows(f, rows, backend=be)

            fns[f"{node.name}/gather"] = gather
        if isinstance(node, Ensemble):
            for k, m in enumerate(node.members):
                fns[f"{node.name}.{k}"] = lambda n, m=m, inp=inp: m(inp[:n])
            logits = node.member_logits(inp)
            labels = torch.zeros(x.shape[0], dtype=torch.int64, device=dev)

            def vote(n, node=node, logits=logits, labels=labels):
                lab, _ = routing.vote(logits[:, :n], node.mode, return_probs=True, backend=be)
                labels[:n].copy_(node.label_table[lab])

            fns[f"{node.name}/vote"] = vote
            continue
        fns[node.name] = lambda n, node=node, inp=inp: node.outputs(inp[:n])
        labels = torch.zeros(x.shape[0], dtype=torch.int64, device=dev)
        exits = torch.zeros_like(labels)

        def route(n, node=node, logits=inputs.logits[node.name], labels=labels, exits=exits, i=node_id):
            _route(cascade, node, logits[:n], labels[:n], exits[:n], i)

        fns[f"{node.name}/route"] = route
    return fns


# ---------------------------------------------------------------------------------------------------------
# measuring


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _timed(models: dict[str, dict], sizes: Sequence[int], repeats: int, warmup: int,
           device: torch.device) -> dict:
    """{(key, part): PartTiming} of passes {key: {part: fn(n)}} (a model's parts in the order it calls them; a
    cascade has a second pass, over its root's parts alone).

    Each round takes every size in turn and, at each size, every model in turn: a burst of load from elsewhere
    meets them all alike instead of one size's or one model's every measurement. A model's turn is two passes
    over its parts on n rows, the first untimed, the second timed part by part: like the second of a stream of
    batches, every part runs after the model's own parts on the previous batch, which is the state of the
    caches when the model runs (a plain model streaming batches finds its weights and buffers where its last
    call left them; a cascade's parts find each other's traces), not after every other model's parts (which
    made the demo's flat model, in cache at 128 rows, 5-21% faster in its runs than predicted). Timing a part
    right after a call of itself instead would be too warm for a cascade, whose parts alternate. `warmup`
    untimed passes of every (pass, size) come first. A cascade's root parts are timed in two states: after the
    whole pass (a batch that went beyond the root came before) and after their own pass alone (one that did
    not): a run that stops nearly every batch at the root finds them warmer than a pass over every part leaves
    them (the demo's trunk designs tuned to do so ran 9-19% faster than the whole pass predicted). (On the CPU this needs steady_allocator: with glibc's
    adaptive thresholds, alternating sizes map fresh memory.)"""
    cuda = device.type == "cuda"

    def run(fns, n):
        for fn in fns.values():
            fn(n)

    for fns in models.values():
        for n in sizes:
            for _ in range(warmup):
                run(fns, n)
    if cuda:
        torch.cuda.synchronize(device)
    times = {(m, k, n): [] for n in sizes for m, fns in models.items() for k in fns}
    for _ in range(repeats):
        for n in sizes:
            for m, fns in models.items():
                run(fns, n)
                for k, fn in fns.items():
                    if cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        fn(n)
                        end.record()
                        end.synchronize()
                        times[m, k, n].append(start.elapsed_time(end) / 1e3)
                    else:
                        t = time.perf_counter()
                        fn(n)
                        times[m, k, n].append(time.perf_counter() - t)
    out = {}
    for m, fns in models.items():
        for k in fns:
            med, p95 = [], []
            for n in sizes:
                ts = torch.tensor(times[m, k, n], dtype=torch.float64)
                med.append(float(ts.quantile(0.5)))
                p95.append(float(ts.quantile(0.95)))
            out[m, k] = PartTiming(tuple(sizes), tuple(med), tuple(p95))
    return out


@torch.no_grad()
def measure_latency(model: nn.Module, example: torch.Tensor, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                    device: torch.device | str | None = None, repeats: int = 15, warmup: int = 2) -> LatencyModel:
    """The LatencyModel of a fastcascade.Cascade (each part) or of any other nn.Module (one part, "model").

    Args:
        model: the cascade or model, in the form it will run in (e.g. fastcascade.inference_form's copy);
            measured in eval mode, its modes restored.
        example: its input rows (uint8 blocks are scaled to [0, 1] as the cascade's tools do); cycled to
            the largest batch size, so a few hundred representative rows are enough.
        batch_sizes: the row counts each part is timed at (ints >= 1; include the run batch size).
        device: where to measure (default: the model's); a model elsewhere is measured as a copy moved there.
        repeats: timed calls per (part, size), taken in turns, each right after an untimed pass over the
            model's parts (see _timed); warmup: untimed passes over the parts per size first.
    On the CPU, call fastcascade.steady_allocator() first (once per process) or use jemalloc / tcmalloc: with
    glibc's adaptive thresholds a part's time depends on what ran before it, in the measurement and in the run.
    To compare models (a cascade and the model it should beat), measure them together: measure_latencies.
    """
    _check_model(model, "model")
    return measure_latencies({"model": model}, example, batch_sizes, device, repeats, warmup)["model"]


@torch.no_grad()
def measure_latencies(models: Mapping[str, nn.Module], example: torch.Tensor,
                      batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, device: torch.device | str | None = None,
                      repeats: int = 15, warmup: int = 2) -> dict[str, LatencyModel]:
    """{name: LatencyModel} of several models or cascades, every part of every model timed in the same rounds.

    Arguments as measure_latency's (device: default the models' own, which must be one device). Measured one
    after another, two models' profiles would each hold the load of their own minutes, and on a shared machine
    that load drifts: their ratio (a cascade's predicted speed-up over the model it replaces, a budget as a
    fraction of that model's time) would carry the drift. In turns, a burst of load meets every model's parts
    alike. Each model's parts are timed right after an untimed pass over its own parts, as in a stream of
    batches through it."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty mapping of name -> nn.Module, got {type(models).__name__}")
    for name, m in models.items():
        _check_model(m, f"models[{name!r}]")
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"example must be a tensor of input rows (at least one), got "
                         f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
    if isinstance(batch_sizes, int) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise ValueError(f"batch_sizes must be a non-empty list of ints >= 1, got {batch_sizes!r}")
    sizes = sorted({positive_int(b, "batch_sizes: each") for b in batch_sizes})
    repeats, warmup = positive_int(repeats, "repeats"), int(warmup)
    if warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    plans = {name: _Plan(m, example, sizes, device) for name, m in models.items()}
    devices = sorted({str(p.device) for p in plans.values()})
    if len(devices) > 1:  # one clock and one stream: the rounds' turns mean nothing across devices
        raise ValueError(f"models: expected every model on one device (or pass device=), got {', '.join(devices)}")
    with contextlib.ExitStack() as stack:
        for p in plans.values():
            stack.enter_context(eval_mode(p.model))
        passes = {}
        for name, p in plans.items():
            passes[name, "full"] = p.fns
            if p.alone:
                passes[name, "alone"] = p.alone
        timed = _timed(passes, sizes, repeats, warmup, next(iter(plans.values())).device)
        return {name: p.finish({k: timed[(name, "full"), k] for k in p.fns},
                               {k: timed[(name, "alone"), k] for k in p.alone}, repeats)
                for name, p in plans.items()}


def _check_model(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a fastcascade.Cascade or an nn.Module, got {type(model).__name__}")


class _Plan:
    """One model's timed calls (part -> fn(n)) on the example, and how its timings become its LatencyModel."""

    def __init__(self, model: nn.Module, example: torch.Tensor, sizes: list[int], device):
        from .runner import Cascade

        self.device = dev = _device_of(model, device)
        if _device_of(model, None) != dev:
            model = copy.deepcopy(model).to(dev)
        self.model = model
        x = model_input(example.to(dev))
        reps = -(-sizes[-1] // x.shape[0])
        self.x = x = x.repeat(reps, *([1] * (x.dim() - 1)))[:sizes[-1]].contiguous()
        self.sizes, self.cascade, self.alone = sizes, isinstance(model, Cascade), {}
        if not self.cascade:
            self.fns = {"model": lambda n: model(x[:n])}
            return
        with eval_mode(model):
            self.names, self.exits = latency_parts(model)
            fns = _cascade_calls(model, _Inputs(model, x))
        self.fns = {k: fns[k] for k in _call_order(model, self.names)}
        # the root's parts again, as a run that stops every batch at the root meets them: after each other alone
        root = set(self.exits[0]) - {"runner"}
        self.alone = {k: fn for k, fn in self.fns.items() if k in root}
        self.fns["runner"] = lambda n: model.predict(x[:n])  # whole calls, timed in turns with the parts

    def finish(self, timed: dict[str, PartTiming], alone: dict[str, PartTiming], repeats: int) -> LatencyModel:
        env = environment(self.device)
        if not self.cascade:
            return LatencyModel(timed, (), (), env, repeats)
        runs = [self.model.predict(self.x[:n], return_details=True).exit_stage.cpu() for n in self.sizes]
        padded = padded_parts(self.model)
        runner = _residual(timed["runner"], timed, self.names, self.exits, runs, self.model.row_buckets, padded)
        parts = {k: runner if k == "runner" else timed[k] for k in self.names}
        return LatencyModel(parts, tuple(self.model.node_names), self.exits, env, repeats, self.model.row_buckets,
                            padded, alone, beyond_root(self.model))


def _call_order(cascade, names: list[str]) -> list[str]:
    """The parts (but the runner) in the order a predict call runs them: per node, its gather, the trunk segments
    it computes, its module or members, its routing or vote; so that in a pass over them each part follows what
    precedes it in a run."""
    order, level, nodes = ["call"], [cascade.root], []
    while level:  # level by level, as Cascade.predict runs them
        nodes += level
        level = [k for n in level if isinstance(n, Stage) for k in n.kids if not isinstance(k, Leaf)]
    for node in nodes:
        own = [f"{node.name}/gather"]
        own += [cascade.segments[k] for k in cascade.plan[node.name].run]
        if isinstance(node, Ensemble):
            own += [f"{node.name}.{k}" for k in range(len(node.members))] + [f"{node.name}/vote"]
        else:
            own += [node.name, f"{node.name}/route"]
        order += [k for k in own if k in names and k not in order]
    return order + [k for k in names if k not in order and k != "runner"]


def _residual(whole: PartTiming, parts: dict[str, PartTiming], names, exits, runs, buckets: int,
              padded: tuple[str, ...]) -> PartTiming:
    """The runner's own time per call (its bookkeeping between parts, and what parts lose to each other's use
    of the caches): whole predict calls on the first n example rows, less the parts those rows reached, each
    at the number of rows that reached it (padded to its row bucket where the runner pads); never below 0."""
    order = [n for n in names if n != "runner"]
    member = torch.zeros(len(exits), len(order), dtype=torch.float64)
    for k, paid in enumerate(exits):
        for p in paid:
            if p != "runner":
                member[k, order.index(p)] = 1
    med, p95 = [], []
    for i, stage in enumerate(runs):
        counts = torch.bincount(stage, minlength=len(exits)).to(torch.float64) @ member
        for which, out, total in (("median", med, whole.median[i]), ("p95", p95, whole.p95[i])):
            paid = sum(float(parts[p].seconds(torch.tensor(float(row_bucket(int(counts[j]), buckets)))
                                              if p in padded else counts[j], which)) for j, p in enumerate(order))
            out.append(max(total - paid, 0.0))
    return PartTiming(whole.batch_sizes, tuple(med), tuple(max(a, b) for a, b in zip(med, p95)))
