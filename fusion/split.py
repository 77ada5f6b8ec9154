"""Seeded, stratified validation splits of the labelled guids (never of the test file)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from importlib import metadata
from pathlib import Path

import numpy as np

from fusion.kept import write_kept

# scikit-learn is imported where a split is made: with scipy and pandas behind it, importing it takes over a
# second, which commands that never split (predict, serve, the Python API's Run) should not pay at start, nor
# commands whose splits were made before (fold_splits keeps them).


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation); the same seed gives the same split."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    train_rows, val_rows = train_test_split(rows, test_size=val_fraction, stratify=labels, random_state=seed)
    return np.sort(train_rows), np.sort(val_rows)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K disjoint stratified validation folds, each with the rest as its training rows."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros(len(labels)), labels)]


SPLITS_FORMAT = 1  # raise when stratified_split or stratified_folds changes which rows a kept split would hold
_SPLITS: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # this process's splits, by fold_splits' key


def fold_splits(labels: np.ndarray, folds: int, val_fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) of every fold: K stratified folds for K ≥ 2, one hold-out of ``val_fraction``.

    fit, sweep, ablate and pipeline all split here (through ``fusion.run.fit_fold``), so the same
    ``folds``, ``val_fraction`` and ``seed`` give the same rows in every command. scikit-learn makes each
    split once per machine: it is kept under ``splits_dir()``, named by the labels, these options,
    ``SPLITS_FORMAT`` and scikit-learn's version, so that a later fit or sweep splits without importing it.
    """
    key = json.dumps({
        "labels": hashlib.sha1(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest(), "folds": folds,
        "val_fraction": val_fraction if folds == 1 else None, "seed": seed, "format": SPLITS_FORMAT,
        "scikit-learn": _scikit_learn_version(),
    }, sort_keys=True)
    if key not in _SPLITS:  # only a split that could be made is kept: checked once, here
        check_splittable(labels, folds, val_fraction)
        path = splits_dir() / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"
        splits = _read_splits(path, key)
        if splits is None:
            splits = stratified_folds(labels, folds, seed) if folds > 1 else [
                stratified_split(labels, val_fraction, seed)
            ]
            _write_splits(path, key, splits)
        _SPLITS[key] = splits
    return [(train.copy(), val.copy()) for train, val in _SPLITS[key]]  # a caller's copy: nobody edits the kept ones


def check_splittable(labels: np.ndarray, folds: int, val_fraction: float) -> None:
    """Refuse, in this project's words, a split scikit-learn would refuse in its own: too few pairs for the folds,
    or a hold-out too small (or too large) to keep every class on both sides."""
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    pairs, classes = len(labels), len(np.unique(labels))
    if pairs == 0:
        raise ValueError("no labelled pairs to split")
    if folds > 1 and folds > pairs:
        raise ValueError(f"folds={folds} but only {pairs} labelled pairs: use fewer folds")
    held_out = math.ceil(pairs * val_fraction)
    if folds == 1 and not classes <= held_out <= pairs - classes:
        raise ValueError(
            f"val_fraction={val_fraction} of {pairs} labelled pairs holds out {held_out}, but each side needs at least "
            f"one pair of each of the {classes} classes: change --val-fraction or label more pairs"
        )


@functools.cache
def _scikit_learn_version() -> str:
    return metadata.version("scikit-learn")  # from its package metadata: importing it is what the kept splits save


def splits_dir() -> Path:
    """``$XDG_CACHE_HOME/mmsent/splits`` (``~/.cache/mmsent/splits``): the splits ``fold_splits`` has made."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmsent" / "splits"


def _read_splits(path: Path, key: str) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The splits stored at ``path`` for ``key``; None when there are none (or the file is damaged or foreign)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            return [(stored[f"train_{k}"], stored[f"val_{k}"]) for k in range(int(stored["folds"]))]
    except Exception:  # absent, truncated or foreign, whatever NumPy says of it: split again
        return None


def _write_splits(path: Path, key: str, splits: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Keep ``splits`` for later processes (``fusion.kept.write_kept``: whole or not at all)."""
    rows = {f"{part}_{k}": array for k, pair in enumerate(splits) for part, array in zip(("train", "val"), pair)}
    write_kept(path, lambda file: np.savez(file, key=np.array(key), folds=np.array(len(splits)), **rows))
