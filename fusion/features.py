"""Cached features of labelled pairs, held in memory as tensors for the heads.

Reads the HDF5 caches once (through ``extract.cache``) and normalises them once;
batches are then slices of pre-loaded float16 tensors, so no HDF5 read and no
normalisation ever happens in the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.cache import cache_path, load_features
from fusion.layers import normalise_features


@dataclass
class PairFeatures:
    """Normalised encoder features of N pairs; build it from encoder outputs with ``from_encoders``."""

    guids: list[str]
    text: torch.Tensor  # (N, T, D_text) float16, normalised
    text_mask: torch.Tensor  # (N, T) bool, True = real token
    image: torch.Tensor  # (N, P, D_image) float16, normalised
    image_mask: torch.Tensor  # (N, P) bool, True = real patch

    @classmethod
    def from_encoders(
        cls, guids: list[str], text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
        image_mask: torch.Tensor,
    ) -> PairFeatures:
        """Features as the encoders gave them (any float dtype), normalised as the heads expect."""
        return cls(list(guids), _normalised(text), text_mask, _normalised(image), image_mask)

    def __len__(self) -> int:
        return len(self.guids)

    def subset(self, rows: np.ndarray) -> PairFeatures:
        index = torch.as_tensor(rows, dtype=torch.long)
        return PairFeatures(
            [self.guids[r] for r in rows], self.text[index], self.text_mask[index], self.image[index],
            self.image_mask[index],
        )

    def batch(
        self, rows: torch.Tensor, inputs: tuple[str, ...] = ("text", "image"), device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, ...]:
        """float32 inputs of a head for ``rows``, each sequence cut after its last real position in the batch.

        A modality not in ``inputs`` (the head does not read it) becomes one masked position: nothing to copy.
        """
        return (
            *_trimmed(self.text, self.text_mask, rows, "text" in inputs, device),  # (B, T', D_text), (B, T')
            *_trimmed(self.image, self.image_mask, rows, "image" in inputs, device),  # (B, P', D_image), (B, P')
        )


@dataclass
class JoinedFeatures:
    """Two feature sets as one training set: rows [0, len(first)) are ``first``'s, the rest ``second``'s.

    The training pairs joined with auxiliary texts (``fit --aux-data``), without copying either.
    """

    first: PairFeatures
    second: PairFeatures

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def batch(
        self, rows: torch.Tensor, inputs: tuple[str, ...] = ("text", "image"), device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, ...]:
        """As ``PairFeatures.batch``, rows in the order given: each part's sequences padded to the longer."""
        in_first = rows < len(self.first)  # (B,)
        picked = [torch.nonzero(in_first).flatten(), torch.nonzero(~in_first).flatten()]  # batch positions per part
        parts = [
            part.batch(rows[where] - offset, inputs, device)
            for part, where, offset in ((self.first, picked[0], 0), (self.second, picked[1], len(self.first)))
            if len(where)
        ]
        joined = []
        for features_at in (0, 2):  # (text, text mask), then (image, image mask)
            length = max(part[features_at].shape[1] for part in parts)
            for index in (features_at, features_at + 1):  # the features and their mask, padded alike
                joined.append(torch.cat([_padded(part[index], length) for part in parts]))
        if torch.equal(picked[0], torch.arange(len(picked[0]))):  # sorted rows (the trainer's): already in order
            return tuple(joined)
        restore = torch.argsort(torch.cat(picked)).to(device)  # back to the order of ``rows``
        return tuple(x[restore] for x in joined)


def _padded(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L, …) padded with zeros (False for masks) to (B, length, …)."""
    padding = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, padding], dim=1)


def _trimmed(
    features: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, used: bool, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mask[rows]  # (B, L)
    real = mask.any(dim=0).nonzero()  # (L_real, 1) positions real in some row
    length = int(real[-1]) + 1 if used and len(real) else 1
    return features[rows, :length].float().to(device), (mask[:, :length] & used).to(device)


def load_pair_features(
    cache_root: Path,
    data_dir: Path,
    guids: list[str],
    text_encoder: str,
    image_encoder: str,
    expected: dict[str, dict[str, Any]] | None = None,
) -> tuple[PairFeatures, dict[str, dict[str, Any]]]:
    """Features of ``guids`` from one text and one image cache, and both caches' descriptions."""
    expected = expected or {}
    text = load_features(cache_path(cache_root, data_dir, "text", text_encoder), guids, expected.get("text"))
    image = load_features(cache_path(cache_root, data_dir, "image", image_encoder), guids, expected.get("image"))
    features = PairFeatures.from_encoders(
        guids,
        torch.from_numpy(text.features),
        torch.from_numpy(text.mask),
        torch.from_numpy(image.features),
        torch.from_numpy(image.mask),
    )
    return features, {"text": text.description, "image": image.description}


def load_text_features(
    cache_root: Path, data_dir: Path, guids: list[str], text_encoder: str, image_dim: int, expected: dict[str, Any]
) -> PairFeatures:
    """Features of a text-only folder's ``guids``: its text cache, and one masked image position each."""
    text = load_features(cache_path(cache_root, data_dir, "text", text_encoder), guids, expected)
    n = len(guids)
    return PairFeatures.from_encoders(
        guids, torch.from_numpy(text.features), torch.from_numpy(text.mask),
        torch.zeros(n, 1, image_dim), torch.zeros(n, 1, dtype=torch.bool),  # (N, 1, D_image), (N, 1): no image
    )


def _normalised(features: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """float16 copy of ``features`` (N, L, D) normalised in float32 a chunk of rows at a time, to bound memory."""
    out = torch.empty(features.shape, dtype=torch.float16)
    for start in range(0, len(features), chunk):
        out[start : start + chunk] = normalise_features(features[start : start + chunk].float())
    return out
