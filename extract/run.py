"""Stage one: run one encoder over every pair of a data folder into its HDF5 cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from extract.cache import FeatureCache, cache_path
from extract.dataset import BadImageError, read_split
from extract.encoders.base import Encoder


@dataclass
class ExtractSummary:
    path: Path
    total: int  # guids the data folder asks for
    encoded: int  # rows written by this run
    skipped: list[str]  # guids recorded as unreadable (--skip-bad)


class _RawItems(Dataset):
    """Raw inputs for the encoder; read errors are returned, not raised, so the main process reports them."""

    def __init__(self, encoder: Encoder, data_dir: Path, guids: list[str]):
        self.encoder, self.data_dir, self.guids = encoder, data_dir, guids

    def __len__(self) -> int:
        return len(self.guids)

    def __getitem__(self, index: int):
        guid = self.guids[index]
        try:
            return guid, self.encoder.read(self.data_dir, guid)
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
) -> ExtractSummary:
    """Encode the guids missing from the cache and append them; resumable by construction."""
    data_dir = Path(data_dir)
    guids = data_guids(data_dir) if guids is None else guids
    path = cache_path(cache_root, data_dir, encoder.kind, encoder.name)
    encoder = encoder.to(device).eval()
    skipped: list[str] = []
    encoded = 0
    with FeatureCache(path, encoder.describe(), data_dir) as cache:
        done = cache.guids()
        todo = [g for g in guids if g not in done]
        workers = default_workers() if num_workers is None else num_workers
        loader = DataLoader(
            _RawItems(encoder, data_dir, todo), batch_size=batch_size, collate_fn=_as_list,
            num_workers=workers if len(todo) > batch_size else 0,
            pin_memory=torch.device(device).type == "cuda",
        )
        bar = tqdm(total=len(todo), unit="pair", desc=f"{encoder.kind}:{encoder.name}", disable=not progress)
        with bar, torch.inference_mode():
            for batch in loader:
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
