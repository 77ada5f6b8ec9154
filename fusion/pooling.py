"""Masked poolings of a sequence (B, L, D) to one vector (B, D).

Masks are bool (B, L), True = real token/patch. A row with no real position (a
skipped image, an empty stream) pools to zeros rather than NaN.
"""

from __future__ import annotations

import math

import torch
from torch import nn

POOLINGS = ("last", "first", "mean", "max", "attention")


class Pool(nn.Module):
    def __init__(self, kind: str, dim: int):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"unknown pooling {kind!r}; expected one of {list(POOLINGS)}")
        self.kind = kind
        # A learned query only for attention pooling; the others have no parameters.
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim)) if kind == "attention" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        has_any = mask.any(dim=1, keepdim=True)  # (B, 1)
        if self.kind in ("last", "first"):
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, L)
            if self.kind == "last":
                index = torch.where(mask, positions, -1).amax(dim=1).clamp(min=0)  # (B,)
            else:
                index = torch.where(mask, positions, mask.shape[1]).amin(dim=1).clamp(max=mask.shape[1] - 1)
            pooled = x[torch.arange(x.shape[0], device=x.device), index]  # (B, D)
        elif self.kind == "mean":
            weights = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)
        elif self.kind == "max":
            pooled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, D)
        else:
            scores = (x @ self.query) / math.sqrt(x.shape[-1])  # (B, L)
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores.masked_fill(~has_any, 0.0), dim=1)  # (B, L)
            pooled = (weights.unsqueeze(-1) * x).sum(1)  # (B, D)
        return torch.where(has_any, pooled, torch.zeros_like(pooled))
