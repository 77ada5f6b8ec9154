"""Cached features of labelled pairs, held in memory as tensors for the heads.

Reads the HDF5 caches once (through ``extract.cache``) and normalises them once;
batches are then slices of pre-loaded float16 tensors, so no HDF5 read and no
normalisation ever happens in the training loop. A modality may read several caches
(``fit --text-encoder minilm,mpnet``): their features are joined block-diagonally
(``joined_streams``), so every head takes them without knowing how many there are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.cache import (
    CacheMismatchError,
    cache_dir_for,
    cache_path,
    file_identity,
    load_features,
    read_description,
)
from extract.registry import STREAM_SEPARATOR, stream_names
from fusion.layers import normalise_features
from fusion.pooling import Pool

Stream = tuple[torch.Tensor, torch.Tensor]  # features (N, L, D), mask (N, L) of one encoder
# (kind, encoder, cache folder, digest of the guids, the description the caller expects as JSON, the cache files'
# identity as JSON) → that modality's joined features (rows in the guids' order) and description
LoadedFeatures = dict[tuple[str, str, str, str, str, str], tuple[Stream, dict[str, Any]]]


@dataclass
class PairFeatures:
    """Normalised encoder features of N pairs; build it from encoder outputs with ``from_encoders``."""

    guids: list[str]
    text: torch.Tensor  # (N, T, D_text) float16, normalised
    text_mask: torch.Tensor  # (N, T) bool, True = real token
    image: torch.Tensor  # (N, P, D_image) float16, normalised
    image_mask: torch.Tensor  # (N, P) bool, True = real patch
    # (modality, fixed pooling) → that modality pooled once: (N, 1, D) float32 and its (N, 1) mask. Never
    # copied by ``dataclasses.replace``, so features with other masks (``with_modalities``) pool their own.
    _pooled: dict[tuple[str, str], Stream] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_encoders(cls, guids: list[str], text: Sequence[Stream], image: Sequence[Stream]) -> PairFeatures:
        """Features as one or more encoders per modality gave them (any float dtype), joined and normalised."""
        return cls(list(guids), *joined_streams(text), *joined_streams(image))

    def __len__(self) -> int:
        return len(self.guids)

    def subset(self, rows: np.ndarray) -> PairFeatures:
        index = torch.as_tensor(rows, dtype=torch.long)
        return PairFeatures(
            [self.guids[r] for r in rows], self.text[index], self.text_mask[index], self.image[index],
            self.image_mask[index],
        )

    def pooled(self, poolings: dict[str, str]) -> PairFeatures:
        """These features with each modality in ``poolings`` (``fusion.registry.input_poolings``) pooled.

        A pooled modality is one position per pair, (N, 1, D), real where the pair had any real
        position: a head pools it back to the same vector, so its logits are those of the whole
        sequence, but an epoch reads N·D numbers instead of N·L·D. Each (modality, pooling) is
        computed once per features object and kept (the auxiliary texts' features, fixtures; the
        labelled pairs' are kept on disk by ``fusion.run.LabelledFeatures.pooled_stream``).
        """
        streams = {"text": (self.text, self.text_mask), "image": (self.image, self.image_mask)}
        for modality, kind in poolings.items():
            if (modality, kind) not in self._pooled:
                self._pooled[modality, kind] = pool_stream(*streams[modality], kind)
            streams[modality] = self._pooled[modality, kind]
        return PairFeatures(self.guids, *streams["text"], *streams["image"]) if poolings else self

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


def pool_stream(features: torch.Tensor, mask: torch.Tensor, kind: str, chunk: int = 256) -> Stream:
    """``features`` (N, L, D) pooled by ``kind`` in float32, a chunk of rows at a time: (N, 1, D) and mask (N, 1).

    last, first and max pick stored values, so they pool the stored float16 and convert only the picks: the
    numbers of converting every position first, at a fraction of the work (the conversion was most of it).
    """
    pool = Pool(kind, features.shape[-1])
    picks = kind in ("last", "first", "max")
    chunks = [
        pool(part if picks else part.float(), part_mask).float()  # (chunk, D)
        for part, part_mask in zip(features.split(chunk), mask.split(chunk))
    ]
    pooled = torch.cat(chunks) if chunks else features.new_zeros(0, features.shape[-1], dtype=torch.float32)  # (N, D)
    return pooled.unsqueeze(1), mask.any(dim=1, keepdim=True)


def _trimmed(
    features: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, used: bool, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mask[rows]  # (B, L)
    real = mask.any(dim=0).nonzero()  # (L_real, 1) positions real in some row
    length = int(real[-1]) + 1 if used and len(real) else 1
    # index_select on the trimmed view: one gather of the rows' real span, faster than features[rows, :length]
    picked = features[:, :length].index_select(0, rows)  # (B, length, D)
    return picked.float().to(device), (mask[:, :length] & used).to(device)


def stream_descriptions(description: dict[str, Any]) -> list[dict[str, Any]]:
    """The cache description of each stream of a (possibly joined) modality description."""
    return description.get("streams", [description])


def joined_description(descriptions: list[dict[str, Any]]) -> dict[str, Any]:
    """What the heads need of several streams (summed sizes), with each stream's own description kept."""
    if len(descriptions) == 1:
        return descriptions[0]
    return {
        "kind": descriptions[0]["kind"],
        "encoder": STREAM_SEPARATOR.join(d["encoder"] for d in descriptions),
        "dim": sum(d["dim"] for d in descriptions),
        "length": sum(d["length"] for d in descriptions),
        "streams": descriptions,
    }


def joined_streams(streams: Sequence[Stream]) -> Stream:
    """One normalised float16 head input (N, ΣL_i, ΣD_i) and its mask (N, ΣL_i) from one or more encoders.

    Each stream is normalised on its own, then the streams are laid out block-diagonally: stream i's
    positions follow stream i−1's, and its features fill its own slice of the feature axis, zeros
    elsewhere. A head's input projection is then one projection per encoder (a zero block adds
    nothing), and its pooling and attention run over every encoder's positions at once. The price
    is memory for the zeros: ΣL·ΣD instead of Σ L_i·D_i.
    """
    N = streams[0][0].shape[0]
    lengths, dims = [f.shape[1] for f, _ in streams], [f.shape[2] for f, _ in streams]
    joined = torch.zeros(N, sum(lengths), sum(dims), dtype=torch.float16)  # (N, ΣL_i, ΣD_i)
    at_length = at_dim = 0
    for (features, _), length, dim in zip(streams, lengths, dims):
        _normalise_into(features, joined[:, at_length : at_length + length, at_dim : at_dim + dim])
        at_length, at_dim = at_length + length, at_dim + dim
    return joined, torch.cat([mask for _, mask in streams], dim=1)


def load_streams(
    cache_root: Path, data_dir: Path, kind: str, encoder: str, guids: list[str], expected: dict[str, Any] | None
) -> tuple[list[Stream], dict[str, Any]]:
    """The cached features of ``guids`` for each encoder in ``encoder`` (comma-separated), and their description."""
    names = stream_names(encoder)
    wanted = stream_descriptions(expected) if expected else [None] * len(names)
    if len(wanted) != len(names):
        raise CacheMismatchError(f"{kind} encoders {encoder!r} are not the {len(wanted)} the run was trained on")
    cached = [
        load_features(cache_path(cache_root, data_dir, kind, name), guids, description)
        for name, description in zip(names, wanted)
    ]
    streams = [(torch.from_numpy(c.features), torch.from_numpy(c.mask)) for c in cached]
    return streams, joined_description([c.description for c in cached])


def load_modality(
    cache_root: Path,
    data_dir: Path,
    guids: list[str],
    kind: str,
    encoder: str,
    expected: dict[str, Any] | None = None,
    loaded: LoadedFeatures | None = None,
) -> tuple[Stream, dict[str, Any]]:
    """One modality's features of ``guids`` from its caches (one or more), joined and normalised, and its
    description; ``loaded`` as ``load_pair_features`` takes it."""
    loaded = {} if loaded is None else loaded
    folder = str(cache_dir_for(cache_root, data_dir).resolve())
    # the files' identity too: a cache extracted again since it was read is read again, not answered from memory
    files = json.dumps(cache_identity(cache_root, data_dir, kind, encoder))
    key = (kind, encoder, folder, guids_digest(guids), json.dumps(expected, sort_keys=True), files)
    if key not in loaded:
        streams, description = load_streams(cache_root, data_dir, kind, encoder, guids, expected)
        loaded[key] = joined_streams(streams), description
    return loaded[key]


def cache_identity(cache_root: Path, data_dir: Path, kind: str, encoder: str) -> list[list[list[Any]]]:
    """``extract.cache.file_identity`` of each cache of ``encoder`` (one or more, comma-separated)."""
    return [file_identity(cache_path(cache_root, data_dir, kind, name)) for name in stream_names(encoder)]


def guids_digest(guids: list[str]) -> str:
    """A digest of the rows ``guids`` name, in their order: what a kept result of those rows is keyed by."""
    return hashlib.sha1("\n".join(guids).encode()).hexdigest()


def describe_modality(cache_root: Path, data_dir: Path, kind: str, encoder: str) -> dict[str, Any]:
    """The description ``load_modality`` gives with the features, read from the caches' attributes alone."""
    names = stream_names(encoder)
    return joined_description([read_description(cache_path(cache_root, data_dir, kind, name)) for name in names])


def load_pair_features(
    cache_root: Path,
    data_dir: Path,
    guids: list[str],
    text_encoder: str,
    image_encoder: str,
    expected: dict[str, dict[str, Any]] | None = None,
    loaded: LoadedFeatures | None = None,
) -> tuple[PairFeatures, dict[str, dict[str, Any]]]:
    """Features of ``guids`` from the text and image caches (one or more each), and the caches' descriptions.

    ``loaded`` keeps each modality's joined features, for callers that read one cache many times (a
    sweep pairing it with several others, an ensemble of runs that share it): it is read, checked
    and normalised once. An entry answers only the same caches and the same ``guids`` in the same order: a
    call for other rows or another data folder reads its own.
    """
    expected, loaded = expected or {}, {} if loaded is None else loaded
    (text, text_description), (image, image_description) = (
        load_modality(cache_root, data_dir, guids, kind, encoder, expected.get(kind), loaded)
        for kind, encoder in (("text", text_encoder), ("image", image_encoder))
    )
    return PairFeatures(list(guids), *text, *image), {"text": text_description, "image": image_description}


def load_text_features(
    cache_root: Path, data_dir: Path, guids: list[str], text_encoder: str, image_dim: int, expected: dict[str, Any]
) -> PairFeatures:
    """Features of a text-only folder's ``guids``: its text caches, and one masked image position each."""
    text, _ = load_streams(cache_root, data_dir, "text", text_encoder, guids, expected)
    n = len(guids)
    no_image = (torch.zeros(n, 1, image_dim), torch.zeros(n, 1, dtype=torch.bool))  # (N, 1, D_image), (N, 1)
    return PairFeatures.from_encoders(guids, text, [no_image])


def _normalise_into(features: torch.Tensor, out: torch.Tensor, chunk: int = 256) -> None:
    """Write ``features`` (N, L, D) normalised into ``out`` (float16), in float32 a chunk of rows at a time."""
    for start in range(0, len(features), chunk):
        out[start : start + chunk] = normalise_features(features[start : start + chunk].float())
