"""Raw pairs on disk: label files, tweet texts and images in the task's layout.

A data folder holds ``train.txt`` and ``test_without_label.txt`` (CSV ``guid,tag``)
and ``data/{guid}.txt`` / ``data/{guid}.jpg``. A *text-only* folder (extra labelled
tweets without images, e.g. mvsa-multiple-text) holds one ``texts.csv`` (UTF-8,
``guid,text,tag``) instead: its rows are its train split and it has no test split.
A *manifest* (a ``.csv``, ``.jsonl`` or ``.parquet`` file with columns ``guid, text, image,
label``) stands for a data folder where two files per post do not scale: the text is inline,
the image a path relative to the manifest, rows with a label are the train split and rows
without one (empty, ``null``) the test split. Everything that reads those files lives here, so
that bad input fails in one place with one clear message, and every stage takes any of the
three wherever it takes a data folder.
"""

from __future__ import annotations

import csv
import functools
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

LABELS: tuple[str, ...] = ("positive", "neutral", "negative")
LABEL_TO_ID: dict[str, int] = {label: i for i, label in enumerate(LABELS)}
UNLABELLED = "null"
TRAIN_FILE = "train.txt"
TEST_FILE = "test_without_label.txt"
TEXTS_FILE = "texts.csv"
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
MANIFEST_COLUMNS = ("guid", "text", "image", "label")
TURNING_ORIENTATIONS = range(2, 9)  # EXIF orientations that flip or turn the stored pixels (1: as stored)
EXIF_ERRORS = (SyntaxError, ValueError, OSError, struct.error)  # what PIL raises on an EXIF block it cannot parse


@dataclass(frozen=True)
class LabelledGuid:
    guid: str
    tag: str  # one of LABELS, or UNLABELLED for the test file
    line: int = field(default=0, compare=False)  # line in the label file, for error messages


def _read_tagged_csv(path: Path, columns: list[str], valid_tags: set[str]) -> list[tuple[LabelledGuid, list[str]]]:
    """Rows of a CSV whose first column is ``guid`` and last ``tag``, refusing anything a typo could have produced.

    Returns each row as its ``LabelledGuid`` and its cells; blank lines are skipped.
    """
    try:
        return _read_tagged_rows(path, columns, valid_tags)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason}): save it as UTF-8") from None


def _read_tagged_rows(path: Path, columns: list[str], valid_tags: set[str]) -> list[tuple[LabelledGuid, list[str]]]:
    rows: list[tuple[LabelledGuid, list[str]]] = []
    seen: dict[str, int] = {}
    expected = ",".join(columns)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != columns:
            raise ValueError(f"{path}:1: expected header {expected!r}, got {','.join(header or [])!r}")
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                raise ValueError(f"{path}:{line_no}: expected {len(columns)} columns {expected!r}, got {row!r}")
            guid, tag = row[0].strip(), row[-1].strip()
            if not guid:
                raise ValueError(f"{path}:{line_no}: empty guid")
            if tag not in valid_tags:
                raise ValueError(
                    f"{path}:{line_no}: unknown tag {tag!r} for guid {guid}; expected one of {sorted(valid_tags)}"
                )
            if guid in seen:
                raise ValueError(f"{path}:{line_no}: duplicate guid {guid} (first on line {seen[guid]})")
            seen[guid] = line_no
            rows.append((LabelledGuid(guid, tag, line_no), row))
    return rows


def read_label_file(path: Path, *, allow_unlabelled: bool = False) -> list[LabelledGuid]:
    """Read a ``guid,tag`` CSV (``null`` tags allowed for the test file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found")
    valid = set(LABELS) | ({UNLABELLED} if allow_unlabelled else set())
    return [labelled for labelled, _ in _read_tagged_csv(path, ["guid", "tag"], valid)]


def is_text_only(data_dir: Path) -> bool:
    """A folder of labelled texts without images (``texts.csv``), rather than of pairs."""
    return (Path(data_dir) / TEXTS_FILE).is_file() and not (Path(data_dir) / TRAIN_FILE).is_file()


def is_manifest(data: Path) -> bool:
    """Whether ``--data`` names a manifest file (by its suffix) rather than a data folder."""
    return Path(data).suffix.lower() in MANIFEST_SUFFIXES and not Path(data).is_dir()


@dataclass(frozen=True)
class Manifest:
    """A manifest read and checked once: its rows in file order, and each guid's text and image file."""

    path: Path
    rows: list[LabelledGuid]  # tag UNLABELLED for a row without a label (the test split)
    texts: dict[str, str]  # guid → text, whitespace collapsed as decode_text does for a text file
    images: dict[str, Path]  # guid → image file (relative paths resolved against the manifest's folder)

    def lookup(self, column: dict[str, Any], guid: str) -> Any:
        if guid not in column:
            raise FileNotFoundError(f"guid {guid}: not in {self.path}")
        return column[guid]


def _manifest(data: Path) -> Manifest | None:
    """The manifest ``data`` names (read once per version of the file), or None for a data folder.

    Every reader asks this first, so a manifest is accepted wherever a data folder is.
    """
    if not is_manifest(data):
        return None
    path = Path(data).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{data}: manifest not found")
    stat = path.stat()
    return _read_manifest(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_manifest(path: Path, mtime_ns: int, size: int) -> Manifest:
    """Check every record as the label files are checked (a typo cannot pass), keyed by the file's version.

    Columns beyond the four are ignored. A label is one of LABELS, or empty / ``null`` for a test row.
    """
    rows: list[LabelledGuid] = []
    texts: dict[str, str] = {}
    images: dict[str, Path] = {}
    seen: dict[str, int] = {}
    unit = "row" if path.suffix.lower() == ".parquet" else "line"
    for where, line, record in _manifest_records(path):
        guid = "" if record["guid"] is None else str(record["guid"]).strip()
        if not guid:
            raise ValueError(f"{where}: empty guid")
        if guid in seen:
            raise ValueError(f"{where}: duplicate guid {guid} (first on {unit} {seen[guid]})")
        seen[guid] = line
        label = "" if record["label"] is None else str(record["label"]).strip()
        if label not in (*LABELS, "", UNLABELLED):
            raise ValueError(
                f"{where}: unknown label {label!r} for guid {guid}; expected one of {sorted(LABELS)}, or empty "
                f"(or {UNLABELLED}) for a test row"
            )
        text, image = record["text"], record["image"]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}: text of guid {guid} is {type(text).__name__} {text!r}, not a string")
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: guid {guid} has no image path (got {image!r})")
        image_file = path.parent / image.strip()
        if not image_file.is_file():
            raise FileNotFoundError(f"{where}: guid {guid} has no image file {image_file}")
        rows.append(LabelledGuid(guid, label or UNLABELLED, line))
        texts[guid] = " ".join((text or "").split())
        images[guid] = image_file
    return Manifest(path, rows, texts, images)


def _manifest_records(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Each record of a manifest as (where, line or row number, its four columns), blank lines skipped.

    ``where`` is ``file:line`` for CSV (the line the record starts on) and JSON lines, ``file: row N`` for Parquet.
    """
    expected = ",".join(MANIFEST_COLUMNS)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [cell.strip() for cell in next(reader, [])]
            _check_columns(f"{path}:1", header, expected)
            start = reader.line_num + 1
            for row in reader:
                line, start = start, reader.line_num + 1  # a quoted text may span lines: name the first
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}:{line}: expected {len(header)} columns {','.join(header)!r}, got {row!r}")
                yield f"{path}:{line}", line, dict(zip(header, row))
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line}: not a JSON object ({error.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
                _check_columns(f"{path}:{line}", list(record), expected)
                yield f"{path}:{line}", line, record
    else:
        import pyarrow.parquet as pq  # with ray[tune] (requirements.txt); only Parquet manifests need it

        try:
            table = pq.ParquetFile(path)
        except Exception as error:  # pyarrow's errors have no common base short of Exception
            raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
        _check_columns(str(path), table.schema_arrow.names, expected)
        row = 0
        for batch in table.iter_batches(columns=list(MANIFEST_COLUMNS)):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", row, record


def _check_columns(where: str, columns: list[str], expected: str) -> None:
    missing = [column for column in MANIFEST_COLUMNS if column not in columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; a manifest has the columns {expected!r}, got "
                         f"{','.join(columns)!r}")


@functools.lru_cache(maxsize=4)
def _texts_table(path: Path) -> tuple[list[LabelledGuid], dict[str, str]]:
    """``texts.csv`` read once: its rows in file order, and guid → text."""
    rows = _read_tagged_csv(path, ["guid", "text", "tag"], set(LABELS))
    return [labelled for labelled, _ in rows], {labelled.guid: " ".join(cells[1].split()) for labelled, cells in rows}


def read_split(data_dir: Path, split: str) -> list[LabelledGuid]:
    """Rows of ``train`` (labelled) or ``test`` (tags ``null``), checked against ``data/`` or the manifest's images."""
    data_dir = Path(data_dir)
    files = {"train": (TRAIN_FILE, False), "test": (TEST_FILE, True)}
    if split not in files:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(files)}")
    manifest = _manifest(data_dir)
    if manifest is not None:
        return [row for row in manifest.rows if (row.tag == UNLABELLED) == (split == "test")]
    if is_text_only(data_dir):
        return list(_texts_table((data_dir / TEXTS_FILE).resolve())[0]) if split == "train" else []
    name, allow_unlabelled = files[split]
    label_path = data_dir / name
    rows = read_label_file(label_path, allow_unlabelled=allow_unlabelled)
    for row in rows:
        if not text_path(data_dir, row.guid).is_file():
            raise FileNotFoundError(
                f"{label_path}:{row.line}: guid {row.guid} has no text file {text_path(data_dir, row.guid)}"
            )
    return rows


def text_path(data_dir: Path, guid: str) -> Path:
    return Path(data_dir) / "data" / f"{guid}.txt"


def image_path(data_dir: Path, guid: str) -> Path:
    manifest = _manifest(data_dir)
    if manifest is not None:
        return manifest.lookup(manifest.images, guid)
    return Path(data_dir) / "data" / f"{guid}.jpg"


def decode_text(raw: bytes) -> str:
    """Decode tweet bytes: UTF-8 when valid, else GB18030 (a superset of GBK), never raising."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("gb18030", errors="replace")
    return " ".join(text.split())


def read_text(data_dir: Path, guid: str) -> str:
    manifest = _manifest(data_dir)
    if manifest is not None:
        return manifest.lookup(manifest.texts, guid)
    if is_text_only(data_dir):
        text = _texts_table((Path(data_dir) / TEXTS_FILE).resolve())[1].get(guid)
        if text is None:
            raise FileNotFoundError(f"guid {guid}: not in {Path(data_dir) / TEXTS_FILE}")
        return text
    path = text_path(data_dir, guid)
    if not path.is_file():
        raise FileNotFoundError(f"guid {guid}: text file not found: {path}")
    return decode_text(path.read_bytes())


class BadImageError(ValueError):
    """An image that is missing or cannot be decoded; carries the guid for reporting."""

    def __init__(self, guid: str, path: Path, reason: str):
        super().__init__(f"guid {guid}: cannot read image {path}: {reason}")
        self.guid, self.path, self.reason = guid, path, reason

    def __reduce__(self):
        # DataLoader workers pickle read errors back to the main process; the default reduce
        # would call __init__ with the message alone.
        return type(self), (self.guid, self.path, self.reason)


class ImageTooLargeError(BadImageError):
    """An image with more pixels than the reader accepts, refused from its header before it is decoded."""


def load_image(path: Path | BinaryIO, guid: str = "?", max_pixels: int | None = None) -> Image.Image:
    """Open any image mode (greyscale, CMYK, palette, alpha) as fully decoded RGB, upright.

    ``path`` may also be an open binary file (an upload); errors then name it ``<upload>``. An image
    with more than ``max_pixels`` pixels (default: PIL's pixel limit, against decompression bombs) is
    refused from its header (``ImageTooLargeError``). A photo stored sideways with an EXIF orientation
    (phone cameras) is turned as its tag says, as a browser shows it.
    """
    name = Path(path) if isinstance(path, (str, Path)) else Path("<upload>")
    if isinstance(path, (str, Path)) and not name.is_file():
        raise BadImageError(guid, name, "file not found")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(name if isinstance(path, (str, Path)) else path) as image:
            # checked here rather than by turning PIL's warning into an error: warning filters are process-wide,
            # so a server decoding in several threads could lose the filter in one while another restores it
            if limit is not None and image.width * image.height > limit:
                raise ImageTooLargeError(guid, name, f"{image.width} × {image.height} = "
                                         f"{image.width * image.height:,} pixels, over the limit of {limit:,}")
            image.load()
            return rgb_image(upright(image))
    except Image.DecompressionBombError as error:  # refused by PIL's own check, in Image.open, past twice its limit
        raise ImageTooLargeError(guid, name, str(error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        # PIL names an unknown format by the file object it was given (an address, for an upload): say what it means
        reason = "unknown image format" if isinstance(error, UnidentifiedImageError) else str(error)
        raise BadImageError(guid, name, reason or type(error).__name__) from error


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned and flipped as its EXIF orientation tag says (itself when it has none, or a damaged one)."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except EXIF_ERRORS:  # a damaged EXIF block: the pixels as stored
        return image
    return ImageOps.exif_transpose(image) if orientation in TURNING_ORIENTATIONS else image


def rgb_image(image: Image.Image) -> Image.Image:
    """``image`` as RGB, transparent parts composited on white (converting alpha straight to RGB leaves them black)."""
    if image.mode in ("RGBA", "LA", "P") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
