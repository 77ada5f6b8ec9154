"""Gated fusion: a learned gate chooses, per hidden unit and per pair, how much of each modality to use.

The gated multimodal unit of Arevalo et al., "Gated Multimodal Units for Information Fusion"
(ICLR workshop 2017), applied to the two pooled vectors:

    t = tanh(W_t · pool(text))          (B, D)
    v = tanh(W_v · pool(image))         (B, D)
    z = σ(W_z · [pool(text); pool(image)])   (B, D)
    fused = z ⊙ t + (1 − z) ⊙ v         (B, D)  → MLP → logits (B, C)

A skipped image pools to zeros, so the gate can learn to lean on the text for it.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.config import PooledHeadConfig
from fusion.layers import PatchPositions, Projection, classifier
from fusion.pooling import Pool, PoolsInputs, project_and_pool
from fusion.registry import register_head


@register_head("gated")
class GatedHead(PoolsInputs, nn.Module):
    config_class = PooledHeadConfig
    modalities = ("text", "image")

    def __init__(self, config: PooledHeadConfig):
        super().__init__()
        self.config = config
        D = config.hidden
        self.text_projection = Projection(config.text_dim, D, config.dropout)
        self.image_projection = Projection(config.image_dim, D, config.dropout)
        self.image_positions = PatchPositions(config.image_positions, config.image_length, D)
        self.text_pool = Pool(config.text_pool, D)
        self.image_pool = Pool(config.image_pool, D)
        self.text_transform = nn.Linear(D, D)
        self.image_transform = nn.Linear(D, D)
        self.gate = nn.Linear(2 * D, D)
        self.classifier = classifier(D, D, config.num_classes, config.dropout)

    def forward(
        self,
        text: torch.Tensor,  # (B, T, D_text)
        text_mask: torch.Tensor,  # (B, T), True = real token
        image: torch.Tensor,  # (B, P, D_image)
        image_mask: torch.Tensor,  # (B, P), True = real patch
    ) -> torch.Tensor:
        text_pooled = project_and_pool(self.text_projection, self.text_pool, text, text_mask)  # (B, D)
        image_pooled = project_and_pool(
            self.image_projection, self.image_pool, image, image_mask, self.image_positions
        )  # (B, D)
        z = torch.sigmoid(self.gate(torch.cat([text_pooled, image_pooled], dim=-1)))  # (B, D), 1 = text
        fused = z * torch.tanh(self.text_transform(text_pooled)) + (1 - z) * torch.tanh(
            self.image_transform(image_pooled)
        )  # (B, D)
        return self.classifier(fused)  # (B, C)
