"""The HDF5 feature cache: one file per (data folder, encoder).

Schema (text and image files share it; see README "Cache schema")::

    guid      (N,)       utf-8 string     row order = extraction order
    features  (N, L, D)  float16          per-token (text) or per-patch (image) features
    mask      (N, L)     bool             True = real token/patch; an all-False row = skipped pair

Attributes: ``schema``, ``kind``, ``encoder``, ``fingerprint``, ``dim``, ``length``,
``preprocessing`` (JSON), ``options`` (JSON), ``versions`` (JSON), ``data_dir``. Rows are appended by
batch and flushed, so an interrupted extraction leaves a valid file holding the
finished rows, and a rerun encodes only the guids that are missing.

Under torchrun every rank writes its slice of the rows into a shard of the same schema beside the
cache file (``text-minilm.shard-00-of-02.h5``), and rank 0 then writes the cache file as HDF5 virtual
datasets over the shards' rows (by relative file name, so the folder can move), with the identity
attributes and two more: ``shards`` (the number of processes) and ``shard_rows`` (rows taken from each).
Readers see one file as before; a stitched file takes no appended rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
SKIPPED_ATTR = "skipped"  # JSON list of the guids whose file could not be read (--skip-bad): their rows hold no input
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


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its rows of the cache file ``path`` under torchrun."""
    return path.with_name(f"{path.stem}.shard-{rank:02d}-of-{world_size:02d}.h5")


def require_cache(path: Path) -> Path:
    """``path``, or a one-line refusal with the fix when there is no cache file there."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no feature cache; run `python cli.py extract` first")
    return Path(path)


def file_identity(path: Path) -> list[list[Any]]:
    """What changes whenever the cache file ``path`` (or a shard a stitched file reads) is written: name, size,
    inode, modification and change times of each, for callers that keep results derived from it."""
    files = [require_cache(path), *sorted(path.parent.glob(f"{path.stem}.shard-*.h5"))]
    return [[f.name, (stat := f.stat()).st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns] for f in files]


def _shard_world_sizes(path: Path) -> dict[int, list[Path]]:
    """The shards of ``path`` on disk, by the number of processes that wrote them."""
    pattern = re.compile(rf"{re.escape(path.stem)}\.shard-\d+-of-(\d+)\.h5")
    found: dict[int, list[Path]] = {}
    for shard in sorted(path.parent.glob(f"{path.stem}.shard-*.h5")):
        match = pattern.fullmatch(shard.name)
        if match:
            found.setdefault(int(match.group(1)), []).append(shard)
    return found


def _other_world_size(path: Path, found: Path, written_by: int, world_size: int) -> CacheMismatchError:
    return CacheMismatchError(
        f"{found}: written by {written_by} processes but {world_size} are running; rerun with {written_by} in all "
        f"(torchrun --nnodes × --nproc-per-node), or delete {path.name} and {path.stem}.shard-*.h5 to extract again"
    )


def is_cached_unsharded(path: Path, world_size: int, expected: dict[str, Any], guids: list[str]) -> bool:
    """Before a torchrun extraction writes anything: whether a one-process cache at ``path`` holds every guid.

    Then there is nothing to do and the file stays as it is. Refused: shards or a stitched file of
    another number of processes (their slices would not match), a cache of another encoder, and a
    one-process cache that lacks guids (its rows cannot join a stitched file; finish it with one
    process). A stitched file of this number of processes is resumed: False.
    """
    for written_by, shards in _shard_world_sizes(path).items():
        if written_by != world_size:
            raise _other_world_size(path, shards[0], written_by, world_size)
    if not path.exists():
        return False
    with h5py.File(path, "r") as handle:
        check_identity(path, _describe_file(handle), expected)
        written_by = int(handle.attrs.get("shards", 0))
        if written_by:
            if written_by != world_size:
                raise _other_world_size(path, path, written_by, world_size)
            return False
        stored = {g.decode() if isinstance(g, bytes) else g for g in handle["guid"][:]}
    found = sum(guid in stored for guid in guids)
    if found < len(guids):
        raise CacheMismatchError(
            f"{path}: a one-process cache holding {found} of {len(guids)} guids is in the way; finish it with "
            f"`python cli.py extract` without torchrun, or delete it to extract across {world_size} processes"
        )
    return True


def stitch_shards(path: Path, world_size: int) -> None:
    """Write the cache file ``path`` as virtual datasets over the complete rows of the ``world_size`` shards.

    Rank 0 calls it once every rank has finished its shard. Shard rows follow each other in rank
    order, so the rows keep the data order of the ranks' contiguous slices.
    """
    shards = [shard_path(path, rank, world_size) for rank in range(world_size)]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(
                f"{shard}: missing after every rank finished; on several machines --cache must be a folder they share"
            )
    rows, sources = [], []
    for shard in shards:
        with h5py.File(shard, "r") as handle:
            attrs = dict(handle.attrs)
            rows.append(handle["guid"].shape[0])  # the guid column grows last: it counts the complete rows
            sources.append({
                name: h5py.VirtualSource(shard.name, name, shape=handle[name].shape, dtype=handle[name].dtype)
                for name in ("features", "mask", "guid")
            })
    layouts = {
        name: h5py.VirtualLayout(shape=(sum(rows), *source.shape[1:]), dtype=source.dtype)
        for name, source in sources[0].items()
    }
    start = 0
    for count, shard_sources in zip(rows, sources):
        if count:
            for name, source in shard_sources.items():
                layouts[name][start : start + count] = source[:count]
        start += count
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as handle:
        for name, layout in layouts.items():
            handle.create_virtual_dataset(name, layout)
        handle.attrs.update(attrs)  # the last shard's identity, the same in every shard: each rank checked it
        handle.attrs["shards"] = world_size
        handle.attrs["shard_rows"] = rows
    os.replace(tmp, path)


def _check_shards(path: Path, handle: h5py.File) -> None:
    """A stitched file reads its shards' rows; refuse it when one is gone or changed, which would read as zeros."""
    world_size = int(handle.attrs.get("shards", 0))
    if not world_size:
        return
    description = _describe_file(handle)
    for rank, rows in enumerate(handle.attrs["shard_rows"]):
        shard = shard_path(path, rank, world_size)
        fix = f"rerun the same extract with {world_size} processes (torchrun), or delete {path.name} to extract again"
        if not shard.is_file():
            raise CacheMismatchError(f"{path}: its shard {shard.name} is missing; {fix}")
        with h5py.File(shard, "r") as shard_handle:
            if shard_handle["guid"].shape[0] < rows or _describe_file(shard_handle) != description:
                raise CacheMismatchError(f"{path}: its shard {shard.name} changed since it was stitched; {fix}")


class FeatureCache:
    """Append-only writer for one cache file; use as a context manager."""

    def __init__(self, path: Path, description: dict[str, Any], data_dir: Path):
        self.path = Path(path)
        self.description = description
        self.data_dir = data_dir
        self.rows_to_rewrite: dict[str, int] = {}  # guid → its row, for the skipped guids a run tries again
        self.recorded_skips: set[str] = set()  # the file's SKIPPED_ATTR, read once

    def __enter__(self) -> FeatureCache:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._create()
        self.handle = open_cache(self.path, "a")
        check_identity(self.path, _describe_file(self.handle), self.description)
        _check_shards(self.path, self.handle)
        _warn_on_versions(self.path, self.handle)
        self.recorded_skips = set(json.loads(self.handle.attrs.get(SKIPPED_ATTR, "[]")))
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
        return set(self.guids_in_order())

    def missing(self, guids: list[str]) -> list[str]:
        """The guids without a row yet, in their order; a stitched file (torchrun) refuses to take any."""
        done = self.guids()
        todo = [g for g in guids if g not in done]
        written_by = int(self.handle.attrs.get("shards", 0))
        if todo and written_by:
            # Shards hold contiguous slices of the guids they were given: new guids would shift every slice.
            raise CacheMismatchError(
                f"{self.path}: stitched from the shards of {written_by} processes, which lack {len(todo)} of the guids "
                f"(e.g. {todo[:3]}); delete it and {self.path.stem}.shard-*.h5 to extract again"
            )
        return todo

    def skipped(self, guids: list[str]) -> list[str]:
        """Those of ``guids`` whose row holds no input because their file could not be read (``--skip-bad``), in
        their order, for ``append`` to write again. A stitched file (torchrun) keeps them as they are."""
        recorded = self.recorded_skips
        if not recorded or self.handle.attrs.get("shards", 0):
            return []
        self.rows_to_rewrite = {g: row for row, g in enumerate(self.guids_in_order()) if g in recorded}
        return [g for g in guids if g in recorded]

    def append(self, guids: list[str], features: np.ndarray, mask: np.ndarray, *, skipped: bool = False) -> None:
        """Write one batch; ``features`` (B, L', D) with L' ≤ L is zero-padded to L. A guid that has a row already
        (one skipped before) gets it rewritten in place; ``skipped``: these guids' files could not be read."""
        count, batch_length = len(guids), features.shape[1]
        length = self.description["length"]
        padded = np.zeros((count, length, features.shape[2]), dtype=np.float16)  # (B, L, D)
        padded[:, :batch_length] = features
        padded_mask = np.zeros((count, length), dtype=bool)  # (B, L)
        padded_mask[:, :batch_length] = mask
        again = {i for i, guid in enumerate(guids) if guid in self.rows_to_rewrite}  # rows rewritten in place
        for i in again:
            self.handle["features"][self.rows_to_rewrite[guids[i]]] = padded[i]
            self.handle["mask"][self.rows_to_rewrite[guids[i]]] = padded_mask[i]
        new = [i for i in range(count) if i not in again]
        start = self.handle["guid"].shape[0]
        for name, rows in (("features", padded[new]), ("mask", padded_mask[new]),
                           ("guid", np.array([guids[i] for i in new], dtype=object))):
            # guid goes last: a row counts as done only once its features are written.
            dataset = self.handle[name]
            dataset.resize(start + len(new), axis=0)
            dataset[start:] = rows
        now = self.recorded_skips | set(guids) if skipped else self.recorded_skips - set(guids)
        if now != self.recorded_skips:  # after the rows: a crash before this line tries them again
            self.handle.attrs[SKIPPED_ATTR] = json.dumps(sorted(now))
            self.recorded_skips = now
        self.handle.flush()

    def guids_in_order(self) -> list[str]:
        return [g.decode() if isinstance(g, bytes) else g for g in self.handle["guid"][:]]


def _warn_on_versions(path: Path, handle: h5py.File) -> None:
    recorded = json.loads(handle.attrs.get("versions", "{}"))
    current = package_versions()
    changed = {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
    if changed:
        warnings.warn(
            f"{path}: built with other package versions {changed}; features may differ slightly", stacklevel=3
        )


def read_description(path: Path) -> dict[str, Any]:
    with open_cache(require_cache(path), "r") as handle:
        return _describe_file(handle)


def open_cache(path: Path, mode: str) -> h5py.File:
    """The HDF5 file at ``path``; a truncated or foreign file is refused in one line with the fix."""
    try:
        return h5py.File(path, mode)
    except OSError as error:  # h5py's error for anything that is not a complete HDF5 file
        raise CacheMismatchError(
            f"{path}: not a readable HDF5 cache ({error}); delete it and run `python cli.py extract` again"
        ) from error


def load_features(path: Path, guids: list[str], expected: dict[str, Any] | None = None) -> CachedFeatures:
    """Load the rows of ``guids`` (in that order); every guid must be in the cache."""
    path = require_cache(path)
    with open_cache(path, "r") as handle:
        description = _describe_file(handle)
        if expected is not None:
            check_identity(path, description, expected)
        _check_shards(path, handle)
        # Only complete rows count: the guid column grows last, so it bounds the others.
        stored = [g.decode() if isinstance(g, bytes) else g for g in handle["guid"][:]]
        row_of = {guid: row for row, guid in enumerate(stored)}
        missing = [g for g in guids if g not in row_of]
        if missing:
            raise CacheMismatchError(
                f"{path}: {len(missing)} guids are not cached (e.g. {missing[:3]}); run `python cli.py extract` again"
            )
        rows = np.array([row_of[g] for g in guids], dtype=np.int64)
        # One sequential read of the rows' span beats h5py's per-row fancy indexing by far when most of it is
        # wanted; reading the span, not the whole file, bounds the memory of a chunk of a large cache (predict).
        low, high = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
        features = handle["features"][low:high][rows - low]  # (N, L, D)
        mask = handle["mask"][low:high][rows - low]  # (N, L)
    return CachedFeatures(list(guids), features, mask, description)
