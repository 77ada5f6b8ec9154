"""OCR stage: text drawn in a generated image is found, cached, resumed; '+ocr' text encoders read it."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from extract.dataset import image_path, read_split
from extract.ocr import clean_ocr_text, extract_ocr, ocr_path, read_ocr
from extract.registry import create_text_encoder


def draw_text(path, text: str) -> None:
    image = Image.new("RGB", (480, 120), (255, 255, 255))
    ImageDraw.Draw(image).text((20, 30), text, fill=(0, 0, 0), font=ImageFont.load_default(size=44))
    image.save(path)


class CountingReader:
    """Stands in for rapidocr where only the caching is under test."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image: Image.Image) -> str:
        self.calls += 1
        return f"text {self.calls}"


def test_rapidocr_finds_drawn_text_and_caches_it(data_dir, tmp_path):
    pytest.importorskip("rapidocr_onnxruntime")
    guid = read_split(data_dir, "train")[0].guid
    draw_text(image_path(data_dir, guid), "HAPPY FRIDAY")
    texts = extract_ocr(data_dir, tmp_path / "cache", [guid], progress=False)
    assert "HAPPY" in texts[guid].upper() and "FRIDAY" in texts[guid].upper()
    assert read_ocr(ocr_path(tmp_path / "cache", data_dir)) == texts


def test_ocr_cache_resumes_and_survives_a_torn_line(data_dir, tmp_path):
    guids = [row.guid for row in read_split(data_dir, "train")][:4]
    reader = CountingReader()
    first = extract_ocr(data_dir, tmp_path, guids[:2], progress=False, reader=reader)
    assert reader.calls == 2 and list(first) == guids[:2]
    path = ocr_path(tmp_path, data_dir)
    with path.open("a") as handle:
        handle.write('{"guid": "torn", "te')  # an interrupted write
    texts = extract_ocr(data_dir, tmp_path, guids, progress=False, reader=reader)
    assert reader.calls == 4  # only the two new guids were read
    assert texts == {guids[0]: "text 1", guids[1]: "text 2", guids[2]: "text 3", guids[3]: "text 4"}
    lines = path.read_text().splitlines()
    assert [json.loads(line)["guid"] for line in lines] == guids  # the torn line is gone


def test_clean_ocr_text_splits_glued_words_and_collapses_space():
    assert clean_ocr_text("Ihavefamily.   ok\nDAY") == "I have family. ok DAY"


def test_ocr_text_encoder_takes_the_image_text_as_a_second_segment(tiny_text_encoder_dir, data_dir):
    plain = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=16)
    with_ocr = create_text_encoder(str(tiny_text_encoder_dir) + "+ocr", max_tokens=16)
    assert with_ocr.name.endswith("+ocr") and with_ocr.options["ocr"] is True
    assert with_ocr.preprocessing() != plain.preprocessing()  # its cache can never pass for the plain one
    guid = read_split(data_dir, "train")[0].guid
    with_ocr.ocr_texts[guid] = "happy"
    text, image_text = with_ocr.read(data_dir, guid)
    assert image_text == "happy" and text == plain.read(data_dir, guid)
    batch = with_ocr.collate([(text, "happy"), (text, "")])
    assert (batch["token_type_ids"][0] == 1).any()  # the image text is the second segment
    alone = plain.collate([text])
    real = batch["attention_mask"][1].bool()
    assert torch.equal(batch["input_ids"][1][real], alone["input_ids"][0])  # no image text: the tweet alone


def test_empty_image_text_changes_nothing(tiny_text_encoder_dir):
    plain = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=16)
    with_ocr = create_text_encoder(str(tiny_text_encoder_dir) + "+ocr", max_tokens=16)
    with_ocr.load_state_dict(plain.state_dict())
    texts = ["happy sunny day", "sad rain"]
    features, mask = with_ocr.eval().encode([(texts[0], ""), (texts[1], "")])
    expected, expected_mask = plain.eval().encode(texts)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(features, expected)
    with_text, with_text_mask = with_ocr.encode([(texts[0], "great news"), (texts[1], "")])
    assert with_text_mask[0].sum() > expected_mask[0].sum()  # image text adds real tokens
    torch.testing.assert_close(with_text[1][with_text_mask[1]], expected[1][expected_mask[1]])


def test_text_encoder_variants_combine_and_unknown_ones_fail(tiny_text_encoder_dir):
    from extract.normalize import resolve_rules

    both = create_text_encoder(str(tiny_text_encoder_dir) + "+norm+ocr", max_tokens=16)
    assert both.ocr and both.normalize == resolve_rules("all")
    assert both.name == str(tiny_text_encoder_dir) + "+norm+ocr"
    rebuilt = create_text_encoder(both.name, **both.options)  # as a run folder rebuilds it
    assert rebuilt.describe() == both.describe()
    with pytest.raises(ValueError, match="unknown variant.*'emoji'"):
        create_text_encoder(str(tiny_text_encoder_dir) + "+emoji")


@pytest.mark.parametrize("ocr", [False, True])
def test_vader_variant_appends_the_lexicon_scores_to_every_real_token(tiny_text_encoder_dir, ocr):
    from extract.lexicon import vader_scores

    name = str(tiny_text_encoder_dir) + ("+ocr+vader" if ocr else "+vader")
    plain = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=16).eval()
    encoder = create_text_encoder(name, max_tokens=16).eval()
    extra = 8 if ocr else 4
    assert encoder.dim == plain.dim + extra and encoder.options["vader"] is True
    texts, image_texts = ["I LOVE this :)", "awful, just awful"], ["", "GREAT NEWS"]
    items = list(zip(texts, image_texts)) if ocr else texts
    features, mask = encoder.encode(items)  # (B, T, D + extra)
    expected = vader_scores(texts) if not ocr else torch.cat([vader_scores(texts), vader_scores(image_texts)], 1)
    for row in range(2):
        real = features[row][mask[row]]  # (T_real, D + extra)
        torch.testing.assert_close(real[:, plain.dim:], expected[row].expand(len(real), extra))
        assert not features[row][~mask[row]][:, plain.dim:].any()  # padding stays zero
    assert expected[0, 3] > 0.5 and expected[1, 3] < -0.5  # compound: positive, then negative
    if not ocr:
        torch.testing.assert_close(features[..., : plain.dim], plain.encode(texts)[0])  # the model's part unchanged


def test_imagetext_variant_encodes_the_image_text_alone_and_masks_posts_without_any(tiny_text_encoder_dir, data_dir):
    plain = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=16).eval()
    alone = create_text_encoder(str(tiny_text_encoder_dir) + "+imagetext+vader", max_tokens=16).eval()
    assert alone.ocr and alone.image_text_only and alone.dim == plain.dim + 4  # VADER of the image text only
    assert alone.preprocessing() != create_text_encoder(str(tiny_text_encoder_dir) + "+ocr+vader").preprocessing()
    guid = read_split(data_dir, "train")[0].guid
    alone.ocr_texts[guid] = "GREAT NEWS"
    assert alone.read(data_dir, guid) == "GREAT NEWS"  # the tweet is not in this stream

    features, mask = alone.encode(["GREAT NEWS", ""])  # (2, T, D + 4)
    expected, expected_mask = plain.encode(["GREAT NEWS"])
    assert torch.equal(mask[0, : expected_mask.shape[1]], expected_mask[0]) and mask[0].sum() == expected_mask.sum()
    torch.testing.assert_close(features[0][mask[0]][:, : plain.dim], expected[0][expected_mask[0]])
    assert not mask[1].any() and not features[1].any()  # no image text: nothing real, nothing but zeros
