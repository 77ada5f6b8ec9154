"""Pooled heads: project each used modality, pool it to one vector, classify with an MLP.

``text-only`` and ``image-only`` are the unimodal baselines of the ablation; ``concat``
is early fusion of the two pooled vectors. They are the fastest heads to sweep.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.config import PooledHeadConfig
from fusion.layers import PatchPositions, Projection, classifier
from fusion.pooling import Pool, PoolsInputs, project_and_pool
from fusion.registry import register_head


class PooledHead(PoolsInputs, nn.Module):
    config_class = PooledHeadConfig
    modalities: tuple[str, ...] = ("text", "image")

    def __init__(self, config: PooledHeadConfig):
        super().__init__()
        self.config = config
        D = config.hidden
        if "text" in self.modalities:
            self.text_projection = Projection(config.text_dim, D, config.dropout)
            self.text_pool = Pool(config.text_pool, D)
        if "image" in self.modalities:
            self.image_projection = Projection(config.image_dim, D, config.dropout)
            self.image_positions = PatchPositions(config.image_positions, config.image_length, D)
            self.image_pool = Pool(config.image_pool, D)
        self.classifier = classifier(D * len(self.modalities), D, config.num_classes, config.dropout)

    def forward(
        self,
        text: torch.Tensor,  # (B, T, D_text)
        text_mask: torch.Tensor,  # (B, T), True = real token
        image: torch.Tensor,  # (B, P, D_image)
        image_mask: torch.Tensor,  # (B, P), True = real patch
    ) -> torch.Tensor:
        pooled = []
        if "text" in self.modalities:
            pooled.append(project_and_pool(self.text_projection, self.text_pool, text, text_mask))  # (B, D)
        if "image" in self.modalities:
            pooled.append(project_and_pool(
                self.image_projection, self.image_pool, image, image_mask, self.image_positions
            ))  # (B, D)
        return self.classifier(torch.cat(pooled, dim=-1))  # (B, C)


@register_head("text-only")
class TextOnlyHead(PooledHead):
    modalities = ("text",)


@register_head("image-only")
class ImageOnlyHead(PooledHead):
    modalities = ("image",)


@register_head("concat")
class ConcatHead(PooledHead):
    modalities = ("text", "image")
