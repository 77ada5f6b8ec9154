"""Predictions from run folders: the submission file, or one new post encoded on the fly.

A ``fit`` run's head reads the cached features; a ``finetune`` run trained its encoders
too, so its whole model (encoders and head, from ``model.pt``) runs on the raw pairs.
Several runs (or a K-fold folder, which holds ``fold-*`` runs) predict as an ensemble: a
decision rule (``fusion/decision.py``) turns their class probabilities into one prediction —
the plain average unless ``--decision`` names another or the K-fold folder's ``decision.json``
stores another as its default.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.cache import check_identity
from extract.dataset import LABELS, load_image, read_split
from extract.device import resolve_device
from extract.ocr import ocr_path, read_ocr
from extract.registry import create_encoder
from fusion.config import HeadConfig, from_dict
from fusion.decision import DEFAULT_RULE, RULES, DecisionRule, PriorRule, create_rule, read_decision
from fusion.features import LoadedFeatures, PairFeatures, load_pair_features, stream_descriptions
from fusion.pair_model import PairModel, RawPairs, build_encoders, predict_raw
from fusion.registry import create_head
from fusion.run import CONFIG_FILE, WEIGHTS_FILE, labelled_rows, load_head, load_weights, predict_run, read_config


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


def load_finetuned(run_dir: Path, config: dict[str, Any]) -> PairModel:
    """Encoders and head of a finetune run, with the weights it trained (model.pt holds all three)."""
    text, image = build_encoders(config["encoders"])
    model = PairModel(text, image, create_head(config["fit"]["head"], from_dict(HeadConfig, config["head"]).validate()))
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir}: no {WEIGHTS_FILE}; the finetune did not finish an epoch")
    load_weights(model, weights, fix="finetune it again with `python cli.py finetune --overwrite`")
    return model.eval()


def expand_runs(paths: list[Path]) -> list[Path]:
    """Run folders to average: each path is a run, or a folder of ``fold-*`` runs (a K-fold sweep trial)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        folds = sorted(path.glob("fold-*/config.json"))
        if (path / CONFIG_FILE).is_file() or not folds:
            runs.append(path)  # read_config names a folder that is neither
        else:
            runs.extend(config.parent for config in folds)
    return runs


def run_probabilities(
    run_dir: Path, data_dir: Path, cache_root: Path, guids: list[str],
    loaded: LoadedFeatures | None = None,
) -> np.ndarray:
    """Class probabilities (N, C) of one run for ``guids`` of ``data_dir``.

    A fit run reads the cached features; a finetune run encodes the raw pairs with its own encoders.
    ``loaded`` (``load_pair_features``) lets the runs of an ensemble that share their caches (the
    folds of a trial) read and normalise them once.
    """
    config = read_config(run_dir)
    if config.get("kind") == "finetune":
        model = load_finetuned(run_dir, config)
        device = resolve_device("auto")
        if getattr(model.text_encoder, "ocr", False):
            model.text_encoder.ocr_texts.update(read_ocr(ocr_path(cache_root, data_dir)))
        pairs = RawPairs(model, data_dir, guids)
        return predict_raw(model.to(device), pairs, device=device, progress=True).numpy()
    model, config = load_head(run_dir)
    encoders = config["encoders"]
    features, _ = load_pair_features(
        cache_root, data_dir, guids, encoders["text"]["encoder"], encoders["image"]["encoder"], expected=encoders,
        loaded=loaded,
    )
    return predict_run(run_dir, model, config, features)  # (N, C)


def ensemble_decision(runs: list[Path], decision: str | None = None, data_dir: Path | None = None) -> DecisionRule:
    """The rule that turns the runs' probabilities into one prediction.

    One K-fold folder with ``decision.json`` (``fit --folds K``): its default rule, or its stored rule named
    ``decision``. Any other ``--run`` list (single runs, several folders whose rules were fitted on other
    heads, folders fitted before decision rules existed): the plain mean, or the named rule when it needs
    no fitting (``geometric``) or only the training labels (``prior``: the shares of ``data_dir``'s train.txt).
    """
    if decision is not None and decision not in RULES:
        raise ValueError(f"unknown decision rule {decision!r}; choose one of {sorted(RULES)}")
    stored = read_decision(runs[0]) if len(runs) == 1 else None
    if stored is not None:
        default, rules = stored
        if (decision or default) in rules:
            return rules[decision or default]
    name = decision or DEFAULT_RULE
    if name in ("mean", "geometric"):
        return create_rule(name)
    if name == "prior" and data_dir is not None:
        return PriorRule().fit(None, labelled_rows(data_dir)[1], len(LABELS))
    refit = "fit --folds K --decision bias" if name == "bias" else "fit --folds K"
    where = str(runs[0]) if len(runs) == 1 else f"{len(runs)} --run folders (rules are read from one K-fold folder)"
    raise ValueError(
        f"decision rule {name!r} is fitted by `{refit}` and stored in the folder's decision.json; none for {where}: "
        "refit, or choose mean, geometric or prior"
    )


def predict_submission(
    runs: list[Path], data_dir: Path, cache_root: Path, out: Path, rule: DecisionRule | None = None
) -> np.ndarray:
    """Label every row of ``test_without_label.txt`` by the runs' probabilities and ``rule``; returns (N, C).

    ``rule`` defaults to ``ensemble_decision(runs)``: the plain mean unless a K-fold folder stores another.
    """
    guids = [row.guid for row in read_split(data_dir, "test")]
    rule = rule if rule is not None else ensemble_decision(runs, None, data_dir)
    loaded: LoadedFeatures = {}
    members = [run_probabilities(run, data_dir, cache_root, guids, loaded) for run in expand_runs(runs)]  # M × (N, C)
    probabilities = rule.apply(np.asarray(members))  # (N, C)
    write_submission(out, guids, probabilities.argmax(1))
    return probabilities


def load_encoders(descriptions: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """Rebuild the run's encoders (one or more per modality) and check they are the ones its head was trained on."""
    encoders: dict[str, list[Any]] = {}
    for kind, description in descriptions.items():
        encoders[kind] = []
        for stream in stream_descriptions(description):
            encoder = create_encoder(kind, stream["encoder"], **stream["options"])
            check_identity(Path(f"<{kind} encoder {encoder.name}>"), encoder.eval().describe(), stream)
            encoders[kind].append(encoder)
    return encoders


@torch.inference_mode()
def _post_probabilities(run_dir: Path, text: str, image: Path) -> dict[str, float]:
    config = read_config(run_dir)
    if config.get("kind") == "finetune":
        model = load_finetuned(run_dir, config)
        picture = load_image(Path(image), "<post>")
        text_inputs = model.text_encoder.collate([model.text_encoder.post_item(text, picture)])
        pixels = model.image_encoder.pixels(picture)[None]  # (1, 3, S, S)
        probabilities = torch.softmax(model(text_inputs, pixels), dim=-1)[0]  # (C,)
        return {label: float(p) for label, p in zip(LABELS, probabilities)}
    model, config = load_head(run_dir)
    encoders = load_encoders(config["encoders"])
    picture = load_image(Path(image), "<post>")
    text_streams = [encoder.encode([encoder.post_item(text, picture)]) for encoder in encoders["text"]]  # (1, T, D)
    image_streams = [encoder.encode([encoder.pixels(picture)]) for encoder in encoders["image"]]  # (1, P, D)
    post = PairFeatures.from_encoders(["<post>"], text_streams, image_streams)
    probabilities = predict_run(run_dir, model, config, post)[0]  # (C,)
    return {label: float(p) for label, p in zip(LABELS, probabilities)}


def predict_post(runs: list[Path], text: str, image: Path, rule: DecisionRule | None = None) -> dict[str, float]:
    """Class probabilities of one post from the runs and ``rule`` (default: ``ensemble_decision(runs)``).

    The encoders run here, no cache needed. One row carries no class shares: the ``prior`` rule gives the mean.
    """
    rule = rule if rule is not None else ensemble_decision(runs)
    each = [_post_probabilities(run, text, image) for run in expand_runs(runs)]
    members = np.array([[[p[label] for label in LABELS]] for p in each])  # (M, 1, C)
    return {label: float(p) for label, p in zip(LABELS, rule.apply(members)[0])}
