"""Stage one: run one encoder over every pair of a data folder into its HDF5 cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from extract.cache import FeatureCache, cache_path
from extract.dataset import BadImageError, read_split
from extract.decode import decode_images, read_raw_image, resolve_decoder
from extract.encoders.base import Encoder, PatchImageEncoder


@dataclass
class ExtractSummary:
    path: Path
    total: int  # guids the data folder asks for
    encoded: int  # rows written by this run
    skipped: list[str]  # guids recorded as unreadable (--skip-bad)


class _RawItems(Dataset):
    """Raw inputs for the encoder; read errors are returned, not raised, so the main process reports them."""

    def __init__(self, read: Callable[[Path, str], Any], data_dir: Path, guids: list[str]):
        self.read, self.data_dir, self.guids = read, data_dir, guids

    def __len__(self) -> int:
        return len(self.guids)

    def __getitem__(self, index: int):
        guid = self.guids[index]
        try:
            return guid, self.read(self.data_dir, guid)
        except BadImageError as error:
            return guid, error


def _as_list(items):
    return items


def data_guids(data_dir: Path, splits: tuple[str, ...] = ("train", "test")) -> list[str]:
    """Guids of the label files, in file order, each once."""
    guids: dict[str, None] = {}
    for split in splits:
        for row in read_split(data_dir, split):
            guids.setdefault(row.guid, None)
    return list(guids)


def default_workers() -> int:
    return min(8, (os.cpu_count() or 2) // 2)


def extract_features(
    encoder: Encoder,
    data_dir: Path,
    cache_root: Path,
    *,
    guids: list[str] | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    skip_bad: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    decode: str = "auto",
) -> ExtractSummary:
    """Encode the guids missing from the cache and append them; resumable by construction.

    ``decode`` picks how an image encoder's JPEGs become pixels (extract/decode.py): ``pil`` in the
    DataLoader workers (the reference), ``tensor`` batched on ``device`` after the workers read the
    bytes, ``auto`` = tensor on CUDA, where worker decoding is the bottleneck, PIL otherwise. Text
    encoders read no pixels and ignore it. The decoder is not part of the cache's identity: like GPU
    against CPU arithmetic, it moves features by small amounts (measured by tests/test_decode.py on
    the CPU, by benchmarks/gpu.py on CUDA).
    """
    data_dir = Path(data_dir)
    decoder = resolve_decoder(decode, device)
    guids = data_guids(data_dir) if guids is None else guids
    path = cache_path(cache_root, data_dir, encoder.kind, encoder.name)
    encoder = encoder.to(device).eval()
    tensor_decode = decoder == "tensor" and isinstance(encoder, PatchImageEncoder)
    square = {"image_size": encoder.image_size, "mean": encoder.mean, "std": encoder.std} if tensor_decode else {}
    read = partial(read_raw_image, **square) if tensor_decode else encoder.read
    skipped: list[str] = []
    encoded = 0
    with FeatureCache(path, encoder.describe(), data_dir) as cache:
        done = cache.guids()
        todo = [g for g in guids if g not in done]
        workers = default_workers() if num_workers is None else num_workers
        loader = DataLoader(
            _RawItems(read, data_dir, todo), batch_size=batch_size, collate_fn=_as_list,
            num_workers=workers if len(todo) > batch_size else 0,
            pin_memory=torch.device(device).type == "cuda",
        )
        bar = tqdm(total=len(todo), unit="pair", desc=f"{encoder.kind}:{encoder.name}", disable=not progress)
        with bar, torch.inference_mode():
            for batch in loader:
                if tensor_decode:  # JPEG bytes → (3, S, S) pixels on the device, or the file's BadImageError
                    pixels = decode_images([item for _, item in batch], **square, device=device)
                    batch = [(guid, item) for (guid, _), item in zip(batch, pixels)]
                good = [(g, item) for g, item in batch if not isinstance(item, BadImageError)]
                bad = [(g, item) for g, item in batch if isinstance(item, BadImageError)]
                if bad and not skip_bad:
                    raise bad[0][1]
                if good:
                    features, mask = encoder.encode([item for _, item in good], device)  # (B, L, D), (B, L)
                    cache.append([g for g, _ in good], features.float().cpu().numpy().astype(np.float16),
                                 mask.cpu().numpy())
                if bad:
                    # A skipped pair keeps a row whose mask is all False, so later stages see "no input".
                    cache.append([g for g, _ in bad], np.zeros((len(bad), 1, encoder.dim), np.float16),
                                 np.zeros((len(bad), 1), bool))
                    skipped.extend(g for g, _ in bad)
                encoded += len(batch)
                bar.update(len(batch))
    return ExtractSummary(path, len(guids), encoded, skipped)
