"""Stage one, text inside images: OCR of every image, cached as one JSON line per guid.

About half of these images carry text (memes, quotes, captions, screenshots), often the
post's real sentiment. ``rapidocr-onnxruntime`` ships its ONNX detection and recognition
models, so this runs offline (~0.4 s per image on a 2-core CPU): it runs once per data
folder, into ``cache/<data>/ocr-rapidocr.jsonl``, flushed line by line, so an interrupted
run resumes where it stopped. The text encoder then reads each guid's OCR text as a second
segment (``extract --ocr``); an image without text gives an empty segment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from extract.cache import cache_dir_for
from extract.dataset import BadImageError, image_path, load_image

ENGINE = "rapidocr"
_GLUED = re.compile(r"[A-Za-z]{9,}")  # rapidocr often drops the spaces between words: "Ihavefamily"


class OcrReader:
    """Text found in an image, lines in reading order joined by spaces, glued words split."""

    def __init__(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as error:
            raise ImportError("OCR needs the package rapidocr-onnxruntime (pip install -r requirements.txt)") from error
        self.engine = RapidOCR()

    def __call__(self, image: Image.Image) -> str:
        found, _ = self.engine(np.asarray(image)[:, :, ::-1])  # RGB → BGR, OpenCV's order
        return clean_ocr_text(" ".join(line for _, line, _ in found or []))


def clean_ocr_text(text: str) -> str:
    """Collapse whitespace and split letter runs that OCR glued together: ``"Ihavefamily"`` → ``"I have family"``."""
    from extract.normalize import split_hashtag

    return " ".join(_GLUED.sub(lambda match: " ".join(split_hashtag(match.group())), text).split())


def ocr_path(cache_root: Path, data_dir: Path) -> Path:
    return cache_dir_for(cache_root, data_dir) / f"ocr-{ENGINE}.jsonl"


def read_ocr(path: Path) -> dict[str, str]:
    """guid → OCR text of a cache file; a torn last line (an interrupted write) is ignored."""
    texts: dict[str, str] = {}
    if not Path(path).is_file():
        return texts
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        texts[row["guid"]] = row["text"]
    return texts


def extract_ocr(
    data_dir: Path,
    cache_root: Path,
    guids: list[str],
    *,
    skip_bad: bool = False,
    progress: bool = True,
    reader: Callable[[Image.Image], str] | None = None,
) -> dict[str, str]:
    """OCR text of every guid, reading the images missing from the cache and appending them."""
    path = ocr_path(cache_root, data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = read_ocr(path)
    todo = [guid for guid in guids if guid not in texts]
    if not todo:
        return {guid: texts[guid] for guid in guids}
    reader = reader or OcrReader()
    _drop_torn_line(path)
    with path.open("a", encoding="utf-8") as handle:
        for guid in tqdm(todo, desc=f"ocr:{ENGINE}", unit="image", disable=not progress):
            try:
                text = reader(load_image(image_path(data_dir, guid), guid))
            except BadImageError:
                if not skip_bad:
                    raise
                text = ""  # a skipped image has no text, as an image without any
            handle.write(json.dumps({"guid": guid, "text": text}, ensure_ascii=False) + "\n")
            handle.flush()
            texts[guid] = text
    return {guid: texts[guid] for guid in guids}


def _drop_torn_line(path: Path) -> None:
    """Cut a last line without its newline (a write interrupted mid-line) before appending after it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
