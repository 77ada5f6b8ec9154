"""End-to-end finetuning: encoders unfrozen (all, the top K blocks, or none) with a fusion head.

The usual recipe is to sweep heads on the cache with ``fit`` and then finetune the
winner with ``--from-run``: the head's config, weights and validation split are reused,
so the numbers compare. Encoders get lower learning rates than the head (layer-wise
decay for the text encoder), with warm-up then cosine or linear decay, gradient
clipping and accumulation, mixed precision on CUDA, early stopping on validation
macro-F1, and a checkpoint each epoch from which ``--resume`` continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from extract import defaults
from extract.cache import check_identity
from extract.dataset import LABELS
from extract.memory import reuse_freed_memory
from extract.run import default_workers
from fusion.config import FitConfig, check_numbers, from_dict, validate_loss, validate_split
from fusion.losses import training_loss
from fusion.metrics import evaluate, format_report
from fusion.pair_model import PairModel, RawPairs, build_encoders, move_batch, predict_raw, save_pair_model
from fusion.precision import autocast
from fusion.registry import create_run_head, head_config_from_dict
from fusion.run import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, labelled_rows, prepare_run_dir, read_config, write_json
from fusion.split import fold_splits

CHECKPOINT_FILE = "checkpoint.pt"
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear")


@dataclass
class FinetuneConfig:
    epochs: int = 3  # upper bound; early stopping may end sooner
    patience: int = 2  # epochs without a better validation macro-F1 before stopping
    batch_size: int = 16
    grad_accum: int = 1  # optimiser step every N batches (effective batch = N · batch_size)
    head_lr: float = 3e-4
    encoder_lr: float = 3e-5  # top text block and the image encoder; lower text blocks decay from it
    layer_decay: float = 0.8  # text block i from the top gets encoder_lr · layer_decay^i
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the optimiser steps spent warming up linearly
    schedule: str = "cosine"  # cosine | linear decay after warm-up
    max_grad_norm: float = 1.0
    unfreeze: str = "top-2"  # all | none | top-K blocks of each encoder
    augment: bool = False  # random resized crop, flip and light colour jitter on training images
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)
    compile: bool = False  # torch.compile the model (CUDA runs)
    loss: str = FitConfig.loss  # a name of the loss registry (fusion/losses.py), trained as fit trains it
    class_weights: bool = FitConfig.class_weights  # weight the loss by inverse class frequency
    label_smoothing: float = FitConfig.label_smoothing
    focal_gamma: float = FitConfig.focal_gamma  # focal loss only
    max_steps_per_epoch: int | None = None  # cap, for quick runs and benchmarks
    seed: int = 0
    val_fraction: float = 0.1

    def validate(self) -> FinetuneConfig:
        parse_unfreeze(self.unfreeze)
        validate_loss(self.loss, self.label_smoothing, self.focal_gamma)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {list(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        for name in ("epochs", "patience", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        validate_split(self.val_fraction, self.seed)
        check_numbers(self, positive=("head_lr", "encoder_lr", "layer_decay", "max_grad_norm"),
                      non_negative=("weight_decay",))
        return self


def parse_unfreeze(value: str) -> int | None:
    """``all`` → None (every block), ``none`` → 0, ``top-K`` → K."""
    if value == "all":
        return None
    if value == "none":
        return 0
    if value.startswith("top-") and value[4:].isdigit():
        return int(value[4:])
    raise ValueError(f"unfreeze={value!r}: expected 'all', 'none' or 'top-K' (e.g. top-2)")


def set_trainable(model: PairModel, unfreeze: str) -> dict[str, list[nn.Module]]:
    """Freeze the encoders except their top-K blocks; returns the trainable blocks of each encoder."""
    top = parse_unfreeze(unfreeze)
    trainable = {}
    for kind, encoder in (("text", model.text_encoder), ("image", model.image_encoder)):
        encoder.requires_grad_(False)
        blocks = encoder.blocks()
        chosen = blocks if top is None else blocks[max(len(blocks) - top, 0) :] if top else []  # K past the count: all
        if top is None:
            encoder.requires_grad_(True)
        for block in chosen:
            block.requires_grad_(True)
        trainable[kind] = chosen
    return trainable


def parameter_groups(model: PairModel, trainable: dict[str, list[nn.Module]], config: FinetuneConfig) -> list[dict]:
    """Head at head_lr; encoder blocks at encoder_lr, text blocks decaying layer-wise from the top."""
    groups: list[dict[str, Any]] = []

    def add(params: list[nn.Parameter], lr: float) -> None:
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups.extend(
            {"params": chosen, "lr": lr, "weight_decay": wd}
            for chosen, wd in ((decay, config.weight_decay), (rest, 0.0))
            if chosen
        )

    add(list(model.head.parameters()), config.head_lr)
    for depth, block in enumerate(reversed(trainable["text"])):
        add(list(block.parameters()), config.encoder_lr * config.layer_decay**depth)
    seen = {id(p) for group in groups for p in group["params"]}
    # Text parameters outside the listed blocks (e.g. a final norm) and the image encoder: encoder_lr.
    rest = [p for p in model.text_encoder.parameters() if id(p) not in seen]
    add(rest + list(model.image_encoder.parameters()), config.encoder_lr)
    return groups


def lr_schedule(total_steps: int, warmup: float, schedule: str):
    warmup_steps = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return factor


def augmentation(image_size: int):
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
    ])


def _train_mode(model: PairModel) -> None:
    model.train()
    # Batch norm statistics from batches of 16 would wreck the pretrained ones: keep them frozen.
    for module in model.image_encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator's state, in types that ``torch.load(weights_only=True)`` accepts (tensors, tuples, numbers)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _rows_of(guids: list[str], val_guids: set[str]) -> tuple[np.ndarray, np.ndarray]:
    is_val = np.array([g in val_guids for g in guids])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def plan_run(
    data_dir: Path,
    config: FinetuneConfig,
    *,
    from_run: Path | None,
    text_encoder: nn.Module,
    image_encoder: nn.Module,
    head: str,
) -> dict[str, Any]:
    """The run's config.json: what to build and which split to use, from --from-run or from scratch."""
    guids, labels = labelled_rows(data_dir)
    descriptions = {"text": text_encoder.describe(), "image": image_encoder.describe()}
    if from_run is not None:
        source = read_config(from_run)
        if not (Path(from_run) / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{from_run}: no {WEIGHTS_FILE}: the fit run did not finish; fit it again first")
        for kind in ("text", "image"):
            # The head must start from the features it was fitted on: same encoder, weights, preprocessing.
            check_identity(Path(from_run), descriptions[kind], source["encoders"][kind])
        head, head_values = source["fit"]["head"], source["head"]
        val_guids = source["val_guids"]
    else:
        head_values = {
            "text_dim": text_encoder.dim, "image_dim": image_encoder.dim, "image_length": image_encoder.length,
            "num_classes": len(LABELS),
        }
        _, val_rows = fold_splits(labels, 1, config.val_fraction, config.seed)[0]  # fit's hold-out for these options
        val_guids = [guids[r] for r in val_rows]
    return {
        "kind": "finetune",
        "labels": list(LABELS),
        "finetune": dataclasses.asdict(config),
        "fit": {"head": head},
        # The head's own options only, also when the source run predates per-head configs and holds them all.
        "head": dataclasses.asdict(head_config_from_dict(head, head_values, drop_foreign=True)),
        "encoders": descriptions,
        "from_run": str(from_run) if from_run is not None else None,
        "data_dir": str(Path(data_dir).resolve()),
        "val_guids": val_guids,
    }


def finetune_run(
    data_dir: Path,
    out: Path,
    config: FinetuneConfig,
    *,
    device: torch.device,
    from_run: Path | None = None,
    text_encoder: str = defaults.TEXT_ENCODER,
    image_encoder: str = defaults.IMAGE_ENCODER,
    head: str = FitConfig.head,
    resume: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
    encoders: tuple[nn.Module, nn.Module] | None = None,
) -> dict[str, Any]:
    """Finetune encoders and head on raw pairs; writes a run folder that ``predict`` accepts.

    ``encoders`` (text, image) may be given ready-made instead of by name (tests, benchmarks).
    Returns the validation metrics of the best epoch.
    """
    out = Path(out)
    if resume:
        run_config = read_config(out)
        config = from_dict(FinetuneConfig, run_config["finetune"]).validate()
        text, image = encoders if encoders is not None else build_encoders(run_config["encoders"])
    else:
        config.validate()
        named = {"text": {"encoder": text_encoder, "options": {}}, "image": {"encoder": image_encoder, "options": {}}}
        if from_run is not None:
            named = read_config(from_run)["encoders"]
        text, image = encoders if encoders is not None else build_encoders(named)
        run_config = plan_run(
            data_dir, config, from_run=from_run, text_encoder=text, image_encoder=image, head=head
        )
        prepare_run_dir(out, overwrite)
        write_json(out / CONFIG_FILE, run_config)
    reuse_freed_memory()  # the encoders' large activations and gradients, as in extraction (extract/memory.py)
    torch.manual_seed(config.seed)  # before the head is built, so the same seed starts from the same head
    model = PairModel(text, image, create_run_head(run_config))
    if from_run is not None and not resume:
        model.head.load_state_dict(torch.load(Path(from_run) / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return _train(model, data_dir, out, run_config, config, device, resume=resume, workers=workers, progress=progress)


def _train(
    model: PairModel,
    data_dir: Path,
    out: Path,
    run_config: dict[str, Any],
    config: FinetuneConfig,
    device: torch.device,
    *,
    resume: bool,
    workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    guids, labels = labelled_rows(data_dir)
    train_rows, val_rows = _rows_of(guids, set(run_config["val_guids"]))
    torch.manual_seed(config.seed)
    trainable = set_trainable(model, config.unfreeze)
    model.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, trainable, config))
    workers = default_workers() if workers is None else workers
    augment = augmentation(model.image_encoder.image_size) if config.augment else None
    train_set = RawPairs(model, data_dir, [guids[r] for r in train_rows], labels[train_rows].tolist(), augment)
    val_set = RawPairs(model, data_dir, [guids[r] for r in val_rows], labels[val_rows].tolist())
    batches = math.ceil(len(train_set) / config.batch_size)
    if config.max_steps_per_epoch is not None:
        batches = min(batches, config.max_steps_per_epoch * config.grad_accum)
    steps_per_epoch = math.ceil(batches / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(steps_per_epoch * config.epochs, config.warmup, config.schedule)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    criterion = training_loss(config, labels[train_rows], len(LABELS), device)
    forward = torch.compile(model) if config.compile else model
    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "stale": 0, "history": [], "best_metrics": None}
    if resume:
        checkpoint = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = checkpoint["state"]
        _set_rng_state(checkpoint["rng"], device)
    started = time.perf_counter()
    while state["epoch"] < config.epochs and state["stale"] < config.patience:
        epoch = state["epoch"]
        _train_mode(model)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, shuffle=True, collate_fn=train_set.collate,
            num_workers=workers, pin_memory=device.type == "cuda", drop_last=False,
            # Seeded per epoch, so batch order and augmentations replay exactly after --resume.
            generator=torch.Generator().manual_seed(config.seed * 1000 + epoch),
        )
        bar = tqdm(total=batches, desc=f"finetune epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not progress)
        total_loss, seen, epoch_started = 0.0, 0, time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for index, (batch, targets) in enumerate(loader):
            if index >= batches:
                break
            targets = targets.to(device)
            with autocast(device, config.precision):
                logits = forward(*move_batch(batch, device))  # (B, C)
            loss = criterion(logits.float(), targets)
            scaler.scale(loss / config.grad_accum).backward()
            if (index + 1) % config.grad_accum == 0 or index + 1 == batches:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            total_loss += float(loss.detach()) * len(targets)
            seen += len(targets)
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - epoch_started
        probabilities = predict_raw(model, val_set, device=device, batch_size=2 * config.batch_size,
                                    precision=config.precision, workers=workers)
        metrics = evaluate(labels[val_rows], probabilities.argmax(1).numpy())
        state["history"].append({
            "epoch": epoch + 1, "train_loss": total_loss / max(seen, 1), "val_accuracy": metrics["accuracy"],
            "val_macro_f1": metrics["macro_f1"], "train_steps": math.ceil(min(index + 1, batches) / config.grad_accum),
            "train_seconds": train_seconds, "seconds": time.perf_counter() - started,
        })
        if metrics["macro_f1"] > state["best_f1"]:
            state.update(best_f1=metrics["macro_f1"], best_epoch=epoch + 1, stale=0, best_metrics=metrics)
            save_pair_model(model, out / WEIGHTS_FILE)
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        checkpoint = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "state": state, "rng": _rng_state(device),
        }
        torch.save(checkpoint, out / f"{CHECKPOINT_FILE}.tmp")
        (out / f"{CHECKPOINT_FILE}.tmp").replace(out / CHECKPOINT_FILE)
        write_json(out / METRICS_FILE, {
            "validation": state["best_metrics"], "best_epoch": state["best_epoch"], "history": state["history"],
            "device": str(device), "precision": config.precision, "train_size": len(train_set),
            "val_size": len(val_set),
        })
        if progress:
            tqdm.write(f"epoch {epoch + 1}: val accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f}")
    (out / "report.txt").write_text(format_report(state["best_metrics"]) + "\n")
    return state["best_metrics"]
