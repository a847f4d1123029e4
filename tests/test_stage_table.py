"""fastcascade.data.stage_table: the plan's stage table from final 8-class predictions, its formatting and
aggregation over seeds, and its bad-input errors."""

import dataclasses
import json
import os

import pytest
import torch

import fastcascade.data as fd
from fastcascade.data import HORZ, HORZ_4, HORZ_A, HORZ_B, NONE, SPLIT, VERT, VERT_4, VERT_A, VERT_B

SCORES = ("stage1_f1", "stage1_precision", "stage1_recall", "stage2_macro_f1", "rect_f1", "ab_f1", "accuracy",
          "macro_f1")


def table(pred, target):
    return fd.stage_table(torch.tensor(pred), torch.tensor(target))


# ---------------------------------------------------------------------------------------------------------
# hand-computed cases, one per score
# ---------------------------------------------------------------------------------------------------------
def test_stage1_scores_by_hand():
    # truth PARTITION: 0 0 1 1 1; predicted: 0 1 0 1 1 -> tp 2 (SPLIT, VERT_A -> VERT_B), fp 1, fn 1
    t = table([NONE, HORZ, NONE, SPLIT, VERT_B], [NONE, NONE, HORZ, SPLIT, VERT_A])
    assert (t.stage1_precision, t.stage1_recall, t.stage1_f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert (t.rows, t.partition_rows) == (5, 3)


def test_stage2_counts_a_none_prediction_on_a_partition_row_as_a_miss_only():
    target = [SPLIT, SPLIT, HORZ, VERT, HORZ_A, NONE]
    pred = [SPLIT, NONE, VERT, SPLIT, HORZ_B, HORZ]
    # partition rows: the first five. groups truth S S R R A, predicted S (none) R S A; the NONE row is left out.
    # SPLIT tp 1 fp 1 fn 1 -> 1/2; RECT tp 1 (HORZ -> VERT is RECT) fn 1 -> 2/3; AB tp 1 -> 1
    t = table(pred, target)
    assert t.partition_rows == 5
    assert t.stage2_macro_f1 == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # dropping the NONE-predicted row instead would give SPLIT 2/3: the rule is what this case pins down
    assert t.stage2_macro_f1 != pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_rect_f1_by_hand():
    target = [HORZ, HORZ, HORZ, VERT, VERT, NONE]
    pred = [HORZ, HORZ, VERT, VERT, NONE, VERT]
    # rows truly RECT: the first five. HORZ tp 2 fn 1 -> 4/5; VERT tp 1 fp 1 fn 1 (NONE) -> 1/2;
    # the true-NONE row predicted VERT is not a RECT row (it would make VERT 2/5)
    t = table(pred, target)
    assert t.rect_rows == 5
    assert t.rect_f1 == pytest.approx((4 / 5 + 1 / 2) / 2)


def test_ab_f1_by_hand():
    target = [HORZ_A, HORZ_A, HORZ_B, VERT_A, VERT_B, VERT_B, SPLIT]
    pred = [HORZ_A, HORZ_B, HORZ_B, SPLIT, VERT_B, VERT_A, VERT_A]
    # HORZ_A tp 1 fn 1 -> 2/3; HORZ_B tp 1 fp 1 -> 2/3; VERT_A fp 1 fn 1 (SPLIT) -> 0; VERT_B tp 1 fn 1 -> 2/3;
    # the SPLIT row predicted VERT_A is outside the AB rows
    t = table(pred, target)
    assert t.ab_rows == 6
    assert t.ab_f1 == pytest.approx((2 / 3 + 2 / 3 + 0 + 2 / 3) / 4)


def test_final_accuracy_and_macro_f1_by_hand():
    target = [NONE, NONE, HORZ, VERT]
    pred = [NONE, HORZ, HORZ, NONE]
    # NONE tp 1 fp 1 fn 1 -> 1/2; HORZ tp 1 fp 1 -> 2/3; VERT fn 1 -> 0; the other five classes are absent
    t = table(pred, target)
    assert t.accuracy == pytest.approx(2 / 4)
    assert t.macro_f1 == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)


def test_a_macro_averages_over_the_classes_present_and_is_zero_without_rows():
    t = table([HORZ, HORZ, NONE], [HORZ, HORZ, NONE])  # VERT and every AB type absent
    assert t.rect_f1 == 1.0  # over HORZ only: fastcascade.metrics' (scikit-learn's) macro convention
    assert (t.ab_rows, t.ab_f1) == (0, 0.0)


# ---------------------------------------------------------------------------------------------------------
# against a straightforward loop, on random predictions
# ---------------------------------------------------------------------------------------------------------
GROUP = {HORZ: "RECT", VERT: "RECT", SPLIT: "SPLIT", HORZ_A: "AB", HORZ_B: "AB", VERT_A: "AB", VERT_B: "AB"}


def _f1(tp, fp, fn):
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _macro(pairs, classes):
    """Macro F1 of (pred, true) pairs over the classes present among them."""
    f1s = []
    for c in classes:
        tp = sum(p == c and t == c for p, t in pairs)
        fp = sum(p == c and t != c for p, t in pairs)
        fn = sum(p != c and t == c for p, t in pairs)
        if tp + fp + fn:
            f1s.append(_f1(tp, fp, fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


def loop_stage_table(pred: list, target: list) -> dict:
    pairs = list(zip(pred, target))
    tp = sum(p != NONE and t != NONE for p, t in pairs)
    fp = sum(p != NONE and t == NONE for p, t in pairs)
    fn = sum(p == NONE and t != NONE for p, t in pairs)
    stage2 = [(GROUP.get(p, "NONE"), GROUP[t]) for p, t in pairs if t != NONE]
    rect = [(p, t) for p, t in pairs if t in (HORZ, VERT)]
    ab = [(p, t) for p, t in pairs if t in (HORZ_A, HORZ_B, VERT_A, VERT_B)]
    return {"stage1_f1": _f1(tp, fp, fn), "stage1_precision": tp / (tp + fp) if tp + fp else 0.0,
            "stage1_recall": tp / (tp + fn) if tp + fn else 0.0,
            "stage2_macro_f1": _macro(stage2, ("SPLIT", "RECT", "AB")), "rect_f1": _macro(rect, (HORZ, VERT)),
            "ab_f1": _macro(ab, (HORZ_A, HORZ_B, VERT_A, VERT_B)),
            "accuracy": sum(p == t for p, t in pairs) / len(pairs), "macro_f1": _macro(pairs, range(8)),
            "rows": len(pairs), "partition_rows": len(stage2), "rect_rows": len(rect), "ab_rows": len(ab)}


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_loop_on_random_predictions(seed):
    fresh = int.from_bytes(os.urandom(4), "little")  # fresh inputs each run; the failure message shows them
    g = torch.Generator().manual_seed(fresh + seed)
    n = int(torch.randint(1, 400, (), generator=g))
    # skewed labels (NONE frequent, like the data) and a model right about half the time, so every kind of
    # error and the occasional absent class turn up
    weights = torch.tensor([8.0, 2, 2, 1.5, 0.7, 0.7, 0.7, 0.7])
    target = torch.multinomial(weights, n, replacement=True, generator=g)
    noise = torch.multinomial(weights.flip(0), n, replacement=True, generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.5, target, noise)
    got = fd.stage_table(pred, target).to_dict()
    want = loop_stage_table(pred.tolist(), target.tolist())
    assert got == pytest.approx(want, abs=1e-12), (pred.tolist(), target.tolist())


def test_any_shape_and_integer_dtype_reads_flat():
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 8, (6, 7), generator=g)
    pred = torch.randint(0, 8, (6, 7), generator=g)
    flat = fd.stage_table(pred.flatten(), target.flatten())
    assert fd.stage_table(pred, target) == flat
    assert fd.stage_table(pred.to(torch.uint8), target.to(torch.int32)) == flat


def test_perfect_predictions_score_one_everywhere():
    target = torch.arange(8).repeat(5)[torch.randperm(40)]
    t = fd.stage_table(target.clone(), target)
    assert all(getattr(t, f) == 1.0 for f in SCORES), t


def test_a_model_that_predicts_only_none_recalls_no_partition():
    target = torch.arange(8).repeat_interleave(torch.tensor([20, 3, 3, 2, 1, 1, 1, 1]))
    t = fd.stage_table(torch.zeros_like(target), target)
    assert (t.stage1_recall, t.stage1_precision, t.stage1_f1) == (0.0, 0.0, 0.0)
    assert (t.stage2_macro_f1, t.rect_f1, t.ab_f1) == (0.0, 0.0, 0.0)
    assert t.accuracy == pytest.approx(20 / 32)


# ---------------------------------------------------------------------------------------------------------
# to_dict / from_dict, aggregation over seeds, the formatted table
# ---------------------------------------------------------------------------------------------------------
def _random_tables(k):
    g = torch.Generator().manual_seed(11)
    target = torch.randint(0, 8, (300,), generator=g)
    return [fd.stage_table(torch.where(torch.rand(300, generator=g) < 0.3 + 0.2 * i, target,
                                       torch.randint(0, 8, (300,), generator=g)), target) for i in range(k)]


def test_to_dict_is_json_and_from_dict_inverts_it():
    t = _random_tables(1)[0]
    d = json.loads(json.dumps(t.to_dict()))
    assert set(d) == {f.name for f in dataclasses.fields(fd.StageTable)}
    assert fd.StageTable.from_dict(d) == t
    with pytest.raises(ValueError, match="d: expected the fields of a StageTable, missing.*ab_f1"):
        fd.StageTable.from_dict({k: v for k, v in d.items() if k != "ab_f1"})


def test_aggregate_gives_mean_and_sample_std_per_field():
    tables = _random_tables(3)
    agg = fd.aggregate_stage_tables(tables)
    assert set(agg) == {f.name for f in dataclasses.fields(fd.StageTable)}
    for field in SCORES:
        values = torch.tensor([getattr(t, field) for t in tables], dtype=torch.float64)
        assert agg[field]["values"] == values.tolist()
        assert agg[field]["mean"] == pytest.approx(float(values.mean()))
        assert agg[field]["std"] == pytest.approx(float(values.std()))  # n - 1, like the demo's seeds table
    one = fd.aggregate_stage_tables(tables[:1])
    assert one["ab_f1"] == {"mean": tables[0].ab_f1, "std": 0.0, "values": [tables[0].ab_f1]}


def test_format_has_every_design_and_the_plans_reference_rows():
    tables = _random_tables(3)
    text = fd.format_stage_table({"flat": tables[0], "v6-trunk": tables})
    lines = text.splitlines()
    flat = next(line for line in lines if line.strip().startswith("flat"))
    assert all(f"{100 * getattr(tables[0], f):.2f}" in flat for f in SCORES)
    trunk = next(line for line in lines if line.strip().startswith("v6-trunk"))
    agg = fd.aggregate_stage_tables(tables)
    assert f"{100 * agg['ab_f1']['mean']:.2f} ± {100 * agg['ab_f1']['std']:.2f}" in trunk
    for name, ref in fd.PLAN_REFERENCE.items():
        row = next(line for line in lines if line.strip().startswith(name))
        v5 = fd.PLAN_REFERENCE["plan v5"]
        assert (f"{100 * v5['stage1_precision']:.2f}" if name == "plan v5" else
                "–".join(f"{100 * b:g}" for b in ref["stage1_precision"])) in row
        assert row.split()[-1] == "-"  # the plan gives no final macro F1
    assert "real AV1 encoder" in text and "only the method compares" in text
    # the designs come first, the reference rows after them
    assert lines.index(flat) < lines.index(trunk) < min(i for i, line in enumerate(lines) if "plan v5" in line)


def test_format_without_reference_and_as_markdown():
    t = _random_tables(1)[0]
    plain = fd.format_stage_table({"flat": t}, reference=False)
    assert "plan v5" not in plain and "encoder" not in plain and "flat" in plain
    md = fd.format_stage_table({"flat": t, "cascade": [t, t]}, markdown=True)
    lines = md.splitlines()
    assert lines[0].startswith("| design | Stage 1 F1 | Stage 1 precision |") and lines[1].startswith("|---|---:|")
    assert f"| flat | {100 * t.stage1_f1:.2f} |" in md
    assert f"| cascade | {100 * t.stage1_f1:.2f} ± 0.00 |" in md
    assert "| plan v6 phase-2 target | 72–75 | 68–72 | - | 55–60 | 80–83 | 60–65 | 58–63 | - |" in md
    assert all(line.count("|") == 10 for line in lines if line.startswith("|"))


def test_plan_reference_names_stage_table_fields_and_ordered_ranges():
    fields = {f.name for f in dataclasses.fields(fd.StageTable)}
    assert list(fd.PLAN_REFERENCE) == ["plan v5", "plan v6 phase-1 target", "plan v6 phase-2 target"]
    for ref in fd.PLAN_REFERENCE.values():
        assert set(ref) == {"stage1_f1", "stage1_precision", "stage2_macro_f1", "rect_f1", "ab_f1", "accuracy"}
        assert set(ref) <= fields
        for v in ref.values():
            lo, hi = v if isinstance(v, tuple) else (v, v)
            assert 0 < lo <= hi < 1
    # each phase's target is above v5 and phase 2 above phase 1
    v5, p1, p2 = fd.PLAN_REFERENCE.values()
    assert all(v5[f] < p1[f][0] and p1[f][1] <= p2[f][0] for f in v5)


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, target, match", [
    (torch.zeros(4), torch.zeros(4, dtype=torch.long), "pred: expected an integer tensor"),
    (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool), "target: expected an integer tensor"),
    ([0, 1], torch.zeros(2, dtype=torch.long), "pred: expected an integer tensor.*list"),
    (torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long), r"same shape, got \(4,\) and \(5,\)"),
    (torch.tensor([0, HORZ_4]), torch.tensor([0, 1]), r"pred: expected the 8 main partition labels.*HORZ_4 \(8\)"),
    (torch.tensor([0, 1]), torch.tensor([VERT_4, 0]), r"target: expected the 8 main.*VERT_4 \(9\)"),
    (torch.tensor([0, 1]), torch.tensor([12, -1]), r"target: expected the 8 main.*got -1, 12"),
    (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), "target: expected at least one"),
])
def test_bad_input_names_the_argument(pred, target, match):
    with pytest.raises(ValueError, match=match):
        fd.stage_table(pred, target)


def test_bad_format_input_names_the_argument():
    t = _random_tables(1)[0]
    with pytest.raises(ValueError, match="rows: expected a mapping"):
        fd.format_stage_table([t])
    with pytest.raises(ValueError, match=r"rows\['flat'\]: expected a StageTable or a non-empty list"):
        fd.format_stage_table({"flat": []})
    with pytest.raises(ValueError, match=r"rows\['flat'\]: expected a StageTable"):
        fd.format_stage_table({"flat": t.to_dict()})
    with pytest.raises(ValueError, match="rows: expected at least one design"):
        fd.format_stage_table({}, reference=False)
    with pytest.raises(ValueError, match="tables: expected a StageTable or a non-empty list"):
        fd.aggregate_stage_tables([])
