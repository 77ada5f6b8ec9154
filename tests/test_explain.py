"""Explanations: IG finds the token and patch a head reads, every head gets sane weights, words and PNGs come out."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fusion.config import AttentionHeadConfig
from fusion.explain import Explanation, Word, explain, merge_words, patch_grid, render_patches, words_html
from fusion.registry import create_head, head_names

T, P, C = 6, 4, 3  # tokens, patches (a 2×2 grid), classes
TEXT_DIM, IMAGE_DIM, HIDDEN = 8, 6, 8
REAL_TOKENS, REAL_PATCHES = 4, 3  # the rest is padding


class OneTokenOnePatch(nn.Module):
    """Class 0's logit reads token 2 and patch 1 only; the other logits are constant."""

    modalities = ("text", "image")

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, text, text_mask, image, image_mask):
        first = torch.tanh(text[:, 2].sum(-1)) + 2 * torch.tanh(image[:, 1].sum(-1))  # (B,)
        return torch.stack([first * self.scale, torch.zeros_like(first), torch.ones_like(first)], dim=1)  # (B, C)


def post(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One post: T tokens of which the first REAL_TOKENS are real, P patches of which REAL_PATCHES are.

    Padding holds garbage: a head never reads it, and its weight must be exactly zero anyway.
    """
    generator = torch.Generator().manual_seed(seed)
    text_mask = (torch.arange(T) < REAL_TOKENS)[None]  # (1, T)
    image_mask = (torch.arange(P) < REAL_PATCHES)[None]  # (1, P)
    text = torch.randn(1, T, TEXT_DIM, generator=generator).abs() * 0.5  # (1, T, D_text)
    image = torch.randn(1, P, IMAGE_DIM, generator=generator).abs() * 0.5  # (1, P, D_image)
    text = torch.where(text_mask[..., None], text, 7 + 3 * torch.randn(text.shape, generator=generator))
    image = torch.where(image_mask[..., None], image, 7 + 3 * torch.randn(image.shape, generator=generator))
    return text, text_mask, image, image_mask


def test_the_token_and_patch_the_head_reads_rank_first():
    head = OneTokenOnePatch()
    text, text_mask, image, image_mask = post()
    explanation = explain(head, text, text_mask, image, image_mask, target="positive")
    assert explanation.target == "positive"
    assert int(np.argmax(np.abs(explanation.token_weights))) == 2
    assert int(np.argmax(np.abs(explanation.patch_weights))) == 1
    assert explanation.token_weights[2] > 0 and explanation.patch_weights[1] > 0
    others = np.delete(explanation.token_weights, 2), np.delete(explanation.patch_weights, 1)
    assert np.all(others[0] == 0) and np.all(others[1] == 0)
    # completeness: the weights share out logit(post) − logit(zeros), up to IG's delta
    with torch.no_grad():
        gap = float(head(text, text_mask, image, image_mask)[0, 0] - head(
            torch.zeros_like(text), text_mask, torch.zeros_like(image), image_mask)[0, 0])
    assert explanation.logit_gap == pytest.approx(gap, abs=1e-5)
    total = explanation.token_weights.sum() + explanation.patch_weights.sum()
    assert total - explanation.logit_gap == pytest.approx(explanation.delta, abs=1e-5)
    assert abs(explanation.delta) < 1e-3 * abs(gap)


def test_default_target_is_the_prediction_and_probabilities_are_the_heads():
    head = OneTokenOnePatch()
    inputs = post()
    explanation = explain(head, *inputs)
    probabilities = torch.softmax(head(*inputs)[0], dim=-1)
    assert explanation.label == explanation.target == ["positive", "neutral", "negative"][int(probabilities.argmax())]
    assert list(explanation.probabilities.values()) == pytest.approx(probabilities.tolist())
    assert np.all(explain(head, *inputs, target=1).token_weights == 0)  # class 1 reads nothing
    with pytest.raises(ValueError, match="unknown target class 'happy'"):
        explain(head, *inputs, target="happy")


def make_head(name: str) -> nn.Module:
    torch.manual_seed(0)
    config = AttentionHeadConfig(text_dim=TEXT_DIM, image_dim=IMAGE_DIM, image_length=P, hidden=HIDDEN, num_heads=2)
    head = create_head(name, config.validate())
    with torch.no_grad():  # move away from the initialisation's symmetric, zero-bias point
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return head


@pytest.mark.parametrize("name", head_names())
def test_every_head_gets_finite_weights_zero_where_masked_or_unread(name):
    head = make_head(name).train()
    explanation = explain(head, *post(), steps=16)
    assert head.training  # left in the mode it came in
    assert explanation.token_weights.shape == (T,) and explanation.patch_weights.shape == (P,)
    assert np.isfinite(explanation.token_weights).all() and np.isfinite(explanation.patch_weights).all()
    assert np.all(explanation.token_weights[REAL_TOKENS:] == 0)
    assert np.all(explanation.patch_weights[REAL_PATCHES:] == 0)
    for modality, weights in (("text", explanation.token_weights), ("image", explanation.patch_weights)):
        assert np.any(weights != 0) == (modality in head.modalities), modality
    assert np.isfinite(explanation.delta)
    json.dumps(explanation.to_dict())


@pytest.mark.parametrize("name", head_names())
def test_a_skipped_image_weighs_nothing_and_breaks_nothing(name):
    text, text_mask, image, image_mask = post()
    with torch.inference_mode():  # as predict makes features
        image, image_mask = torch.zeros_like(image), torch.zeros_like(image_mask)
    explanation = explain(make_head(name), text, text_mask, image, image_mask, steps=8)
    assert np.all(explanation.patch_weights == 0)
    assert np.isfinite(explanation.token_weights).all()


@pytest.fixture
def ocr_encoder(tiny_text_encoder_dir):
    from extract.registry import create_text_encoder

    return create_text_encoder(str(tiny_text_encoder_dir), max_tokens=16, ocr=True)


def test_word_pieces_are_summed_special_tokens_dropped_and_image_text_marked(ocr_encoder):
    item = ("Happy legday", "sad")
    tokenized = ocr_encoder.tokenize_item(item)
    ids = tokenized["encoding"]["input_ids"]
    assert ids == ocr_encoder.collate([item])["input_ids"][0].tolist()  # the positions the features have
    tokens = tokenized["encoding"].tokens()  # [CLS] happy l ##e ##g ##d ##a ##y [SEP] sad [SEP]
    assert tokens[:3] == ["[CLS]", "happy", "l"] and tokens[-2:] == ["sad", "[SEP]"]
    weights = np.arange(1, len(ids) + 1, dtype=np.float32)  # token i weighs i + 1
    words = merge_words(tokenized, np.concatenate([weights, np.zeros(3, np.float32)]))  # padding after: fine
    assert [(w.text, w.segment, w.ocr) for w in words] == [
        ("Happy", 0, False), ("legday", 0, False), ("sad", 1, True)]
    assert [w.weight for w in words] == [2.0, sum(range(3, 9)), 10.0]  # legday: its six pieces
    assert (words[1].start, words[1].end) == (6, 12)
    with pytest.raises(ValueError, match="do not fit the post's 11 tokens"):
        merge_words(tokenized, weights[:5])


@pytest.mark.parametrize("item", [
    ("good news", ""), ("happy " * 12, "sad " * 12), ("win", "the news at noon today meeting rain lost awful bad")])
def test_tokenize_item_gives_the_positions_collate_gives(ocr_encoder, item):
    """Truncated longest-first at 16 tokens, or the tweet alone without image text: as the features were made."""
    assert ocr_encoder.tokenize_item(item)["encoding"]["input_ids"] == ocr_encoder.collate([item])["input_ids"][
        0].tolist()


def test_the_image_text_alone_is_all_ocr(tiny_text_encoder_dir):
    from extract.registry import create_text_encoder

    encoder = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=16, image_text_only=True)
    tokenized = encoder.tokenize_item("sad day")
    words = merge_words(tokenized, np.ones(len(tokenized["encoding"]["input_ids"])))
    assert [(w.text, w.segment, w.ocr) for w in words] == [("sad", 0, True), ("day", 0, True)]


def test_a_post_without_image_text_has_no_ocr_words(ocr_encoder, tiny_text_encoder):
    with_ocr, alone = ocr_encoder.tokenize_item(("good news", "")), tiny_text_encoder.tokenize_item("good news")
    assert with_ocr["encoding"]["input_ids"] == alone["encoding"]["input_ids"]
    assert with_ocr["image_text"] is alone["image_text"] is None
    words = merge_words(alone, np.ones(len(alone["encoding"]["input_ids"])))
    assert [(w.text, w.ocr) for w in words] == [("good", False), ("news", False)]


def test_words_html_shades_and_escapes():
    words = [Word("@", 0.2, 0, False, 0, 1), Word("<b>", 1.0, 0, False, 1, 4), Word("ok", 0.1, 0, False, 5, 7),
             Word("sad", -0.5, 1, True, 0, 3)]
    snippet = words_html(words, "negative")
    assert "&lt;b&gt;" in snippet and "<b>" not in snippet
    assert "@</span><span" in snippet and "&gt;</span> <span" in snippet  # spaces only where the text had them
    assert "rgba(200, 30, 30, 1.00)" in snippet and "rgba(30, 80, 200, 0.50)" in snippet
    assert snippet.index("image text:") < snippet.index("sad")
    explanation = Explanation("negative", "negative", {}, np.zeros(2), np.zeros(4), 0.0, 0.0, 8)
    assert json.loads(json.dumps(dataclasses.replace(explanation, words=words).to_dict()))["words"][3]["ocr"]


@pytest.mark.parametrize("patches", [4, 5])  # a 2×2 grid; the same after a class token (CLIP)
def test_patch_png_has_the_image_size(tmp_path, patches):
    image = Image.new("RGB", (33, 77), (120, 60, 30))
    weights = np.linspace(-1, 1, patches)
    path = render_patches(image, weights, tmp_path / "patches.png", "positive")
    with Image.open(path) as written:
        assert written.size == (33, 77)
    assert [p.name for p in tmp_path.iterdir()] == ["patches.png"]
    grid, dropped = patch_grid(weights)
    assert grid.shape == (2, 2) and dropped == (patches == 5)


def test_patches_that_form_no_grid_are_refused():
    with pytest.raises(ValueError, match="7 patch weights form no square grid"):
        patch_grid(np.zeros(7))
