"""Image decoding for extraction (extract/decode.py): the tensor path against the PIL reference, on the CPU.

The tensor path runs here with torchvision's CPU ``decode_jpeg`` (libjpeg-turbo, as Pillow's), so
the only difference left is the antialiased resize: PIL resizes 8-bit pixels in fixed point, the
tensor path in float and then rounds. Measured on the generated folder (64 px) and at 224 px: at
most one 8-bit level on any pixel, at most 0.19 of a level on average per image (0 where no resize
is needed); through the tiny random ResNet-18, features differ by at most 0.031 (mean 0.0024, while
the features' mean magnitude is 0.64).
The bounds below leave some margin over those figures; nvjpeg on a GPU is measured by benchmarks/gpu.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import ExifTags, Image, ImageOps

from extract.cache import load_features
from extract.dataset import BadImageError, image_path, load_image
from extract.decode import EncodedJpeg, decode_images, is_plain_jpeg, pil_pixels, read_raw_image, resolve_decoder
from extract.encoders.torchvision_image import IMAGENET_MEAN, IMAGENET_STD
from extract.run import extract_features

MAX_LEVELS = 1.0 + 1e-3  # per pixel, in 8-bit levels (float32 normalisation adds ~1e-5)
MEAN_LEVELS = 0.25  # per image, in 8-bit levels
MAX_FEATURE_DIFF, MEAN_FEATURE_DIFF = 0.05, 0.01  # tiny random ResNet-18 features, cached in float16


def _square(encoder) -> dict:
    return {"image_size": encoder.image_size, "mean": encoder.mean, "std": encoder.std}


def _levels(pixels: torch.Tensor, reference: torch.Tensor, encoder) -> torch.Tensor:
    """|pixels − reference| in 8-bit levels: normalised values times std times 255, (3, S, S)."""
    std = torch.tensor(encoder.std).view(3, 1, 1)
    return (pixels - reference).abs() * std * 255.0


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise over a colour gradient: edges and smooth areas, like a photo, unlike a flat test card."""
    rng = np.random.default_rng(seed)
    gradient = np.stack(np.meshgrid(np.linspace(0, 255, width), np.linspace(255, 0, height)), axis=-1)
    pixels = np.concatenate([gradient, np.full((height, width, 1), 90.0)], axis=-1)
    pixels += rng.normal(0.0, 20.0, size=(height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _encoded(image: Image.Image, image_format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = value
    return exif


def _undecodable_jpeg() -> bytes:
    """Frame header and tables of a real JPEG, then a scan header with a bogus length: neither decoder reads it."""
    data = _encoded(_photo(40, 30))
    start_of_scan = data.index(b"\xff\xda")
    return data[:start_of_scan] + b"\xff\xda\x00\x02" + bytes(5) + b"\xff\xd9"


# --- choosing the decoder ---------------------------------------------------------------------------------


def test_auto_decoder_is_tensor_on_cuda_only():
    assert resolve_decoder("auto", "cpu") == "pil"  # CPU extraction keeps the reference path
    assert resolve_decoder("auto", torch.device("cuda")) == "tensor"
    assert resolve_decoder("tensor", "cpu") == "tensor"
    assert resolve_decoder("pil", "cuda") == "pil"
    with pytest.raises(ValueError, match=r"unknown image decoder 'nvjpeg'; expected one of \['auto', 'pil', 'te"):
        resolve_decoder("nvjpeg", "cpu")


@pytest.mark.parametrize(
    ("data", "plain"),
    [
        (_encoded(_photo(40, 30)), True),
        (_encoded(_photo(40, 30), progressive=True), True),
        (_encoded(_photo(40, 30).convert("L")), True),
        (_encoded(_photo(40, 30), subsampling=0, quality=95), True),
        (_encoded(_photo(40, 30).convert("CMYK")), False),  # 4 components: PIL's CMYK conversion decides
        (_encoded(_photo(40, 30), "PNG"), False),
        (_encoded(_photo(40, 30))[:-200], False),  # truncated: no end marker
        (_encoded(_photo(40, 30)) + b"trailer", False),  # bytes after the end marker
        (b"\xff\xd8\xff\xd9", False),  # no frame header
        (b"", False),
        (_encoded(_photo(40, 30), exif=_orientation(1)), True),  # EXIF that leaves the pixels as stored
        (_encoded(_photo(40, 30), exif=_orientation(6)), False),  # a phone's portrait photo: PIL turns it upright
    ],
    ids=["baseline", "progressive", "grey", "444", "cmyk", "png", "truncated", "trailer", "empty-jpeg", "empty",
         "exif-upright", "exif-turned"],
)
def test_which_files_take_the_tensor_path(data, plain):
    assert is_plain_jpeg(data) is plain


# --- the tensor path against the PIL path -----------------------------------------------------------------


def test_tensor_path_matches_pil_path_on_the_data_folder(tiny_image_encoder, data_dir, data_spec):
    encoder = tiny_image_encoder
    raw = [read_raw_image(data_dir, guid, **_square(encoder)) for guid in data_spec.guids]
    jpeg_guids = {guid for guid, item in zip(data_spec.guids, raw) if isinstance(item, EncodedJpeg)}
    assert data_spec.grey_guid in jpeg_guids
    assert jpeg_guids.isdisjoint({data_spec.cmyk_guid, data_spec.palette_guid, data_spec.rgba_guid})
    pixels = decode_images(raw, **_square(encoder), device="cpu")
    for guid, tensor_pixels in zip(data_spec.guids, pixels):
        reference = encoder.read(data_dir, guid)
        assert tensor_pixels.shape == reference.shape == (3, encoder.image_size, encoder.image_size)
        levels = _levels(tensor_pixels, reference, encoder)
        assert levels.max() <= MAX_LEVELS and levels.mean() <= MEAN_LEVELS, guid
        if guid not in jpeg_guids:  # PIL made these in the worker: exactly the reference
            assert torch.equal(tensor_pixels, reference)


@pytest.mark.parametrize(("width", "height"), [(640, 480), (150, 400), (224, 224), (100, 60)])
@pytest.mark.parametrize("options", [{}, {"progressive": True}], ids=["baseline", "progressive"])
def test_tensor_path_matches_pil_path_at_224(tmp_path, width, height, options):
    square = {"image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    (tmp_path / "data").mkdir()
    image_path(tmp_path, "1").write_bytes(_encoded(_photo(width, height), **options))
    item = read_raw_image(tmp_path, "1", **square)
    assert isinstance(item, EncodedJpeg)
    (pixels,) = decode_images([item], **square, device="cpu")
    reference = pil_pixels(load_image(image_path(tmp_path, "1")), **square)
    levels = (pixels - reference).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0
    assert levels.max() <= MAX_LEVELS and levels.mean() <= MEAN_LEVELS


# --- fallbacks and bad files ------------------------------------------------------------------------------


def test_a_turned_photo_takes_the_pil_path_and_comes_out_upright(tmp_path):
    square = {"image_size": 64, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    (tmp_path / "data").mkdir()
    image_path(tmp_path, "1").write_bytes(_encoded(_photo(80, 40), exif=_orientation(6)))
    item = read_raw_image(tmp_path, "1", **square)
    assert isinstance(item, torch.Tensor)  # PIL's pixels, made in the worker
    (pixels,) = decode_images([item], **square, device="cpu")
    with Image.open(image_path(tmp_path, "1")) as stored:
        upright = pil_pixels(ImageOps.exif_transpose(stored).convert("RGB"), **square)
    assert torch.equal(pixels, upright)




def test_non_jpeg_files_fall_back_to_pil_in_the_worker(tiny_image_encoder, data_dir, data_spec):
    encoder = tiny_image_encoder
    for guid in (data_spec.cmyk_guid, data_spec.palette_guid, data_spec.rgba_guid):  # CMYK JPEG, PNGs named .jpg
        item = read_raw_image(data_dir, guid, **_square(encoder))
        assert isinstance(item, torch.Tensor) and torch.equal(item, encoder.read(data_dir, guid))
        (passed,) = decode_images([item], **_square(encoder), device="cpu")
        assert torch.equal(passed, item)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_bad_file_raises_the_pil_paths_error(tiny_image_encoder, data_dir, data_spec, damage):
    guid = data_spec.guids[0]
    path = image_path(data_dir, guid)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.unlink()
    with pytest.raises(BadImageError, match=f"guid {guid}: cannot read image") as tensor_error:
        read_raw_image(data_dir, guid, **_square(tiny_image_encoder))
    with pytest.raises(BadImageError) as pil_error:
        tiny_image_encoder.read(data_dir, guid)
    assert str(tensor_error.value) == str(pil_error.value) and tensor_error.value.guid == guid


def test_jpeg_neither_decoder_reads_becomes_bad_image_error(tiny_image_encoder, data_dir, data_spec):
    bad, good = data_spec.guids[0], data_spec.guids[1]
    image_path(data_dir, bad).write_bytes(_undecodable_jpeg())
    raw = [read_raw_image(data_dir, guid, **_square(tiny_image_encoder)) for guid in (bad, good)]
    assert all(isinstance(item, EncodedJpeg) for item in raw)  # it looks like a plain JPEG
    error, pixels = decode_images(raw, **_square(tiny_image_encoder), device="cpu")
    assert isinstance(error, BadImageError) and error.guid == bad
    assert str(error).startswith(f"guid {bad}: cannot read image {image_path(data_dir, bad)}:")
    assert _levels(pixels, tiny_image_encoder.read(data_dir, good), tiny_image_encoder).max() <= MAX_LEVELS


def test_refused_jpeg_falls_back_alone(tiny_image_encoder, data_dir, data_spec, monkeypatch):
    # nvjpeg refuses some files libjpeg-turbo reads; simulate one refusal on the CPU decoder.
    encoder = tiny_image_encoder
    read = {guid: read_raw_image(data_dir, guid, **_square(encoder)) for guid in data_spec.guids}
    guids = [guid for guid, item in read.items() if isinstance(item, EncodedJpeg)][:4]
    raw = [read[guid] for guid in guids]
    refused = bytes(raw[2].data)
    real_decode_jpeg, calls = torchvision.io.decode_jpeg, []

    def picky_decode_jpeg(data, **options):
        calls.append(len(data) if isinstance(data, list) else 1)
        if any(d.numpy().tobytes() == refused for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("unsupported JPEG")  # and no partial results, as the real one on a batch
        return real_decode_jpeg(data, **options)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky_decode_jpeg)
    pixels = decode_images(raw, **_square(encoder), device="cpu")
    assert calls == [4, 1, 1, 1, 1]  # the batch, then one by one
    assert torch.equal(pixels[2], encoder.read(data_dir, guids[2]))  # the PIL path, exactly
    for guid, tensor_pixels in zip(guids, pixels):
        assert _levels(tensor_pixels, encoder.read(data_dir, guid), encoder).max() <= MAX_LEVELS


# --- extraction end to end --------------------------------------------------------------------------------


def _extract(encoder, data_dir, cache_root, **options):
    options = {"batch_size": 8, "num_workers": 0, "progress": False, **options}
    return extract_features(encoder, data_dir, cache_root, **options)


def test_tensor_decode_cache_matches_pil_cache(tiny_image_encoder, data_dir, data_spec, tmp_path):
    pil = _extract(tiny_image_encoder, data_dir, tmp_path / "pil", decode="pil")
    tensor = _extract(tiny_image_encoder, data_dir, tmp_path / "tensor", decode="tensor", num_workers=2)
    assert (tensor.encoded, tensor.skipped) == (pil.encoded, pil.skipped) == (len(data_spec.guids), [])
    expected = tiny_image_encoder.describe()  # the decoder is not part of the cache's identity
    pil_rows = load_features(pil.path, data_spec.guids, expected=expected)
    tensor_rows = load_features(tensor.path, data_spec.guids, expected=expected)
    assert np.array_equal(tensor_rows.mask, pil_rows.mask) and tensor_rows.mask.all()
    difference = np.abs(tensor_rows.features.astype(np.float32) - pil_rows.features.astype(np.float32))
    assert difference.max() <= MAX_FEATURE_DIFF and difference.mean() <= MEAN_FEATURE_DIFF


def test_default_cpu_extraction_keeps_the_pil_path(tiny_image_encoder, data_dir, tmp_path, monkeypatch):
    def no_tensor_path(*args, **kwargs):
        raise AssertionError("the tensor path ran on the CPU by default")

    monkeypatch.setattr("extract.run.read_raw_image", no_tensor_path)
    monkeypatch.setattr("extract.run.decode_images", no_tensor_path)
    summary = _extract(tiny_image_encoder, data_dir, tmp_path / "cache", device="cpu")
    assert summary.skipped == []


@pytest.fixture
def bad_images(data_dir, data_spec):
    """A truncated JPEG, one that only looks like a JPEG, a missing file: guids in extraction order."""
    truncated, undecodable, missing = data_spec.guids[3], data_spec.guids[10], data_spec.guids[20]
    image_path(data_dir, truncated).write_bytes(image_path(data_dir, truncated).read_bytes()[:-100])
    image_path(data_dir, undecodable).write_bytes(_undecodable_jpeg())
    image_path(data_dir, missing).unlink()
    return [truncated, undecodable, missing]


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_bad_images_stop_or_skip_alike(tiny_image_encoder, data_dir, data_spec, tmp_path, bad_images, decode):
    with pytest.raises(BadImageError, match=f"guid {bad_images[0]}: cannot read image") as info:
        _extract(tiny_image_encoder, data_dir, tmp_path / "stop", decode=decode)
    assert info.value.guid == bad_images[0]
    summary = _extract(tiny_image_encoder, data_dir, tmp_path / "skip", decode=decode, skip_bad=True)
    assert summary.skipped == bad_images
    cached = load_features(summary.path, data_spec.guids)
    bad = np.isin(cached.guids, bad_images)
    assert not cached.mask[bad].any() and cached.mask[~bad].all()
