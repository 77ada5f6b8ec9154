"""Do ensembles beat one model? Nested cross-validation on train.txt, the test labels untouched.

    python -m benchmarks.ensemble [--data DIR] [--cache cache] [--text-encoder NAME] [--image-encoder NAME]
                                  [--head gated] [--outer 5] [--inner 5] [--seeds 5] [--json FILE]

Each outer fold is held out and scored, and nothing else sees it. On the rest:

* ``single``: what ``fit`` does — one model, selected on a stratified 10 % validation split;
* ``seed ensemble``: ``--seeds`` such models on the same split with other seeds, probabilities
  averaged (``predict --run A --run B …``);
* ``fold ensemble``: one model per inner fold of a ``--inner``-fold split, probabilities averaged
  (``predict --run SWEEP/runs/TRIAL`` of a K-fold sweep).

Prints a Markdown table: mean ± sample std over the outer folds, and each ensemble's paired
difference in macro-F1 from ``single``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion.config import FitConfig
from fusion.metrics import cv_summary, evaluate, mean_std
from fusion.run import LabelledFeatures, load_labelled
from fusion.split import stratified_folds, stratified_split
from fusion.train import HeadTrainer, predict_proba

SHOWN = ("accuracy", "macro_f1", "neutral_recall")


def fitted_probabilities(
    labelled: LabelledFeatures, train_rows: np.ndarray, val_rows: np.ndarray, test_rows: np.ndarray, head: str,
    seed: int,
) -> np.ndarray:
    """Class probabilities (N_test, C) of one head trained on ``train_rows``, selected on ``val_rows``."""
    features, labels = labelled.features, labelled.labels
    trainer = HeadTrainer(FitConfig(head=head, seed=seed), labelled.head_config({})).fit(
        features.subset(train_rows), labels[train_rows], features.subset(val_rows), labels[val_rows],
        progress=False,
    )
    return predict_proba(trainer.model_, features.subset(test_rows))


def nested_scores(labelled: LabelledFeatures, head: str, outer: int, inner: int, seeds: int,
                  seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Each method's report (``fusion.metrics.evaluate``) on every outer fold."""
    labels = labelled.labels
    methods: dict[str, list[dict[str, Any]]] = {
        "single": [], f"seed ensemble ({seeds} seeds)": [], f"fold ensemble ({inner} folds)": []
    }
    for fold, (rest, held_out) in enumerate(stratified_folds(labels, outer, seed)):
        train, val = (rest[rows] for rows in stratified_split(labels[rest], 0.1, seed))
        by_seed = [fitted_probabilities(labelled, train, val, held_out, head, s) for s in range(seed, seed + seeds)]
        by_fold = [
            fitted_probabilities(labelled, rest[inner_train], rest[inner_val], held_out, head, seed)
            for inner_train, inner_val in stratified_folds(labels[rest], inner, seed)
        ]
        for method, probabilities in zip(methods, (by_seed[0], np.mean(by_seed, 0), np.mean(by_fold, 0))):
            methods[method].append(evaluate(labels[held_out], probabilities.argmax(1)))
        print(f"outer fold {fold}: " + ", ".join(
            f"{method} {reports[-1]['macro_f1']:.4f}" for method, reports in methods.items()
        ), flush=True)
    return methods


def markdown(methods: dict[str, list[dict[str, Any]]]) -> str:
    single = [report["macro_f1"] for report in methods["single"]]
    lines = [
        "| method | accuracy | macro-F1 | neutral recall | Δ macro-F1 vs single (paired) |", "|---|---|---|---|---|"
    ]
    for method, reports in methods.items():
        summary = cv_summary(reports) | mean_std("delta", [r["macro_f1"] - s for r, s in zip(reports, single)])
        cells = [f"{summary[f'{m}_mean']:.4f} ± {summary[f'{m}_std']:.4f}" for m in SHOWN]
        delta = f"{summary['delta_mean']:+.4f} ± {summary['delta_std']:.4f}" if method != "single" else "—"
        lines.append(f"| {method} | {' | '.join(cells)} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    from cli import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvsa-single"))
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER)
    parser.add_argument("--image-encoder", default=DEFAULT_IMAGE_ENCODER)
    parser.add_argument("--head", default=FitConfig().head)
    parser.add_argument("--outer", type=int, default=5, help="outer folds, each held out and scored")
    parser.add_argument("--inner", type=int, default=5, help="folds of the fold ensemble")
    parser.add_argument("--seeds", type=int, default=5, help="models of the seed ensemble")
    parser.add_argument("--json", type=Path, default=None, help="also write every fold's scores as JSON here")
    args = parser.parse_args()

    labelled = load_labelled(args.data, args.cache, text_encoder=args.text_encoder, image_encoder=args.image_encoder)
    methods = nested_scores(labelled, args.head, args.outer, args.inner, args.seeds)
    print(f"\n## Ensembles, nested {args.outer}-fold CV ({args.head}, {args.text_encoder} / {args.image_encoder}, "
          f"{torch.get_num_threads()} threads)\n\n{markdown(methods)}")
    if args.json is not None:
        args.json.write_text(json.dumps(vars(args) | {"methods": methods}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
