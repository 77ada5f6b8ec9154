"""Auxiliary labelled texts (a text-only folder, e.g. mvsa-multiple-text): reading, extraction, joint training.

The auxiliary rows join the training rows of every fit and every fold, never the validation rows.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_WORDS, TINY_MAX_TOKENS, write_data_dir

from extract.cache import CacheMismatchError
from extract.dataset import is_text_only, read_split, read_text
from extract.registry import create_text_encoder
from extract.run import data_guids, extract_features
from fusion.config import FitConfig
from fusion.features import JoinedFeatures, PairFeatures
from fusion.run import fit_run, load_labelled, read_config
from fusion.sweep import SweepOptions, sweep_from_cache

TINY = {"hidden": 8}


def write_texts(folder: Path, rows: list[tuple[str, str, str]], header: str = "guid,text,tag") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "texts.csv").open("w", newline="", encoding="utf-8") as handle:
        handle.write(header + "\n")
        csv.writer(handle).writerows(rows)
    return folder


def aux_rows(n: int = 30) -> list[tuple[str, str, str]]:
    labels = list(CLASS_WORDS)
    return [
        (f"aux{i}", " ".join(CLASS_WORDS[labels[i % 3]][j % 6] for j in range(i, i + 4)) + "  \n #tag", labels[i % 3])
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_text_encoder_dir, _tiny_image_encoder_template):
    """Pairs with both caches, and a text-only folder with its text cache, from the same tiny encoders."""
    root = tmp_path_factory.mktemp("aux")
    data_dir = write_data_dir(root / "data")
    aux_dir = write_texts(root / "aux", aux_rows())
    text = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS)
    for folder, encoders in ((data_dir, (text, copy.deepcopy(_tiny_image_encoder_template))), (aux_dir, (text,))):
        for encoder in encoders:
            extract_features(encoder, folder, root / "cache", batch_size=8, num_workers=0, progress=False)
    return {"data_dir": data_dir, "aux_dir": aux_dir, "cache_root": root / "cache", "text_encoder": text.name,
            "image_encoder": _tiny_image_encoder_template.name, "root": root}


def test_text_only_folder_is_a_train_split_without_test(tmp_path):
    folder = write_texts(tmp_path / "t", aux_rows(6))
    assert is_text_only(folder)
    rows = read_split(folder, "train")
    assert [r.guid for r in rows] == [f"aux{i}" for i in range(6)]
    assert [r.tag for r in rows[:3]] == ["positive", "neutral", "negative"]
    assert read_split(folder, "test") == []
    assert data_guids(folder) == [r.guid for r in rows]
    assert "\n" not in read_text(folder, "aux0") and "  " not in read_text(folder, "aux0")


@pytest.mark.parametrize(("rows", "header", "message"), [
    ([("a", "x", "happy")], "guid,text,tag", "unknown tag 'happy'"),
    ([("a", "x", "positive"), ("a", "y", "neutral")], "guid,text,tag", "duplicate guid a"),
    ([("a", "x", "positive")], "guid,tag,text", "expected header 'guid,text,tag'"),
])
def test_text_only_folder_refuses_bad_rows(tmp_path, rows, header, message):
    folder = write_texts(tmp_path / "bad", rows, header)
    with pytest.raises(ValueError, match=message):
        read_split(folder, "train")


def test_joined_features_keep_the_row_order_and_pad_each_part():
    first = PairFeatures(["a", "b"], torch.ones(2, 3, 4).half(), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool(),
                         torch.full((2, 5, 6), 2.0).half(), torch.ones(2, 5, dtype=torch.bool))
    second = PairFeatures(["x", "y"], torch.full((2, 2, 4), 3.0).half(), torch.ones(2, 2, dtype=torch.bool),
                          torch.zeros(2, 1, 6).half(), torch.zeros(2, 1, dtype=torch.bool))
    joined = JoinedFeatures(first, second)
    assert len(joined) == 4
    text, text_mask, image, image_mask = joined.batch(torch.tensor([2, 0, 3, 1]))
    assert text.shape == (4, 3, 4) and image.shape == (4, 5, 6)
    assert text[:, 0, 0].tolist() == [3.0, 1.0, 3.0, 1.0]  # rows in the order asked for
    assert text_mask.sum(1).tolist() == [2, 2, 2, 3]
    assert image_mask.sum(1).tolist() == [0, 5, 0, 5]  # auxiliary rows have no image
    assert torch.equal(image[0], torch.zeros(5, 6)) and torch.equal(text[0, 2], torch.zeros(4))  # padding is zero


def test_aux_rows_train_but_never_validate(caches, tmp_path):
    common = {"text_encoder": caches["text_encoder"], "image_encoder": caches["image_encoder"], "progress": False}
    config = FitConfig(head="gated", epochs=2, batch_size=8, val_fraction=0.25)
    plain = fit_run(caches["data_dir"], caches["cache_root"], tmp_path / "plain", config, TINY, **common)
    with_aux = fit_run(
        caches["data_dir"], caches["cache_root"], tmp_path / "aux",
        FitConfig(head="gated", epochs=2, batch_size=8, val_fraction=0.25, aux_data=str(caches["aux_dir"])),
        TINY, **common,
    )
    saved = read_config(tmp_path / "aux")
    assert saved["val_guids"] == read_config(tmp_path / "plain")["val_guids"]  # the same split, pairs only
    assert not any(guid.startswith("aux") for guid in saved["val_guids"])
    assert saved["fit"]["aux_data"] == str(caches["aux_dir"])
    changed = [not torch.equal(a, b) for a, b in zip(plain.model_.state_dict().values(),
                                                     with_aux.model_.state_dict().values())]
    assert any(changed)  # the auxiliary rows were trained on


def test_sweep_folds_validate_on_pairs_only(caches, tmp_path):
    grid = [{k: [v] for k, v in TINY.items()} | {"epochs": [1], "batch_size": [8], "head": ["gated"],
                                                 "aux_data": ["", str(caches["aux_dir"])]}]
    trials, rows = sweep_from_cache(
        caches["data_dir"], caches["cache_root"], tmp_path / "sweep", grid, SweepOptions(folds=2),
        text_encoder=caches["text_encoder"], image_encoder=caches["image_encoder"], echo=lambda _: None,
    )
    assert len(rows) == 2
    pairs = {r.guid for r in read_split(caches["data_dir"], "train")}
    for config in (tmp_path / "sweep" / "runs").glob("*/fold-*/config.json"):
        val_guids = json.loads(config.read_text())["val_guids"]
        assert val_guids and set(val_guids) <= pairs


def test_aux_cache_of_another_encoder_is_refused(caches, tmp_path, tiny_text_encoder_dir):
    other = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS, normalize="all")
    aux_dir = write_texts(tmp_path / "aux-other", aux_rows(6))
    extract_features(other, aux_dir, caches["cache_root"], batch_size=8, num_workers=0, progress=False)
    labelled = load_labelled(caches["data_dir"], caches["cache_root"], text_encoder=caches["text_encoder"],
                             image_encoder=caches["image_encoder"])
    with pytest.raises(CacheMismatchError, match="preprocessing"):
        labelled.aux(str(aux_dir))


def test_aux_labels_follow_the_file(caches):
    labelled = load_labelled(caches["data_dir"], caches["cache_root"], text_encoder=caches["text_encoder"],
                             image_encoder=caches["image_encoder"])
    features, labels = labelled.aux(str(caches["aux_dir"]))
    assert features.guids == [f"aux{i}" for i in range(30)]
    np.testing.assert_array_equal(labels, np.arange(30) % 3)
    assert not features.image_mask.any() and features.text_mask.any(1).all()


def test_aux_data_cannot_train_an_image_only_ablation():
    with pytest.raises(ValueError, match="modalities=image"):
        FitConfig(aux_data="somewhere", modalities="image").validate()
