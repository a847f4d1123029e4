"""The demo's plots (matplotlib, imported when a plot is drawn): confusion matrices, learning curves, frontiers
and the latency model's predictions against measurement, the Stage-1 threshold's effect on the later stages."""

from __future__ import annotations

import pathlib

import torch

__all__ = ["plot_confusion", "plot_curves", "plot_frontier", "plot_thresholds"]


def plot_confusion(cm: torch.Tensor, names, title: str, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    cm = cm.double()
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(names), 0.8 + 0.6 * len(names)))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(histories: dict[str, list[dict]], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in histories.items():
        ep = [r["epoch"] for r in h]
        line = a.plot(ep, [r["train_loss"] for r in h], label=f"{name} train")[0]
        a.plot(ep, [r["val_loss"] for r in h], "--", color=line.get_color(), label=f"{name} val")
        b.plot(ep, [r["val"]["macro_f1"] for r in h], color=line.get_color(), label=name)
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.set_yscale("log")
    b.set_xlabel("epoch")
    b.set_ylabel("val macro F1")
    a.legend(fontsize=6, ncol=2)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(designs: dict[str, dict], path: pathlib.Path) -> None:
    """Three panels: macro F1 against FLOPs per block (each cascade's FLOPs-tuned frontier on val, its chosen
    points on test), against blocks/s (its latency-tuned frontier on val as predicted, a few of its points
    and the chosen points on test as measured), and measured against predicted blocks/s for every timed
    point (the line: equal; the band: within 15%)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    flat = designs["flat"]
    colors = {}
    timed = []
    for key, d in designs.items():
        if key == "flat":
            continue
        name, way = key.split("@")
        color = colors.setdefault(name, f"C{len(colors) % 10}")
        marker = "s" if way == "flops" else "o"
        if way == "flops":
            front = d["frontier_val"]
            axes[0].plot([p["cost"] for p in front], [p["macro_f1"] for p in front], "-", lw=1, alpha=0.6,
                         color=color, drawstyle="steps-post", label=f"{name} (val frontier)")
        else:
            front = d["frontier_val"]
            axes[1].plot([1 / p["cost"] for p in front], [p["macro_f1"] for p in front], "-", lw=1, alpha=0.6,
                         color=color, label=f"{name} (val frontier, predicted)")
            pts = d.get("frontier_val_timed", [])
            axes[1].plot([p["blocks_per_s"] for p in pts], [p["macro_f1"] for p in pts], "x", color=color, ms=5)
            timed += [(p["predicted_blocks_per_s"], p["blocks_per_s"], color, "x") for p in pts]
        axes[0].plot(d["flops_per_block"], d["macro_f1"], marker, ms=7, color=color, mec="black",
                     label=f"{name} tuned on {way} (test)")
        axes[1].plot(d["blocks_per_s"], d["macro_f1"], marker, ms=7, color=color, mec="black")
        timed.append((d["predicted_blocks_per_s"], d["blocks_per_s"], color, marker))
    from matplotlib.ticker import NullFormatter

    for ax, key in ((axes[0], "flops_per_block"), (axes[1], "blocks_per_s")):
        ax.plot(flat[key], flat["macro_f1"], "*", ms=14, color="black", label="flat (test)" if key[0] == "f" else None)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # a decade or two: the minor labels overlap
        ax.set_ylabel("macro F1")
        ax.grid(alpha=0.3)
    timed.append((flat["predicted_blocks_per_s"], flat["blocks_per_s"], "black", "*"))
    for pred, meas, color, marker in timed:
        axes[2].plot(pred, meas, marker, color=color, mec="black" if marker in "so*" else None, ms=7)
    lo = min(min(p, m) for p, m, _, _ in timed) * 0.8
    hi = max(max(p, m) for p, m, _, _ in timed) * 1.25
    line = [lo, hi]
    axes[2].plot(line, line, "k-", lw=0.8)
    axes[2].fill_between(line, [v * 0.85 for v in line], [v * 1.15 for v in line], color="gray", alpha=0.2,
                         label="within 15%")
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    for axis in (axes[2].xaxis, axes[2].yaxis):
        axis.set_minor_formatter(NullFormatter())
    axes[2].set_xlabel("predicted blocks/s (latency model)")
    axes[2].set_ylabel("measured blocks/s")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="upper left")
    axes[0].set_xlabel("FLOPs per block (torch.utils.flop_counter)")
    axes[1].set_xlabel("blocks/s (lines: predicted on val; x: measured on val; markers: measured on test)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, (len(labels) + 2) // 3), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_thresholds(thresholds: dict[str, dict], path: pathlib.Path) -> None:
    """Per v6 hierarchy (threshold_ways' output): test Stage-1 F1, final macro F1 and the contamination of Stage
    2's inputs against the Stage-1 threshold, with the thresholds each way chose on val."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(thresholds), figsize=(5.5 * len(thresholds), 4), squeeze=False)
    for ax, (design, ways) in zip(axes[0], thresholds.items()):
        sw = ways["sweep"]
        ax.plot(sw["threshold"], sw["stage1_f1"], color="tab:blue", label="Stage-1 F1")
        ax.plot(sw["threshold"], sw["macro_f1"], color="tab:green", label="final macro F1")
        ax.plot(sw["threshold"], sw["contamination"], color="tab:red", ls="--", label="NONE share of Stage-2 inputs")
        for (way, r), c in zip(((k, v) for k, v in ways.items() if k != "sweep"), ("tab:purple", "tab:orange", "k")):
            ax.axvline(r["threshold"], color=c, lw=1, ls=":", label=f"chosen for {way}: {r['threshold']:.3f}")
        ax.axvspan(0.40, 0.70, color="0.9", zorder=0, label="the plan's grid")
        ax.set_xlabel("Stage-1 threshold (on the calibrated probability)")
        ax.set_title(f"{design} (test)", fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6.5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
