"""Seeded, stratified validation splits of the labelled guids (never of the test file)."""

from __future__ import annotations

import numpy as np

# scikit-learn is imported where a split is made: with scipy and pandas behind it, importing it takes over a
# second, which commands that never split (predict, serve, the Python API's Run) should not pay at start.


def import_splitters() -> None:
    """Import scikit-learn's splitters now: once in a process that forks workers, rather than once in each."""
    import sklearn.model_selection  # noqa: F401


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


def fold_splits(labels: np.ndarray, folds: int, val_fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) of every fold: K stratified folds for K ≥ 2, one hold-out of ``val_fraction``.

    fit, sweep, ablate and pipeline all split here (through ``fusion.run.fit_fold``), so the same
    ``folds``, ``val_fraction`` and ``seed`` give the same rows in every command.
    """
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    if folds == 1:
        return [stratified_split(labels, val_fraction, seed)]
    return stratified_folds(labels, folds, seed)
