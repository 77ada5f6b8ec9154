"""Order of the training rows in one epoch: a shuffle, or class-balanced draws."""

from __future__ import annotations

import numpy as np
import torch


def epoch_order(labels: np.ndarray, balanced: bool, generator: torch.Generator) -> torch.Tensor:
    """Row indices (N,) of one epoch, drawn from ``generator``.

    Plain: a permutation, each row once. Balanced: N draws with replacement, each row with
    probability ∝ 1 / its class count, so every class is drawn equally often in expectation
    (rare rows repeat, frequent rows are left out more often).
    """
    if not balanced:
        return torch.randperm(len(labels), generator=generator)
    counts = np.bincount(labels)  # (C,)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)  # (N,)
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator)


def with_auxiliary(
    order: torch.Tensor, offset: int, available: int, draws: int, generator: torch.Generator
) -> torch.Tensor:
    """``order`` plus ``draws`` distinct auxiliary rows (indices from ``offset``), all shuffled together."""
    extra = offset + torch.randperm(available, generator=generator)[: min(draws, available)]  # (K,)
    joined = torch.cat([order, extra])
    return joined[torch.randperm(len(joined), generator=generator)]
