"""Each head's own options, from the command line to config.json and back, and in a sweep crossing heads."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from fusion.config import PooledHeadConfig
from fusion.sweep import plan_trials
from tests.test_cli import MAX_TOKENS, invoke, one_line_error, read_submission, succeeded

TINY = ("--epochs", 2, "--batch-size", 8)


@pytest.fixture
def cached(data_dir: Path, tmp_path: Path, tiny_text_encoder_dir: Path, tiny_image_encoder_name: str) -> list[str]:
    """Both caches of the tiny data folder extracted; the ``--data --cache`` and encoder options."""
    shared = ["--data", data_dir, "--cache", tmp_path / "cache"]
    encoders = ["--text-encoder", tiny_text_encoder_dir, "--image-encoder", tiny_image_encoder_name]
    succeeded(invoke("extract", *shared, *encoders, "--max-tokens", MAX_TOKENS, "--workers", 0))
    return [*shared, *encoders]


def test_fit_gives_each_head_only_its_own_options(cached, tmp_path):
    # gated has no attention, so no rule that num_heads divides hidden.
    run = tmp_path / "gated"
    succeeded(invoke("fit", *cached, "--out", run, "--head", "gated", "--hidden", 130, *TINY))
    head = json.loads((run / "config.json").read_text())["head"]
    assert set(head) == {field.name for field in fields(PooledHeadConfig)} and head["hidden"] == 130
    succeeded(invoke("predict", *cached[:4], "--run", run, "--out", tmp_path / "sub.csv"))
    assert len(read_submission(tmp_path / "sub.csv")) > 1

    attention = tmp_path / "attention"
    one_line_error(
        invoke("fit", *cached, "--out", attention, "--head", "cross-attention", "--hidden", 130, "--num-heads", 4),
        "hidden=130 is not divisible by num_heads=4",
    )
    concat = tmp_path / "concat"
    one_line_error(
        invoke("fit", *cached, "--out", concat, "--head", "concat", "--num-heads", 8),
        "head 'concat' does not take num_heads; its options are hidden, dropout, text_pool, image_pool, "
        "image_positions",
    )
    assert not attention.exists() and not concat.exists()  # refused before any work


def test_a_sweep_crossing_heads_gives_each_the_options_it_takes():
    trials = plan_trials([{"head": ["gated", "cross-attention"], "num_heads": [2, 4], "hidden": [8]}])
    # gated takes no num_heads: it is fitted once, and its name and options show only what it took.
    assert [trial.name for trial in trials] == [
        "head=gated", "head=cross-attention num_heads=2", "head=cross-attention num_heads=4",
    ]
    assert trials[0].options == {"head": "gated", "hidden": 8} and trials[0].head_options == {"hidden": 8}
    assert [trial.head_options for trial in trials[1:]] == [{"num_heads": n, "hidden": 8} for n in (2, 4)]
    with pytest.raises(ValueError, match="hidden=8 is not divisible by num_heads=3"):
        plan_trials([{"head": ["gated", "cross-attention"], "num_heads": [3], "hidden": [8]}])
