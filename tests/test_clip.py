"""The ``clip:`` encoder family on a tiny random CLIP checkpoint saved to a folder (no network).

The folder holds what a real checkpoint holds: a ``CLIPModel`` (text hidden 32, vision hidden 24,
2 layers each, 32 px images in 8 px patches: 16 patches) and a BPE tokenizer built from a generated
vocab.json + merges.txt, so every test goes through ``create_*_encoder("clip:<folder>")``.
"""

from __future__ import annotations

import json
import string
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_WORDS

from extract.cache import load_features
from extract.encoders.clip import CLIPImageEncoder, CLIPTextEncoder
from extract.encoders.hf_text import EncoderUnavailableError
from extract.registry import create_encoder, create_image_encoder, create_text_encoder
from extract.run import extract_features

TEXT_DIM, IMAGE_DIM, LAYERS = 32, 24, 2
IMAGE_SIZE, PATCH = 32, 8
PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16
POSITIONS, MAX_TOKENS = 20, 16
TEXTS = ["happy day", "the news at noon today was sad and bad", "love", "rain ??? …"]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _write_bpe_files(folder: Path) -> None:
    """A tiny CLIP BPE vocabulary: every printable ASCII character, alone and word-final, plus merges
    that rebuild the data folder's words, so ``happy`` is one token and any ASCII text is covered."""
    chars = [c for c in string.printable if not c.isspace()]
    tokens = [BOS, EOS, *chars, *(c + "</w>" for c in chars)]
    merges: list[str] = []
    for word in sorted({w for pool in CLASS_WORDS.values() for w in pool}):
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if f"{merged} {piece}" not in merges:
                merges.append(f"{merged} {piece}")
                tokens.append(merged + piece)
            merged += piece
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(dict.fromkeys(tokens))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local CLIP folder: seeded random ``CLIPModel`` and its ``CLIPTokenizer``. Do not modify."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    folder = tmp_path_factory.mktemp("tiny-clip")
    _write_bpe_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)  # the vocab.json + merges.txt route
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=LAYERS,
        num_attention_heads=4, max_position_embeddings=POSITIONS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_text(tiny_clip_dir: Path) -> CLIPTextEncoder:
    return create_text_encoder(f"clip:{tiny_clip_dir}", max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def clip_image(tiny_clip_dir: Path) -> CLIPImageEncoder:
    return create_image_encoder(f"clip:{tiny_clip_dir}")


# --- name resolution --------------------------------------------------------------------------------------


def test_clip_prefix_resolves_both_sides(clip_text, clip_image, tiny_clip_dir):
    assert isinstance(clip_text, CLIPTextEncoder) and isinstance(clip_image, CLIPImageEncoder)
    assert clip_text.name == clip_image.name == f"clip:{tiny_clip_dir}"
    assert (clip_text.kind, clip_text.dim, clip_text.length) == ("text", TEXT_DIM, MAX_TOKENS)
    assert (clip_image.kind, clip_image.dim, clip_image.length) == ("image", IMAGE_DIM, 1 + PATCHES)


def test_each_side_keeps_only_its_tower(clip_text, clip_image):
    assert not any(name.startswith("vision") for name, _ in clip_text.named_parameters())
    assert not any(name.startswith("text") for name, _ in clip_image.named_parameters())


def test_unknown_names_mention_clip():
    with pytest.raises(ValueError, match="'clip:<model id>'"):
        create_text_encoder("nope")
    with pytest.raises(ValueError, match="'clip:<model id>'"):
        create_image_encoder("nope")


def test_non_clip_checkpoint_refused(tiny_text_encoder_dir):
    with pytest.raises(ValueError, match="is a 'bert' checkpoint, not a CLIP one"):
        create_image_encoder(f"clip:{tiny_text_encoder_dir}")


# --- text -------------------------------------------------------------------------------------------------


def test_tokenizer_reads_the_generated_merges(clip_text):
    tokens = clip_text.tokenizer.convert_ids_to_tokens(clip_text.tokenizer("Happy sad")["input_ids"])
    assert tokens == [BOS, "happy</w>", "sad</w>", EOS]  # lowercased, whole words from merges.txt


def test_text_shapes_and_mask(clip_text):
    expected = clip_text.tokenizer(TEXTS, padding=True, truncation=True, max_length=MAX_TOKENS)["attention_mask"]
    with torch.no_grad():
        features, mask = clip_text.encode(TEXTS)
    assert features.shape == (len(TEXTS), len(expected[0]), TEXT_DIM)  # (B, T, D)
    assert mask.dtype == torch.bool and mask.tolist() == [[bool(m) for m in row] for row in expected]
    assert not mask.all()  # the batch really has padding
    assert torch.isfinite(features).all()


def test_text_padding_does_not_change_real_tokens(clip_text):
    # CLIP's text transformer is causal: tokens never see the padding that follows them.
    with torch.no_grad():
        alone, alone_mask = clip_text.encode(["happy day"])
        batch, batch_mask = clip_text.encode(["happy day", "the news at noon today was sad and bad"])
    real = int(alone_mask.sum())
    assert alone.shape[1] == real < batch.shape[1]
    assert batch_mask[0, :real].all() and not batch_mask[0, real:].any()
    torch.testing.assert_close(batch[0, :real], alone[0], atol=1e-5, rtol=0)


def test_text_max_tokens_caps_length(tiny_clip_dir):
    encoder = create_text_encoder(f"clip:{tiny_clip_dir}", max_tokens=5)
    with torch.no_grad():
        features, mask = encoder.encode([" ".join(["happy"] * 50)])
    assert features.shape == (1, 5, TEXT_DIM) and mask.all()


@pytest.mark.parametrize(("max_tokens", "message"), [(1, "at least 2"), (POSITIONS + 1, f"the {POSITIONS} positions")])
def test_text_max_tokens_out_of_range(tiny_clip_dir, max_tokens, message):
    with pytest.raises(ValueError, match=message):
        create_text_encoder(f"clip:{tiny_clip_dir}", max_tokens=max_tokens)


def test_text_preprocessing(clip_text, tiny_clip_dir):
    pre = clip_text.preprocessing()
    assert pre["model_id"] == tiny_clip_dir.name  # not the absolute tmp path
    assert (pre["tokenizer"], pre["lowercase"], pre["max_tokens"]) == ("CLIPTokenizer", True, MAX_TOKENS)
    assert pre["vocab_size"] == len(clip_text.tokenizer)
    assert clip_text.options == {"max_tokens": MAX_TOKENS, "normalize": []}


# --- image ------------------------------------------------------------------------------------------------


def test_image_shapes_mask_and_class_token(clip_image, data_dir, data_spec):
    pixels = [clip_image.read(data_dir, guid) for guid in data_spec.guids[:3]]
    assert all(p.shape == (3, IMAGE_SIZE, IMAGE_SIZE) for p in pixels)  # squashed from any size
    with torch.no_grad():
        features, mask = clip_image.encode(pixels)
        pooled = clip_image.model(pixel_values=torch.stack(pixels)).pooler_output  # (B, D)
    assert features.shape == (3, 1 + PATCHES, IMAGE_DIM)  # (B, 1 + P, D)
    assert mask.shape == (3, 1 + PATCHES) and mask.dtype == torch.bool and mask.all()
    torch.testing.assert_close(features[:, 0], pooled)  # position 0 is CLIP's pooled image output
    assert torch.isfinite(features).all()


def test_image_reads_every_mode(clip_image, data_dir, data_spec):
    for guid in (data_spec.grey_guid, data_spec.cmyk_guid, data_spec.palette_guid, data_spec.rgba_guid):
        assert clip_image.read(data_dir, guid).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_image_preprocessing_uses_clip_statistics(clip_image):
    from PIL import Image
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    pre = clip_image.preprocessing()
    assert (pre["image_size"], pre["patches"]) == (IMAGE_SIZE, PATCHES)
    assert pre["mean"] == pytest.approx(OPENAI_CLIP_MEAN, abs=1e-6)  # recorded to 6 decimals
    assert pre["std"] == pytest.approx(OPENAI_CLIP_STD, abs=1e-6)
    assert "class token" in pre["tokens"]
    pixel = clip_image.pixels(Image.new("RGB", (40, 30), (255, 0, 128)))[:, 5, 5]
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    torch.testing.assert_close(pixel, torch.tensor(expected), atol=1e-5, rtol=0)


# --- finetuning blocks, fingerprints, rebuilding ----------------------------------------------------------


@pytest.mark.parametrize("side", ["clip_text", "clip_image"])
def test_blocks_cover_every_parameter_once(side, request):
    encoder = request.getfixturevalue(side)
    blocks = encoder.blocks()
    assert len(blocks) == 1 + LAYERS  # embeddings, then one block per layer (last one with the final norm)
    owned = [id(p) for block in blocks for p in block.parameters()]
    assert len(owned) == len(set(owned))
    assert set(owned) == {id(p) for p in encoder.parameters()}


def test_fingerprints_stable_across_loads_and_distinct(clip_text, clip_image, tiny_clip_dir):
    text_again = create_text_encoder(f"clip:{tiny_clip_dir}", max_tokens=MAX_TOKENS)
    image_again = create_image_encoder(f"clip:{tiny_clip_dir}")
    assert text_again.describe() == clip_text.describe()
    assert image_again.describe() == clip_image.describe()
    assert clip_text.describe()["fingerprint"] != clip_image.describe()["fingerprint"]


@pytest.mark.parametrize(("kind", "side"), [("text", "clip_text"), ("image", "clip_image")])
def test_rebuilt_from_description(kind, side, request):
    description = request.getfixturevalue(side).describe()
    rebuilt = create_encoder(kind, description["encoder"], **description["options"])
    assert rebuilt.describe() == description


# --- extraction into the cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["clip_text", "clip_image"])
def test_extract_round_trip(side, request, data_dir, data_spec, tmp_path):
    encoder = request.getfixturevalue(side)
    guids = data_spec.guids
    summary = extract_features(encoder, data_dir, tmp_path / "cache", batch_size=8, num_workers=0, progress=False)
    assert (summary.total, summary.encoded, summary.skipped) == (len(guids), len(guids), [])
    cached = load_features(summary.path, guids, expected=encoder.describe())
    assert cached.features.shape == (len(guids), encoder.length, encoder.dim)  # (N, L, D)
    assert cached.mask.shape == (len(guids), encoder.length) and cached.mask[:, 0].all()
    guid = data_spec.utf8_guid  # accents and emoji: bytes the tiny vocabulary lacks become the unknown token
    with torch.no_grad():
        fresh, fresh_mask = encoder.encode([encoder.read(data_dir, guid)])
    row = guids.index(guid)
    real = int(fresh_mask.sum())
    assert cached.mask[row].sum() == real
    np.testing.assert_allclose(cached.features[row, :real], fresh[0, :real].numpy(), atol=2e-2, rtol=1e-2)
    again = extract_features(encoder, data_dir, tmp_path / "cache", num_workers=0, progress=False)
    assert again.encoded == 0  # resumable: nothing left to encode


# --- offline ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "image"])
def test_hub_id_offline_is_one_line(kind, tmp_path, monkeypatch):
    import huggingface_hub.constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub reads these once at import, which an earlier test may already have done.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    name = "clip:openai/clip-vit-base-patch32"
    started = time.perf_counter()
    with pytest.raises(EncoderUnavailableError, match=f"cannot load {kind} encoder '{name}'") as info:
        create_encoder(kind, name)
    assert time.perf_counter() - started < 20  # no retries against an unreachable hub
    assert "\n" not in str(info.value)
