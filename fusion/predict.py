"""Predictions from a run folder: the submission file, or one new post encoded on the fly."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.cache import check_identity
from extract.dataset import LABELS, load_image, read_split
from extract.registry import create_encoder
from fusion.features import load_pair_features
from fusion.run import load_head
from fusion.train import predict_proba


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


def predict_submission(run_dir: Path, data_dir: Path, cache_root: Path, out: Path) -> np.ndarray:
    """Label every row of ``test_without_label.txt`` from the cached features; returns the probabilities."""
    model, config = load_head(run_dir)
    guids = [row.guid for row in read_split(data_dir, "test")]
    encoders = config["encoders"]
    features, _ = load_pair_features(
        cache_root, data_dir, guids, encoders["text"]["encoder"], encoders["image"]["encoder"], expected=encoders
    )
    probabilities = predict_proba(model, features)  # (N, C)
    write_submission(out, guids, probabilities.argmax(1))
    return probabilities


def load_encoders(descriptions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the run's encoders by name and check they are the ones its head was trained on."""
    encoders = {}
    for kind, description in descriptions.items():
        options = {"max_tokens": description["preprocessing"]["max_tokens"]} if kind == "text" else {}
        encoder = create_encoder(kind, description["encoder"], **options).eval()
        check_identity(Path(f"<{kind} encoder {description['encoder']}>"), encoder.describe(), description)
        encoders[kind] = encoder
    return encoders


@torch.inference_mode()
def predict_post(run_dir: Path, text: str, image: Path) -> dict[str, float]:
    """Class probabilities of one post; the encoders run here, no cache needed."""
    model, config = load_head(run_dir)
    encoders = load_encoders(config["encoders"])
    text_tokens, text_mask = encoders["text"].encode([" ".join(text.split())])  # (1, T, D_text), (1, T)
    image_encoder = encoders["image"]
    image_patches, image_mask = image_encoder.encode([image_encoder.pixels(load_image(Path(image), "<post>"))])
    probabilities = torch.softmax(model(text_tokens, text_mask, image_patches, image_mask), dim=-1)[0]
    return {label: float(p) for label, p in zip(LABELS, probabilities)}
