"""Early-exit cascades: a declarative tree of stages, run on whole batches with device-side routing.

A cascade is a tree. A :class:`Stage` holds a module, a decision rule and one child per branch of the
rule; a child is another Stage, a :class:`Leaf` (a final class id) or an :class:`Ensemble` (members
that vote, each class mapped to a final id). A two-stage example, a cheap gate in front of a model:

    cascade = Cascade(Stage(gate, Threshold(0.5), [0, Stage(model, Argmax(), range(8), name="model")],
                            name="gate"))
    labels = cascade.predict(x)                            # int64 (N,) final ids
    report = fastcascade.evaluate(cascade, (x, y))         # final and per-stage scores, FLOPs per row

(The AV1 partition hierarchy the package grew from is built by fastcascade.data.av1_partition_cascade.)

Modes of :meth:`Cascade.predict`:

* ``"dynamic"`` (default): each stage runs only on the rows routed to it, as sub-batches padded to the
  cascade's row buckets (``Cascade(row_buckets=8)``: few distinct shapes; 0: exact sizes).
  Rows are routed with a device-side stable partition; the sizes of all branches of one level of the
  tree reach the host in one transfer, so a cascade of depth d waits on the device at most d times
  (boolean-mask indexing waits once per branch). The mode for large-batch throughput.
* ``"static"``: every stage runs on a buffer of the full batch size; routed rows are gathered to its
  front, validity is a device-side mask, and results are written back with scatters over fixed-size
  index tensors. No host synchronisation at all, so the whole prediction can be captured in a CUDA
  graph (:meth:`Cascade.capture`). It computes every stage on batch-size buffers: the mode for
  small-batch latency, where launch and sync overheads dominate.

Both equal the dense oracle (fastcascade.cascade.cascade_dense: every stage on every row, then
select per row) for any input. Decisions use fastcascade.routing's ops, so they are bitwise the same
in every mode.
"""

from .cost import CascadeCost, cascade_cost, flops_per_row
from .dense import cascade_dense, dense_outputs  # noqa: F401  (the oracle, for tests and benchmarks)
from .evaluate import EvaluationReport, evaluate_cascade
from .latency import LatencyModel
from .measure import measure_latencies, measure_latency, steady_allocator
from .runner import Cascade, CascadeOutput
from .tree import Argmax, Confident, Ensemble, Leaf, Stage, Threshold
from .trunk import split_backbone
from .tuning import TuneResult, tune_cascade

__all__ = ["Argmax", "Cascade", "CascadeCost", "CascadeOutput", "Confident", "Ensemble", "EvaluationReport", "LatencyModel", "Leaf",
           "Stage", "Threshold", "TuneResult", "cascade_cost", "evaluate_cascade", "flops_per_row", "measure_latencies", "measure_latency", "split_backbone", "steady_allocator",
           "tune_cascade"]
