"""The seed's cross-attention fusion head.

Both modalities are projected to one hidden size D, then four branches run side by side:

1. text tokens, raw                                         → pooled by ``text_pool`` (last real token)
2. image patches → self-attention                           → pooled by ``image_pool`` (mean over patches)
3. text queries attend to image patches → self-attention    → pooled by ``text_pool``
4. image queries attend to text tokens  → self-attention    → pooled by ``image_pool``

The four pooled vectors are summed and a linear layer gives the logits. Every
attention respects the masks, so padding neither attends nor is pooled.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.config import AttentionHeadConfig
from fusion.layers import AttentionBlock, PatchPositions, Projection
from fusion.pooling import Pool
from fusion.registry import register_head


def _stack(config: AttentionHeadConfig) -> nn.ModuleList:
    return nn.ModuleList(
        AttentionBlock(config.hidden, config.num_heads, config.dropout, config.norm, cross=False)
        for _ in range(config.layers)
    )


@register_head("cross-attention")
class CrossAttentionHead(nn.Module):
    config_class = AttentionHeadConfig
    modalities = ("text", "image")

    def __init__(self, config: AttentionHeadConfig):
        super().__init__()
        self.config = config
        D = config.hidden
        self.text_projection = Projection(config.text_dim, D, config.dropout)
        self.image_projection = Projection(config.image_dim, D, config.dropout)
        self.image_positions = PatchPositions(config.image_positions, config.image_length, D)
        self.image_self = _stack(config)
        self.text_to_image = AttentionBlock(D, config.num_heads, config.dropout, config.norm)
        self.text_to_image_self = _stack(config)
        self.image_to_text = AttentionBlock(D, config.num_heads, config.dropout, config.norm)
        self.image_to_text_self = _stack(config)
        self.text_pool = Pool(config.text_pool, D)
        self.image_pool = Pool(config.image_pool, D)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(D, config.num_classes)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x, mask)
        return x

    def forward(
        self,
        text: torch.Tensor,  # (B, T, D_text)
        text_mask: torch.Tensor,  # (B, T), True = real token
        image: torch.Tensor,  # (B, P, D_image)
        image_mask: torch.Tensor,  # (B, P), True = real patch
    ) -> torch.Tensor:
        text_tokens = self.text_projection(text) * text_mask.unsqueeze(-1)  # (B, T, D)
        image_patches = self.image_positions(self.image_projection(image)) * image_mask.unsqueeze(-1)  # (B, P, D)

        image_self = self._run(self.image_self, image_patches, image_mask)  # (B, P, D)
        text_cross = self.text_to_image(text_tokens, text_mask, image_patches, image_mask)  # (B, T, D)
        text_cross = self._run(self.text_to_image_self, text_cross, text_mask)  # (B, T, D)
        image_cross = self.image_to_text(image_patches, image_mask, text_tokens, text_mask)  # (B, P, D)
        image_cross = self._run(self.image_to_text_self, image_cross, image_mask)  # (B, P, D)

        fused = (
            self.text_pool(text_tokens, text_mask)
            + self.image_pool(image_self, image_mask)
            + self.text_pool(text_cross, text_mask)
            + self.image_pool(image_cross, image_mask)
        )  # (B, D)
        return self.classifier(self.dropout(fused))  # (B, C)
