"""Late fusion: a text-only and an image-only head side by side, their logits averaged.

Each modality gets its own pooled head (``fusion/heads/pooled.py``), trained jointly
through the averaged logits; neither sees the other's features before the vote.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.config import PooledHeadConfig
from fusion.heads.pooled import ImageOnlyHead, TextOnlyHead
from fusion.pooling import PoolsInputs
from fusion.registry import register_head


@register_head("late")
class LateHead(PoolsInputs, nn.Module):
    config_class = PooledHeadConfig  # both halves' options: text-only reads the text ones, image-only the image ones
    modalities = ("text", "image")

    def __init__(self, config: PooledHeadConfig):
        super().__init__()
        self.config = config
        self.text_head = TextOnlyHead(config)
        self.image_head = ImageOnlyHead(config)

    def forward(
        self,
        text: torch.Tensor,  # (B, T, D_text)
        text_mask: torch.Tensor,  # (B, T), True = real token
        image: torch.Tensor,  # (B, P, D_image)
        image_mask: torch.Tensor,  # (B, P), True = real patch
    ) -> torch.Tensor:
        text_logits = self.text_head(text, text_mask, image, image_mask)  # (B, C)
        image_logits = self.image_head(text, text_mask, image, image_mask)  # (B, C)
        return (text_logits + image_logits) / 2  # (B, C)
