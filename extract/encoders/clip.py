"""CLIP text and image encoders through transformers, by hub id or local folder: ``clip:<id or folder>``.

The encoder to use when online: ``--text-encoder clip:openai/clip-vit-base-patch32 --image-encoder
clip:openai/clip-vit-base-patch32`` downloads the checkpoint into the Hugging Face cache on first use.
Frozen CLIP ViT-B/32 features with a small head are *reported* at about 0.79 accuracy on MVSA-Single
(a published figure, not measured here: no CLIP weights can be downloaded on this machine).
Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021).

Both encoders load the whole ``CLIPModel`` checkpoint and keep their own tower (the other is freed):
a CLIP checkpoint holds both, so loading it for either side needs no other file, and loading a tower
class alone would report every weight of the other tower as unexpected. The projections into the
joint space (``text_projection``, ``visual_projection``) are not applied: they are linear, and every
fusion head learns its own projection of each stream.

* Text: per-token states of the text transformer after its final layer norm, ``(B, T, D_text)``, and
  the padding mask. The text transformer is causal, so right padding leaves the real tokens' states
  unchanged; the last real token (end of text) is the one CLIP projects as the text embedding.
  ``max_tokens`` is capped by the position table (77 for the released models).
* Image: the vision transformer's tokens after its post layer norm, ``(B, 1 + P, D_vision)``.
  Position 0 is the class token, exactly CLIP's pooled image output before the projection, so the
  summary CLIP aligned with text is one token away for any head; positions 1… are the
  P = (S / patch)² patches, row by row. Pixels are squashed to S × S (S from the vision config, no
  centre crop, as for every image encoder here: see ``PatchImageEncoder``) and normalised with
  CLIP's mean and std, not ImageNet's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from extract.dataset import read_text
from extract.encoders.base import PatchImageEncoder, TextEncoder
from extract.encoders.hf_text import DEFAULT_MAX_TOKENS, EncoderUnavailableError, quiet_loading
from extract.normalize import normalize_text, preprocessing_record, resolve_rules

if TYPE_CHECKING:
    from transformers import CLIPModel


def _load_clip(model_id: str, kind: str) -> CLIPModel:
    """The whole checkpoint; a folder or hub id that is not a CLIP checkpoint fails here, not later."""
    from transformers import AutoConfig, CLIPModel

    try:
        config = AutoConfig.from_pretrained(model_id)
        if config.model_type != "clip":
            # CLIPModel would load it anyway, with random weights and a warning that scrolls past.
            raise ValueError(
                f"{kind} encoder 'clip:{model_id}' is a {config.model_type!r} checkpoint, not a CLIP one "
                f"(model_type 'clip'); use 'hf:{model_id}' for other Hugging Face text models"
            )
        with quiet_loading():
            return CLIPModel.from_pretrained(model_id, config=config)
    except OSError as error:
        raise EncoderUnavailableError(
            f"cannot load {kind} encoder 'clip:{model_id}': it is neither a local CLIP folder nor in the "
            "Hugging Face cache, and the hub could not be reached (offline?); download it once online or use "
            "the embedded encoders"
        ) from error


def _model_label(model_id: str) -> str:
    """The hub id, or only the folder's name: caches must not depend on where a folder lies."""
    return Path(model_id).name if Path(model_id).is_dir() else model_id


def _side(value: int | Sequence[int], what: str) -> int:
    """One side of a square size from a CLIP vision config (an int, or a pair of equal ints)."""
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"CLIP {what} {list(value)} is not square; only square inputs are supported")


class CLIPTextEncoder(TextEncoder):
    """Per-token states of CLIP's text transformer, with its padding mask: (B, T, D), (B, T)."""

    def __init__(
        self,
        model_id: str,
        *,
        name: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        normalize: str | Sequence[str] | None = "none",
    ):
        super().__init__()
        from transformers import CLIPTokenizer

        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (room for the special tokens), got {max_tokens}")
        self.normalize = resolve_rules(normalize)  # before loading: a typo fails without the load's cost
        clip = _load_clip(model_id, "text")
        positions = clip.config.text_config.max_position_embeddings
        if max_tokens > positions:
            raise ValueError(
                f"max_tokens={max_tokens} exceeds the {positions} positions of CLIP text model {model_id!r}; "
                f"use at most {positions}"
            )
        try:
            # Not AutoTokenizer: a folder with only vocab.json and merges.txt names no tokenizer class.
            self.tokenizer = CLIPTokenizer.from_pretrained(model_id)
        except OSError as error:
            raise EncoderUnavailableError(f"cannot load the tokenizer of text encoder 'clip:{model_id}'") from error
        self.model = clip.text_model.eval()  # CLIPTextModel: embeddings, encoder.layers, final_layer_norm
        self.model_id = model_id
        self.name = name or f"clip:{model_id}"
        self.max_tokens = max_tokens
        self.options = {"max_tokens": max_tokens, "normalize": list(self.normalize)}
        self.dim = clip.config.text_config.hidden_size
        self.length = max_tokens

    def read(self, data_dir: Path, guid: str) -> str:
        return read_text(data_dir, guid)

    def collate(self, items: list[str]) -> dict[str, torch.Tensor]:
        items = [normalize_text(text, self.normalize) for text in items]
        batch = self.tokenizer(items, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}  # (B, T) each

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text_tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        return text_tokens, attention_mask.bool()  # mask (B, T), True = real token

    def blocks(self) -> list[nn.Module]:
        """Token and position embeddings, then each layer; the final layer norm goes with the last layer."""
        layers = list(self.model.encoder.layers)
        return [self.model.embeddings, *layers[:-1], nn.ModuleList([layers[-1], self.model.final_layer_norm])]

    def preprocessing(self) -> dict[str, Any]:
        return {
            "model_id": _model_label(self.model_id),
            "tokenizer": type(self.tokenizer).__name__,
            "vocab_size": len(self.tokenizer),
            "lowercase": True,  # CLIPTokenizer's normaliser lowercases every text
            "max_tokens": self.max_tokens,
            "text": "utf-8 else gb18030, whitespace collapsed",
            **preprocessing_record(self.normalize),
        }


class CLIPImageEncoder(PatchImageEncoder):
    """CLIP's vision tokens, class token first: (B, 1 + P, D), mask all True.

    Reads, resizes, normalises and batches pixels like every ``PatchImageEncoder``; only the network
    (a vision transformer, not a feature map) and its blocks differ.
    """

    def __init__(self, model_id: str, *, name: str | None = None):
        super().__init__()
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        clip = _load_clip(model_id, "image")
        config = clip.config.vision_config
        self.model = clip.vision_model.eval()  # embeddings, pre_layrnorm, encoder.layers, post_layernorm
        self.model_id = model_id
        self.name = name or f"clip:{model_id}"
        self.options = {}
        self.image_size = _side(config.image_size, "image_size")
        self.patches = (self.image_size // _side(config.patch_size, "patch_size")) ** 2  # P = (S / patch)²
        self.mean, self.std = tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
        self.dim = config.hidden_size
        self.length = 1 + self.patches  # the class token, then the patches

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + P, D), before the post layer norm
        image_tokens = self.model.post_layernorm(hidden)  # (B, 1 + P, D); [:, 0] is CLIP's pooled output
        mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=pixels.device)  # (B, 1 + P)
        return image_tokens, mask

    def for_inference(self) -> CLIPImageEncoder:
        return self  # a vision transformer: no batch norm to fold, no convolution layout to change

    def blocks(self) -> list[nn.Module]:
        """Patch embedding with the pre layer norm, then each layer; the post layer norm goes with the last."""
        layers = list(self.model.encoder.layers)
        stem = nn.ModuleList([self.model.embeddings, self.model.pre_layrnorm])
        return [stem, *layers[:-1], nn.ModuleList([layers[-1], self.model.post_layernorm])]

    def preprocessing(self) -> dict[str, Any]:
        return {
            **super().preprocessing(),
            "model_id": _model_label(self.model_id),
            "patches": self.patches,
            "tokens": "class token, then the patches row by row; after the post layer norm",
        }

