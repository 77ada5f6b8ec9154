"""Configuration of the heads and of their training, as plain dataclasses.

Every field is a CLI option of ``fit`` (whose defaults are read from here) and a key of the
run's ``config.json``; ``validate()`` runs before any work so that a bad value fails in a second.
Each head takes its own config class, holding only its options (``BaseHeadConfig`` and subclasses).
Nothing here imports torch, so the command line reads the defaults without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

MODALITIES = ("both", "text", "image")  # what the head sees; the other modality's mask is all False
CACHE_SIZES = ("text_dim", "image_dim", "image_length", "num_classes")  # set from the caches and labels, not by hand


@dataclass
class BaseHeadConfig:
    """What every head takes: the sizes of its inputs and outputs, its hidden size and dropout.

    A head declares the subclass it takes as ``config_class`` (``fusion.registry``), so each head
    has only its own options: ``--head gated --hidden 130`` is not held to an attention-only rule.
    """

    text_dim: int = 384  # D_text of the text cache (set from the cache, not by hand)
    image_dim: int = 1280  # D_image of the image cache (set from the cache)
    image_length: int = 49  # P patches of the image cache (for learned positions)
    num_classes: int = 3
    hidden: int = 128  # D: both modalities are projected to this size first
    dropout: float = 0.2

    def validate(self) -> BaseHeadConfig:
        for name in ("hidden", *CACHE_SIZES):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self


@dataclass
class PooledHeadConfig(BaseHeadConfig):
    """Heads that pool each modality to one vector (pooled.py, gated.py, late.py): how they pool."""

    text_pool: str = "attention"  # last | first | mean | max | attention (5-fold best: results/)
    image_pool: str = "attention"  # last | first | mean | max | attention (5-fold best: results/)
    image_positions: str = "none"  # none | sinusoidal | learned, added to patches

    def validate(self) -> PooledHeadConfig:
        from fusion.layers import POSITIONS
        from fusion.pooling import POOLINGS

        super().validate()
        for name, value, choices in (
            ("text_pool", self.text_pool, POOLINGS),
            ("image_pool", self.image_pool, POOLINGS),
            ("image_positions", self.image_positions, POSITIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
        return self


@dataclass
class AttentionHeadConfig(PooledHeadConfig):
    """Heads with attention blocks (cross_attention.py): the pooled heads' options plus the blocks'."""

    num_heads: int = 4  # attention heads; must divide hidden
    layers: int = 1  # attention blocks per branch
    norm: str = "layer"  # layer | batch, inside the attention blocks

    def validate(self) -> AttentionHeadConfig:
        from fusion.layers import NORMS

        super().validate()
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {list(NORMS)}")
        for name in ("num_heads", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by num_heads={self.num_heads}")
        return self


@dataclass
class FitConfig:
    head: str = "gated"  # a name from the head registry (5-fold best of the sweeps: results/)
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    patience: int = 5  # epochs without a better validation macro-F1 before stopping
    batch_size: int = 64
    lr: float = 5e-4  # AdamW learning rate
    weight_decay: float = 0.01
    loss: str = "ce"  # a name of the loss registry (fusion/losses.py; `fit --help` lists them)
    class_weights: bool = False  # weight the loss by inverse class frequency
    label_smoothing: float = 0.0  # share of each target spread evenly over the classes
    focal_gamma: float = 2.0  # focal loss: (1 − p_true)^γ · CE; other losses ignore it
    balanced_sampling: bool = False  # draw training rows with probability ∝ 1 / class count (with replacement)
    logit_adjustment: bool = False  # subtract τ·log prior from the logits, τ tuned on validation (calibration.py)
    modalities: str = "both"  # both | text | image: the ablation masks the other modality out, in fit and predict
    aux_data: str = ""  # a text-only folder (texts.csv) whose labelled texts join the training rows, never validation
    aux_per_epoch: float = 1.0  # auxiliary texts drawn each epoch, as a multiple of the training pairs
    val_fraction: float = 0.1  # stratified share of train.txt held out for validation
    seed: int = 0  # seeds the split, the initialisation and the batch order
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast in training; auto = bf16 where the CPU has bf16 units
    batch_folds: bool = False  # with K ≥ 2 folds: train them as one batched model (fusion/batched.py), pooled heads
    # only; without dropout the same fits, with dropout other masks (as another seed's)

    def validate(self) -> FitConfig:
        from fusion.precision import HEAD_PRECISIONS
        from fusion.registry import head_names

        if self.head not in head_names():
            raise ValueError(f"unknown head {self.head!r}; choose one of {head_names()}")
        if self.precision not in HEAD_PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {list(HEAD_PRECISIONS)}")
        validate_loss(self.loss, self.label_smoothing, self.focal_gamma)
        if self.modalities not in MODALITIES:
            raise ValueError(f"modalities={self.modalities!r} is not one of {list(MODALITIES)}")
        validate_split(self.val_fraction, self.seed)
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.aux_data and self.modalities == "image":
            raise ValueError("aux_data adds texts without images: it cannot train a modalities=image head")
        check_numbers(self, positive=("lr", "aux_per_epoch"), non_negative=("weight_decay",))
        if self.batch_folds:
            from fusion.batched import check_batchable

            check_batchable(self)
        return self


def validate_split(val_fraction: float, seed: int) -> None:
    """Refuse a held-out share or a seed that cannot split ``train.txt`` (fit and finetune split it alike)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be at least 0, got {seed}")


def check_numbers(config: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Refuse a NaN, an infinity, or a value out of range among ``config``'s named float options."""
    for name in (*positive, *non_negative):
        value = getattr(config, name)
        if not (math.isfinite(value) and (value > 0 if name in positive else value >= 0)):
            bound = "above 0" if name in positive else "of at least 0"
            raise ValueError(f"{name} must be a finite number {bound}, got {value}")


def validate_loss(loss: str, label_smoothing: float, focal_gamma: float) -> None:
    """Refuse a loss the registry lacks or a bad loss option: fit and finetune share their loss options."""
    from fusion.losses import loss_names

    if loss not in loss_names():
        raise ValueError(f"loss={loss!r} is not one of {loss_names()}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if focal_gamma < 0:
        raise ValueError(f"focal_gamma must be at least 0, got {focal_gamma}")


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config, refusing unknown keys so a typo never trains the defaults."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected some of {sorted(known)}")
    return cls(**values)
