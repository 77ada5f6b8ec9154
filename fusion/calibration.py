"""Post-hoc logit adjustment for imbalanced classes: subtract τ·log prior from the logits.

Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021). A head trained on
imbalanced labels leans towards the frequent classes; subtracting τ·log π_c (π = class
prior of the training rows) moves the decision towards the rare ones. τ is tuned on
validation predictions only, never on test; τ = 0 is the identity, exactly.

Softmax is shift-invariant, so adjusting probabilities through their logs equals
adjusting the logits: ``softmax(log p − τ·log π) = softmax(logits − τ·log π)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusion.metrics import evaluate

TAUS = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0, 0.1, …, 2.0: the values tried on validation
ADJUSTMENT_KEY = "logit_adjustment"  # its key in a run's metrics.json


def log_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """log π (C,) of the training labels; an absent class counts as one row, so the log stays finite."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1).astype(np.float64)  # (C,)
    return np.log(counts / counts.sum())


@dataclass
class LogitAdjustment:
    tau: float = 0.0  # 0 = off
    log_prior: list[float] = field(default_factory=list)  # log π (C,) of the training rows
    scores: dict[str, float] = field(default_factory=dict)  # validation macro-F1 of each τ tried

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """Adjusted class probabilities (N, C); τ = 0 returns the input unchanged."""
        if self.tau == 0.0:
            return probabilities
        logits = np.log(np.clip(probabilities, 1e-12, None)) - self.tau * np.asarray(self.log_prior)  # (N, C)
        logits -= logits.max(axis=1, keepdims=True)
        adjusted = np.exp(logits)
        return (adjusted / adjusted.sum(axis=1, keepdims=True)).astype(probabilities.dtype)


def tune_tau(
    probabilities: np.ndarray,  # (N, C) validation probabilities
    labels: np.ndarray,  # (N,) validation labels
    prior: np.ndarray,  # (C,) log prior of the training rows
    taus: tuple[float, ...] = TAUS,
) -> LogitAdjustment:
    """The τ with the best validation macro-F1; on a tie the smallest, so τ = 0 wins unless τ helps."""
    if len(probabilities) != len(labels):
        raise ValueError(f"{len(probabilities)} probability rows but {len(labels)} labels")
    scores = {}
    for tau in taus:
        adjusted = LogitAdjustment(tau, list(map(float, prior))).apply(probabilities)
        scores[str(tau)] = evaluate(labels, adjusted.argmax(1))["macro_f1"]
    best = max(taus, key=lambda tau: (scores[str(tau)], -tau))
    return LogitAdjustment(float(best), list(map(float, prior)), scores)


def stored_adjustment(metrics: dict[str, Any]) -> LogitAdjustment:
    """The tuned adjustment in a run's metrics.json (key ``logit_adjustment``); τ = 0 when it has none."""
    stored = metrics.get(ADJUSTMENT_KEY)
    return LogitAdjustment(**stored) if stored else LogitAdjustment()
