"""Predictions from run folders for the command line: the submission file, or one new post.

Both go through ``fusion.api.Run``: a ``fit`` run's heads read the cached features (or, for a
new post, the features its encoders compute as extraction did); a ``finetune`` run's whole model
runs on the raw pairs. Several runs (or a K-fold folder, which holds ``fold-*`` runs) predict as
an ensemble: a decision rule (``fusion/decision.py``) turns their class probabilities into one
prediction — the plain average unless ``--decision`` names another or the K-fold folder's
``decision.json`` stores another as its default.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from extract.dataset import LABELS, read_split
from fusion.api import Run
from fusion.decision import DecisionRule


def write_submission(path: Path, guids: list[str], predictions: np.ndarray) -> None:
    """``guid,tag`` rows in the given order, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["guid", "tag"])
        writer.writerows((guid, LABELS[int(p)]) for guid, p in zip(guids, predictions))
    os.replace(tmp, path)


def predict_submission(
    runs: list[Path], data_dir: Path, cache_root: Path, out: Path, decision: str | DecisionRule | None = None
) -> np.ndarray:
    """Label every row of ``test_without_label.txt`` by the runs' probabilities and ``decision``; returns (N, C).

    ``decision`` (a rule or its name) defaults to the plain mean unless a K-fold folder stores another.
    """
    guids = [row.guid for row in read_split(data_dir, "test")]
    run = Run.load(runs, decision=decision, data_dir=data_dir)
    probabilities = run.predict_cached(data_dir, guids, cache_root, progress=True)  # (N, C)
    write_submission(out, guids, probabilities.argmax(1))
    return probabilities
