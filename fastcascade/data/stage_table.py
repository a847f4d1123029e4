"""The seed plan's stage table, computed from a model's final 8-class partition predictions.

    table = stage_table(pred, target)              # StageTable: Stage-1 F1 / precision / recall, Stage-2
                                                   # macro F1, RECT F1, AB F1, final accuracy and macro F1
    print(format_stage_table({"flat": table, "cascade": [seed0, seed1, seed2]}))   # + the plan's rows

Every score is computed from the **final** labels, whatever produced them (a flat 8-class model or a
cascade), so any two designs compare on the same footing: each stage's score is what the pipeline as a whole
got right at that level of the hierarchy, errors of earlier stages included. The per-stage reports of a
cascade's own decisions (fastcascade.cascade.EvaluationReport) answer a different question and stay beside it.

The reference rows (``PLAN_REFERENCE``) are the v5 figures and v6 targets of the research plan this package
grew from. Their data were a real AV1 encoder's decisions; fastcascade's embedded dataset is labelled by a
rate-distortion proxy (fastcascade.data.label_blocks), so only the method compares, not the numbers.
"""

from __future__ import annotations

import dataclasses
import statistics
import textwrap
from collections.abc import Mapping, Sequence

import torch

from ..metrics import IGNORE_INDEX, ClassificationReport, confusion_matrix
from .labels import LABEL_NAMES, NUM_MAIN_CLASSES, STAGE_CLASS_NAMES, stage_targets

__all__ = ["PLAN_REFERENCE", "StageTable", "aggregate_stage_tables", "format_stage_table", "stage_table"]

# From the success table (block_16) of the research plan this package grew from (the project's summary of
# its notes, SEED-PLAN.md): v5 as measured, the v6 phase-1 / phase-2 targets as (low, high) ranges.
# Fractions, like StageTable's fields; the plan gives no Stage-1 recall and no final macro F1.
PLAN_REFERENCE = {
    "plan v5": {"stage1_f1": 0.6519, "stage1_precision": 0.5371, "stage2_macro_f1": 0.3341,
                "rect_f1": 0.7250, "ab_f1": 0.2526, "accuracy": 0.3956},
    "plan v6 phase-1 target": {"stage1_f1": (0.68, 0.70), "stage1_precision": (0.62, 0.65),
                               "stage2_macro_f1": (0.45, 0.50), "rect_f1": (0.75, 0.78),
                               "ab_f1": (0.45, 0.50), "accuracy": (0.48, 0.52)},
    "plan v6 phase-2 target": {"stage1_f1": (0.72, 0.75), "stage1_precision": (0.68, 0.72),
                               "stage2_macro_f1": (0.55, 0.60), "rect_f1": (0.80, 0.83),
                               "ab_f1": (0.60, 0.65), "accuracy": (0.58, 0.63)},
}

# (field, plain-text header, markdown header) of each score column, in the plan's order
_COLUMNS = (
    ("stage1_f1", "stage1 F1", "Stage 1 F1"),
    ("stage1_precision", "stage1 P", "Stage 1 precision"),
    ("stage1_recall", "stage1 R", "Stage 1 recall"),
    ("stage2_macro_f1", "stage2 mF1", "Stage 2 macro F1"),
    ("rect_f1", "RECT F1", "Stage 3-RECT F1"),
    ("ab_f1", "AB F1", "Stage 3-AB F1"),
    ("accuracy", "accuracy", "final accuracy"),
    ("macro_f1", "macro F1", "final macro F1"),
)

_NOTE_SCORES = ("Scores in % of the final 8-class predictions, each on the rows its definition names"
                " (fastcascade.data.stage_table); mean ± std over seeds where a design has several runs.")
_NOTE_REFERENCE = ("Rows 'plan ...' are reference rows from the research plan (v5 as measured, v6 targets"
                   " as ranges): its data were a real AV1 encoder's decisions, these designs' labels are the"
                   " embedded rate-distortion proxy's, so only the method compares, not the numbers.")


@dataclasses.dataclass(frozen=True)
class StageTable:
    """The plan's per-stage scores of final partition predictions (fractions in [0, 1]); see
    :func:`stage_table` for how each is computed. ``rows`` .. ``ab_rows`` count the rows each score is
    computed on (true labels: all, PARTITION, HORZ / VERT, the four AB types)."""

    stage1_f1: float
    stage1_precision: float
    stage1_recall: float
    stage2_macro_f1: float
    rect_f1: float
    ab_f1: float
    accuracy: float
    macro_f1: float
    rows: int
    partition_rows: int
    rect_rows: int
    ab_rows: int

    def to_dict(self) -> dict:
        """JSON-serialisable: field name -> value."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> StageTable:
        """The inverse of :meth:`to_dict` (e.g. a table read back from a run's metrics.json)."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"d: expected the fields of a StageTable, missing {missing}")
        return cls(**{n: (int(d[n]) if n.endswith("rows") else float(d[n])) for n in names})


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    for t, name in ((pred, "pred"), (target, "target")):
        if not isinstance(t, torch.Tensor) or t.dtype not in _INT_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected an integer tensor of partition labels, got {got}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target: expected the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target: expected the same device, got {pred.device} and {target.device}")
    if target.numel() == 0:
        # zeros would read as a model that got everything wrong: an empty split is a caller's mistake
        raise ValueError("target: expected at least one labelled row, got an empty tensor")
    for t, name in ((pred, "pred"), (target, "target")):
        bad = (t < 0) | (t >= NUM_MAIN_CLASSES)
        if bool(bad.any()):
            ids = sorted({int(v) for v in t[bad].unique()})
            shown = ", ".join(f"{LABEL_NAMES[i]} ({i})" if 0 <= i < len(LABEL_NAMES) else str(i)
                              for i in ids[:8])
            last = NUM_MAIN_CLASSES - 1
            raise ValueError(f"{name}: expected the {NUM_MAIN_CLASSES} main partition labels (ids 0 to "
                             f"{last}, {LABEL_NAMES[0]} to {LABEL_NAMES[last]}), got {shown}")
    return pred.reshape(-1).long(), target.reshape(-1).long()


def _restricted(stage: str, pred: dict, target: dict) -> tuple[ClassificationReport, int]:
    """The report of one stage's classes on the rows whose true label reaches it (k classes), each prediction
    mapped to that stage's class or to an extra column k ("outside the stage") when its label does not reach
    the stage; and the number of those rows."""
    true, guess = target[stage], pred[stage]  # stage_targets of the final labels
    rows = true != IGNORE_INDEX
    k = len(STAGE_CLASS_NAMES[stage]) if stage != "rect" else 2  # HORZ_4 / VERT_4 are not main labels
    guess = torch.where(guess == IGNORE_INDEX, torch.full_like(guess, k), guess)
    cm = confusion_matrix(guess[rows], true[rows], k + 1)
    return ClassificationReport.from_confusion(cm), int(rows.sum())


def _macro_f1(report: ClassificationReport, k: int) -> float:
    """Mean F1 of the first k classes present in target or prediction (fastcascade.metrics' macro convention);
    the "outside" column k, never a true class, is left out."""
    present = (report.support[:k] + report.confusion[:, :k].sum(0)) > 0
    return float(report.f1[:k][present].mean()) if bool(present.any()) else 0.0


def stage_table(pred: torch.Tensor, target: torch.Tensor) -> StageTable:
    """The plan's stage table from final partition predictions ``pred`` and labels ``target``.

    Args:
        pred, target: integer tensors of the same shape and device holding the 8 main labels (libaom order:
            NONE=0, HORZ=1, VERT=2, SPLIT=3, HORZ_A=4, HORZ_B=5, VERT_A=6, VERT_B=7). Any shape; read flat.

    Per class c of a score, on that score's rows: tp = #(pred in c & true in c), fp = #(pred in c & true not
    in c), fn = #(pred not in c & true in c); precision = tp / (tp + fp), recall = tp / (tp + fn),
    F1 = 2 tp / (2 tp + fp + fn), each 0 where its denominator is 0 (fastcascade.metrics' zero_division=0).
    A macro F1 is the mean of the classes' F1 over the classes present (tp + fp + fn > 0; scikit-learn's
    labels=None), 0.0 when none is.

    * ``stage1_f1``, ``stage1_precision``, ``stage1_recall``: all rows, the one class PARTITION = any label
      but NONE (in truth and in prediction).
    * ``stage2_macro_f1``: rows whose true label is a partition; classes SPLIT = {SPLIT}, RECT = {HORZ,
      VERT}, AB = {HORZ_A, HORZ_B, VERT_A, VERT_B}. A prediction of NONE on such a row is wrong for every
      class: a false negative of the true group, a false positive of none.
    * ``rect_f1``: rows truly HORZ or VERT; macro over HORZ, VERT. A prediction outside them is a false
      negative of the true class only.
    * ``ab_f1``: rows truly one of the four AB types; macro over those four, likewise.
    * ``accuracy``, ``macro_f1``: all rows, the 8 final classes (fastcascade.classification_report).

    A score whose rows are absent (e.g. no row truly AB: ``ab_rows == 0``) is 0.0; the row counts are in the
    table. An empty ``target``, shapes or devices that differ, a non-integer dtype or a label outside the 8
    main ones (HORZ_4 / VERT_4 or any id >= 8) raise ValueError. The counts are read back to the host.
    """
    pred, target = _check(pred, target)
    per_stage = stage_targets(pred), stage_targets(target)
    stage1 = ClassificationReport.from_confusion(
        confusion_matrix(per_stage[0]["stage1"], per_stage[1]["stage1"], 2))
    stage2, partition_rows = _restricted("stage2", *per_stage)
    rect, rect_rows = _restricted("rect", *per_stage)
    ab, ab_rows = _restricted("ab", *per_stage)
    final = ClassificationReport.from_confusion(confusion_matrix(pred, target, NUM_MAIN_CLASSES))
    return StageTable(
        stage1_f1=float(stage1.f1[1]), stage1_precision=float(stage1.precision[1]),
        stage1_recall=float(stage1.recall[1]), stage2_macro_f1=_macro_f1(stage2, 3),
        rect_f1=_macro_f1(rect, 2), ab_f1=_macro_f1(ab, 4), accuracy=final.accuracy, macro_f1=final.macro_f1,
        rows=target.numel(), partition_rows=partition_rows, rect_rows=rect_rows, ab_rows=ab_rows)


def _tables(value, name: str) -> list[StageTable]:
    tables = [value] if isinstance(value, StageTable) else value
    if not isinstance(tables, Sequence) or not tables or not all(isinstance(t, StageTable) for t in tables):
        raise ValueError(f"{name}: expected a StageTable or a non-empty list of StageTables, got "
                         f"{type(value).__name__}")
    return list(tables)


def aggregate_stage_tables(tables: Sequence[StageTable]) -> dict[str, dict]:
    """Over runs (e.g. seeds): field -> {"mean", "std", "values"} for every StageTable field; std is the
    sample standard deviation (statistics.stdev, n - 1), 0.0 for one run (the demo's mean ± std)."""
    tables = _tables(tables, "tables")
    out = {}
    for f in dataclasses.fields(StageTable):
        values = [getattr(t, f.name) for t in tables]
        out[f.name] = {"mean": statistics.fmean(values),
                       "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _reference_cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, tuple):  # a target range, written as the plan writes it (68–70)
        return "–".join(f"{100 * b:.2f}".rstrip("0").rstrip(".") for b in v)
    return _pct(v)


def _design_cells(tables: list[StageTable]) -> list[str]:
    if len(tables) == 1:
        return [_pct(getattr(tables[0], field)) for field, _, _ in _COLUMNS]
    agg = aggregate_stage_tables(tables)
    return [f"{_pct(agg[field]['mean'])} ± {_pct(agg[field]['std'])}" for field, _, _ in _COLUMNS]


def format_stage_table(rows: Mapping[str, StageTable | Sequence[StageTable]], reference: bool = True,
                       markdown: bool = False) -> str:
    """One table, one row per design (name -> its StageTable, or a list of them, one per seed, shown as mean
    ± std; a list of one shows that table's values), then, with ``reference``, the plan's rows (``PLAN_REFERENCE``: v5, v6 phase-1 and phase-2 target
    ranges; "-" where the plan gives no figure) and a note saying they are the plan's, on other data. Scores
    in %. ``markdown`` gives a GitHub table for the docs instead of aligned plain text."""
    if not isinstance(rows, Mapping):
        raise ValueError(f"rows: expected a mapping of design name -> StageTable(s), got "
                         f"{type(rows).__name__}")
    designs = [(str(name), _design_cells(_tables(v, f"rows[{name!r}]"))) for name, v in rows.items()]
    references = [(name, [_reference_cell(ref.get(field)) for field, _, _ in _COLUMNS])
                  for name, ref in PLAN_REFERENCE.items()] if reference else []
    if not designs and not references:
        raise ValueError("rows: expected at least one design (or reference=True)")
    notes = [_NOTE_SCORES] + ([_NOTE_REFERENCE] if reference else [])
    if markdown:
        lines = ["| design | " + " | ".join(md for _, _, md in _COLUMNS) + " |",
                 "|---|" + "---:|" * len(_COLUMNS)]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in designs + references]
        return "\n".join(lines + ["", " ".join(notes)])
    body = designs + references
    first = max(len("design"), *(len(name) for name, _ in body))
    widths = [max(len(head), *(len(cells[i]) for _, cells in body))
              for i, (_, head, _) in enumerate(_COLUMNS)]

    def line(name, cells):
        return f"  {name:<{first}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))

    lines = [line("design", [head for _, head, _ in _COLUMNS])] + [line(*row) for row in designs]
    if references:  # set apart: the plan's figures, not a design of this run
        lines += ["  " + "-" * (first + sum(w + 2 for w in widths))] + [line(*row) for row in references]
    return "\n".join(lines + [textwrap.fill(n, 108, initial_indent="  ", subsequent_indent="  ")
                              for n in notes])
