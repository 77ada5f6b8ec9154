"""Building blocks shared by the heads: masked norms, attention blocks, patch positions."""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("layer", "batch")
POSITIONS = ("none", "sinusoidal", "learned")


class SequenceDropout(nn.Module):
    """Dropout with one mask per sequence, shared by all its positions ("locked" dropout).

    Drawing a (B, 1, D) mask instead of a (B, L, D) one regularises as well for frozen
    features and is ~L times cheaper: on a CPU, random masks cost more than the matmuls.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def keep_mask(self, batch: int, dim: int, like: torch.Tensor) -> torch.Tensor | None:
        """The scaled mask (B, D) this layer multiplies each sequence by; None when it does nothing."""
        if not self.training or self.p == 0.0:
            return None
        keep = torch.empty(batch, dim, device=like.device, dtype=like.dtype)  # (B, D)
        return keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep_mask(x.shape[0], x.shape[-1], x)  # (B, D)
        if keep is None:
            return x
        return x * keep.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])  # broadcast over L


class MaskedNorm(nn.Module):
    """LayerNorm, or BatchNorm whose statistics come from real positions only."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"unknown norm {kind!r}; expected one of {list(NORMS)}")
        self.kind = kind
        self.norm = nn.LayerNorm(dim) if kind == "layer" else nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return self.norm(x)
        out = torch.zeros_like(x)  # (B, L, D)
        if mask.any():
            out[mask] = self.norm(x[mask])  # normalise the (N_real, D) real positions only
        return out


class MaskedAttention(nn.Module):
    """Multi-head attention of queries over a context whose padding is masked out.

    Written on ``scaled_dot_product_attention`` rather than ``nn.MultiheadAttention``:
    the latter's packing and transposes cost more than the attention itself at these sizes.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        B, Lq, D = query.shape
        Lc, H = context.shape[1], self.num_heads
        q = self.query(query).view(B, Lq, H, D // H).transpose(1, 2)  # (B, H, Lq, D/H)
        k, v = self.key_value(context).view(B, Lc, 2, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, Lc, D/H)
        attended = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=context_mask[:, None, None, :]  # (B, 1, 1, Lc), True = attend
        )  # (B, H, Lq, D/H)
        return self.out(attended.transpose(1, 2).reshape(B, Lq, D))  # (B, Lq, D)


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: queries attend to a context (itself for self-attention), then an MLP."""

    def __init__(self, dim: int, num_heads: int, dropout: float, norm: str, cross: bool = True):
        super().__init__()
        self.norm_query = MaskedNorm(norm, dim)
        # Self-attention reuses the normalised queries as keys: only a cross-attention block has a context norm.
        self.norm_context = MaskedNorm(norm, dim) if cross else None
        # No dropout on attention weights: it forces the slow unfused attention path on CPU.
        self.attention = MaskedAttention(dim, num_heads)
        self.norm_mlp = MaskedNorm(norm, dim)
        # Dropout only on the residual branches: CPU random masks are costly, so they go where they count.
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.dropout = SequenceDropout(dropout)

    def forward(
        self,
        query: torch.Tensor,  # (B, Lq, D)
        query_mask: torch.Tensor,  # (B, Lq)
        context: torch.Tensor | None = None,  # (B, Lc, D); None = self-attention
        context_mask: torch.Tensor | None = None,  # (B, Lc)
    ) -> torch.Tensor:
        if context is None:
            context, context_mask = query, query_mask
        assert context is query or self.norm_context is not None, "a self-attention block was given a context"
        has_context = context_mask.any(dim=1)  # (B,)
        # A row with no real key would give NaN; let it see key 0 and zero its output instead.
        safe_mask = context_mask.clone()
        safe_mask[~has_context, 0] = True
        q = self.norm_query(query, query_mask)
        kv = q if context is query else self.norm_context(context, safe_mask)
        attended = self.attention(q, kv, safe_mask)  # (B, Lq, D)
        attended = attended * has_context[:, None, None].to(attended.dtype)
        x = query + self.dropout(attended)
        x = x + self.dropout(self.mlp(self.norm_mlp(x, query_mask)))  # (B, Lq, D)
        return x * query_mask.unsqueeze(-1).to(x.dtype)  # padding stays exactly zero


class PatchPositions(nn.Module):
    """Adds a position code to each patch: none, fixed sinusoidal, or learned."""

    def __init__(self, kind: str, length: int, dim: int):
        super().__init__()
        if kind not in POSITIONS:
            raise ValueError(f"unknown positional encoding {kind!r}; expected one of {list(POSITIONS)}")
        self.kind = kind
        if kind == "learned":
            self.table = nn.Parameter(torch.zeros(length, dim))
            nn.init.normal_(self.table, std=0.02)
        elif kind == "sinusoidal":
            position = torch.arange(length).unsqueeze(1)  # (P, 1)
            frequency = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))  # (D/2,)
            table = torch.zeros(length, dim)
            table[:, 0::2] = torch.sin(position * frequency)
            table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
            self.register_buffer("table", table, persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return patches
        return patches + self.table[: patches.shape[1]]  # (B, P, D)


def normalise_features(x: torch.Tensor) -> torch.Tensor:
    """Layer-normalise encoder features (…, D) without affine: the input every head expects.

    A fixed function of the features, so the cache's features are normalised once when
    loaded (``PairFeatures.from_encoders``) and the encoders' output in ``PairModel``, not
    at every training step; an all-zero padding position stays zero.
    """
    return nn.functional.layer_norm(x, x.shape[-1:])


class Projection(nn.Module):
    """Map normalised encoder features to the head's hidden size, with one dropout mask per sequence."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, dim)
        self.dropout = SequenceDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(x))  # (B, L, D)


def classifier(in_dim: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
