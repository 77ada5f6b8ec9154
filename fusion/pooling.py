"""Masked poolings of a sequence (B, L, D) to one vector (B, D).

Masks are bool (B, L), True = real token/patch. A row with no real position (a
skipped image, an empty stream) pools to zeros rather than NaN.

``project_and_pool`` is what the pooled heads call: the same result as projecting
every position and pooling, computed by pooling first wherever that is exact. The fixed
poolings (every one but attention) give a branch the same input vector every epoch, so the
trainer pools such branches once per cache (``fusion.registry.input_poolings`` says which;
``fusion.run.LabelledFeatures.pooled_stream`` pools them, kept by ``fusion.pooled_cache``) and the
head then pools a single position.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from fusion.layers import PatchPositions, Projection

if TYPE_CHECKING:
    from fusion.config import PooledHeadConfig

POOLINGS = ("last", "first", "mean", "max", "attention")
FIXED_POOLINGS = ("last", "first", "mean", "max")  # no parameters: a fixed function of the encoder features


class Pool(nn.Module):
    def __init__(self, kind: str, dim: int):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"unknown pooling {kind!r}; expected one of {list(POOLINGS)}")
        self.kind = kind
        # A learned query only for attention pooling; the others have no parameters.
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim)) if kind == "attention" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Pool ``x`` (B, L, D); attention pooling may be given its (B, L) ``scores`` instead of computing them."""
        if x.shape[1] == 1:  # every pooling of one position is that position: pre-pooled inputs take no work
            return x[:, 0] * mask.to(x.dtype)  # (B, D); a masked position is multiplied by zero
        has_any = mask.any(dim=1, keepdim=True)  # (B, 1)
        if self.kind in ("last", "first"):
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, L)
            if self.kind == "last":
                index = torch.where(mask, positions, -1).amax(dim=1).clamp(min=0)  # (B,)
            else:
                index = torch.where(mask, positions, mask.shape[1]).amin(dim=1).clamp(max=mask.shape[1] - 1)
            pooled = x[torch.arange(x.shape[0], device=x.device), index]  # (B, D)
        elif self.kind == "mean":
            weights = mask.to(x.dtype)  # (B, L)
            weights = weights / weights.sum(1, keepdim=True).clamp(min=1.0)
            pooled = (weights.unsqueeze(1) @ x).squeeze(1)  # (B, D)
        elif self.kind == "max":
            pooled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, D)
        else:
            if scores is None:
                scores = (x @ self.query) / math.sqrt(x.shape[-1])  # (B, L)
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores.masked_fill(~has_any, 0.0), dim=1)  # (B, L)
            pooled = (weights.unsqueeze(1) @ x).squeeze(1)  # (B, D); a matmul never builds the (B, L, D) product
        return torch.where(has_any, pooled, torch.zeros_like(pooled))


def project_and_pool(
    projection: Projection,
    pool: Pool,
    x: torch.Tensor,  # (B, L, D_in) normalised encoder features
    mask: torch.Tensor,  # (B, L), True = real position
    positions: PatchPositions | None = None,
) -> torch.Tensor:
    """``pool(positions(projection(x)), mask)`` (B, D), without projecting every position when it need not.

    The projection is linear (W, b) then one dropout mask m per sequence, and every pooling but max
    takes weights a_i that sum to 1, so  Σ a_i·m⊙(W x_i + b) = m⊙(W Σ a_i x_i + b), and attention
    scores q·m⊙(W x_i + b) = (Wᵀ(m⊙q))·x_i + a constant that softmax ignores. Pooling the inputs
    first costs L·D_in per pair instead of L·D_in·D: projecting 49 patches of 1280 features was
    most of a pooled head's time. Max pooling is defined on the encoder features (the maximum of
    each input feature over the real positions, then projected), which makes it a fixed pooling
    like the others. Patch positions, added after the projection, take the direct path.
    """
    if positions is not None and positions.kind != "none":
        projected = projection(x)  # (B, L, D)
        return pool(positions(projected) if positions is not None else projected, mask)
    batch, dim = x.shape[0], projection.linear.out_features
    keep = projection.dropout.keep_mask(batch, dim, x)  # (B, D) or None
    if x.shape[1] == 1:  # pre-pooled: the vector itself (a masked row is zeroed below), no (B, D_in) mask product
        pooled = projection.linear(x[:, 0])  # (B, D)
    else:
        pooled = projection.linear(pool(x, mask, _attention_scores(projection, pool, x, keep)))  # (B, D)
    if keep is not None:
        pooled = pooled * keep
    return torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))


def _attention_scores(
    projection: Projection, pool: Pool, x: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor | None:
    """Attention pooling's scores (B, L) of the projected positions, computed on the inputs; None for other poolings."""
    batch, dim = x.shape[0], projection.linear.out_features
    if pool.kind == "attention":
        query = pool.query.expand(batch, dim) if keep is None else pool.query * keep  # (B, D)
        direction = query @ projection.linear.weight  # (B, D_in)
        # (B, 1, D_in) @ (B, D_in, L), not x @ direction: the same numbers, but CPU kernels run this
        # orientation (and its backward, grad @ x) about five times faster.
        return (direction.unsqueeze(1) @ x.transpose(1, 2)).squeeze(1) / math.sqrt(dim)  # (B, L)
    return None


class PoolsInputs:
    """Mixin of heads whose branches pool their projected inputs (``project_and_pool``), one per modality.

    A branch with a fixed pooling and no patch positions depends on its input only through that
    pooled vector, so the trainer may hand it the vector as a one-position sequence: pooling a
    single real position gives it back, and the logits are the same.
    """

    modalities: tuple[str, ...]

    @classmethod
    def input_poolings(cls, config: PooledHeadConfig) -> dict[str, str]:
        """Modality → fixed pooling, for each branch of this head that pools its raw inputs with one."""
        poolings = {"text": config.text_pool}
        if config.image_positions == "none":
            poolings["image"] = config.image_pool
        return {m: kind for m, kind in poolings.items() if m in cls.modalities and kind in FIXED_POOLINGS}
