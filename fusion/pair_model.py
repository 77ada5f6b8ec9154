"""Encoders and a fusion head as one module: raw pairs in, logits out.

``finetune`` trains it end to end; ``predict`` uses it for posts that are not in a
cache (a single new post, or any pair for a finetuned run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from extract.encoders.base import ImageEncoder, TextEncoder
from fusion.features import stream_descriptions
from fusion.layers import normalise_features
from fusion.precision import autocast


class PairModel(nn.Module):
    def __init__(self, text_encoder: TextEncoder, image_encoder: ImageEncoder, head: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.head = head

    def forward(self, text_inputs: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        text_tokens, text_mask = self.text_encoder(**text_inputs)  # (B, T, D_text), (B, T)
        image_patches, image_mask = self.image_encoder(pixels)  # (B, P, D_image), (B, P)
        text_tokens, image_patches = normalise_features(text_tokens.float()), normalise_features(image_patches.float())
        return self.head(text_tokens, text_mask, image_patches, image_mask)  # (B, C)


def move_batch(batch: tuple[dict[str, torch.Tensor], torch.Tensor], device: torch.device) -> tuple[Any, ...]:
    text_inputs, pixels = batch
    non_blocking = device.type == "cuda"
    return (
        {key: value.to(device, non_blocking=non_blocking) for key, value in text_inputs.items()},
        pixels.to(device, non_blocking=non_blocking),
    )


def build_encoders(descriptions: dict[str, dict[str, Any]]) -> tuple[TextEncoder, ImageEncoder]:
    """Rebuild the text and image encoders from their recorded descriptions (name and options)."""
    from extract.registry import create_encoder

    for kind, description in descriptions.items():
        if len(stream_descriptions(description)) > 1:
            raise ValueError(
                f"the run reads several {kind} encoders ({description['encoder']}); end-to-end models take one "
                "text and one image encoder"
            )
    text, image = (create_encoder(kind, d["encoder"], **d["options"]) for kind, d in descriptions.items())
    return text, image


def save_pair_model(model: PairModel, path: Path) -> None:
    tmp = Path(f"{path}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


class RawPairs(torch.utils.data.Dataset):
    """(text, pixels, label) of each guid, read from the data folder; images decoded once per visit."""

    def __init__(
        self,
        model: PairModel,
        data_dir: Path,
        guids: list[str],
        labels: list[int] | None = None,
        augment: Any = None,  # a PIL → PIL transform applied before the encoder's preprocessing
    ):
        self.text_encoder, self.image_encoder = model.text_encoder, model.image_encoder
        self.data_dir, self.guids, self.augment = Path(data_dir), guids, augment
        self.labels = labels if labels is not None else [-1] * len(guids)
        if getattr(self.text_encoder, "ocr", False):  # image text read here once, not in every worker every epoch
            for guid in guids:
                self.text_encoder.read(self.data_dir, guid)

    def __len__(self) -> int:
        return len(self.guids)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, int]:
        from extract.dataset import image_path, load_image

        guid = self.guids[index]
        image = load_image(image_path(self.data_dir, guid), guid)
        if self.augment is not None:
            image = self.augment(image)
        return self.text_encoder.read(self.data_dir, guid), self.image_encoder.pixels(image), self.labels[index]

    def collate(self, items: list[tuple[str, torch.Tensor, int]]) -> tuple[tuple[Any, ...], torch.Tensor]:
        texts, pixels, labels = zip(*items)
        text_inputs = self.text_encoder.collate(list(texts))
        return (text_inputs, torch.stack(pixels)), torch.tensor(labels)  # pixels (B, 3, S, S)


@torch.inference_mode()
def predict_raw(
    model: PairModel,
    dataset: RawPairs,
    *,
    device: torch.device,
    batch_size: int = 32,
    precision: str = "fp32",
    workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Class probabilities (N, C) of raw pairs, encoders run on the fly."""
    from tqdm import tqdm

    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, collate_fn=dataset.collate, num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    chunks = []
    for batch, _ in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        with autocast(device, precision):
            logits = model(*move_batch(batch, device))  # (B, C)
        chunks.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(chunks)
