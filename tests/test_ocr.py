"""OCR stage: text drawn in a generated image is found, cached, resumed, read in parallel; '+ocr' encoders read it."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from extract.dataset import BadImageError, image_path, read_split
from extract.encoders import hf_text
from extract.ocr import OCR_SETTINGS, OcrSettings, clean_ocr_text, extract_ocr, ocr_path, read_ocr
from extract.registry import create_text_encoder
from extract.run import data_guids


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


class ImageSizeReader:
    """A deterministic stand-in for rapidocr that pickles: the image's size and mean colour.

    Images 40 px wide take longer, so that parallel workers finish out of guid order.
    """

    def __call__(self, image: Image.Image) -> str:
        time.sleep(0.05 if image.width == 40 else 0.0)
        return f"{image.width}x{image.height} {np.asarray(image).mean():.3f}"


def test_rapidocr_finds_drawn_text_in_worker_processes_and_caches_it(data_dir, tmp_path):
    pytest.importorskip("rapidocr_onnxruntime")
    guids = [row.guid for row in read_split(data_dir, "train")][:2]
    draw_text(image_path(data_dir, guids[0]), "HAPPY FRIDAY")
    draw_text(image_path(data_dir, guids[1]), "GOOD NEWS")
    texts = extract_ocr(data_dir, tmp_path / "cache", guids, progress=False, workers=2)  # OCR_SETTINGS, 1 thread each
    assert "HAPPY" in texts[guids[0]].upper() and "FRIDAY" in texts[guids[0]].upper()
    assert "GOOD" in texts[guids[1]].upper() and "NEWS" in texts[guids[1]].upper()
    path = ocr_path(tmp_path / "cache", data_dir)
    assert path.name == f"ocr-rapidocr-{OCR_SETTINGS.tag}.jsonl" and read_ocr(path) == texts


def test_ocr_cache_resumes_and_survives_a_torn_line(data_dir, tmp_path):
    guids = [row.guid for row in read_split(data_dir, "train")][:4]
    reader = CountingReader()
    first = extract_ocr(data_dir, tmp_path, guids[:2], progress=False, reader=reader, workers=0)
    assert reader.calls == 2 and list(first) == guids[:2]
    path = ocr_path(tmp_path, data_dir)
    with path.open("a") as handle:
        handle.write('{"guid": "torn", "te')  # an interrupted write
    texts = extract_ocr(data_dir, tmp_path, guids, progress=False, reader=reader, workers=0)
    assert reader.calls == 4  # only the two new guids were read
    assert texts == {guids[0]: "text 1", guids[1]: "text 2", guids[2]: "text 3", guids[3]: "text 4"}
    lines = path.read_text().splitlines()
    assert [json.loads(line)["guid"] for line in lines] == guids  # the torn line is gone


def test_parallel_ocr_writes_what_one_process_writes_in_guid_order(data_dir, tmp_path):
    guids = data_guids(data_dir)
    alone = extract_ocr(data_dir, tmp_path / "alone", guids, progress=False, reader=ImageSizeReader(), workers=0)
    pooled = extract_ocr(data_dir, tmp_path / "pooled", guids, progress=False, reader=ImageSizeReader(), workers=2)
    assert pooled == alone and list(pooled) == guids
    assert ocr_path(tmp_path / "pooled", data_dir).read_bytes() == ocr_path(tmp_path / "alone", data_dir).read_bytes()


def test_parallel_ocr_resumes_after_a_torn_line(data_dir, tmp_path):
    guids = data_guids(data_dir)
    path = ocr_path(tmp_path, data_dir)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"guid": guids[0], "text": "cached"}) + "\n" + '{"guid": "torn", "te')
    texts = extract_ocr(data_dir, tmp_path, guids, progress=False, reader=ImageSizeReader(), workers=2)
    expected = extract_ocr(data_dir, tmp_path / "alone", guids[1:], progress=False, reader=ImageSizeReader(), workers=0)
    assert texts == {guids[0]: "cached"} | expected  # the cached guid was not read again
    assert [json.loads(line)["guid"] for line in path.read_text().splitlines()] == guids  # the torn line is gone


def test_a_bad_image_in_a_worker_stops_the_run_or_is_skipped(data_dir, tmp_path):
    guids = [row.guid for row in read_split(data_dir, "train")][:6]
    image_path(data_dir, guids[3]).write_bytes(b"not a jpeg")
    with pytest.raises(BadImageError, match=f"guid {guids[3]}: cannot read image"):
        extract_ocr(data_dir, tmp_path, guids, progress=False, reader=ImageSizeReader(), workers=2)
    assert list(read_ocr(ocr_path(tmp_path, data_dir))) == guids[:3]  # the images before it are kept
    texts = extract_ocr(data_dir, tmp_path, guids, progress=False, reader=ImageSizeReader(), workers=2, skip_bad=True)
    assert texts[guids[3]] == "" and all(texts[guid] for guid in guids if guid != guids[3])


def test_ocr_settings_keep_caches_apart(data_dir, tmp_path):
    guids = [row.guid for row in read_split(data_dir, "train")][:3]
    fast = OcrSettings(det_min_side=0, use_cls=False)
    untagged = ocr_path(tmp_path, data_dir).with_name("ocr-rapidocr.jsonl")  # rapidocr's defaults, before tags
    untagged.parent.mkdir(parents=True)
    untagged.write_text("".join(json.dumps({"guid": guid, "text": "untagged"}) + "\n" for guid in guids))
    reader = CountingReader()
    texts = extract_ocr(data_dir, tmp_path, guids, progress=False, reader=reader, workers=0, settings=fast)
    assert list(texts.values()) == ["text 1", "text 2", "text 3"]  # other settings never read the untagged file
    again = extract_ocr(data_dir, tmp_path, guids, progress=False, reader=reader, workers=0)
    assert again == dict.fromkeys(guids, "untagged") and reader.calls == 3  # the defaults adopt it
    assert ocr_path(tmp_path, data_dir, fast) != ocr_path(tmp_path, data_dir)
    assert read_ocr(ocr_path(tmp_path, data_dir, fast)) == texts
    with pytest.raises(ValueError, match="rec_batch >= 1"):
        OcrSettings(rec_batch=0)


def test_models_as_shipped_read_and_fill_the_folded_models_cache(data_dir, tmp_path):
    guids = [row.guid for row in read_split(data_dir, "train")][:2]
    shipped = OcrSettings(folded=False)  # the same text (README): the same cache file, an old untagged one adopted
    untagged = ocr_path(tmp_path, data_dir).with_name("ocr-rapidocr.jsonl")
    untagged.parent.mkdir(parents=True)
    untagged.write_text("".join(json.dumps({"guid": guid, "text": "untagged"}) + "\n" for guid in guids))
    reader = CountingReader()
    texts = extract_ocr(data_dir, tmp_path, guids, progress=False, reader=reader, workers=0, settings=shipped)
    assert texts == dict.fromkeys(guids, "untagged") and reader.calls == 0
    assert ocr_path(tmp_path, data_dir, shipped) == ocr_path(tmp_path, data_dir) and not untagged.exists()


def test_ocr_settings_are_part_of_the_text_cache_identity(tiny_text_encoder_dir, monkeypatch):
    with_ocr = create_text_encoder(str(tiny_text_encoder_dir) + "+ocr", max_tokens=16)
    alone = create_text_encoder(str(tiny_text_encoder_dir) + "+imagetext", max_tokens=16)
    before = [with_ocr.preprocessing(), alone.preprocessing()]
    assert all(OCR_SETTINGS.tag in preprocessing["ocr"] for preprocessing in before)
    monkeypatch.setattr(hf_text, "OCR_SETTINGS", OcrSettings(det_min_side=0, use_cls=False))
    assert with_ocr.preprocessing() != before[0] and alone.preprocessing() != before[1]  # such caches are refused


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

