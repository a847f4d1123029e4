"""The demo's plots (matplotlib, imported when a plot is drawn): confusion matrices, learning curves, frontiers."""

from __future__ import annotations

import pathlib

import torch

__all__ = ["plot_confusion", "plot_curves", "plot_frontier"]


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
    """Macro F1 against FLOPs per block and against blocks/s: each cascade's frontier on val (its tuned
    operating points), its chosen point on test, the flat model as a point."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    flat = designs["flat"]
    for name, d in designs.items():
        if name == "flat":
            continue
        for ax, key, front in ((axes[0], "flops_per_block", d["frontier_val"]),
                               (axes[1], "blocks_per_s", d["frontier_val_timed"])):
            line = ax.plot([p[key] for p in front], [p["macro_f1"] for p in front], "-", lw=1, alpha=0.7,
                           drawstyle="steps-post" if key == "flops_per_block" else "default",
                           marker="." if key == "blocks_per_s" else None, label=f"{name} (val frontier)")[0]
            ax.plot(d[key], d["macro_f1"], "o", ms=8, color=line.get_color(), mec="black",
                    label=f"{name} (test, chosen)")
    for ax, key in ((axes[0], "flops_per_block"), (axes[1], "blocks_per_s")):
        ax.plot(flat[key], flat["macro_f1"], "*", ms=14, color="black", label="flat (test)")
        ax.set_xscale("log")
        ax.set_ylabel("macro F1")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("FLOPs per block (torch.utils.flop_counter)")
    axes[1].set_xlabel("blocks/s (dynamic mode, measured)")
    # below the panels: inside either one it covers points (the flat star sits top right of the left one)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=(len(labels) + 1) // 2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
