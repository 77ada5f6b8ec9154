"""Image files → normalised square pixels, two ways: PIL in the DataLoader workers, or batched on the device.

The PIL path (``pil_pixels``) is the reference: every image encoder's ``pixels`` uses it, CPU
extraction uses it, and so does finetuning and single-post prediction. On a GPU it is the
bottleneck: decoding JPEGs in the workers held resnet50 extraction on an H100 to 231 pairs/s
while the GPU idled. The tensor path moves that work to the device: the workers only read the
bytes of each JPEG (``read_raw_image``), and the main process decodes the whole batch at once with
``torchvision.io.decode_jpeg`` (nvjpeg on CUDA, libjpeg-turbo on the CPU), then squashes,
quantises and normalises on the device (``decode_images``).

The tensor path takes only what it can decode as PIL would: a complete plain JPEG (baseline or
progressive Huffman, 8-bit, greyscale or colour). Everything else, and any JPEG that
``decode_jpeg`` refuses, goes through the PIL path, so the checks, the ``BadImageError`` messages
and ``--skip-bad`` are the same whichever path runs. On the CPU the two paths agree to within one
8-bit level per pixel (libjpeg-turbo decodes exactly as Pillow does; only the antialiased resize
rounds differently; tests/test_decode.py). nvjpeg's IDCT and chroma upsampling are not
libjpeg-turbo's, so on CUDA the difference can be larger: ``benchmarks/gpu.py`` measures it.
A JPEG whose EXIF orientation turns it goes through the PIL path, which turns it upright.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import ExifTags, Image

from extract.dataset import EXIF_ERRORS, TURNING_ORIENTATIONS, BadImageError, image_path, load_image

DECODERS = ("auto", "pil", "tensor")  # auto: tensor on CUDA, PIL otherwise

# JPEG markers (ITU T.81, table B.1).
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_SOS = 0xDA
_APP1 = 0xE1  # where EXIF lives
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0–SOF15 (DHT, JPG and DAC excluded)
_TENSOR_FRAMES = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended sequential, progressive; Huffman-coded
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0–7 carry no length


@dataclass
class EncodedJpeg:
    """A JPEG file's bytes, read in a DataLoader worker and decoded later in the main process."""

    guid: str
    path: Path  # re-read by the PIL path when the tensor decoder refuses the bytes
    # The whole file. Bytes, not a tensor: a tensor leaves a DataLoader worker through a shared-memory
    # file descriptor of its own, which held resnet50 extraction on an H200 to 728 pairs/s (the cause
    # profiled with cProfile, the figures from benchmarks/gpu.py); bytes travel in the batch's pickle.
    data: bytearray


RawImage = EncodedJpeg | torch.Tensor | BadImageError  # bytes, PIL-path pixels (3, S, S), or a worker's read error


def resolve_decoder(decode: str, device: torch.device | str) -> str:
    """``auto`` → ``tensor`` on CUDA, ``pil`` otherwise, so CPU extraction keeps the reference path."""
    if decode not in DECODERS:
        raise ValueError(f"unknown image decoder {decode!r}; expected one of {list(DECODERS)}")
    if decode == "auto":
        return "tensor" if torch.device(device).type == "cuda" else "pil"
    return decode


def is_plain_jpeg(data: bytes) -> bool:
    """Whether the tensor path may take these bytes: a complete 8-bit Huffman JPEG with 1 or 3 components.

    The end marker must be the last two bytes: torchvision's CPU decoder refuses a truncated file
    as PIL does, but what nvjpeg makes of one is not documented, so a truncated file (or one with
    bytes after its end marker, which only costs speed) takes the PIL path and gets its verdict.
    CMYK/YCCK (4 components), 12-bit, arithmetic-coded and lossless files are rare and go to PIL too,
    and so does a photo whose EXIF orientation turns it (``load_image`` turns it upright).
    """
    if len(data) < 4 or data[:2] != _SOI or data[-2:] != _EOI:
        return False
    at = 2
    while at + 10 <= len(data):  # a frame header needs 10 bytes: marker, length, precision, size, components
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
        elif marker in _STANDALONE_MARKERS:
            at += 2
        elif marker in _FRAME_MARKERS:
            precision, components = data[at + 4], data[at + 9]
            return marker in _TENSOR_FRAMES and precision == 8 and components in (1, 3)
        elif marker == _SOS or marker == _EOI[1]:  # a scan or the end before any frame header
            return False
        else:
            length = int.from_bytes(data[at + 2 : at + 4], "big")
            if marker == _APP1 and _turned(bytes(data[at + 4 : at + 2 + length])):
                return False
            at += 2 + length
    return False


def _turned(segment: bytes) -> bool:
    """Whether an APP1 segment is EXIF with an orientation that turns or flips the picture (or EXIF PIL cannot read:
    the PIL path then decides, as for every file this path does not take)."""
    if not segment.startswith(b"Exif\x00\x00"):
        return False
    exif = Image.Exif()
    try:
        exif.load(segment)
    except EXIF_ERRORS:
        return True
    return exif.get(ExifTags.Base.Orientation, 1) in TURNING_ORIENTATIONS


def pil_pixels(image: Any, *, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB image → normalised tensor (3, S, S): squashed to a square with PIL's antialiased bilinear."""
    from torchvision.transforms.functional import normalize, pil_to_tensor, resize

    image = resize(image, [image_size, image_size], antialias=True)
    pixels = pil_to_tensor(image).float().div_(255.0)  # (3, S, S) in [0, 1]
    return normalize(pixels, list(mean), list(std))


def read_raw_image(
    data_dir: Path, guid: str, *, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> EncodedJpeg | torch.Tensor:
    """A worker's read for the tensor path: a plain JPEG's bytes, else the PIL path's pixels (3, S, S).

    Raises ``BadImageError`` as ``load_image`` does for a missing or unreadable non-JPEG file.
    """
    path = image_path(data_dir, guid)
    try:
        data = path.read_bytes()
    except OSError:
        data = b""  # missing or unreadable: load_image below raises the usual BadImageError
    if is_plain_jpeg(data):
        return EncodedJpeg(guid, path, bytearray(data))
    return pil_pixels(load_image(path, guid), image_size=image_size, mean=mean, std=std)


def _decode_jpegs(encoded: list[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as (3, H, W) uint8 on ``device``, or None where ``decode_jpeg`` refuses it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return []
    files = [torch.frombuffer(item.data, dtype=torch.uint8) for item in encoded]  # (N_i,) uint8 views, no copy
    try:
        # One call for the batch: on CUDA, nvjpeg decodes the batch together.
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    # One refused file fails the whole call (decode_jpeg returns no partial results): retry one by one.
    images: list[torch.Tensor | None] = []
    for data in files:
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            images.append(None)
    return images


def decode_images(
    items: Sequence[RawImage],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
) -> list[torch.Tensor | BadImageError]:
    """What the workers returned → one normalised (3, S, S) tensor on ``device`` per item, in order.

    JPEG bytes are decoded together on ``device``, squashed to S × S with antialiased bilinear,
    rounded to 8-bit levels (as PIL's resize of a uint8 image is, so both paths share one value
    grid) and normalised with ``mean``/``std``. A JPEG that ``decode_jpeg`` refuses goes through
    the PIL path here; if PIL cannot read it either, its ``BadImageError`` takes its place.
    Pixels already made by the PIL path move to ``device``; a worker's ``BadImageError`` passes
    through. Errors are returned, not raised, so the caller applies ``--skip-bad``.
    """
    from torchvision.transforms.functional import normalize, resize

    device = torch.device(device)
    jpeg_at = [i for i, item in enumerate(items) if isinstance(item, EncodedJpeg)]
    decoded = _decode_jpegs([items[i] for i in jpeg_at], device)  # (3, H_i, W_i) uint8, or None if refused
    squashed = {
        i: resize(image.float(), [image_size, image_size], antialias=True)  # (3, S, S) in [0, 255]
        for i, image in zip(jpeg_at, decoded)
        if image is not None
    }
    tensor_pixels: dict[int, torch.Tensor] = {}
    if squashed:
        pixels = torch.stack(list(squashed.values())).round_().clamp_(0.0, 255.0).div_(255.0)  # (B_jpeg, 3, S, S)
        tensor_pixels = dict(zip(squashed, normalize(pixels, list(mean), list(std)).unbind(0)))  # i → (3, S, S)
    results: list[torch.Tensor | BadImageError] = []
    for index, item in enumerate(items):
        if index in tensor_pixels:
            results.append(tensor_pixels[index])
        elif isinstance(item, EncodedJpeg):  # refused by decode_jpeg: the PIL path decides
            try:
                image = load_image(item.path, item.guid)
            except BadImageError as error:
                results.append(error)
            else:
                results.append(pil_pixels(image, image_size=image_size, mean=mean, std=std).to(device))
        elif isinstance(item, torch.Tensor):
            results.append(item.to(device))
        else:
            results.append(item)
    return results
