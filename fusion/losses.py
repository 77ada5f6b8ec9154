"""Losses for imbalanced classes, by name: (weighted, smoothed) cross-entropy and focal loss.

A loss is one function ``(logits, targets, options) → scalar`` under ``@register_loss("name")``.
``fit`` and ``finetune`` both train through ``training_loss``, and their configs' validation and
the CLI help read the names from this registry, so a new loss needs no other line anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fusion.config import FitConfig
    from fusion.finetune import FinetuneConfig


@dataclass(frozen=True)
class LossOptions:
    """The loss options of fit and finetune, handed to every loss: each reads those it has a use for."""

    class_weights: torch.Tensor | None = None  # (C,) weight of each class, None = unweighted
    label_smoothing: float = 0.0  # share of each target spread evenly over the classes
    focal_gamma: float = 2.0  # γ of the focal loss


Loss = Callable[[torch.Tensor, torch.Tensor, LossOptions], torch.Tensor]  # (logits (B, C), targets (B,), options)
LOSSES: dict[str, Loss] = {}


def register_loss(name: str) -> Callable[[Loss], Loss]:
    def decorator(loss: Loss) -> Loss:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = loss
        return loss

    return decorator


def loss_names() -> list[str]:
    return sorted(LOSSES)


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Weights ∝ 1 / class count, scaled so that their mean over the samples is 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


@register_loss("ce")
def cross_entropy(
    logits: torch.Tensor,  # (B, C)
    targets: torch.Tensor,  # (B,)
    options: LossOptions,
) -> torch.Tensor:
    return F.cross_entropy(logits, targets, weight=options.class_weights, label_smoothing=options.label_smoothing)


@register_loss("focal")
def focal_loss(
    logits: torch.Tensor,  # (B, C)
    targets: torch.Tensor,  # (B,)
    options: LossOptions,
) -> torch.Tensor:
    """Down-weights examples the model already gets right: (1 − p_true)^γ · CE."""
    weights = options.class_weights
    ce = F.cross_entropy(
        logits, targets, weight=weights, label_smoothing=options.label_smoothing, reduction="none"
    )  # (B,)
    p_true = torch.softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (B,)
    focal = (1.0 - p_true).pow(options.focal_gamma) * ce  # (B,)
    if weights is None:
        return focal.mean()
    # Normalise by the summed target weights, as weighted cross-entropy does, so that γ = 0 is exactly CE.
    return focal.sum() / weights[targets].sum()


def classification_loss(
    logits: torch.Tensor,  # (B, C)
    targets: torch.Tensor,  # (B,)
    *,
    kind: str = "ce",
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """The registered loss ``kind`` with these options."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {loss_names()}")
    return LOSSES[kind](logits, targets, LossOptions(class_weights, label_smoothing, focal_gamma))


def training_loss(
    config: FitConfig | FinetuneConfig,
    labels: np.ndarray,  # (N,) class ids of the training rows
    num_classes: int,
    device: torch.device | str = "cpu",
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(logits, targets) → loss`` as ``config`` asks (its loss, smoothing, γ, class weights from ``labels``).

    fit and finetune both build their loss here, so a loss name and its options train the same in either.
    """
    weights = inverse_frequency_weights(labels, num_classes).to(device) if config.class_weights else None
    return functools.partial(
        classification_loss, kind=config.loss, class_weights=weights, label_smoothing=config.label_smoothing,
        focal_gamma=config.focal_gamma,
    )
