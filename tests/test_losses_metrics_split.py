"""Losses, the classification report, and the seeded stratified splits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from extract.dataset import LABELS
from fusion import losses, split
from fusion.config import FitConfig
from fusion.finetune import FinetuneConfig
from fusion.losses import LossOptions, classification_loss, inverse_frequency_weights, register_loss, training_loss
from fusion.metrics import evaluate, format_report
from fusion.split import fold_splits, stratified_folds, stratified_split
from fusion.train import HeadTrainer
from tests.test_train import fit, head_config, make_data


def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, generator=generator) * 2  # (B, C)
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])  # (B,)
    return logits, targets


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", ["ce", "focal"])
def test_a_gradient_step_raises_the_true_class_probability(kind, weighted):
    logits, targets = toy_batch()
    weights = torch.tensor([0.5, 1.5, 3.0]) if weighted else None
    logits.requires_grad_(True)
    loss = classification_loss(logits, targets, kind=kind, class_weights=weights)
    loss.backward()
    before = torch.softmax(logits.detach(), -1).gather(1, targets[:, None]).squeeze(1)  # (B,)
    stepped = logits.detach() - 0.1 * logits.grad
    after = torch.softmax(stepped, -1).gather(1, targets[:, None]).squeeze(1)  # (B,)
    assert (after > before).all(), (before, after)
    assert classification_loss(stepped, targets, kind=kind, class_weights=weights) < loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_with_gamma_zero_is_cross_entropy(weighted, smoothing):
    logits, targets = toy_batch()
    weights = torch.tensor([0.5, 1.5, 3.0]) if weighted else None
    options = {"class_weights": weights, "label_smoothing": smoothing}
    ce = classification_loss(logits, targets, kind="ce", **options)
    focal = classification_loss(logits, targets, kind="focal", focal_gamma=0.0, **options)
    torch.testing.assert_close(focal, ce)


def test_focal_down_weights_easy_examples():
    targets = torch.tensor([0, 0])
    easy, hard = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]])
    for gamma in (1.0, 2.0):
        ratio = [
            classification_loss(x, targets[:1], kind="focal", focal_gamma=gamma)
            / classification_loss(x, targets[:1], kind="ce")
            for x in (easy, hard)
        ]
        assert ratio[0] < ratio[1] < 1.0


def test_focal_loss_is_below_cross_entropy():
    logits, targets = toy_batch()
    ce = classification_loss(logits, targets, kind="ce")
    assert classification_loss(logits, targets, kind="focal", focal_gamma=2.0) < ce


def test_unknown_loss_is_refused():
    logits, targets = toy_batch()
    with pytest.raises(ValueError, match=r"'hinge'.*\['ce', 'focal'\]"):
        classification_loss(logits, targets, kind="hinge")
    for config in (FitConfig, FinetuneConfig):
        with pytest.raises(ValueError, match=r"loss='hinge' is not one of \['ce', 'focal'\]"):
            config(loss="hinge").validate()
        with pytest.raises(ValueError, match="focal_gamma must be at least 0"):
            config(loss="focal", focal_gamma=-1.0).validate()


@pytest.mark.parametrize("kind", ["ce", "focal"])
def test_training_loss_is_the_registered_loss_with_the_config_options(kind):
    """fit and finetune train through ``training_loss``: the registry's loss, their options, weights from labels."""
    logits, targets = toy_batch()
    labels = np.array([0, 0, 0, 1, 2, 2])
    for config in (FitConfig(loss=kind, class_weights=True, label_smoothing=0.1, focal_gamma=1.5),
                   FinetuneConfig(loss=kind, class_weights=True, label_smoothing=0.1, focal_gamma=1.5)):
        expected = classification_loss(
            logits, targets, kind=kind, class_weights=inverse_frequency_weights(labels, 3), label_smoothing=0.1,
            focal_gamma=1.5,
        )
        torch.testing.assert_close(training_loss(config, labels, 3)(logits, targets), expected, rtol=0, atol=0)


@pytest.fixture
def brier(monkeypatch) -> list[int]:
    """A new loss, registered as a user would (one function, one line), in a copy of the registry."""
    monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))
    calls = []

    @register_loss("brier")
    def brier_score(logits: torch.Tensor, targets: torch.Tensor, options: LossOptions) -> torch.Tensor:
        calls.append(len(targets))
        one_hot = torch.nn.functional.one_hot(targets, logits.shape[1]).to(logits.dtype)  # (B, C)
        return (torch.softmax(logits, dim=-1) - one_hot).square().sum(1).mean()

    return calls


def test_a_registered_loss_is_accepted_and_trained_with_by_fit(brier):
    assert "brier" in losses.loss_names()
    with pytest.raises(ValueError, match="already registered"):
        register_loss("brier")(classification_loss)
    data = make_data()
    trainer = HeadTrainer(FitConfig(head="concat", loss="brier", epochs=2).validate(), head_config())
    trainer.fit(*data, progress=False)
    assert sum(brier) == 2 * len(data[1])  # every training row of both epochs went through the new loss
    assert fit(data, loss="brier").val_metrics_["macro_f1"] > 0.9  # and it learns
    FinetuneConfig(loss="brier").validate()


def test_inverse_frequency_weights_favour_rare_classes():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    weights = inverse_frequency_weights(labels, 3)
    assert weights.dtype == torch.float32 and weights.shape == (3,)
    assert weights[2] > weights[1] > weights[0]
    torch.testing.assert_close(weights, torch.tensor([100 / 180, 100 / 90, 100 / 30]))
    assert weights[labels].mean().item() == pytest.approx(1.0)  # mean over the samples is 1


def test_inverse_frequency_weights_survive_a_missing_class():
    weights = inverse_frequency_weights(np.array([0, 0, 1, 1]), 3)
    assert torch.isfinite(weights).all()
    assert weights[0] == weights[1]


# ---------------------------------------------------------------- metrics

Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


def test_evaluate_on_a_hand_computed_example():
    # class 0: tp 2, fn 1, fp 0 → P 1,   R 2/3, F1 0.8
    # class 1: tp 1, fn 1, fp 1 → P 1/2, R 1/2, F1 0.5
    # class 2: tp 1, fn 0, fp 1 → P 1/2, R 1,   F1 2/3
    metrics = evaluate(Y_TRUE, Y_PRED)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert metrics["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    positive, neutral, negative = (metrics["per_class"][label] for label in LABELS)
    assert positive["recall"] == pytest.approx(2 / 3) and positive["precision"] == pytest.approx(1.0)
    assert neutral["recall"] == pytest.approx(0.5) and neutral["f1"] == pytest.approx(0.5)
    assert negative["recall"] == pytest.approx(1.0) and negative["precision"] == pytest.approx(0.5)
    assert [metrics["per_class"][label]["support"] for label in LABELS] == [3, 2, 1]
    assert metrics["labels"] == list(LABELS)


def test_confusion_matrix_rows_are_true_labels():
    matrix = evaluate(Y_TRUE, Y_PRED)["confusion_matrix"]
    assert matrix == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert [sum(row) for row in matrix] == [3, 2, 1]  # row sums = true counts


def test_evaluate_counts_a_never_seen_class_as_zero():
    metrics = evaluate(np.array([0, 0, 1]), np.array([0, 1, 1]))
    assert metrics["per_class"]["negative"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["confusion_matrix"][2] == [0, 0, 0]
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)


def test_evaluate_with_other_labels():
    metrics = evaluate(np.array([0, 1, 1]), np.array([0, 1, 0]), labels=("cat", "dog"))
    assert set(metrics["per_class"]) == {"cat", "dog"}
    assert metrics["confusion_matrix"] == [[1, 0], [1, 1]]


def test_format_report_names_every_class():
    metrics = evaluate(Y_TRUE, Y_PRED)
    report = format_report(metrics)
    assert "macro-F1" in report
    assert f"{metrics['macro_f1']:.4f}" in report
    for label in LABELS:
        row = metrics["per_class"][label]
        assert f"{label:<10}{row['precision']:>10.4f}{row['recall']:>10.4f}" in report  # its own row
    assert "cat" in format_report(evaluate(np.array([0, 1]), np.array([0, 1]), labels=("cat", "dog")))


# ---------------------------------------------------------------- splits


def imbalanced_labels() -> np.ndarray:
    labels = np.array([0] * 57 + [1] * 31 + [2] * 13)  # 101 rows
    return np.random.default_rng(0).permutation(labels)


def test_stratified_split_is_seeded():
    labels = imbalanced_labels()
    train, val = stratified_split(labels, 0.2, seed=3)
    again_train, again_val = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    other_train, other_val = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(val, other_val)


def test_stratified_split_partitions_and_keeps_proportions():
    labels = imbalanced_labels()
    train, val = stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.array_equal(train, np.sort(train)) and np.array_equal(val, np.sort(val))
    assert len(val) == pytest.approx(0.2 * len(labels), abs=1)
    for label in range(3):
        share = np.mean(labels == label)
        assert abs(np.sum(labels[val] == label) - share * len(val)) <= 1
        assert abs(np.sum(labels[train] == label) - share * len(train)) <= 1


@pytest.mark.parametrize("folds", [3, 5])
def test_stratified_folds_partition_the_rows(folds):
    labels = imbalanced_labels()
    splits = stratified_folds(labels, folds, seed=0)
    assert len(splits) == folds
    vals = [val for _, val in splits]
    for i in range(folds):
        for j in range(i + 1, folds):
            assert np.intersect1d(vals[i], vals[j]).size == 0
    assert np.array_equal(np.sort(np.concatenate(vals)), np.arange(len(labels)))
    for train, val in splits:
        assert np.intersect1d(train, val).size == 0
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
        for label in range(3):
            assert abs(np.sum(labels[val] == label) - np.sum(labels == label) / folds) <= 1


def test_stratified_folds_are_seeded():
    labels = imbalanced_labels()
    first = stratified_folds(labels, 4, seed=1)
    again = stratified_folds(labels, 4, seed=1)
    other = stratified_folds(labels, 4, seed=2)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other))


@pytest.fixture
def kept_splits(tmp_path, monkeypatch):
    """fold_splits keeping its splits in an empty folder, with nothing kept in this process yet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(split, "_SPLITS", {})
    return tmp_path / "mmsent" / "splits"


def test_fold_splits_are_scikit_learns_made_once_and_read_back(kept_splits, monkeypatch):
    labels = imbalanced_labels()
    folds, hold_out = fold_splits(labels, 4, 0.1, seed=2), fold_splits(labels, 1, 0.2, seed=2)
    expected = stratified_folds(labels, 4, seed=2) + [stratified_split(labels, 0.2, seed=2)]
    for (train, val), (want_train, want_val) in zip(folds + hold_out, expected):
        assert np.array_equal(train, want_train) and np.array_equal(val, want_val)
    assert len(list(kept_splits.glob("*.npz"))) == 2
    assert not np.array_equal(fold_splits(labels, 1, 0.3, seed=2)[0][1], hold_out[0][1])  # another fraction: its own

    def refuse(*args, **kwargs):
        raise AssertionError("split again instead of reading the kept split")

    monkeypatch.setattr(split, "_SPLITS", {})  # a new process: the splits come from the files
    monkeypatch.setattr(split, "stratified_folds", refuse)
    monkeypatch.setattr(split, "stratified_split", refuse)
    for (train, val), (want_train, want_val) in zip(
        fold_splits(labels, 4, 0.1, seed=2) + fold_splits(labels, 1, 0.2, seed=2), expected
    ):
        assert np.array_equal(train, want_train) and np.array_equal(val, want_val)
    fold_splits(labels, 4, 0.1, seed=2)[0][1][:] = -1  # a caller's copy: what is kept stays as it was
    assert np.array_equal(fold_splits(labels, 4, 0.1, seed=2)[0][1], expected[0][1])


def test_a_damaged_kept_split_is_made_again(kept_splits, monkeypatch):
    labels = imbalanced_labels()
    fold_splits(labels, 3, 0.1, seed=0)
    (kept,) = kept_splits.glob("*.npz")
    whole = kept.read_bytes()
    for damaged in (b"not a split", whole[: len(whole) // 2]):  # a foreign file, a truncated one
        kept.write_bytes(damaged)
        monkeypatch.setattr(split, "_SPLITS", {})
        for (train, val), (want_train, want_val) in zip(fold_splits(labels, 3, 0.1, seed=0),
                                                        stratified_folds(labels, 3, seed=0)):
            assert np.array_equal(train, want_train) and np.array_equal(val, want_val)
        assert kept.read_bytes() == whole  # and kept again
    assert list(kept_splits.glob("*.tmp*")) == []


def test_a_split_that_cannot_be_kept_is_made_all_the_same(kept_splits):
    kept_splits.parent.mkdir(parents=True)
    kept_splits.write_text("a file where the folder would be")  # as a read-only or full disk would refuse it
    labels = imbalanced_labels()
    for (train, val), (want_train, want_val) in zip(fold_splits(labels, 3, 0.1, seed=0),
                                                    stratified_folds(labels, 3, seed=0)):
        assert np.array_equal(train, want_train) and np.array_equal(val, want_val)


def test_a_split_made_before_needs_no_scikit_learn(kept_splits):
    """A fit or sweep whose splits were made before does not import scikit-learn (over a second at start)."""
    code = ("import sys, numpy as np; from fusion.split import fold_splits; "
            "fold_splits(np.arange(60) % 3, 5, 0.1, 0); print('sklearn' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    environment = {"PYTHONPATH": str(root), "XDG_CACHE_HOME": str(kept_splits.parents[1]), "PATH": ""}
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env=environment).stdout.strip() for _ in range(2))
    assert (first, second) == ("True", "False")


def test_evaluate_gives_scikit_learns_numbers_exactly():
    """evaluate counts a confusion matrix itself (fast enough for every epoch of a sweep): the same floats as
    scikit-learn's metrics with zero_division=0, classes never predicted or never true included."""
    rng = np.random.default_rng(0)
    ids = [0, 1, 2]
    for size, classes in ((1, 3), (7, 2), (50, 3), (401, 3), (400, 1)):
        y_true, y_pred = rng.integers(0, classes, size), rng.integers(0, 3, size)
        metrics = evaluate(y_true, y_pred)
        precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
        assert metrics["accuracy"] == accuracy_score(y_true, y_pred)
        for average in ("macro", "weighted"):
            assert metrics[f"{average}_f1"] == f1_score(y_true, y_pred, labels=ids, average=average, zero_division=0)
        assert [[row[key] for key in ("precision", "recall", "f1", "support")] for row in metrics["per_class"].values()
                ] == np.stack([precision, recall, f1, support], 1).tolist()
        assert metrics["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=ids).tolist()
