"""Classification report: accuracy alone lies on imbalanced classes, so macro-F1 and recalls too."""

from __future__ import annotations

from typing import Any

import numpy as np

from extract.dataset import LABELS


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (C, C) of class ids, rows = true, columns = predicted."""
    codes = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(codes, minlength=num_classes**2).reshape(num_classes, num_classes)


def f1_scores(matrix: np.ndarray) -> np.ndarray:
    """Each class's F1 (C,) from a confusion count: 2·TP / (2·TP + FP + FN), 0 for a class never true nor predicted."""
    denominators = matrix.sum(0) + matrix.sum(1)  # (C,) predicted + true counts
    return _ratio(2.0 * np.diag(matrix), denominators)


def _ratio(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    return np.divide(numerators, denominators, out=np.zeros(len(numerators)), where=denominators > 0)


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...] = LABELS) -> dict[str, Any]:
    """Accuracy, macro- and support-weighted F1, per-class precision, recall, F1 and support, and the confusion matrix.

    The numbers of scikit-learn's ``precision_recall_fscore_support`` / ``f1_score`` (``zero_division=0``), computed
    from one confusion count: a sweep evaluates every fit after every epoch, and scikit-learn's input checks
    cost more than the counting.
    """
    matrix = confusion(y_true, y_pred, len(labels))  # (C, C)
    true_positives, support = np.diag(matrix), matrix.sum(1)  # (C,), (C,)
    precision, recall = _ratio(true_positives, matrix.sum(0)), _ratio(true_positives, support)
    f1 = f1_scores(matrix)
    return {
        "accuracy": float(true_positives.sum() / max(matrix.sum(), 1)),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float(np.average(f1, weights=support)) if support.sum() else 0.0,
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": matrix.tolist(),  # rows = true, cols = predicted
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
