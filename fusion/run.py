"""Run folders: ``fit`` writes one, ``predict`` rebuilds the head from it alone.

A run folder holds ``config.json`` (head, training options, encoders and their cache
descriptions, the split), ``model.pt`` (head weights), ``metrics.json`` (validation
report and per-epoch history), ``confusion_matrix.csv`` and ``report.txt``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.dataset import LABEL_TO_ID, LABELS, read_split
from fusion.config import FitConfig, HeadConfig, from_dict
from fusion.features import load_pair_features
from fusion.metrics import format_report
from fusion.registry import create_head
from fusion.split import stratified_split
from fusion.train import HeadTrainer

CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE = "config.json", "model.pt", "metrics.json"


def prepare_run_dir(out: Path, overwrite: bool) -> Path:
    """Refuse to mix a new run into an existing one unless asked to."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: run folder exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data: Any) -> None:
    """Write through a temporary file, so an interrupted write never leaves half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); train one with `python cli.py fit`")
    return json.loads(path.read_text())


def labelled_rows(data_dir: Path) -> tuple[list[str], np.ndarray]:
    rows = read_split(data_dir, "train")
    return [r.guid for r in rows], np.array([LABEL_TO_ID[r.tag] for r in rows], dtype=np.int64)


def fit_run(
    data_dir: Path,
    cache_root: Path,
    out: Path,
    fit_config: FitConfig,
    head_options: dict[str, Any],
    *,
    text_encoder: str,
    image_encoder: str,
    overwrite: bool = False,
    progress: bool = True,
) -> HeadTrainer:
    """Split train.txt, train the head on cached features, and write the run folder."""
    fit_config.validate()
    guids, labels = labelled_rows(data_dir)
    features, descriptions = load_pair_features(cache_root, data_dir, guids, text_encoder, image_encoder)
    head_config = HeadConfig(
        text_dim=descriptions["text"]["dim"], image_dim=descriptions["image"]["dim"],
        image_length=descriptions["image"]["length"], num_classes=len(LABELS), **head_options,
    ).validate()
    out = prepare_run_dir(out, overwrite)
    train_rows, val_rows = stratified_split(labels, fit_config.val_fraction, fit_config.seed)
    config = {
        "kind": "fit",
        "labels": list(LABELS),
        "fit": dataclasses.asdict(fit_config),
        "head": dataclasses.asdict(head_config),
        "encoders": descriptions,
        "data_dir": str(Path(data_dir).resolve()),
        "val_guids": [guids[r] for r in val_rows],
    }
    write_json(out / CONFIG_FILE, config)  # first, so a crashed run still says what it was
    trainer = HeadTrainer(fit_config, head_config).fit(
        features.subset(train_rows), labels[train_rows], features.subset(val_rows), labels[val_rows],
        progress=progress,
    )
    torch.save(trainer.model_.state_dict(), out / WEIGHTS_FILE)
    write_json(out / METRICS_FILE, {
        "validation": trainer.val_metrics_, "best_epoch": trainer.best_epoch_,
        "fit_seconds": trainer.fit_seconds_, "history": trainer.history_,
        "train_size": len(train_rows), "val_size": len(val_rows),
        "parameters": sum(p.numel() for p in trainer.model_.parameters()),
    })
    matrix = trainer.val_metrics_["confusion_matrix"]
    (out / "confusion_matrix.csv").write_text(
        "true\\predicted," + ",".join(LABELS) + "\n"
        + "".join(f"{label}," + ",".join(map(str, row)) + "\n" for label, row in zip(LABELS, matrix))
    )
    (out / "report.txt").write_text(format_report(trainer.val_metrics_) + "\n")
    return trainer


def load_head(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a fitted head from its run folder alone."""
    config = read_config(run_dir)
    fit_config = from_dict(FitConfig, config["fit"])
    model = create_head(fit_config.head, from_dict(HeadConfig, config["head"]).validate())
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir}: no {WEIGHTS_FILE}; the fit did not finish")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), config
