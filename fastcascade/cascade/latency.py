"""Wall-clock cost of a cascade: a measured latency model of its parts, and the time per row it predicts.

    lat = fc.measure_latency(cascade, val_x[:2048], batch_sizes=(1, 16, 64, 256, 512, 2048))
    lat.seconds_per_row(cascade, val_x, batch_size=512)    # predicted, at the cascade's current setting
    lat.save("latency.json"); fc.LatencyModel.load("latency.json")   # warns if measured elsewhere
    fc.tune_cascade(cascade, val_x, val_y, cost="latency", latency=lat, run_batch_size=512, budget=...)

A cascade is as fast as its parts: every trunk segment, stage module and ensemble member, the routing of
every stage (its rule's decision, the partition and the host transfer of the branch sizes: ``<stage>/route``),
the gather that hands a node its rows' features or inputs (``<node>/gather``, paid by the rows that reach
it), the vote of every ensemble (``<ensemble>/vote``), the fixed cost of a predict call (``call``) and the
runner's own time (``runner``: whole predict calls on the example, timed in turns with the parts, less the
parts the example's rows reached: the runner's bookkeeping between parts and what parts lose to each other's
use of the caches, measured at the cascade's setting when it is measured; both paid per call by every row).
Each part is timed on n rows for every n of batch_sizes (warm-up calls first, then `repeats` timed calls per
size, all (model, size) pairs taking turns so a burst of load from elsewhere hits them alike; in its turn a
model's parts run twice in their order, timed the second time: after the model's own parts, as in a stream
of batches): the median and the 95th percentile are kept. A part's time on n rows is interpolated linearly
between the measured sizes (per-row cost is not constant: small batches pay a fixed cost per call, large
ones fall out of cache) and extrapolated along the last two sizes above them.

The prediction. At run batch size B, a part that a fraction p of the rows reach is called in a batch when
at least one of its B rows reaches it, with probability P = 1 - (1 - p)^B (rows independent), and then on
B p / P rows on average. Its expected time per batch is taken as P t(B p / P), exact when t is affine
between the sizes involved (E[t(K) 1{K > 0}] = P a + b E[K] for t(k) = a + b k, K ~ Binomial(B, p));
the time per row is the sum over parts divided by B. Two refinements: parts that the runner pads to row
buckets (Cascade.row_buckets) are priced at the mean padded count; and a cascade's root parts at
D t + (1 - D) t_alone, where D = 1 - (1 - q)^B is the chance that a batch goes beyond the root (q: the
fraction of rows that does) and t_alone their time after their own pass alone, the runner at D t(B). A
plain model is one part, ``model``: t(B) / B.

Timing: time.perf_counter around each call on the CPU; on CUDA, events around each call and a
synchronisation after it. The thread count, device and torch version are recorded; a model loaded where
any of them differs warns (its times may not hold there).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from dataclasses import dataclass, field

import torch

from .._checks import model_input, positive_int
from .._io import checksum, checksum_problem, write_json
from .buckets import expected_padded_rows
from .tree import Ensemble, Leaf, Stage

__all__ = ["LatencyModel"]

DEFAULT_BATCH_SIZES = (1, 16, 64, 256, 512, 1024, 2048)
FORMAT = "fastcascade.latency/1"


def environment(device: torch.device) -> dict:
    """What a latency model's times depend on: device (type and name), CPU threads and torch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device here"
    else:
        name = device.type
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


@dataclass(frozen=True)
class PartTiming:
    """Seconds for one call of a part on n rows, n = batch_sizes (ascending): median and 95th percentile."""

    batch_sizes: tuple[int, ...]
    median: tuple[float, ...]
    p95: tuple[float, ...]

    def seconds(self, n: torch.Tensor, which: str = "median") -> torch.Tensor:
        """Interpolated time of one call on n rows (float64 tensor of any shape); 0 where n <= 0."""
        xs = torch.tensor(self.batch_sizes, dtype=torch.float64)
        ys = torch.tensor(self.median if which == "median" else self.p95, dtype=torch.float64)
        n = n.to(torch.float64)
        if len(xs) == 1:
            t = ys[0] * n / xs[0]  # one size: proportional
        else:
            i = (torch.searchsorted(xs, n.clamp(min=xs[0]).contiguous(), right=True) - 1).clamp(0, len(xs) - 2)
            x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
            t = y0 + (y1 - y0) * (n - x0) / (x1 - x0)
            below = n < xs[0]  # under the smallest size: no less than a call on it costs, scaled down to 0 rows
            t = torch.where(below, ys[0] * n / xs[0] if xs[0] > 1 else ys[0].expand_as(n), t)
        return torch.where(n > 0, t.clamp(min=0), torch.zeros_like(t))


@dataclass(frozen=True)
class LatencyModel:
    """Measured times of the parts of a cascade (or of one model, part "model"): see the module docstring.

    parts: part name -> PartTiming. nodes: the cascade's node names (Cascade.node_names; () for a model);
    exit_parts: per node, the parts a row that exits there has paid for. env: device, device_name, threads
    and torch version of the measurement. repeats: timed calls per (part, size). row_buckets: the cascade's
    (Cascade.row_buckets) and padded: the parts that run on its padded row counts (those of the nodes below
    the root: fastcascade.cascade.buckets), priced at the mean padded count. alone: the root's parts (those a
    row exiting at the root pays, but the runner) timed after one another alone, as a run that stops the
    previous batch at the root meets them; beyond_root: the parts whose reach is the fraction of rows going
    beyond the root (each of its non-leaf children's route or vote part). A batch goes beyond the root with
    probability D = 1 - (1 - q)^B (q: that fraction); the root's parts cost D t(rows) + (1 - D) t_alone(rows),
    the runner D t(B) (a call that stops at the root has no bookkeeping beyond its parts)."""

    parts: dict[str, PartTiming]
    nodes: tuple[str, ...]
    exit_parts: tuple[tuple[str, ...], ...]
    env: dict
    repeats: int
    row_buckets: int = 0
    padded: tuple[str, ...] = ()
    alone: dict[str, PartTiming] = field(default_factory=dict)
    beyond_root: tuple[str, ...] = ()

    @property
    def is_cascade(self) -> bool:
        return bool(self.nodes)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return next(iter(self.parts.values())).batch_sizes

    def call_seconds(self, part: str, n: int, which: str = "median") -> float:
        """Interpolated time of one call of `part` on n rows."""
        if part not in self.parts:
            raise ValueError(f"part: unknown part {part!r}; parts: {sorted(self.parts)}")
        return float(self.parts[part].seconds(torch.tensor(float(n), dtype=torch.float64), which))

    def membership(self) -> torch.Tensor:
        """float64 (nodes, parts): 1 where a row exiting at the node pays for the part (parts in self.parts order)."""
        names = list(self.parts)
        m = torch.zeros(len(self.nodes), len(names), dtype=torch.float64)
        for k, paid in enumerate(self.exit_parts):
            for p in paid:
                m[k, names.index(p)] = 1
        return m

    def seconds_from_reach(self, reach: torch.Tensor, batch_size: int, which: str = "median") -> torch.Tensor:
        """Predicted seconds per row from reach (..., parts): the fraction of rows reaching each part."""
        B = positive_int(batch_size, "batch_size")
        p = reach.to(torch.float64).clamp(0, 1)
        called = -torch.expm1(B * torch.log1p(-p.clamp(max=1 - 1e-300)))  # 1 - (1 - p)^B, accurate for small p
        called = torch.where(p >= 1, torch.ones_like(p), called)
        rows = torch.where(called > 0, B * p / called.clamp(min=1e-300), torch.zeros_like(p))
        t = torch.stack([timing.seconds(expected_padded_rows(rows[..., j], self.row_buckets) if k in self.padded
                                        else rows[..., j], which)
                         for j, (k, timing) in enumerate(self.parts.items())], -1)
        if self.alone:  # the root's parts in the state the previous batch left: beyond the root, or not
            names = list(self.parts)
            q = p[..., [names.index(k) for k in self.beyond_root]].sum(-1).clamp(0, 1)
            deeper = torch.where(q >= 1, torch.ones_like(q), -torch.expm1(B * torch.log1p(-q.clamp(max=1 - 1e-300))))
            t_alone = torch.stack([self.alone[k].seconds(rows[..., j], which) if k in self.alone
                                   else torch.zeros_like(rows[..., j]) if k == "runner" else t[..., j]
                                   for j, k in enumerate(names)], -1)
            t = deeper[..., None] * t + (1 - deeper[..., None]) * t_alone
        return (called * t).sum(-1) / B

    def seconds_from_exits(self, exits: torch.Tensor, batch_size: int, which: str = "median") -> torch.Tensor:
        """Predicted seconds per row from exit histograms (..., nodes) (rows exiting at each node)."""
        if not self.is_cascade:
            raise ValueError("this latency model is of a plain model (one part), which has no exits")
        exits = exits.to(torch.float64)
        reach = (exits @ self.membership()) / exits.sum(-1, keepdim=True).clamp(min=1e-300)
        return self.seconds_from_reach(reach, batch_size, which)

    @torch.no_grad()
    def seconds_per_row(self, model, x: torch.Tensor | None = None, batch_size: int = 512,
                        which: str = "median") -> float:
        """Predicted seconds per row of running model (the cascade or model measured) over x in batches of
        batch_size (full batches, then the rest); for a cascade at its current setting, from the fraction of
        x's rows reaching each part. A plain model needs no x (then: full batches)."""
        B = positive_int(batch_size, "batch_size")
        if self.is_cascade:
            self.check(model)
            if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
                raise ValueError("x must be a tensor of the cascade's input rows (at least one) to predict from")
            counts = torch.zeros(len(self.nodes), dtype=torch.float64)
            for i in range(0, x.shape[0], 4096):
                stage = model.predict(model_input(x[i:i + 4096]), return_details=True).exit_stage
                counts += torch.bincount(stage.cpu(), minlength=len(self.nodes)).to(torch.float64)
            reach = (counts @ self.membership()) / counts.sum()
        else:
            reach = torch.ones(1, dtype=torch.float64)
        if x is None:
            return float(self.seconds_from_reach(reach, B, which))
        full, rest = divmod(x.shape[0], B)
        total = full * B * float(self.seconds_from_reach(reach, B, which))
        if rest:
            total += rest * float(self.seconds_from_reach(reach, rest, which))
        return total / x.shape[0]

    def check(self, cascade) -> None:
        """ValueError unless this model was measured for a cascade with the same stages and parts."""
        names = list(getattr(cascade, "node_names", []))
        if not self.is_cascade or names != list(self.nodes):
            what = f"stages {list(self.nodes)}" if self.is_cascade else "a plain model"
            raise ValueError(f"latency: the latency model was measured for {what}, but the cascade has stages "
                             f"{names}; measure it with fastcascade.measure_latency(cascade, example)")
        missing = sorted(set(latency_parts(cascade)[0]) - set(self.parts))
        if missing:
            raise ValueError(f"latency: the latency model lacks the parts {missing} of the cascade")
        if getattr(cascade, "row_buckets", 0) != self.row_buckets:
            raise ValueError(f"latency: the latency model was measured with row_buckets={self.row_buckets}, the "
                             f"cascade has row_buckets={cascade.row_buckets}; measure it as it will run")

    # -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": FORMAT, "env": dict(self.env), "repeats": self.repeats, "nodes": list(self.nodes),
             "exit_parts": [list(p) for p in self.exit_parts], "row_buckets": self.row_buckets,
             "padded": list(self.padded), "beyond_root": list(self.beyond_root),
             "alone": {k: {"batch_sizes": list(v.batch_sizes), "median_s": list(v.median), "p95_s": list(v.p95)}
                       for k, v in self.alone.items()},
             "parts": {k: {"batch_sizes": list(v.batch_sizes), "median_s": list(v.median), "p95_s": list(v.p95)}
                       for k, v in self.parts.items()}}
        return json.loads(json.dumps(d))  # the form it is read back in (lists, floats), which the checksum covers

    @classmethod
    def from_dict(cls, d: dict, where: str = "the latency model") -> LatencyModel:
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, not {FORMAT!r}")
            parts = {k: _part_timing(k, v) for k, v in d["parts"].items()}
            alone = {k: _part_timing(k, v) for k, v in d.get("alone", {}).items()}  # absent: saved before it
            beyond = tuple(d.get("beyond_root", ()))
            if any(k not in parts or k == "runner" for k in alone) or any(k not in parts for k in beyond):
                raise ValueError("alone and beyond_root must name parts the model holds (alone: not the runner)")
            nodes, exits = tuple(d["nodes"]), tuple(tuple(p) for p in d["exit_parts"])
            if len(exits) != len(nodes) or any(p not in parts for e in exits for p in e) or not parts:
                raise ValueError("exit_parts must list, per node, parts the model holds")
            buckets, padded = d.get("row_buckets", 0), tuple(d.get("padded", ()))  # absent: saved before buckets
            if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 0:
                raise ValueError(f"row_buckets must be an int >= 0, got {buckets!r}")
            if any(p not in parts for p in padded):
                raise ValueError("padded must list parts the model holds")
            return cls(parts, nodes, exits, dict(d["env"]), int(d["repeats"]), buckets, padded, alone, beyond)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: not a fastcascade latency model ({type(e).__name__}: {e})") from None
        except ValueError as e:
            raise ValueError(f"{where}: not a valid fastcascade latency model: {e}") from None

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the model as JSON (atomically, with a checksum checked on load)."""
        d = self.to_dict()
        return write_json({**d, "checksum": checksum(d)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> LatencyModel:
        """Read a saved model; warns when it was measured on another device type or name, thread count or torch
        version than this process has (device: the one it will be used for, default CPU)."""
        path = pathlib.Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a fastcascade latency model (not JSON: {e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a fastcascade latency model (not a JSON object)")
        problem = checksum_problem({k: v for k, v in d.items() if k != "checksum"}, d.get("checksum"))
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        model = cls.from_dict(d, str(path))
        here = environment(torch.device(device) if device is not None else torch.device("cpu"))
        diff = {k: (model.env.get(k), v) for k, v in here.items() if model.env.get(k) != v}
        if diff:
            warnings.warn(f"{path}: measured with " + ", ".join(f"{k} {a!r}" for k, (a, _) in diff.items())
                          + ", here " + ", ".join(f"{k} {b!r}" for k, (_, b) in diff.items())
                          + ": its times may not hold here", RuntimeWarning, stacklevel=2)
        return model


def _part_timing(k: str, v: dict) -> PartTiming:
    sizes, med, p95 = list(v["batch_sizes"]), list(v["median_s"]), list(v["p95_s"])
    if not sizes or len(med) != len(sizes) or len(p95) != len(sizes) or sizes != sorted(set(sizes)):
        raise ValueError(f"part {k!r}: batch_sizes must ascend, with a median and a p95 for each")
    if not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in med + p95):
        raise ValueError(f"part {k!r}: times must be finite numbers >= 0")
    return PartTiming(tuple(int(s) for s in sizes), tuple(map(float, med)), tuple(map(float, p95)))


# ---------------------------------------------------------------------------------------------------------
# the parts of a cascade


def _parent_branch(cascade) -> dict[str, tuple[Stage, int]]:
    """node name -> (its parent stage, the branch leading to it), for every node but the root."""
    out = {}
    for node in cascade.nodes:
        if isinstance(node, Stage):
            for b, child in enumerate(node.kids):
                if not isinstance(child, Leaf):
                    out[child.name] = (node, b)
    return out


def node_gathers(cascade, name: str) -> tuple[tuple[int, ...], bool]:
    """What node `name` receives by a gather of its rows: the parent's trunk features it is carried (segment
    ids) and whether it reads the cascade's input. Nothing for the root (it reads everything as it is)."""
    parent = _parent_branch(cascade).get(name)
    if parent is None:
        return (), False
    node, b = parent
    return cascade.plan[node.name].carry[b], cascade.plan[name].reads < 0


def latency_parts(cascade) -> tuple[list[str], tuple[tuple[str, ...], ...]]:
    """(part names, per node the parts a row exiting there pays for). A node's parts: ``<node>/gather`` (its
    rows' features or inputs gathered from its parent's, where it receives any), its module (an ensemble: its
    members), then ``<node>/route`` (a stage's decision and partition) or ``<node>/vote``."""
    own = {}
    for n in cascade.nodes:
        feats, reads_x = node_gathers(cascade, n.name)
        gather = [f"{n.name}/gather"] if feats or reads_x else []
        if isinstance(n, Ensemble):
            own[n.name] = [*gather, *(f"{n.name}.{k}" for k in range(len(n.members))), f"{n.name}/vote"]
        else:
            own[n.name] = [*gather, n.name, f"{n.name}/route"]
    names = ["call", "runner", *cascade.segments, *(p for n in cascade.nodes for p in own[n.name])]
    exits = tuple(("call", "runner", *cascade.segments[:cascade.plan[name].depth + 1],
                   *(p for q in cascade.path(name) for p in own[q])) for name in cascade.node_names)
    return names, exits


def padded_parts(cascade) -> tuple[str, ...]:
    """The parts that run on padded row counts (Cascade.row_buckets): every part of the nodes below the root
    but their routing or vote (the gather, the trunk segments they compute, their module or members)."""
    if not getattr(cascade, "row_buckets", 0):
        return ()
    out = []
    for node in cascade.nodes[1:]:
        feats, reads_x = node_gathers(cascade, node.name)
        out += [f"{node.name}/gather"] if feats or reads_x else []
        out += [cascade.segments[k] for k in cascade.plan[node.name].run]
        out += [f"{node.name}.{k}" for k in range(len(node.members))] if isinstance(node, Ensemble) else [node.name]
    return tuple(out)


def beyond_root(cascade) -> tuple[str, ...]:
    """The route or vote part of each non-leaf child of the root: their reaches sum to the fraction of rows
    that go beyond the root."""
    return tuple(f"{c.name}/vote" if isinstance(c, Ensemble) else f"{c.name}/route"
                 for c in cascade.root.kids if not isinstance(c, Leaf))
