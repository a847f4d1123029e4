"""The demo's report: aggregation over seeds and the target check, on hand-made results."""

import pytest

from fastcascade.demo.report import aggregate, aggregate_numbers, target_check


def _design(macro_f1, blocks_per_s, ratio, predicted_blocks_per_s, predicted_ratio, flops=1.0):
    return {"macro_f1": macro_f1, "accuracy": 0.5, "flops_per_block": flops, "blocks_per_s": blocks_per_s,
            "throughput_ratio": ratio, "predicted_blocks_per_s": predicted_blocks_per_s,
            "predicted_throughput_ratio": predicted_ratio}


def _seed(flat_f1, designs):
    return {"flat": _design(flat_f1, 100.0, None, 100.0, 1.0), **designs}


def test_target_check_on_the_predicted_speed_up():
    runs = [
        _seed(0.30, {"fast@latency": _design(0.31, 160, 1.60, 200, 1.50),  # ratio predicted within 7%, blocks/s 20%
                     "faster@latency": _design(0.32, 210, 2.10, 210, 2.00),
                     "offpred@latency": _design(0.31, 160, 1.60, 160, 1.20),  # speed-up predicted 33% low
                     "worse@latency": _design(0.25, 300, 3.00, 300, 3.00)}),
        _seed(0.30, {"fast@latency": _design(0.31, 160, 1.60, 150, 1.55),
                     "faster@latency": _design(0.32, 210, 2.10, 210, 2.05),
                     "offpred@latency": _design(0.31, 160, 1.60, 160, 1.55),
                     "worse@latency": _design(0.25, 300, 3.00, 300, 3.00)}),
    ]
    agg = aggregate(runs)
    assert agg["fast@latency"]["ratio_measured_over_predicted"]["values"] == pytest.approx([1.6 / 1.5, 1.6 / 1.55])
    assert agg["fast@latency"]["measured_over_predicted"]["values"] == pytest.approx([0.8, 160 / 150])
    check = target_check(agg)
    assert check["met"] and check["designs_meeting"] == ["fast@latency", "faster@latency"]
    assert check["stretch_met"] == ["faster@latency"]
    r = check["ratios"]
    assert r["fast@latency"]["prediction_error"] == pytest.approx(1.6 / 1.5 - 1)  # the worst seed
    assert r["fast@latency"]["blocks_per_s_prediction_error"] == pytest.approx(0.2)
    assert r["offpred@latency"]["prediction_error"] == pytest.approx(1.6 / 1.2 - 1)  # one bad seed fails it
    assert r["worse@latency"]["macro_f1_delta"] == pytest.approx(-0.05)


def test_aggregate_numbers_keeps_the_structure():
    runs = [{"a": {"x": 1.0, "n": 2, "ok": True, "name": "s", "none": None}},
            {"a": {"x": 3.0, "n": 4, "ok": False, "name": "t", "none": None}}]
    agg = aggregate_numbers(runs)
    assert agg["a"]["x"] == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "values": [1.0, 3.0]}
    assert agg["a"]["n"]["values"] == [2.0, 4.0] and agg["a"]["ok"] is False
    assert agg["a"]["name"] == "s" and agg["a"]["none"] is None
