"""Fixed poolings of the labelled pairs' features, kept on disk beside the feature caches.

A fixed pooling (``fusion.pooling.FIXED_POOLINGS``) of a modality is a function of its cached,
normalised features alone, so it is computed once per cache and rows and stored as
``<cache folder>/pooled/<modality>-<encoders>-<pooling>.pt``. A later fit, sweep or pipeline whose
head pools that way reads N vectors, (N, 1, D) float32, instead of loading and normalising N
sequences: 20 MB instead of the default image cache's 566 MB. A file answers only what it was pooled
from: the same cache files, unchanged since (``extract.cache.file_identity``: names, sizes, inodes,
modification and change times, shards included) and of the same description, the same rows in the
same order, and this module's ``FORMAT``; anything else pools again and replaces the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from extract.cache import cache_dir_for, cache_path
from fusion.features import Stream, cache_identity, guids_digest
from fusion.kept import write_kept

FORMAT = 1  # raise when the normalisation or a pooling changes what a stored vector would hold


def pooled_dir(cache_root: Path, data_dir: Path) -> Path:
    """The folder of a data folder's pooled vectors: deleting it only costs pooling them again."""
    return cache_dir_for(cache_root, data_dir) / "pooled"


def pooled_path(cache_root: Path, data_dir: Path, modality: str, encoder: str, kind: str) -> Path:
    """Where ``modality``'s ``kind`` pooling of the caches of ``encoder`` (one or more, comma-separated) lives."""
    # text-minilm_vader for the minilm+vader cache, text-minilm_mpnet for the two of minilm,mpnet
    stem = cache_path(cache_root, data_dir, modality, encoder).stem
    return pooled_dir(cache_root, data_dir) / f"{stem}-{kind}.pt"


def source_key(
    cache_root: Path, data_dir: Path, modality: str, encoder: str, guids: list[str], kind: str,
    description: dict[str, Any],
) -> str:
    """What a pooled file must have been pooled from, as JSON: the caches (their files' identity and their
    ``description``, weights included), the rows and the pooling."""
    return json.dumps({
        "format": FORMAT, "files": cache_identity(cache_root, data_dir, modality, encoder),
        "description": description, "rows": guids_digest(guids), "pooling": kind,
    }, sort_keys=True)


def read_pooled(path: Path, key: str) -> Stream | None:
    """The vectors (N, 1, D) and mask (N, 1) stored at ``path`` for ``key``; None when absent or pooled from
    anything else (a damaged file included: it is pooled again)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # absent, damaged or foreign, whatever torch.load says of it: pooled again
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    return stored["vectors"], stored["mask"]


def write_pooled(path: Path, key: str, stream: Stream) -> None:
    """Store ``stream`` for ``key`` (``fusion.kept.write_kept``: whole or not at all)."""
    vectors, mask = stream
    write_kept(path, lambda file: torch.save({"key": key, "vectors": vectors, "mask": mask}, file))
