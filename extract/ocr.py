"""Stage one, text inside images: OCR of every image, cached as one JSON line per guid.

About half of these images carry text (memes, quotes, captions, screenshots), often the
post's real sentiment. ``rapidocr-onnxruntime`` ships its ONNX detection and recognition
models, so this runs offline. It runs once per data folder and per ``OcrSettings``, into
``cache/<data>/ocr-rapidocr-<settings tag>.jsonl``, flushed line by line, so an interrupted
run resumes where it stopped, and text read with other settings is never mixed in: other
settings read into another file. Images are read by one process per CPU core, each running
the models on one thread. The text encoder then reads each guid's OCR text as a second
segment (``+ocr``); an image without text gives an empty segment.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from extract.cache import cache_dir_for
from extract.dataset import BadImageError, image_path, load_image
from extract.onnx_fold import folded_model_path

ENGINE = "rapidocr"
_GLUED = re.compile(r"[A-Za-z]{9,}")  # rapidocr often drops the spaces between words: "Ihavefamily"

Reader = Callable[[Image.Image], str]


@dataclass(frozen=True)
class OcrSettings:
    """The rapidocr options; ``tag`` names the cache file they fill, by those that change the text it reads.

    The defaults are rapidocr's own: detection enlarges every image until its short side is
    736 px, and an orientation classifier turns crops it believes upside down. Measured against
    them (README, Results): detection at each image's own size (``det_min_side=0``) without the
    classifier reads 2.5× faster, but on 1,000 images it changes the text of most images that
    have any and loses it on 11 % (2 % of the characters), so the defaults keep the text that the
    ``+ocr`` results were measured with, and the speed comes from reading images in parallel and
    from ``folded`` models.

    ``folded`` runs rapidocr's models rewritten with fewer ops (``extract.onnx_fold``): 1.5–2× faster
    per model, and the same text as the original models on 1,000 of 1,000 images (README, Results),
    so it is not in the tag: either reads and fills the same cache.
    """

    det_min_side: int = 736  # detection enlarges an image until its short side is this; 0: at its own size
    max_side: int = 2000  # a larger image is first shrunk until its long side is this (rapidocr's default)
    use_cls: bool = True  # the 180° orientation classifier on every detected line
    rec_batch: int = 6  # lines recognised per batch, each padded to the widest: this changes the text too
    folded: bool = True  # the models with scalar affines folded into convolutions (extract.onnx_fold)

    def __post_init__(self) -> None:
        if self.det_min_side < 0 or self.max_side < 32 or self.rec_batch < 1:
            raise ValueError(
                f"OCR settings need det_min_side >= 0, max_side >= 32 and rec_batch >= 1, got {self}"
            )

    @property
    def tag(self) -> str:
        """Every setting in a file-name-safe string: ``det736-max2000-cls-rec6``."""
        return f"det{self.det_min_side}-max{self.max_side}-{'cls' if self.use_cls else 'nocls'}-rec{self.rec_batch}"

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of ``RapidOCR`` (its config.yaml names) for these settings."""
        options = {
            "det_limit_type": "min", "det_limit_side_len": self.det_min_side, "max_side_len": self.max_side,
            "use_cls": self.use_cls, "rec_batch_num": self.rec_batch,
        }
        if self.folded:
            options |= _folded_model_options()
        return options


@functools.cache
def _folded_model_options() -> dict[str, str]:
    """``RapidOCR``'s det / cls / rec model paths, each the folded copy of the model it ships and runs by default
    (its config.yaml). Once a process: finding a folded copy hashes its source model (16 MB in all)."""
    import rapidocr_onnxruntime
    import yaml

    root = Path(rapidocr_onnxruntime.__file__).parent
    config = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    return {
        f"{stage.lower()}_model_path": str(folded_model_path(root / config[stage]["model_path"]))
        for stage in ("Det", "Cls", "Rec")
    }


OCR_SETTINGS = OcrSettings()  # what extract, predict and the "+ocr" encoders' cache identity use


class OcrReader:
    """Text found in an image, lines in reading order joined by spaces, glued words split.

    ``threads``: ONNX Runtime threads per model, None for every core (one image at a time); the
    text does not depend on it.
    """

    def __init__(self, settings: OcrSettings = OCR_SETTINGS, *, threads: int | None = None) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as error:
            raise ImportError("OCR needs the package rapidocr-onnxruntime (pip install -r requirements.txt)") from error
        self.settings = settings
        threads_options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1} if threads else {}
        self.engine = RapidOCR(**settings.engine_options(), **threads_options)

    def __call__(self, image: Image.Image) -> str:
        found, _ = self.engine(np.asarray(image)[:, :, ::-1])  # RGB → BGR, OpenCV's order
        return clean_ocr_text(" ".join(line for _, line, _ in found or []))


def clean_ocr_text(text: str) -> str:
    """Collapse whitespace and split letter runs that OCR glued together: ``"Ihavefamily"`` → ``"I have family"``."""
    from extract.normalize import split_hashtag

    return " ".join(_GLUED.sub(lambda match: " ".join(split_hashtag(match.group())), text).split())


def ocr_path(cache_root: Path, data_dir: Path, settings: OcrSettings = OCR_SETTINGS) -> Path:
    return cache_dir_for(cache_root, data_dir) / f"ocr-{ENGINE}-{settings.tag}.jsonl"


def adopted_ocr_path(cache_root: Path, data_dir: Path, settings: OcrSettings = OCR_SETTINGS) -> Path:
    """The cache's OCR file, its folder made; a file from before files named their settings is adopted when its
    settings are rapidocr's defaults (it was written with them)."""
    path = ocr_path(cache_root, data_dir, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    legacy = path.parent / f"ocr-{ENGINE}.jsonl"
    if settings.tag == OcrSettings().tag and legacy.is_file() and not path.exists():
        legacy.rename(path)
    return path


def ocr_part_path(cache_root: Path, data_dir: Path, rank: int, settings: OcrSettings = OCR_SETTINGS) -> Path:
    """Rank ``rank``'s OCR file under torchrun, beside the cache's."""
    path = ocr_path(cache_root, data_dir, settings)
    return path.with_name(f"{path.stem}.rank-{rank}.jsonl")


def merge_ocr_parts(cache_root: Path, data_dir: Path, guids: list[str], settings: OcrSettings = OCR_SETTINGS) -> None:
    """Append the texts of every rank's part file (of any world size) missing from the cache's OCR file, in
    ``guids`` order, then delete the parts. Rerun after a crash, it appends only what is still missing."""
    path = adopted_ocr_path(cache_root, data_dir, settings)
    parts = sorted(path.parent.glob(f"{path.stem}.rank-*.jsonl"))
    found: dict[str, str] = {}
    for part in parts:
        found |= read_ocr(part)
    done = read_ocr(path)
    _drop_torn_line(path)
    with path.open("a", encoding="utf-8") as handle:
        for guid in guids:
            if guid in found and guid not in done:
                handle.write(json.dumps({"guid": guid, "text": found[guid]}, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    for part in parts:
        part.unlink()


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
    reader: Reader | None = None,
    workers: int | None = None,
    settings: OcrSettings = OCR_SETTINGS,
    part: int | None = None,
) -> dict[str, str]:
    """OCR text of every guid, reading the images missing from the cache and appending them in guid order.

    ``part``: under torchrun, this rank's own file (``ocr_part_path``), which ``merge_ocr_parts`` then
    appends to the cache's: each file has one writer.

    ``workers`` processes (default: one per CPU core) each read whole images on one ONNX Runtime
    thread: the models' small convolutions keep two threads busy far less than two images do.
    0 or 1 reads in this process. ``reader`` replaces the rapidocr reader built from ``settings``
    (tests); with workers it must pickle wherever processes are spawned rather than forked.
    """
    path = adopted_ocr_path(cache_root, data_dir, settings) if part is None else ocr_part_path(
        cache_root, data_dir, part, settings
    )
    texts = read_ocr(path)
    todo = [guid for guid in guids if guid not in texts]
    if not todo:
        return {guid: texts[guid] for guid in guids}
    workers = min((os.cpu_count() or 1) if workers is None else workers, len(todo))
    _drop_torn_line(path)
    # The workers start before the file opens: forked, they hold no copy of its handle.
    with (
        _image_texts(data_dir, todo, reader, settings, workers, skip_bad) as results,
        path.open("a", encoding="utf-8") as handle,
    ):
        arriving = tqdm(zip(todo, results), total=len(todo), desc=f"ocr:{ENGINE}", unit="image", disable=not progress)
        for guid, text in arriving:
            handle.write(json.dumps({"guid": guid, "text": text}, ensure_ascii=False) + "\n")
            handle.flush()
            texts[guid] = text
    return {guid: texts[guid] for guid in guids}


@contextmanager
def _image_texts(
    data_dir: Path, guids: list[str], reader: Reader | None, settings: OcrSettings, workers: int, skip_bad: bool
) -> Iterator[Iterator[str]]:
    """The text of each guid's image, in ``guids`` order, as each is read: here, or by a pool of ``workers``.

    An unreadable image raises ``BadImageError`` (from a worker, it is re-raised here), or reads as
    no text with ``skip_bad``. Leaving the block stops the workers, finished or not.
    """
    if workers <= 1:
        reader = reader or OcrReader(settings)
        yield (_read_image(reader, data_dir, guid, skip_bad) for guid in guids)
        return
    with multiprocessing.Pool(workers, initializer=_start_worker, initargs=(reader, settings)) as pool:
        yield pool.imap(partial(_worker_read, data_dir, skip_bad), guids)


def _read_image(reader: Reader, data_dir: Path, guid: str, skip_bad: bool) -> str:
    try:
        return reader(load_image(image_path(data_dir, guid), guid))
    except BadImageError:
        if not skip_bad:
            raise
        return ""  # a skipped image has no text, as an image without any


# A pool process's reader, and the settings to build it from (for its first image, not in the pool's
# initializer: a pool restarts a worker whose initializer fails, forever, instead of reporting it).
_worker: dict[str, Any] = {}


def _start_worker(reader: Reader | None, settings: OcrSettings) -> None:
    _worker.update(reader=reader, settings=settings)


def _worker_read(data_dir: Path, skip_bad: bool, guid: str) -> str:
    if _worker["reader"] is None:
        _worker["reader"] = OcrReader(_worker["settings"], threads=1)
    return _read_image(_worker["reader"], data_dir, guid, skip_bad)


def _drop_torn_line(path: Path) -> None:
    """Cut a last line without its newline (a write interrupted mid-line) before appending after it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
