"""K folds trained as one batched model (fusion/batched.py) are the K separate HeadTrainer fits."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from test_sweep import TINY, run, tiny_cache
from test_train import head_config, synthetic
from typer.testing import CliRunner

import cli
from fusion.batched import Member, StackedInputs, check_batchable, fit_batched
from fusion.config import FitConfig
from fusion.losses import loss_names
from fusion.registry import input_poolings
from fusion.run import load_labelled, read_config, read_metrics
from fusion.split import stratified_folds
from fusion.sweep import SweepOptions, trial_tasks
from fusion.train import HeadTrainer

N, FOLDS = 101, 3  # folds of 67 or 68 training rows: with batches of 8, the last batch is 3 or 4 rows
POOLED_HEADS = ["gated", "concat", "late", "text-only", "image-only"]

__all__ = ["tiny_cache"]  # test_sweep.py's module fixture (the generated data and its caches), reused here


def members(head: str, text_pool: str, image_pool: str, **fit_options) -> list[Member]:
    labels = np.random.default_rng(1).integers(0, 3, N)
    config = head_config(text_pool=text_pool, image_pool=image_pool, dropout=0.0)
    options = {"head": head, "epochs": 10, "patience": 2, "batch_size": 8, "lr": 1e-2, "seed": 5} | fit_options
    fit_config = FitConfig(**options).validate()
    features = synthetic(labels, seed=0, signal=0.2).pooled(input_poolings(head, config))
    splits = stratified_folds(labels, FOLDS, seed=0)
    return [Member(fit_config, config, features, labels, train, val) for train, val in splits]


def separate(member: Member) -> HeadTrainer:
    features, labels = member.features, member.labels
    return HeadTrainer(copy.deepcopy(member.fit_config), member.head_config).fit(
        features.subset(member.train_rows), labels[member.train_rows], features.subset(member.val_rows),
        labels[member.val_rows], progress=False,
    )


def assert_same_fits(batched: list[HeadTrainer], alone: list[HeadTrainer]) -> None:
    for fold, (one, other) in enumerate(zip(batched, alone)):
        assert one.best_epoch_ == other.best_epoch_, fold
        assert one.val_metrics_ == other.val_metrics_, fold
        assert [h["val_macro_f1"] for h in one.history_] == [h["val_macro_f1"] for h in other.history_], fold
        for key in ("train_loss", "val_loss"):
            np.testing.assert_allclose([h[key] for h in one.history_], [h[key] for h in other.history_], rtol=1e-5)
        for (name, weights), expected in zip(one.model_.named_parameters(), other.model_.parameters()):
            torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5, msg=f"fold {fold}: {name}")


@pytest.mark.parametrize("head", POOLED_HEADS)
def test_batched_folds_without_dropout_are_the_separate_fits(head):
    """Same best epoch, validation report, history and weights; the folds differ in size, so the last batches do."""
    folds = members(head, "mean", "max")
    assert len({len(m.train_rows) % 8 for m in folds}) > 1  # ragged last batches are exercised
    batched = fit_batched(folds)
    alone = [separate(member) for member in folds]
    assert len({len(t.history_) for t in alone}) > 1 or head != "gated"  # members stop at different epochs
    assert_same_fits(batched, alone)


def test_attention_pooling_and_a_fold_with_one_step_fewer():
    """Attention pooling reads whole sequences (padded to the longest member's). Batches of 17 end each epoch on
    16 or 17 rows; batches of 67 give the 67-row folds one step and the 68-row fold two, the last of one row."""
    for batch_size in (17, 67):
        folds = members("gated", "attention", "attention", batch_size=batch_size)
        assert_same_fits(fit_batched(folds), [separate(member) for member in folds])


def test_several_configurations_share_a_batch():
    """Fixed poolings differ only in the pooled vectors they feed the head: one batch holds several of them."""
    batch = members("gated", "mean", "mean")[:2] + members("gated", "last", "max")[1:]
    assert_same_fits(fit_batched(batch), [separate(member) for member in batch])


def test_class_weights_and_balanced_sampling_follow_each_member():
    folds = members("concat", "first", "last", class_weights=True, balanced_sampling=True, loss="focal")
    assert_same_fits(fit_batched(folds), [separate(member) for member in folds])


@pytest.mark.parametrize("loss", loss_names())
def test_every_loss_of_the_members_at_once_is_each_fits_own(loss):
    """Without class weights the members' losses of a full step are one vmapped call, of a ragged last step one call
    each: both give each member its own fit's loss and gradient."""
    folds = members("gated", "mean", "max", loss=loss, label_smoothing=0.1)
    assert_same_fits(fit_batched(folds), [separate(member) for member in folds])


def test_with_dropout_the_fits_differ_but_train():
    folds = members("gated", "mean", "mean")
    for member in folds:
        member.head_config = head_config(text_pool="mean", image_pool="mean", dropout=0.3)
    batched = fit_batched(folds)
    assert all(t.val_metrics_["macro_f1"] > 0 and not t.model_.training for t in batched)


def test_heads_that_attend_across_positions_are_refused():
    with pytest.raises(ValueError, match="pooled heads only"):
        check_batchable(FitConfig(head="cross-attention"))
    with pytest.raises(ValueError, match="aux_data"):
        check_batchable(FitConfig(aux_data="somewhere"))
    mixed = members("gated", "mean", "mean")[:1] + members("concat", "mean", "mean")[:1]
    with pytest.raises(ValueError, match="same training options"):
        fit_batched(mixed)


def test_sweep_and_fit_batch_folds_write_the_runs_of_the_separate_fits(tiny_cache, tmp_path):
    """sweep --set batch_folds=… and fit --folds K --batch-folds: without dropout, the separate fits' run folders."""
    grid = TINY | {"head": ["gated"], "dropout": [0.0], "epochs": [4], "batch_folds": [False, True]}
    trials, rows = run(tiny_cache, tmp_path / "sweep", [grid], folds=3)
    by_trial = {trial.fit_config.batch_folds: tmp_path / "sweep" / "runs" / trial.folder for trial in trials}
    assert rows[0]["macro_f1_mean"] == rows[1]["macro_f1_mean"] and rows[0]["macro_f1_std"] == rows[1]["macro_f1_std"]
    result = CliRunner().invoke(cli.app, [
        "fit", "--data", str(tiny_cache["data_dir"]), "--cache", str(tiny_cache["cache_root"]), "--text-encoder",
        tiny_cache["text_encoder"], "--image-encoder", tiny_cache["image_encoder"], "--out", str(tmp_path / "fit"),
        "--head", "gated", "--hidden", "8", "--dropout", "0", "--epochs", "4", "--batch-size", "8", "--folds", "3",
        "--split-seed", "0", "--batch-folds",
    ])
    assert result.exit_code == 0, result.output
    for fold in range(3):
        separate, batched = (read_metrics(by_trial[mode] / f"fold-{fold}") for mode in (False, True))
        fitted = read_metrics(tmp_path / "fit" / f"fold-{fold}")
        assert batched["validation"] == separate["validation"] == fitted["validation"]
        assert batched["best_epoch"] == separate["best_epoch"] == fitted["best_epoch"]
        assert read_config(tmp_path / "fit" / f"fold-{fold}")["fit"]["batch_folds"] is True
    refused = CliRunner().invoke(cli.app, ["fit", "--out", str(tmp_path / "one"), "--batch-folds"])
    assert refused.exit_code != 0 and "--folds K" in refused.output


def test_sweep_batches_the_fixed_poolings_of_a_head_together(tiny_cache, tmp_path):
    """With batch_folds, the sweep fits every configuration that shares a batch key as one model (in --jobs parts):
    here 2 × 2 fixed poolings × 3 folds, whose runs are, without dropout, those of the separate fits."""
    pools = {"text_pool": ["mean", "max"], "image_pool": ["last", "mean"]}
    grid = TINY | {"head": ["gated"], "dropout": [0.0], "epochs": [4]} | pools
    separate_trials, separate_rows = run(tiny_cache, tmp_path / "separate", [grid], folds=3)
    batched = grid | {"batch_folds": [True]}
    trials, rows = run(tiny_cache, tmp_path / "batched", [batched], folds=3)
    labelled = {trials[0].encoders: load_labelled(
        tiny_cache["data_dir"], tiny_cache["cache_root"], text_encoder=tiny_cache["text_encoder"],
        image_encoder=tiny_cache["image_encoder"],
    )}
    every_fit = sorted((trial.index, fold) for trial in trials for fold in range(3))
    for jobs, parts in ((1, [12]), (2, [6, 6]), (3, [4, 4, 4]), (5, [3, 3, 3, 3])):
        tasks = trial_tasks(labelled, trials, SweepOptions(folds=3, jobs=jobs))
        assert [len(task) for task in tasks] == parts
        assert sorted((trial.index, fold) for task in tasks for trial, fold in task) == every_fit
        # dealt out in turn: each part has fits of every trial once there are at least as many fits as trials
        assert all({trial.index for trial, _ in task} == {t.index for t in trials} for task in tasks if len(task) >= 4)
    assert [row["config"] for row in rows] == [row["config"] for row in separate_rows]
    for row, alone in zip(rows, separate_rows):
        assert (row["macro_f1_mean"], row["macro_f1_std"]) == (alone["macro_f1_mean"], alone["macro_f1_std"])
    for trial, alone in zip(trials, separate_trials):
        for fold in range(3):
            one, other = (read_metrics(out / "runs" / t.folder / f"fold-{fold}")
                          for out, t in ((tmp_path / "batched", trial), (tmp_path / "separate", alone)))
            assert (one["validation"], one["best_epoch"]) == (other["validation"], other["best_epoch"])


def test_stacked_inputs_join_streams_of_other_lengths():
    """Members reading streams of other lengths get each its own rows, padded to the longest real position in the
    step: the masks of PairFeatures.batch and the features at every real position, whatever the padding holds."""
    labels = np.random.default_rng(1).integers(0, 3, N)
    long = synthetic(labels, seed=0)
    short = dataclasses.replace(long, text=long.text[:, :3].clone(), text_mask=long.text_mask[:, :3].clone())
    picked = [Member(FitConfig(), head_config(), features, labels, np.arange(N), np.arange(N)) for features in
              (long, short, long)]
    rows = [torch.tensor([5, 1, 7]), torch.tensor([2, 9]), torch.tensor([0])]
    stacked = StackedInputs(picked, ("text", "image")).gather([0, 1, 2], [np.arange(N)] * 3, rows)
    for k, (member, pick) in enumerate(zip(picked, rows)):
        padded = torch.cat([pick, torch.zeros(3 - len(pick), dtype=torch.long)])  # padded with the member's row 0
        own = member.features.batch(padded)
        for features, mask, (own_features, own_mask) in zip(stacked[::2], stacked[1::2], (own[:2], own[2:])):
            length = own_mask.shape[1]
            assert not mask[k, :, length:].any() and torch.equal(mask[k, :, :length], own_mask)
            torch.testing.assert_close(features[k, :, :length][own_mask], own_features[own_mask], rtol=0, atol=0)
