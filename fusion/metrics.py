"""Classification report: accuracy alone lies on imbalanced classes, so macro-F1 and recalls too."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from extract.dataset import LABELS


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...] = LABELS) -> dict[str, Any]:
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),  # rows = true, cols = predicted
        "labels": list(labels),
    }


def format_report(metrics: dict[str, Any]) -> str:
    labels = metrics["labels"]
    lines = [
        f"accuracy {metrics['accuracy']:.4f}   macro-F1 {metrics['macro_f1']:.4f}   "
        f"weighted-F1 {metrics['weighted_f1']:.4f}",
        f"{'class':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for label in labels:
        row = metrics["per_class"][label]
        lines.append(
            f"{label:<10}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>10d}"
        )
    lines.append("confusion matrix (rows = true, columns = predicted): " + " ".join(labels))
    for label, row in zip(labels, metrics["confusion_matrix"]):
        lines.append(f"{label:<10}" + "".join(f"{count:>10d}" for count in row))
    return "\n".join(lines)


METRICS = ("macro_f1", "accuracy", "weighted_f1", "neutral_recall")  # what leaderboards and CV summaries report


def metric_of(report: dict[str, Any], name: str) -> float:
    """One of ``METRICS`` from a report of ``evaluate``."""
    return report["per_class"]["neutral"]["recall"] if name == "neutral_recall" else report[name]


def mean_std(name: str, values: list[float] | np.ndarray) -> dict[str, float]:
    """``{name}_mean`` and ``{name}_std`` (sample std over the folds; 0 for one fold)."""
    values = np.asarray(values, dtype=np.float64)
    return {f"{name}_mean": float(values.mean()), f"{name}_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def cv_summary(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and std over K folds' reports of every one of ``METRICS``."""
    summary: dict[str, float] = {}
    for metric in METRICS:
        summary |= mean_std(metric, [metric_of(report, metric) for report in reports])
    return summary
