"""Raw inputs: label files, tweet text decoding and image loading (extract/dataset.py)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from unittest import mock

import pytest
from PIL import ExifTags, Image

from extract.dataset import (
    LABELS,
    BadImageError,
    ImageTooLargeError,
    decode_text,
    image_path,
    load_image,
    read_label_file,
    read_split,
    read_text,
)
from extract.run import data_guids

# --- text -------------------------------------------------------------------------------------------------


def test_decode_utf8_keeps_accents_and_emoji():
    assert decode_text("café 😀 ok".encode()) == "café 😀 ok"


def test_decode_collapses_whitespace():
    assert decode_text(b"  RT @a:\n\tgood   day \r\n") == "RT @a: good day"


@pytest.mark.parametrize(
    ("text", "codec"),
    [("好 happy …", "gbk"), ("今天 下雨 … sad", "gbk"), ("€ 𠀀 rare", "gb18030")],
)
def test_decode_falls_back_to_gb18030(text, codec):
    raw = text.encode(codec)
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert decode_text(raw) == text


def test_decode_gbk_ellipsis_bytes():
    assert decode_text(b"wait\xa1\xad") == "wait…"


def test_decode_keeps_lost_emoji_question_marks():
    assert decode_text(b"so sad ??? #rain") == "so sad ??? #rain"


@pytest.mark.parametrize("raw", [b"\x80\xff\xfe", b"ok \xff", b"\x81", b"\xfe\xfe\xfe\xfe bad", b""])
def test_decode_never_raises(raw):
    assert isinstance(decode_text(raw), str)


def test_read_text_from_data_folder(data_dir, data_spec):
    assert read_text(data_dir, data_spec.gbk_guid) == data_spec.gbk_text
    assert "???" in read_text(data_dir, data_spec.emoji_lost_guid)
    assert read_text(data_dir, data_spec.utf8_guid).startswith("café ")
    assert read_text(data_dir, data_spec.undecodable_guid).startswith("broken ")


def test_read_text_missing_names_guid(data_dir):
    with pytest.raises(FileNotFoundError, match="guid 999"):
        read_text(data_dir, "999")


# --- images -----------------------------------------------------------------------------------------------


def _save(path: Path, image: Image.Image, image_format: str) -> Path:
    image.save(path, format=image_format)
    return path


@pytest.mark.parametrize(
    ("mode", "image_format"),
    [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("I;16", "PNG")],
)
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode, image_format):
    source = Image.new("RGB", (37, 21), (200, 30, 30))
    image = source.convert(mode) if mode != "I;16" else Image.new("I;16", (37, 21), 1000)
    path = _save(tmp_path / "x.jpg", image, image_format)
    with Image.open(path) as check:
        assert check.mode == mode  # the file really has the mode under test
    loaded = load_image(path, "x")
    assert loaded.mode == "RGB"
    assert loaded.size == (37, 21)
    path.unlink()
    loaded.getpixel((0, 0))  # fully decoded: no lazy read from the (now deleted) file


def test_load_image_cmyk_keeps_colour(tmp_path):
    path = _save(tmp_path / "c.jpg", Image.new("RGB", (16, 16), (220, 40, 40)).convert("CMYK"), "JPEG")
    red, green, blue = load_image(path).getpixel((8, 8))
    assert red > 180 and green < 80 and blue < 80


def test_load_image_alpha_composited_on_white(tmp_path):
    image = Image.new("RGBA", (10, 10), (0, 0, 255, 255))
    image.paste((0, 0, 0, 0), (0, 0, 5, 5))
    loaded = load_image(_save(tmp_path / "a.jpg", image, "PNG"))
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((8, 8)) == (0, 0, 255)


def test_load_image_palette_transparency_on_white(tmp_path):
    image = Image.new("P", (6, 6), 1)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.paste(0, (0, 0, 3, 3))
    image.info["transparency"] = 0
    path = tmp_path / "p.jpg"
    image.save(path, format="PNG", transparency=0)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((5, 5)) == (10, 200, 10)


def test_data_folder_images_all_load_as_rgb(data_dir, data_spec):
    special = {data_spec.grey_guid: "L", data_spec.cmyk_guid: "CMYK", data_spec.palette_guid: "P",
               data_spec.rgba_guid: "RGBA"}
    for guid in data_spec.guids:
        path = image_path(data_dir, guid)
        with Image.open(path) as raw:
            assert raw.mode == special.get(guid, "RGB")
        image = load_image(path, guid)
        assert image.mode == "RGB"
        assert image.size == data_spec.sizes[guid]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_load_image_turns_a_photo_upright_as_its_exif_says(tmp_path, orientation):
    # Phone cameras store a portrait photo as landscape pixels with an EXIF orientation; browsers show it upright.
    stored = Image.new("RGB", (40, 30), (10, 10, 10))
    stored.paste((250, 0, 0), (0, 0, 10, 10))  # a red corner, top left as stored
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = tmp_path / "o.jpg"
    stored.save(path, format="JPEG", exif=exif, quality=95)
    loaded = load_image(path)
    shown = {1: ((40, 30), (2, 2)), 3: ((40, 30), (37, 27)), 6: ((30, 40), (27, 2)), 8: ((30, 40), (2, 37))}
    size, red_at = shown[orientation]  # where a browser draws the red corner
    assert loaded.size == size
    red, green, _ = loaded.getpixel(red_at)
    assert red > 200 and green < 60


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    path = _save(tmp_path / "7.jpg", Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageTooLargeError, match=r"guid 7: .*300 × 200 = 60,000 pixels, over the limit of 50,000"):
        load_image(path, "7", max_pixels=50_000)
    assert load_image(path, "7", max_pixels=60_000).size == (300, 200)
    decoding = mock.patch.object(Image.Image, "load", side_effect=AssertionError("decoded"))
    with decoding, pytest.raises(ImageTooLargeError):  # refused from the header: no pixel decoded
        load_image(path, "7", max_pixels=50_000)
    # past twice PIL's own limit, PIL refuses it while opening it: too large all the same, not unreadable
    with mock.patch.object(Image, "MAX_IMAGE_PIXELS", 20_000), pytest.raises(ImageTooLargeError, match="guid 7"):
        load_image(path, "7", max_pixels=100_000)


def test_missing_image_raises_bad_image_error_naming_guid(tmp_path):
    with pytest.raises(BadImageError, match=r"guid 42: .*not found") as info:
        load_image(tmp_path / "42.jpg", "42")
    assert info.value.guid == "42"
    assert isinstance(info.value, ValueError)


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="JPEG")
    return buffer.getvalue()[:200]


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage", _truncated_jpeg()])
def test_corrupt_image_raises_bad_image_error_naming_guid(tmp_path, content):
    path = tmp_path / "13.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=r"guid 13: cannot read image .*13\.jpg") as info:
        load_image(path, "13")
    assert info.value.guid == "13"


def test_bad_image_error_survives_pickling(tmp_path):
    # DataLoader workers send read errors to the main process by pickling them.
    import pickle

    error = BadImageError("9", tmp_path / "9.jpg", "file not found")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is BadImageError
    assert copy.guid == "9"
    assert str(copy) == str(error)


# --- label files ------------------------------------------------------------------------------------------


def _label_file(tmp_path: Path, content: str, name: str = "train.txt") -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def _at(path: Path, line: int) -> str:
    return re.escape(f"{path}:{line}: ")


def test_read_label_file_rows_in_order(tmp_path):
    path = _label_file(tmp_path, "guid,tag\n3,positive\n1,negative\n\n2,neutral\n")
    rows = read_label_file(path)
    assert [(r.guid, r.tag) for r in rows] == [("3", "positive"), ("1", "negative"), ("2", "neutral")]


def test_read_label_file_tolerates_bom_and_spaces(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("guid, tag\n 5 , positive\n", encoding="utf-8-sig")
    assert [(r.guid, r.tag) for r in read_label_file(path)] == [("5", "positive")]


@pytest.mark.parametrize("header", ["id,tag", "guid,label", "guid", "tag,guid", "1,positive"])
def test_wrong_header(tmp_path, header):
    path = _label_file(tmp_path, f"{header}\n2,positive\n")
    with pytest.raises(ValueError, match=_at(path, 1) + "expected header 'guid,tag'"):
        read_label_file(path)


def test_empty_label_file(tmp_path):
    path = _label_file(tmp_path, "")
    with pytest.raises(ValueError, match=_at(path, 1) + "expected header"):
        read_label_file(path)


@pytest.mark.parametrize("tag", ["postive", "Positive", "null", "", "1"])
def test_unknown_tag_in_train_file(tmp_path, tag):
    path = _label_file(tmp_path, f"guid,tag\n1,neutral\n2,{tag}\n")
    valid = re.escape(str(sorted(LABELS)))
    with pytest.raises(ValueError, match=_at(path, 3) + f"unknown tag {re.escape(repr(tag))} for guid 2.*{valid}"):
        read_label_file(path)


def test_test_file_allows_null_but_train_file_does_not(tmp_path):
    path = _label_file(tmp_path, "guid,tag\n1,null\n2,null\n", name="test_without_label.txt")
    assert [r.tag for r in read_label_file(path, allow_unlabelled=True)] == ["null", "null"]
    with pytest.raises(ValueError, match=_at(path, 2) + "unknown tag 'null'"):
        read_label_file(path)


def test_duplicate_guid(tmp_path):
    path = _label_file(tmp_path, "guid,tag\n7,positive\n8,neutral\n7,negative\n")
    with pytest.raises(ValueError, match=_at(path, 4) + r"duplicate guid 7 \(first on line 2\)"):
        read_label_file(path)


@pytest.mark.parametrize("row", ["1,positive,extra", "1", "1,positive,"])
def test_wrong_column_count(tmp_path, row):
    path = _label_file(tmp_path, f"guid,tag\n2,neutral\n{row}\n")
    with pytest.raises(ValueError, match=_at(path, 3) + "expected 2 columns"):
        read_label_file(path)


def test_empty_guid(tmp_path):
    path = _label_file(tmp_path, "guid,tag\n,positive\n")
    with pytest.raises(ValueError, match=_at(path, 2) + "empty guid"):
        read_label_file(path)


def test_missing_label_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train.txt"))):
        read_label_file(tmp_path / "train.txt")


# --- splits of a data folder ------------------------------------------------------------------------------


def test_read_split_train_and_test(data_dir, data_spec):
    train = read_split(data_dir, "train")
    assert [(r.guid, r.tag) for r in train] == list(data_spec.train.items())
    assert {r.tag for r in train} == set(LABELS)
    test = read_split(data_dir, "test")
    assert [r.guid for r in test] == data_spec.test
    assert {r.tag for r in test} == {"null"}


def test_train_split_refuses_null(data_dir):
    path = data_dir / "train.txt"
    path.write_text(path.read_text() + "25,null\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r":\d+: unknown tag 'null'"):
        read_split(data_dir, "train")


def test_guid_without_text_file(data_dir, data_spec):
    guid = list(data_spec.train)[2]
    (data_dir / "data" / f"{guid}.txt").unlink()
    label_path = data_dir / "train.txt"
    with pytest.raises(FileNotFoundError, match=_at(label_path, 4) + f"guid {guid} has no text file"):
        read_split(data_dir, "train")


def test_guid_without_text_file_line_counts_blank_lines(data_dir):
    label_path = data_dir / "train.txt"
    label_path.write_text("guid,tag\n\n1,positive\n\n500,neutral\n")
    with pytest.raises(FileNotFoundError, match=_at(label_path, 5) + "guid 500 has no text file"):
        read_split(data_dir, "train")


def test_unknown_split(data_dir):
    with pytest.raises(ValueError, match=re.escape("unknown split 'val'; expected one of ['test', 'train']")):
        read_split(data_dir, "val")


def test_data_guids_train_then_test_each_once(data_dir, data_spec):
    test_path = data_dir / "test_without_label.txt"
    test_path.write_text(test_path.read_text() + "1,null\n")  # a guid in both files is extracted once
    assert data_guids(data_dir) == data_spec.guids
