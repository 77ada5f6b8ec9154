"""Name → loader registries for text and image encoders.

Adding an encoder is one file with a ``@register_text_encoder("name")`` (or image)
function plus one import line in ``extract/encoders/__init__.py``. The key is the
CLI name and the name stored in caches and run folders.

Names outside the registry still work where a library can resolve them: a Hugging
Face model id or local folder as ``hf:<id>`` (or a plain existing folder) for text,
any torchvision classification backbone as ``tv:<name>`` for images, and a CLIP
checkpoint (hub id or local folder) as ``clip:<id>`` for either side.

Text encoder names take variants as ``+`` suffixes, each its own cache file and name:
``+norm`` normalises tweets with every rule of ``extract.normalize``, ``+ocr`` adds the
text inside each post's image as a second segment (``extract.ocr``), ``+vader`` appends
lexicon scores to every token (``extract.lexicon``): ``minilm+norm+ocr+vader``; ``+imagetext``
encodes the image's text alone (a post without any is all masked), a stream to list beside the
tweet's: ``minilm+vader,minilm+imagetext``.

Where a command takes several encoders of one modality (``extract`` and ``fit``), they are
listed with commas, ``minilm+ocr,mpnet+ocr``: one cache each, joined by the heads' input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the encoder modules import this registry to register themselves
    from extract.encoders.base import ImageEncoder, TextEncoder

TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {}
IMAGE_ENCODERS: dict[str, Callable[..., ImageEncoder]] = {}
STREAM_SEPARATOR = ","  # "minilm,mpnet": extract both caches, fit on both (one stream of positions each)
TEXT_VARIANTS: dict[str, dict[str, Any]] = {
    "norm": {"normalize": "all"}, "ocr": {"ocr": True}, "vader": {"vader": True},
    "imagetext": {"image_text_only": True},
}


def _register(table: dict[str, Callable[..., Any]], kind: str, name: str):
    def decorator(loader: Callable[..., Any]) -> Callable[..., Any]:
        if name in table:
            raise ValueError(f"{kind} encoder {name!r} is already registered")
        table[name] = loader
        return loader

    return decorator


def register_text_encoder(name: str):
    return _register(TEXT_ENCODERS, "text", name)


def register_image_encoder(name: str):
    return _register(IMAGE_ENCODERS, "image", name)


def _drop_none(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Unset CLI options arrive as None; dropping them keeps each encoder's own defaults.
    return {key: value for key, value in kwargs.items() if value is not None}


def create_text_encoder(name: str, **kwargs: Any) -> TextEncoder:
    import extract.encoders  # noqa: F401  (importing registers the built-in encoders)
    from extract.encoders.clip import CLIPTextEncoder
    from extract.encoders.hf_text import HFTextEncoder

    kwargs = _drop_none(kwargs)
    base, *variants = name.split("+")
    if variants:
        unknown = [v for v in variants if v not in TEXT_VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown} in text encoder {name!r}; expected {sorted(TEXT_VARIANTS)}")
        for variant in variants:
            kwargs |= TEXT_VARIANTS[variant]  # a run folder's recorded options say the same
        encoder = create_text_encoder(base, **kwargs)
        encoder.name = name
        return encoder
    if name in TEXT_ENCODERS:
        return TEXT_ENCODERS[name](**kwargs)
    if name.startswith("hf:"):
        return HFTextEncoder(name[3:], name=name, **kwargs)
    if name.startswith("clip:"):
        return CLIPTextEncoder(name[5:], name=name, **kwargs)
    if Path(name).is_dir():
        return HFTextEncoder(name, name=name, **kwargs)
    raise ValueError(
        f"unknown text encoder {name!r}; choose one of {sorted(TEXT_ENCODERS)}, "
        "'hf:<model id>' for any Hugging Face model, 'clip:<model id>' for a CLIP checkpoint, or a local model folder"
    )


def create_image_encoder(name: str, **kwargs: Any) -> ImageEncoder:
    import extract.encoders  # noqa: F401  (importing registers the built-in encoders)
    from extract.encoders.clip import CLIPImageEncoder
    from extract.encoders.torchvision_image import TorchvisionImageEncoder

    kwargs = _drop_none(kwargs)
    if name in IMAGE_ENCODERS:
        return IMAGE_ENCODERS[name](**kwargs)
    if name.startswith("tv:"):
        return TorchvisionImageEncoder(name[3:], name=name, **kwargs)
    if name.startswith("clip:"):
        return CLIPImageEncoder(name[5:], name=name, **kwargs)
    raise ValueError(
        f"unknown image encoder {name!r}; choose one of {sorted(IMAGE_ENCODERS)}, "
        "'tv:<name>' for any torchvision classification backbone or 'clip:<model id>' for a CLIP checkpoint"
    )


def stream_names(encoders: str) -> list[str]:
    """The encoders of one modality: ``"minilm,mpnet"`` → ``["minilm", "mpnet"]``, one stream each."""
    names = [name.strip() for name in encoders.split(STREAM_SEPARATOR)]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"encoder list {encoders!r} has an empty or repeated name")
    return names


def create_encoder(kind: str, name: str, **kwargs: Any) -> TextEncoder | ImageEncoder:
    if STREAM_SEPARATOR in name:  # extract and fit split such lists into one encoder each
        raise ValueError(f"{name!r} names several {kind} encoders; only extract and fit take a list, this takes one")
    if kind == "text":
        return create_text_encoder(name, **kwargs)
    if kind == "image":
        return create_image_encoder(name, **kwargs)
    raise ValueError(f"unknown encoder kind {kind!r}; expected 'text' or 'image'")
