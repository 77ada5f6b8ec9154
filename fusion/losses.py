"""Losses for imbalanced classes: (weighted, smoothed) cross-entropy and focal loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Weights ∝ 1 / class count, scaled so that their mean over the samples is 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def classification_loss(
    logits: torch.Tensor,  # (B, C)
    targets: torch.Tensor,  # (B,)
    *,
    kind: str = "ce",
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing)
    if kind == "focal":
        # Down-weights examples the model already gets right: (1 − p_true)^γ · CE.
        ce = F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing, reduction="none")
        p_true = torch.softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (B,)
        focal = (1.0 - p_true).pow(focal_gamma) * ce  # (B,)
        if class_weights is None:
            return focal.mean()
        # Normalise by the summed target weights, as weighted cross-entropy does, so that γ = 0 is exactly CE.
        return focal.sum() / class_weights[targets].sum()
    raise ValueError(f"unknown loss {kind!r}; expected 'ce' or 'focal'")
