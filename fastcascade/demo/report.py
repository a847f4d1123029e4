"""The demo's tables: designs on test side by side, their stages, and the target check."""

from __future__ import annotations

__all__ = ["TARGET", "format_stages", "format_table", "target_check"]

#: some cascade reaches the flat model's test macro F1 at <= 0.6x its FLOPs and >= 1.5x its blocks/s
TARGET = {"flops_ratio": 0.6, "throughput_ratio": 1.5}


def _setting(r: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in r.get("setting", {}).items()) or "-"


def format_table(results: dict[str, dict], always_none: dict) -> str:
    """One row per design (test split): macro F1, accuracy, FLOPs per block and blocks/s, each also
    relative to the flat model, the batch size of its blocks/s, and the operating point tuned on val."""
    flat = results["flat"]
    head = (f"  {'design':<9} {'macro F1':>8} {'accuracy':>8} {'FLOPs/block':>12} {'x flat':>6} {'blocks/s':>9} "
            f"{'x flat':>6} {'batch':>5}  operating point (tuned on val)")
    rows = [head]
    for name, r in results.items():
        rows.append(f"  {name:<9} {r['macro_f1']:8.4f} {r['accuracy']:8.4f} {r['flops_per_block']:12,.0f} "
                    f"{r['flops_per_block'] / flat['flops_per_block']:6.2f} {r['blocks_per_s']:9,.0f} "
                    f"{r['blocks_per_s'] / flat['blocks_per_s']:6.2f} {r['batch_size']:5d}  {_setting(r)}")
    rows.append(f"  {'NONE':<9} {always_none['macro_f1']:8.4f} {always_none['accuracy']:8.4f} {0:12,} {0:6.2f} "
                f"{'':>9} {'':>6} {'':>5}  always NONE")
    return "\n".join(rows)


def format_stages(r: dict) -> str:
    """Per stage of a design on test: rows reaching it, the macro F1 of the decisions it made there."""
    test = r["test"]
    lines = []
    for name, rep in test["stages"].items():
        err = test["cascade_error"].get(name, {})
        lines.append(f"    {name:<8} reached {100 * test['reached'][name]:5.1f}%   decisions macro F1 "
                     f"{rep['macro_f1']:.4f}   accuracy standalone {err.get('standalone_accuracy', float('nan')):.4f}"
                     f", in cascade {err.get('in_cascade_accuracy', float('nan')):.4f}")
    return "\n".join(lines)


def target_check(results: dict[str, dict]) -> dict:
    """Per cascade design its ratios to the flat model on test, and the designs that meet TARGET."""
    flat = results["flat"]
    per, met = {}, []
    for name, r in results.items():
        if name == "flat":
            continue
        ratios = {"macro_f1_delta": r["macro_f1"] - flat["macro_f1"],
                  "flops_ratio": r["flops_per_block"] / flat["flops_per_block"],
                  "throughput_ratio": r["blocks_per_s"] / flat["blocks_per_s"]}
        per[name] = ratios
        if (ratios["macro_f1_delta"] >= 0 and ratios["flops_ratio"] <= TARGET["flops_ratio"]
                and ratios["throughput_ratio"] >= TARGET["throughput_ratio"]):
            met.append(name)
    return {"target": dict(TARGET), "met": bool(met), "designs_meeting": met, "ratios": per}
