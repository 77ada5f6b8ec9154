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

``--rules`` asks another question: which decision rule should turn the fold ensemble's
probabilities into labels (``fusion/decision.py``)? On each outer fold's rest, the ``--inner``
fold heads are fitted once and every rule decides from the same heads' probabilities of the
held-out fold: ``mean`` (today's), ``geometric``, ``temperature`` (τ from the heads' out-of-fold
probabilities on the rest), ``prior`` (label-free offsets on the held-out rows, matching the rest's
class shares), and ``bias`` fitted two ways: on the single heads' out-of-fold probabilities (the
near-zero fit the issue reports), and on *nested ensemble* probabilities of the rest, each row
averaged over ``--bias-members`` heads of a second-level split that never saw it
(``nested_ensemble_probabilities``: ``--inner`` · ``--bias-members`` more fits per outer fold).
The table adds each rule's share of neutral predictions and its paired Δ macro-F1 from ``mean``;
a rule "wins beyond noise" when that Δ's mean exceeds 2 · std / √outer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion.config import FitConfig
from fusion.decision import (
    BiasRule,
    GeometricRule,
    MeanRule,
    PriorRule,
    TemperatureRule,
    nested_ensemble_probabilities,
    to_dict,
)
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
    trainer = HeadTrainer(FitConfig(head=head, seed=seed), labelled.head_config(head, {})).fit(
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


def fitted_on(
    labelled: LabelledFeatures, train_rows: np.ndarray, val_rows: np.ndarray, head: str, seed: int,
    *row_sets: np.ndarray,
) -> list[np.ndarray]:
    """Probabilities (N_rows, C) of each row set, from one head trained on ``train_rows``, selected on ``val_rows``."""
    features, labels = labelled.features, labelled.labels
    trainer = HeadTrainer(FitConfig(head=head, seed=seed), labelled.head_config(head, {})).fit(
        features.subset(train_rows), labels[train_rows], features.subset(val_rows), labels[val_rows],
        progress=False,
    )
    return [predict_proba(trainer.model_, features.subset(rows)) for rows in row_sets]


def nested_rule_scores(
    labelled: LabelledFeatures, head: str, outer: int, inner: int, bias_members: int, seed: int = 0,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]], dict[str, np.ndarray]]:
    """Each decision rule's report on every outer fold, the rules as fitted there, and the probabilities behind them.

    The probabilities (keys ``fold{k}_members`` (K, N_held, C), ``fold{k}_out_of_fold`` and ``fold{k}_nested``
    (N_rest, C), ``fold{k}_held_out`` / ``fold{k}_rest`` row indices) let other rules be scored without refitting.
    """
    labels, num_classes = labelled.labels, labelled.head_config(FitConfig.head, {}).num_classes
    methods: dict[str, list[dict[str, Any]]] = {}
    fitted: dict[str, list[dict[str, Any]]] = {}
    arrays: dict[str, np.ndarray] = {}
    for fold, (rest, held_out) in enumerate(stratified_folds(labels, outer, seed)):
        y_rest = labels[rest]
        inner_folds = stratified_folds(y_rest, inner, seed)  # row indices into rest, as fit --folds splits it
        members, out_of_fold = [], np.zeros((len(rest), num_classes))
        for train, val in inner_folds:
            on_held_out, on_val = fitted_on(labelled, rest[train], rest[val], head, seed, held_out, rest[val])
            members.append(on_held_out)
            out_of_fold[val] = on_val  # (N_val, C) by the one head that did not train on these rows
        stacked = np.asarray(members)  # (K, N_held, C)

        def fit_predict(train: np.ndarray, val: np.ndarray, rows: np.ndarray, rest: np.ndarray = rest) -> np.ndarray:
            return fitted_on(labelled, rest[train], rest[val], head, seed, rest[rows])[0]  # rows of rest → of train.txt

        nested = nested_ensemble_probabilities(y_rest, inner_folds, fit_predict, bias_members, seed)  # (N_rest, C)
        rules = {
            "mean": MeanRule(),
            "geometric": GeometricRule(),
            "temperature": TemperatureRule().fit(out_of_fold, y_rest),
            "bias (fitted on single heads' out-of-fold)": BiasRule().fit(out_of_fold, y_rest),
            f"bias (fitted on nested {bias_members}-head ensembles)": BiasRule().fit(nested, y_rest),
            "prior": PriorRule().fit(None, y_rest, num_classes),
        }
        for name, rule in rules.items():
            methods.setdefault(name, []).append(evaluate(labels[held_out], rule.apply(stacked).argmax(1)))
            stored = to_dict(rule)
            stored.pop("log_loss", None)  # τ's grid of scores: long, and τ itself is kept
            if isinstance(rule, PriorRule):
                stored["offsets"] = rule.offsets(stacked).tolist()  # fitted on the held-out rows, label-free
            fitted.setdefault(name, []).append(stored)
        arrays |= {
            f"fold{fold}_members": stacked, f"fold{fold}_out_of_fold": out_of_fold, f"fold{fold}_nested": nested,
            f"fold{fold}_held_out": held_out, f"fold{fold}_rest": rest,
        }
        print(f"outer fold {fold}: " + ", ".join(
            f"{name} {reports[-1]['macro_f1']:.4f}" for name, reports in methods.items()
        ), flush=True)
    return methods, fitted, arrays


def neutral_share(report: dict[str, Any]) -> float:
    """Share of the rows predicted neutral (column ``neutral`` of the confusion matrix)."""
    matrix = np.asarray(report["confusion_matrix"])
    return float(matrix[:, report["labels"].index("neutral")].sum() / matrix.sum())


def rules_markdown(methods: dict[str, list[dict[str, Any]]]) -> str:
    """Mean ± std of each rule, its neutral share, and its paired Δ macro-F1 from ``mean`` with the noise test."""
    base = [report["macro_f1"] for report in methods["mean"]]
    lines = [
        "| rule | accuracy | macro-F1 | neutral recall | neutral predicted | Δ macro-F1 vs mean (paired) "
        "| beyond noise (Δ > 2·std/√n) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, reports in methods.items():
        deltas = [r["macro_f1"] - b for r, b in zip(reports, base)]
        summary = cv_summary(reports) | mean_std("delta", deltas) | mean_std("share", list(map(neutral_share, reports)))
        cells = [f"{summary[f'{m}_mean']:.4f} ± {summary[f'{m}_std']:.4f}" for m in (*SHOWN, "share")]
        margin = 2 * summary["delta_std"] / np.sqrt(len(deltas))
        delta, verdict = "—", "—"
        if method != "mean":
            delta = f"{summary['delta_mean']:+.4f} ± {summary['delta_std']:.4f}"
            verdict = f"{'yes' if summary['delta_mean'] > margin else 'no'} (2·std/√n = {margin:.4f})"
        lines.append(f"| {method} | {' | '.join(cells)} | {delta} | {verdict} |")
    return "\n".join(lines)


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
    from extract import defaults

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvsa-single"))
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--text-encoder", default=defaults.TEXT_ENCODER)
    parser.add_argument("--image-encoder", default=defaults.IMAGE_ENCODER)
    parser.add_argument("--head", default=FitConfig().head)
    parser.add_argument("--outer", type=int, default=5, help="outer folds, each held out and scored")
    parser.add_argument("--inner", type=int, default=5, help="folds of the fold ensemble")
    parser.add_argument("--seeds", type=int, default=5, help="models of the seed ensemble")
    parser.add_argument("--json", type=Path, default=None, help="also write every fold's scores as JSON here")
    parser.add_argument("--rules", action="store_true", help="score the fold ensemble's decision rules instead")
    parser.add_argument("--bias-members", type=int, default=2, help="--rules: heads per nested ensemble of the bias")
    parser.add_argument("--probabilities", type=Path, default=None, help="--rules: save the probabilities (.npz) here")
    args = parser.parse_args()

    labelled = load_labelled(args.data, args.cache, text_encoder=args.text_encoder, image_encoder=args.image_encoder)
    if args.rules:
        started = time.perf_counter()
        methods, fitted, arrays = nested_rule_scores(labelled, args.head, args.outer, args.inner, args.bias_members)
        seconds = time.perf_counter() - started
        print(f"\n## Decision rules of the fold ensemble, nested {args.outer}-fold CV ({args.head}, {args.inner} "
              f"inner folds, {args.text_encoder} / {args.image_encoder}, {torch.get_num_threads()} threads, "
              f"{seconds:.0f} s)\n\n{rules_markdown(methods)}")
        if args.json is not None:
            args.json.write_text(json.dumps(
                vars(args) | {"seconds": seconds, "methods": methods, "fitted": fitted}, indent=2, default=str
            ) + "\n")
        if args.probabilities is not None:
            np.savez_compressed(args.probabilities, **arrays)
        return
    methods = nested_scores(labelled, args.head, args.outer, args.inner, args.seeds)
    print(f"\n## Ensembles, nested {args.outer}-fold CV ({args.head}, {args.text_encoder} / {args.image_encoder}, "
          f"{torch.get_num_threads()} threads)\n\n{markdown(methods)}")
    if args.json is not None:
        args.json.write_text(json.dumps(vars(args) | {"methods": methods}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
