"""The Python API (fusion/api.py): a run loaded once predicts raw posts as its cached rows, explains them, fits.

Parity is the point: a post encoded on the fly must get the probabilities its cached row gets,
for a fit run, a K-fold folder and a "+ocr" text encoder, so that a served model is the model
that was validated.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MAX_TOKENS
from PIL import Image
from typer.testing import CliRunner

import cli
import fusion.api
from extract.dataset import LABELS, BadImageError, image_path, read_split, read_text
from extract.ocr import extract_ocr
from extract.registry import create_encoder
from extract.run import extract_features
from fusion.api import FitSpec, Post, Run, fit
from fusion.config import FitConfig
from fusion.explain import EXPLANATION_FILES, explain
from fusion.run import with_modalities

TINY_HEAD = ("--epochs", 2, "--hidden", 8, "--batch-size", 8)


class SizeReader:
    """A deterministic stand-in for rapidocr: the image's size and mean colour as its 'text'."""

    def __init__(self, *args: object, **kwargs: object):
        pass

    def __call__(self, image: Image.Image) -> str:
        return f"size {image.width} by {image.height} mean {np.asarray(image).mean():.0f}"


@pytest.fixture
def cached(data_dir, tmp_path, tiny_text_encoder_dir, tiny_image_encoder_name, monkeypatch):
    """The generated data folder with text (plain and +ocr) and image caches of the tiny encoders."""
    monkeypatch.setattr("extract.encoders.hf_text.OcrReader", SizeReader)  # posts read image text like the cache
    cache = tmp_path / "cache"
    guids = [row.guid for split in ("train", "test") for row in read_split(data_dir, split)]
    texts = extract_ocr(data_dir, cache, guids, progress=False, reader=SizeReader(), workers=0)
    assert all(texts.values())
    for kind, name in (("text", str(tiny_text_encoder_dir)), ("text", f"{tiny_text_encoder_dir}+ocr"),
                       ("image", tiny_image_encoder_name)):
        encoder = create_encoder(kind, name, **({"max_tokens": TINY_MAX_TOKENS} if kind == "text" else {}))
        if getattr(encoder, "ocr", False):
            encoder.ocr_texts.update(texts)
        extract_features(encoder, data_dir, cache, batch_size=8, num_workers=0, progress=False)
    return {"data": data_dir, "cache": cache, "text": str(tiny_text_encoder_dir), "image": tiny_image_encoder_name}


def fit_by_cli(cached: dict, out: Path, *more: object, text: str | None = None) -> Path:
    args = ["fit", "--data", cached["data"], "--cache", cached["cache"], "--out", out, "--text-encoder",
            text or cached["text"], "--image-encoder", cached["image"], *TINY_HEAD, *more]
    result = CliRunner().invoke(cli.app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return out


def posts(data_dir: Path, guids: list[str]) -> list[Post]:
    return [Post(read_text(data_dir, guid), image_path(data_dir, guid)) for guid in guids]


def unlabelled(cached) -> list[str]:
    return [row.guid for row in read_split(cached["data"], "test")]


@pytest.mark.parametrize("kind", ["fit run", "K-fold folder", "+ocr text encoder"])
def test_raw_posts_predict_as_their_cached_rows(cached, tmp_path, kind):
    more = ("--folds", 2) if kind == "K-fold folder" else ()
    text = f"{cached['text']}+ocr" if kind == "+ocr text encoder" else None
    run = Run.load(fit_by_cli(cached, tmp_path / "run", *more, text=text))
    assert len(run.members) == (2 if more else 1)
    guids = unlabelled(cached)
    from_cache = run.predict_cached(cached["data"], guids, cached["cache"])  # (N, C)
    from_posts = run.predict_proba(posts(cached["data"], guids), batch_size=3)  # batches of other lengths
    assert from_posts.shape == (len(guids), len(LABELS))
    np.testing.assert_allclose(from_posts, from_cache, atol=1e-5)
    assert run.predict(posts(cached["data"], guids)) == [LABELS[i] for i in from_cache.argmax(1)]


def test_encoders_are_built_once_per_run_and_only_when_posts_need_them(cached, tmp_path, monkeypatch):
    built = []
    original = fusion.api.create_encoder
    monkeypatch.setattr(fusion.api, "create_encoder", lambda kind, name, **o: built.append(kind) or original(
        kind, name, **o))
    run = Run.load(fit_by_cli(cached, tmp_path / "run", "--folds", 3))
    guids = unlabelled(cached)
    run.predict_cached(cached["data"], guids, cached["cache"])
    assert built == []  # the submission path reads the caches: no encoder needed
    for _ in range(2):
        run.predict_proba(posts(cached["data"], guids[:2]))
    assert sorted(built) == ["image", "text"]  # three fold heads, two calls: each encoder built once


def test_a_post_image_may_be_a_path_a_pil_image_or_bytes(cached, tmp_path):
    run = Run.load(fit_by_cli(cached, tmp_path / "run"))
    guid = unlabelled(cached)[0]
    path, text = image_path(cached["data"], guid), read_text(cached["data"], guid)
    with Image.open(path) as image:
        picture = image.convert("RGBA")  # any mode: composited to RGB like the files
    each = [run.predict_proba(Post(text, image))[0] for image in (path, str(path), picture, path.read_bytes())]
    for probabilities in each[1:]:
        np.testing.assert_allclose(probabilities, each[0], atol=1e-6)


def test_an_unreadable_post_image_is_refused_in_one_line(cached, tmp_path):
    run = Run.load(fit_by_cli(cached, tmp_path / "run"))
    with pytest.raises(BadImageError, match="cannot read image <upload>"):
        run.predict_proba([Post("fine text", b"not an image")])
    with pytest.raises(BadImageError, match="file not found"):
        run.predict_proba([Post("fine text", tmp_path / "missing.jpg")])


def test_explain_of_one_run_is_its_heads_integrated_gradients_and_names_words(cached, tmp_path):
    run = Run.load(fit_by_cli(cached, tmp_path / "run"))
    guid = unlabelled(cached)[0]
    post = Post(read_text(cached["data"], guid), image_path(cached["data"], guid))
    explanation, picture = run.explain(post)
    assert picture.size == Image.open(post.image).size
    assert explanation.label == run.predict(post)[0] == explanation.target
    np.testing.assert_allclose(list(explanation.probabilities.values()), run.predict_proba(post)[0], atol=1e-6)
    member, encoders = run.members[0], next(iter(run.encoder_sets.values()))
    features = encoders.features([post], [picture], run.device)
    direct = explain(member.head, *with_modalities(features, member.modalities).batch(torch.tensor([0])),
                     target=explanation.target)
    np.testing.assert_allclose(explanation.token_weights, direct.token_weights, atol=1e-6)
    np.testing.assert_allclose(explanation.patch_weights, direct.patch_weights, atol=1e-6)
    words = [word.text for word in explanation.words]
    assert words and " ".join(words).lower() in " ".join(post.text.lower().split())


def test_explain_averages_the_members_of_an_ensemble(cached, tmp_path):
    run = Run.load(fit_by_cli(cached, tmp_path / "run", "--folds", 2))
    guid = unlabelled(cached)[1]
    post = Post(read_text(cached["data"], guid), image_path(cached["data"], guid))
    explanation, picture = run.explain(post, target="negative")
    features = next(iter(run.encoder_sets.values())).features([post], [picture], run.device)
    each = [explain(m.head, *features.batch(torch.tensor([0])), target="negative") for m in run.members]
    np.testing.assert_allclose(explanation.patch_weights, np.mean([e.patch_weights for e in each], axis=0), atol=1e-6)
    assert explanation.target == "negative"


def test_explain_gives_every_member_the_posts_positions_whatever_it_reads(cached, tmp_path):
    # An ablation's runs read one modality: the other comes to their heads as one masked position. An ensemble of a
    # text-only, an image-only and a two-modality member still explains each word and each patch of the post.
    run = Run.load(fit_by_cli(cached, tmp_path / "run"))
    both = run.members[0]
    run.members = [dataclasses.replace(both, modalities=m) for m in ("text", "image", "both")]
    guid = unlabelled(cached)[0]
    post = Post(read_text(cached["data"], guid), image_path(cached["data"], guid))
    explanation, picture = run.explain(post, target="positive")
    features = next(iter(run.encoder_sets.values())).features([post], [picture], run.device)
    text, _, image, _ = features.batch(torch.tensor([0]))  # the post's own positions
    direct = explain(both.head, *features.batch(torch.tensor([0])), target="positive")
    alone = {m: explain(both.head, *with_modalities(features, m).batch(torch.tensor([0])), target="positive")
             for m in ("text", "image")}
    assert explanation.token_weights.shape == (text.shape[1],) and explanation.patch_weights.shape == (image.shape[1],)
    # the image-only member adds zeros to the words, the text-only one to the patches
    np.testing.assert_allclose(explanation.token_weights, (alone["text"].token_weights + direct.token_weights) / 3,
                               atol=1e-6)
    np.testing.assert_allclose(explanation.patch_weights, (alone["image"].patch_weights + direct.patch_weights) / 3,
                               atol=1e-6)
    assert [word.text for word in explanation.words]


def test_predict_explain_writes_the_heatmap_words_and_json(cached, tmp_path):
    run_dir = fit_by_cli(cached, tmp_path / "run")
    guid = unlabelled(cached)[0]
    result = CliRunner().invoke(cli.app, [
        "predict", "--run", str(run_dir), "--text", read_text(cached["data"], guid), "--image",
        str(image_path(cached["data"], guid)), "--explain", str(tmp_path / "why"),
    ])
    assert result.exit_code == 0, result.output
    for name in EXPLANATION_FILES:
        assert (tmp_path / "why" / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "why" / "explanation.json").read_text())
    assert result.output.split()[0] == saved["label"] and saved["words"]
    with Image.open(tmp_path / "why" / "patches.png") as heatmap:
        assert heatmap.size == Image.open(image_path(cached["data"], guid)).size
    assert "patches.png" in (tmp_path / "why" / "words.html").read_text()
    refused = CliRunner().invoke(cli.app, ["predict", "--run", str(run_dir), "--out", str(tmp_path / "s.csv"),
                                           "--explain", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--explain explains one post" in refused.output


def test_fit_from_python_is_the_cli_fit(cached, tmp_path):
    spec = FitSpec(cached["text"], cached["image"], FitConfig(epochs=2, batch_size=8), {"hidden": 8})
    run = fit(spec, tmp_path / "api", data=cached["data"], cache=cached["cache"], folds=2)
    fit_by_cli(cached, tmp_path / "cli", "--folds", 2)
    cv = [json.loads((tmp_path / name / "cv.json").read_text()) for name in ("api", "cli")]
    assert cv[0] == cv[1]
    guids = unlabelled(cached)
    np.testing.assert_allclose(run.predict_cached(cached["data"], guids, cached["cache"]),
                               Run.load(tmp_path / "cli").predict_cached(cached["data"], guids, cached["cache"]))


def test_load_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        Run.load(tmp_path)
    with pytest.raises(ValueError, match="at least one run folder"):
        Run.load([])


def test_bytes_and_io_do_not_leave_files(cached, tmp_path):
    """An upload's bytes are decoded in memory: nothing is written beside the run or the data."""
    run_dir = fit_by_cli(cached, tmp_path / "run")
    before = sorted(p for p in tmp_path.rglob("*"))
    image = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(image, format="PNG")
    Run.load(run_dir).predict_proba(Post("red", image.getvalue()))
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_predicting_and_serving_start_without_the_training_only_libraries():
    """predict, serve and the Python API import neither scikit-learn nor matplotlib (over 1.5 s at start): only a
    split or a plot imports them."""
    code = "import sys, fusion.predict, fusion.api, serve; print(sorted({'sklearn', 'matplotlib'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert loaded.stdout.strip() == "[]"
