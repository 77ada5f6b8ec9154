"""Shared fixtures: a tiny generated data folder and tiny random encoders (no network, no hub).

* ``data_spec``            what the generated data folder holds (labels, guids, the odd files).
* ``make_data_dir``        factory: writes that data folder under any directory.
* ``data_dir``             a fresh data folder in ``tmp_path``; tests may modify it.
* ``tiny_text_encoder_dir`` a random 2-layer BERT (D=32) and its tokenizer saved to a folder.
* ``tiny_text_encoder``    that folder loaded through ``create_text_encoder(..., max_tokens=16)``.
* ``tiny_image_encoder``   a seeded random ResNet-18 at 64 px: 2×2 = 4 patches × 512.
* ``tiny_image_encoder_name`` the same encoder registered by name, for CLI tests.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract.dataset import LABELS, TEST_FILE, TRAIN_FILE, UNLABELLED

TINY_TEXT_DIM = 32
TINY_MAX_TOKENS = 16
TINY_IMAGE_SIZE = 64
TINY_IMAGE_PATCHES = 4  # ResNet-18 downsamples 32×: 64 px → 2×2 feature map
TINY_IMAGE_DIM = 512

# Words of each class; the texts are built from them so that a text head can learn something.
CLASS_WORDS = {
    "positive": ["happy", "good", "love", "great", "sunny", "win"],
    "neutral": ["the", "news", "at", "noon", "today", "meeting"],
    "negative": ["sad", "bad", "hate", "awful", "rain", "lost"],
}
# Mean colour of each class's images, so that an image head can learn something.
CLASS_COLOURS = {"positive": (220, 50, 40), "neutral": (60, 190, 70), "negative": (40, 60, 210)}
IMAGE_SIZES = [(40, 60), (90, 90), (64, 48), (120, 80), (33, 77)]  # (width, height)

# The models here are tiny: intra-op threads only add overhead, and on a busy 2-core machine OpenMP
# threads spin against each other (measured 4× slower on this suite). One thread for the whole session.
torch.set_num_threads(1)


@dataclass(frozen=True)
class DataSpec:
    """What ``make_data_dir`` writes. Guids are strings, as in the task's files."""

    train: dict[str, str]  # guid → tag, in train.txt order; 8 of each class
    test: list[str]  # guids of test_without_label.txt, in file order
    gbk_guid: str  # text stored as GBK bytes containing "…" (b"\xa1\xad") and "好"
    gbk_text: str  # what that text decodes to
    emoji_lost_guid: str  # text with emoji that became "???"
    utf8_guid: str  # UTF-8 text with an accent and an emoji
    undecodable_guid: str  # text bytes that are neither UTF-8 nor clean GB18030 (a test guid)
    grey_guid: str  # mode "L" JPEG
    cmyk_guid: str  # mode "CMYK" JPEG
    palette_guid: str  # mode "P" PNG saved under the .jpg name
    rgba_guid: str  # mode "RGBA" PNG with a transparent corner, saved under the .jpg name
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # guid → (width, height) of its image

    @property
    def guids(self) -> list[str]:
        """Every guid, train then test: the order ``extract.run.data_guids`` returns."""
        return [*self.train, *self.test]


def _build_spec() -> DataSpec:
    tags = [label for label in LABELS for _ in range(8)]
    random.Random(0).shuffle(tags)
    train = {str(i + 1): tag for i, tag in enumerate(tags)}
    test = [str(i) for i in range(25, 31)]
    all_guids = [*train, *test]
    sizes = {guid: IMAGE_SIZES[i % len(IMAGE_SIZES)] for i, guid in enumerate(all_guids)}
    return DataSpec(
        train=train, test=test, gbk_guid="4", gbk_text="好 happy day …", emoji_lost_guid="5", utf8_guid="6",
        undecodable_guid="27", grey_guid="2", cmyk_guid="3", palette_guid="7", rgba_guid="8", sizes=sizes,
    )


SPEC = _build_spec()


def _text_bytes(spec: DataSpec, guid: str, tag: str, rng: random.Random) -> bytes:
    words = CLASS_WORDS.get(tag) or [w for pool in CLASS_WORDS.values() for w in pool]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
    if guid == spec.gbk_guid:
        return spec.gbk_text.encode("gbk")
    if guid == spec.emoji_lost_guid:
        return f"RT @someone: {text} ??? #{words[0]}".encode()
    if guid == spec.utf8_guid:
        return f"café {text} 😀\n  http://t.co/x".encode()
    if guid == spec.undecodable_guid:
        return b"broken \x80\xff\xfe bytes " + text.encode()
    return text.encode()


def _image(spec: DataSpec, guid: str, tag: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    width, height = spec.sizes[guid]
    colour = np.array(CLASS_COLOURS.get(tag, (128, 128, 128)), dtype=np.float32)
    pixels = colour + rng.normal(0.0, 25.0, size=(height, width, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    if guid == spec.grey_guid:
        return image.convert("L"), "JPEG"
    if guid == spec.cmyk_guid:
        return image.convert("CMYK"), "JPEG"
    if guid == spec.palette_guid:
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"
    if guid == spec.rgba_guid:
        rgba = image.convert("RGBA")
        rgba.paste((0, 0, 0, 0), (0, 0, width // 2, height // 2))
        return rgba, "PNG"
    return image, "JPEG"


def write_data_dir(root: Path, spec: DataSpec = SPEC) -> Path:
    """Write ``train.txt``, ``test_without_label.txt`` and ``data/{guid}.txt|.jpg`` under ``root``."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / TRAIN_FILE).write_text("guid,tag\n" + "".join(f"{g},{t}\n" for g, t in spec.train.items()))
    (root / TEST_FILE).write_text("guid,tag\n" + "".join(f"{g},{UNLABELLED}\n" for g in spec.test))
    text_rng = random.Random(1)
    image_rng = np.random.default_rng(2)
    for guid in spec.guids:
        tag = spec.train.get(guid, UNLABELLED)
        (root / "data" / f"{guid}.txt").write_bytes(_text_bytes(spec, guid, tag, text_rng))
        image, image_format = _image(spec, guid, tag, image_rng)
        image.save(root / "data" / f"{guid}.jpg", format=image_format)
    return root


@pytest.fixture(scope="session")
def data_spec() -> DataSpec:
    """Description of the generated data folder: train labels, test guids and which guid has which oddity."""
    return SPEC


@pytest.fixture
def make_data_dir() -> Callable[[Path], Path]:
    """Factory ``make_data_dir(folder) -> folder`` writing the tiny data folder described by ``data_spec``.

    24 labelled train rows (8 per class, text words and image colour depend on the class), 6 test rows
    tagged ``null``; texts in UTF-8, GBK, with lost emoji and undecodable bytes; JPEGs of varied sizes
    plus greyscale, CMYK, palette-PNG and RGBA-PNG files under ``.jpg`` names.
    """
    return write_data_dir


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh copy of the tiny data folder in ``tmp_path`` (see ``make_data_dir``); safe to modify."""
    return write_data_dir(tmp_path / "tiny-data")


def _write_vocab(folder: Path) -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += sorted({w for pool in CLASS_WORDS.values() for w in pool} | {"day", "rt", "someone", "broken", "bytes"})
    tokens += list("abcdefghijklmnopqrstuvwxyz0123456789#@:/.?…好")
    tokens += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return {token: i for i, token in enumerate(tokens)}


@pytest.fixture(scope="session")
def tiny_text_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model folder with a seeded random 2-layer ``BertModel`` (hidden 32) and a ``BertTokenizerFast``.

    The tokenizer's vocab.txt holds the special tokens, the data folder's words and single letters, so
    ``create_text_encoder(str(folder), max_tokens=16)`` loads it through AutoModel/AutoTokenizer offline.
    Session-scoped: do not modify the folder.
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = _write_vocab(folder)
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    config = BertConfig(
        hidden_size=TINY_TEXT_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=len(vocab), max_position_embeddings=128,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertModel(config)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_text_encoder(tiny_text_encoder_dir: Path):
    """A fresh ``HFTextEncoder`` loaded from ``tiny_text_encoder_dir`` with ``max_tokens=16``: (B, T≤16, 32)."""
    from extract.registry import create_text_encoder

    return create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS)


def build_tiny_image_encoder(name: str = "tiny-resnet18"):
    """Seeded random ResNet-18 at 64 px: the same weights (and fingerprint) on every call."""
    from extract.encoders.torchvision_image import TorchvisionImageEncoder

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TorchvisionImageEncoder("resnet18", name=name, weights=None, image_size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="session")
def _tiny_image_encoder_template():
    return build_tiny_image_encoder()


@pytest.fixture
def tiny_image_encoder(_tiny_image_encoder_template):
    """A fresh copy of a seeded random ResNet-18 image encoder named ``tiny-resnet18``: (B, 4, 512), 64 px.

    Every copy has the same weights, so caches written by one are accepted for another.
    """
    return copy.deepcopy(_tiny_image_encoder_template)


@pytest.fixture
def tiny_image_encoder_name(_tiny_image_encoder_template):
    """Registers ``tiny-resnet18`` in the image encoder registry for this test (e.g. ``--image-encoder``).

    ``create_image_encoder("tiny-resnet18")`` then returns a copy of ``tiny_image_encoder``'s weights.
    """
    from extract.registry import IMAGE_ENCODERS

    name = "tiny-resnet18"
    assert name not in IMAGE_ENCODERS
    # Accepts (and ignores) the recorded options, as finetune and predict rebuild encoders with them.
    IMAGE_ENCODERS[name] = lambda **options: copy.deepcopy(_tiny_image_encoder_template)
    yield name
    IMAGE_ENCODERS.pop(name, None)
