"""The one training loop of stage two: AdamW, early stopping on validation macro-F1."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fusion.config import BaseHeadConfig, FitConfig
from fusion.features import JoinedFeatures, PairFeatures
from fusion.losses import training_loss
from fusion.metrics import evaluate
from fusion.optim import AdamW
from fusion.precision import autocast, resolve_head_precision
from fusion.registry import create_head
from fusion.sampling import epoch_order, with_auxiliary


class HeadTrainer:
    """Trains one head on cached features, keeping the epoch with the best validation macro-F1.

    Follows scikit-learn's contract: ``__init__`` stores, ``fit`` returns ``self`` and sets
    the learned state (``model_``, ``best_epoch_``, ``history_``, ``val_metrics_``, ``fit_seconds_``, and
    ``precision_``, the training precision ``auto`` resolved to). Validation and prediction run in fp32.
    """

    def __init__(self, fit_config: FitConfig, head_config: BaseHeadConfig):
        self.fit_config = fit_config
        self.head_config = head_config

    @classmethod
    def fitted(
        cls, fit_config: FitConfig, head_config: BaseHeadConfig, model: torch.nn.Module, *, best_epoch: int,
        val_metrics: dict[str, Any], history: list[dict[str, Any]], fit_seconds: float, precision: str,
    ) -> HeadTrainer:
        """A trainer holding what ``fit`` sets, for a head trained elsewhere: with other members
        (``fusion.batched``), or by an earlier, interrupted command (``fusion.run.finished_fold``)."""
        trainer = cls(fit_config, head_config)
        trainer.model_, trainer.best_epoch_, trainer.val_metrics_ = model.eval(), best_epoch, val_metrics
        trainer.history_, trainer.fit_seconds_, trainer.precision_ = history, fit_seconds, precision
        return trainer

    def fit(
        self,
        train: PairFeatures,
        y_train: np.ndarray,
        val: PairFeatures,
        y_val: np.ndarray,
        *,
        aux: tuple[PairFeatures, np.ndarray] | None = None,
        progress: bool = True,
        on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> HeadTrainer:
        """Train on ``train`` (plus ``config.aux_per_epoch`` × N rows of ``aux`` each epoch), select on ``val``.

        ``on_epoch(epoch, history row)`` is called after each epoch's validation, e.g. so that a search
        scheduler can stop an unpromising fit early.
        """
        config = self.fit_config
        started = time.perf_counter()
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        self.precision_ = resolve_head_precision(config.precision)
        model = create_head(config.head, self.head_config)
        optimizer = AdamW(_parameter_groups(model, config.weight_decay), lr=config.lr)  # torch's fused AdamW update
        criterion = training_loss(config, y_train, self.head_config.num_classes)
        targets = torch.as_tensor(y_train, dtype=torch.long)
        rows_of: PairFeatures | JoinedFeatures = train
        if aux is not None:
            rows_of = JoinedFeatures(train, aux[0])
            targets = torch.cat([targets, torch.as_tensor(aux[1], dtype=torch.long)])
            aux_draws = round(config.aux_per_epoch * len(train))
        best_f1, best_state, stale = -1.0, None, 0
        self.history_: list[dict[str, Any]] = []
        bar = tqdm(range(1, config.epochs + 1), desc=f"fit {config.head}", unit="epoch", disable=not progress)
        for epoch in bar:
            model.train()
            order = epoch_order(y_train, config.balanced_sampling, generator)  # (N,)
            if aux is not None:
                order = with_auxiliary(order, len(train), len(aux[0]), aux_draws, generator)  # (N + K,)
            total_loss = 0.0
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                if aux is not None:
                    rows = rows.sort().values  # pairs first, auxiliary texts after: no reordering of the batch
                with autocast(torch.device("cpu"), self.precision_):
                    logits = model(*rows_of.batch(rows, model.modalities)).float()  # (B, C)
                loss = criterion(logits, targets[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * len(rows)
            probabilities = predict_proba(model, val)
            val_loss = float(torch.nn.functional.nll_loss(
                torch.log(torch.from_numpy(probabilities).clamp_min(1e-12)), torch.as_tensor(y_val)
            ))
            metrics = evaluate(y_val, probabilities.argmax(1))
            self.history_.append({
                "epoch": epoch, "train_loss": total_loss / len(order), "val_loss": val_loss,
                "val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
            })
            bar.set_postfix(val_f1=f"{metrics['macro_f1']:.3f}", best=f"{max(best_f1, metrics['macro_f1']):.3f}")
            if on_epoch is not None:
                on_epoch(epoch, self.history_[-1])
            if metrics["macro_f1"] > best_f1:
                best_f1, stale = metrics["macro_f1"], 0
                best_state = copy.deepcopy(model.state_dict())
                self.best_epoch_, self.val_metrics_ = epoch, metrics
            else:
                stale += 1
                if stale >= config.patience:
                    break
        model.load_state_dict(best_state)
        self.model_ = model.eval()
        self.fit_seconds_ = time.perf_counter() - started
        return self


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay weight matrices only: biases, norm scales and pooling queries stay undecayed.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.inference_mode()
def predict_proba(model: torch.nn.Module, features: PairFeatures, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, C) for cached features, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(features), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(features)))
        logits = model(*features.batch(rows, model.modalities, device))  # (B, C)
        chunks.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, model.config.num_classes), np.float32)
