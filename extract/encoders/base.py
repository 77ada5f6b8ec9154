"""The two encoder contracts that every stage relies on.

A text encoder maps tweets to per-token features, an image encoder maps images to
per-patch features; both return ``(features, mask)`` with ``features`` of shape
``(B, L, D)`` and a bool ``mask`` of shape ``(B, L)``, True = real token or patch.
Each encoder also reads its own raw input (``read``) and batches it (``collate``),
so that extraction, finetuning and single-post prediction share one code path.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of every parameter and buffer: two encoders agree iff their weights do."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())  # no copy: a buffer
    return digest.hexdigest()[:16]


class Encoder(nn.Module):
    """Common part of both contracts; subclasses set ``kind``, ``name``, ``dim`` and ``length``."""

    kind: str
    name: str
    dim: int  # D: feature size of each token or patch
    length: int  # L: tokens (text, the max) or patches (image, fixed) per row
    options: dict[str, Any]  # keyword arguments that rebuild it: create_encoder(kind, name, **options)

    def read(self, data_dir: Path, guid: str) -> Any:
        raise NotImplementedError

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def preprocessing(self) -> dict[str, Any]:
        """Everything besides the weights that changes the features; stored in caches."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The encoder's stages from input to output; ``finetune --unfreeze top-K`` unfreezes the last K."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "encoder": self.name,
            "fingerprint": weights_fingerprint(self),
            "dim": self.dim,
            "length": self.length,
            "preprocessing": self.preprocessing(),
            "options": self.options,
        }

    def for_inference(self) -> Encoder:
        """An encoder that computes the same features faster, for extraction (self where there is nothing to gain).

        Its weights may be rearranged (batch norms folded into convolutions), so ``describe()``, the
        fingerprint that caches are checked against, is always taken on the original encoder.
        """
        return self

    def encode(self, items: list[Any], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Collate raw items, move them to ``device`` and run the encoder."""
        batch = {key: value.to(device) for key, value in self.collate(items).items()}
        return self(**batch)


class TextEncoder(Encoder):
    kind = "text"

    def post_item(self, text: str, image: Any) -> Any:
        """The raw item of a new post (text, and its PIL image for encoders that read text in images)."""
        return " ".join(text.split())


class ImageEncoder(Encoder):
    kind = "image"

    def read(self, data_dir: Path, guid: str) -> torch.Tensor:
        from extract.dataset import image_path, load_image

        return self.pixels(load_image(image_path(data_dir, guid), guid))

    def pixels(self, image: Any) -> torch.Tensor:
        """A PIL RGB image → this encoder's raw item (what ``collate`` takes)."""
        raise NotImplementedError


class PatchImageEncoder(ImageEncoder):
    """A convolutional backbone whose last feature map (B, C, H, W) becomes H·W patches.

    Subclasses set ``backbone`` (pixels → feature map), ``image_size``, ``mean`` and ``std``.
    Images are squashed to a square rather than centre-cropped: text and faces near the
    edges of tweet images carry sentiment that a crop would cut off.
    """

    backbone: nn.Module
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def _set_shape(self) -> None:
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            feature_map = self.backbone(torch.zeros(1, 3, self.image_size, self.image_size))  # (1, C, H, W)
            self.backbone.train(was_training)
        self.dim = feature_map.shape[1]
        self.length = feature_map.shape[2] * feature_map.shape[3]

    def pixels(self, image: Any) -> torch.Tensor:
        """PIL RGB image → normalised tensor (3, S, S); extraction's tensor path matches it (extract/decode.py)."""
        from extract.decode import pil_pixels

        return pil_pixels(image, image_size=self.image_size, mean=self.mean, std=self.std)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"pixels": torch.stack(items)}  # (B, 3, S, S)

    def blocks(self) -> list[nn.Module]:
        return list(self.backbone.children())

    channels_last = False  # feed the backbone NHWC pixels (``for_inference``): faster convolutions on CPU

    def fold_batch_norms(self) -> None:
        """Fold each batch norm of the backbone into the convolution before it, in place (eval only).

        Families whose convolution–norm pairs are known override this; by default nothing is folded.
        """

    def for_inference(self) -> PatchImageEncoder:
        """A frozen copy for extraction: batch norms folded, channels-last layout (~1.7× faster on CPU).

        The same arithmetic reordered: features move by about 1e-4 (tests/test_encoders.py), below the
        float16 step of the cache at these magnitudes, like the difference between a CPU and a GPU.
        """
        fast = copy.deepcopy(self).eval()
        fast.fold_batch_norms()
        fast.backbone.to(memory_format=torch.channels_last)
        fast.channels_last = True
        return fast

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        feature_map = self.backbone(pixels)  # (B, C, H, W)
        image_patches = feature_map.flatten(2).transpose(1, 2)  # (B, P=H·W, C)
        mask = torch.ones(image_patches.shape[:2], dtype=torch.bool, device=pixels.device)  # (B, P)
        return image_patches, mask

    def preprocessing(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize": "squash to square, antialiased",
            "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std],
            "patches": self.length,
        }
