"""Figures for people: training curves and confusion matrix of a run, the leaderboard of a sweep.

Uses matplotlib's object API (``Figure``, no pyplot state), so plotting works headless
and in worker processes. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES_FILE, CONFUSION_FILE, LEADERBOARD_FILE = "curves.png", "confusion_matrix.png", "leaderboard.png"
METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "weighted_f1": "weighted-F1",
                "neutral_recall": "neutral recall"}


def new_figure(**options: Any) -> Figure:
    """``matplotlib.figure.Figure(**options)``, imported on first use: commands that never plot (predict, serve,
    the Python API) do not pay matplotlib's half-second import at start."""
    from matplotlib.figure import Figure

    return Figure(**options)


def plot_curves(history: list[dict[str, Any]], best_epoch: int, path: Path) -> Path:
    """Training and validation loss, validation macro-F1 and accuracy per epoch; the kept epoch marked."""
    epochs = [row["epoch"] for row in history]
    # Fixed margins rather than a constrained layout: the content never changes size, and the layout solver
    # doubled the drawing time of a plot every fit writes.
    figure = new_figure(figsize=(9, 3.4))
    figure.subplots_adjust(left=0.07, right=0.99, bottom=0.14, top=0.91, wspace=0.18)
    loss_axes, score_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [row["train_loss"] for row in history], marker="o", label="training")
    loss_axes.plot(epochs, [row["val_loss"] for row in history], marker="o", label="validation")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    score_axes.plot(epochs, [row["val_macro_f1"] for row in history], marker="o", label="validation macro-F1")
    score_axes.plot(epochs, [row["val_accuracy"] for row in history], marker="o", label="validation accuracy")
    score_axes.set(xlabel="epoch", title="validation scores")
    for axes in (loss_axes, score_axes):
        axes.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"kept (epoch {best_epoch})")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=100)
    return Path(path)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str = "validation") -> Path:
    """Counts with rows = true class, columns = predicted class, and each row's recall."""
    counts = np.asarray(matrix)  # (C, C)
    recall = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # (C, C), rows sum to 1
    figure = new_figure(figsize=(4.6, 3.8))  # fixed margins, as plot_curves
    figure.subplots_adjust(left=0.22, right=0.98, bottom=0.13, top=0.92)
    axes = figure.subplots()
    image = axes.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, column), count in np.ndenumerate(counts):
        colour = "white" if recall[row, column] > 0.6 else "black"
        axes.text(column, row, f"{count}\n{recall[row, column]:.2f}", ha="center", va="center", color=colour)
    axes.set(
        xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
        xlabel="predicted", ylabel="true", title=f"{title}: count, row share",
    )
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.savefig(path, dpi=100)
    return Path(path)


def plot_leaderboard(rows: list[dict[str, Any]], path: Path, metric: str = "macro_f1") -> Path:
    """Horizontal bars of ``{metric}_mean`` with ``{metric}_std`` error bars, best config on top."""
    names = [row["config"] for row in rows][::-1]
    means = [row[f"{metric}_mean"] for row in rows][::-1]
    stds = [row[f"{metric}_std"] for row in rows][::-1]
    figure = new_figure(figsize=(9, 1.2 + 0.32 * len(rows)), layout="constrained")
    axes = figure.subplots()
    bars = axes.barh(range(len(rows)), means, xerr=stds, color="tab:blue", alpha=0.8, capsize=3)
    axes.bar_label(bars, [f"{m:.3f}" for m in means], label_type="center", color="white", fontsize=8)
    axes.set_yticks(range(len(rows)), names, fontsize=8)
    low = min(m - s for m, s in zip(means, stds))
    axes.set_xlim(max(0.0, low - 0.05), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.02))
    axes.set(xlabel=f"validation {METRIC_NAMES.get(metric, metric)} (mean ± std over folds)", title="leaderboard")
    axes.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=100)
    return Path(path)
