"""Nested K-fold check: does finetuning the text encoder on each fold's own training rows help the default head?

For each fold k of the main job's folds (``fit --folds 5``, split seed 0), the text encoder
(``minilm+vader``) is finetuned as a text-only classifier (its tokens mean-pooled, then one
linear layer; class-weighted cross-entropy, AdamW, linear warm-up and decay) on fold k's
training rows only. It then encodes every pair's text into a cache of its own, and the default
head (gated, attention pooling) is fitted on those features beside the default image cache, on
fold k's training rows, and scored on fold k's validation rows: rows the finetune never saw.
The frozen encoder's fold scores are fitted in the same run on the same rows, so each Δ is paired.

    python -m benchmarks.text_finetune [--epochs 2] [--lr 3e-5] [--json results/text-finetune.json]

Needs the default caches (``python cli.py extract``). On this project's 2-core CPU a fold takes
a few minutes (the finetune, then 4,511 texts encoded again); prints a table per fold and the
mean ± std of each score and of the paired differences.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from extract import defaults
from extract.cache import cache_path
from extract.dataset import LABELS, read_text
from extract.encoders.hf_text import HFTextEncoder
from extract.registry import create_text_encoder
from extract.run import data_guids, extract_features
from fusion.config import FitConfig
from fusion.finetune import lr_schedule
from fusion.losses import inverse_frequency_weights
from fusion.metrics import mean_std, metric_of
from fusion.run import fit_fold, labelled_rows, load_labelled
from fusion.split import fold_splits

SCORES = ("accuracy", "macro_f1", "neutral_recall")


def finetune_text(
    encoder: HFTextEncoder, texts: list[str], labels: np.ndarray, *, epochs: int, lr: float, batch_size: int,
    seed: int,
) -> HFTextEncoder:
    """Train ``encoder.model`` with a linear classifier on its mean-pooled tokens, in place; returns it in eval mode."""
    torch.manual_seed(seed)
    classifier = nn.Linear(encoder.model.config.hidden_size, len(LABELS))
    parameters = list(encoder.model.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(texts) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(steps, warmup=0.1, schedule="linear"))
    loss_of = nn.CrossEntropyLoss(weight=inverse_frequency_weights(labels, len(LABELS)))
    targets = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    encoder.model.train()
    with tqdm(total=steps, desc="finetune text", unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(texts), generator=generator)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = encoder.collate([texts[i] for i in rows])
                tokens = encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
                pooled = (tokens.last_hidden_state * mask).sum(1) / mask.sum(1)  # (B, D)
                loss = loss_of(classifier(pooled), targets[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
    encoder.model.eval()
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=defaults.DATA_DIR)
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--text-encoder", default=defaults.TEXT_ENCODER)
    parser.add_argument("--image-encoder", default=defaults.IMAGE_ENCODER)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--split-seed", type=int, default=FitConfig.seed)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only-folds", default=None, help="comma list of folds to run (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    guids, labels = labelled_rows(args.data)
    every_pair = data_guids(args.data)
    texts = [read_text(args.data, guid) for guid in guids]
    splits = fold_splits(labels, args.folds, FitConfig.val_fraction, args.split_seed)
    frozen = load_labelled(args.data, args.cache, text_encoder=args.text_encoder, image_encoder=args.image_encoder)
    image_cache = cache_path(args.cache, args.data, "image", args.image_encoder)
    folds = range(args.folds) if args.only_folds is None else [int(k) for k in args.only_folds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for fold in folds:
            train_rows, _ = splits[fold]
            started = time.perf_counter()
            encoder = create_text_encoder(args.text_encoder)
            finetune_text(encoder, [texts[i] for i in train_rows], labels[train_rows], epochs=args.epochs,
                          lr=args.lr, batch_size=args.batch_size, seed=fold)
            finetuned_seconds = time.perf_counter() - started
            root = Path(scratch) / f"fold-{fold}"
            extract_features(encoder, args.data, root, guids=every_pair, batch_size=64)
            linked = cache_path(root, args.data, "image", args.image_encoder)
            linked.symlink_to(image_cache.resolve())  # the image features are the frozen encoder's, shared
            tuned = load_labelled(args.data, root, text_encoder=args.text_encoder, image_encoder=args.image_encoder)
            row: dict[str, object] = {"fold": fold, "finetune_s": round(finetuned_seconds, 1)}
            for name, labelled in (("frozen", frozen), ("finetuned", tuned)):
                result = fit_fold(labelled, Path(scratch) / f"{name}-runs", FitConfig(), {}, fold, folds=args.folds,
                                  split_seed=args.split_seed, progress=False)
                row[name] = {key: round(metric_of(result.validation, key), 4) for key in SCORES}
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print("\n| fold | frozen acc / macro-F1 / neutral recall | finetuned | Δ macro-F1 |\n|---|---|---|---|")
    for row in rows:
        frozen_row, tuned_row = row["frozen"], row["finetuned"]
        print(f"| {row['fold']} | " + " / ".join(f"{frozen_row[k]:.4f}" for k in SCORES) + " | "
              + " / ".join(f"{tuned_row[k]:.4f}" for k in SCORES)
              + f" | {tuned_row['macro_f1'] - frozen_row['macro_f1']:+.4f} |")
    summary = {}
    for key in SCORES:
        scores = {name: [row[name][key] for row in rows] for name in ("frozen", "finetuned")}
        scores["paired_delta"] = list(np.subtract(scores["finetuned"], scores["frozen"]))
        summary[key] = {name: mean_std(key, values) for name, values in scores.items()}
        print(f"{key}: " + ", ".join(
            f"{name} {stats[key + '_mean']:{'+' if name == 'paired_delta' else ''}.4f} ± {stats[key + '_std']:.4f}"
            for name, stats in summary[key].items()
        ) + " (sample std over the folds)")
    if args.json:
        settings = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "folds": args.folds,
                    "split_seed": args.split_seed, "text_encoder": args.text_encoder,
                    "image_encoder": args.image_encoder}
        args.json.write_text(json.dumps({"settings": settings, "folds": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
