"""The HDF5 feature cache: one file per (data folder, encoder).

Schema (text and image files share it; see README "Cache schema")::

    guid      (N,)       utf-8 string     row order = extraction order
    features  (N, L, D)  float16          per-token (text) or per-patch (image) features
    mask      (N, L)     bool             True = real token/patch; an all-False row = skipped pair

Attributes: ``schema``, ``kind``, ``encoder``, ``fingerprint``, ``dim``, ``length``,
``preprocessing`` (JSON), ``options`` (JSON), ``versions`` (JSON), ``data_dir``. Rows are appended by
batch and flushed, so an interrupted extraction leaves a valid file holding the
finished rows, and a rerun encodes only the guids that are missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np

SCHEMA = 1
# What must match for cached features to be interchangeable; versions only warn.
IDENTITY_KEYS = ("kind", "encoder", "fingerprint", "dim", "length", "preprocessing")
VERSIONED_PACKAGES = ("torch", "torchvision", "transformers", "h5py")


class CacheMismatchError(ValueError):
    """A cache built by another encoder, other weights or other preprocessing."""


def package_versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def cache_dir_for(cache_root: Path, data_dir: Path) -> Path:
    """``cache/<folder name>-<hash of its absolute path>``: two data folders never share files."""
    data_dir = Path(data_dir).resolve()
    tag = hashlib.sha1(str(data_dir).encode()).hexdigest()[:8]
    return Path(cache_root) / f"{data_dir.name}-{tag}"


def cache_path(cache_root: Path, data_dir: Path, kind: str, encoder: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in encoder)
    return cache_dir_for(cache_root, data_dir) / f"{kind}-{safe}.h5"


def _describe_file(handle: h5py.File) -> dict[str, Any]:
    attrs = dict(handle.attrs)
    description = {key: attrs.get(key) for key in IDENTITY_KEYS}
    description["preprocessing"] = json.loads(attrs.get("preprocessing", "null"))
    description["options"] = json.loads(attrs.get("options", "{}"))
    for key in ("dim", "length"):
        if description[key] is not None:
            description[key] = int(description[key])
    return description


def check_identity(path: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse features that another encoder, other weights or preprocessing produced."""
    for key in IDENTITY_KEYS:
        if key in expected and found.get(key) != expected[key]:
            raise CacheMismatchError(
                f"{path}: cache was built with {key}={found.get(key)!r} but {expected[key]!r} is wanted; "
                f"delete the file or pass another --cache folder to extract again"
            )


@dataclass
class CachedFeatures:
    """Features of the requested guids, in the requested order, loaded into memory."""

    guids: list[str]
    features: np.ndarray  # (N, L, D) float16
    mask: np.ndarray  # (N, L) bool
    description: dict[str, Any]


class FeatureCache:
    """Append-only writer for one cache file; use as a context manager."""

    def __init__(self, path: Path, description: dict[str, Any], data_dir: Path):
        self.path = Path(path)
        self.description = description
        self.data_dir = data_dir

    def __enter__(self) -> FeatureCache:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._create()
        try:
            self.handle = h5py.File(self.path, "a")
        except OSError as error:
            raise CacheMismatchError(f"{self.path}: not a readable HDF5 cache ({error}); delete it") from error
        check_identity(self.path, _describe_file(self.handle), self.description)
        _warn_on_versions(self.path, self.handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.handle.close()

    def _create(self) -> None:
        # Build the empty file under a temporary name, so a crash never leaves a file without attributes.
        length, dim = self.description["length"], self.description["dim"]
        tmp = self.path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("guid", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,))
            handle.create_dataset(
                "features", shape=(0, length, dim), maxshape=(None, length, dim), dtype="float16",
                chunks=(1, length, dim),
            )
            handle.create_dataset(
                "mask", shape=(0, length), maxshape=(None, length), dtype="bool", chunks=(1024, length)
            )
            handle.attrs["schema"] = SCHEMA
            for key in IDENTITY_KEYS:
                value = self.description[key]
                handle.attrs[key] = json.dumps(value) if key == "preprocessing" else value
            handle.attrs["options"] = json.dumps(self.description["options"])
            handle.attrs["versions"] = json.dumps(package_versions())
            handle.attrs["data_dir"] = str(Path(self.data_dir).resolve())
        os.replace(tmp, self.path)

    def guids(self) -> set[str]:
        return {g.decode() if isinstance(g, bytes) else g for g in self.handle["guid"][:]}

    def append(self, guids: list[str], features: np.ndarray, mask: np.ndarray) -> None:
        """Write one batch; ``features`` (B, L', D) with L' ≤ L is zero-padded to L."""
        count, batch_length = len(guids), features.shape[1]
        length = self.description["length"]
        padded = np.zeros((count, length, features.shape[2]), dtype=np.float16)  # (B, L, D)
        padded[:, :batch_length] = features
        padded_mask = np.zeros((count, length), dtype=bool)  # (B, L)
        padded_mask[:, :batch_length] = mask
        start = self.handle["guid"].shape[0]
        for name, rows in (("features", padded), ("mask", padded_mask), ("guid", np.array(guids, dtype=object))):
            # guid goes last: a row counts as done only once its features are written.
            dataset = self.handle[name]
            dataset.resize(start + count, axis=0)
            dataset[start:] = rows
        self.handle.flush()


def _warn_on_versions(path: Path, handle: h5py.File) -> None:
    recorded = json.loads(handle.attrs.get("versions", "{}"))
    current = package_versions()
    changed = {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
    if changed:
        warnings.warn(
            f"{path}: built with other package versions {changed}; features may differ slightly", stacklevel=3
        )


def read_description(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no feature cache; run `python cli.py extract` first")
    with h5py.File(path, "r") as handle:
        return _describe_file(handle)


def load_features(path: Path, guids: list[str], expected: dict[str, Any] | None = None) -> CachedFeatures:
    """Load the rows of ``guids`` (in that order); every guid must be in the cache."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature cache; run `python cli.py extract` first")
    with h5py.File(path, "r") as handle:
        description = _describe_file(handle)
        if expected is not None:
            check_identity(path, description, expected)
        # Only complete rows count: the guid column grows last, so it bounds the others.
        stored = [g.decode() if isinstance(g, bytes) else g for g in handle["guid"][:]]
        row_of = {guid: row for row, guid in enumerate(stored)}
        missing = [g for g in guids if g not in row_of]
        if missing:
            raise CacheMismatchError(
                f"{path}: {len(missing)} guids are not cached (e.g. {missing[:3]}); run `python cli.py extract` again"
            )
        rows = np.array([row_of[g] for g in guids], dtype=np.int64)
        # One sequential read beats h5py's per-row fancy indexing by far when most rows are wanted.
        features = handle["features"][: len(stored)][rows]  # (N, L, D)
        mask = handle["mask"][: len(stored)][rows]  # (N, L)
    return CachedFeatures(list(guids), features, mask, description)
