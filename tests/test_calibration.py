"""Imbalance options: post-hoc logit adjustment, balanced sampling, and the modality mask of the ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.calibration import TAUS, LogitAdjustment, log_prior, stored_adjustment, tune_tau
from fusion.config import AttentionHeadConfig, FitConfig
from fusion.features import PairFeatures
from fusion.run import with_modalities
from fusion.sampling import epoch_order
from fusion.train import HeadTrainer

LABELS = np.array([0] * 70 + [1] * 10 + [2] * 20)  # class 1 is rare, like neutral
PRIOR = log_prior(LABELS, 3)


def leaning_probabilities(seed: int = 0) -> np.ndarray:
    """Probabilities (N, C) of a head that leans towards the frequent class: rare rows lose to class 0."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 0.5, size=(len(LABELS), 3))  # (N, C)
    logits[np.arange(len(LABELS)), LABELS] += 1.0  # some signal for the true class
    logits[:, 0] += 1.2  # ... and a pull towards the majority
    probabilities = np.exp(logits)
    return (probabilities / probabilities.sum(1, keepdims=True)).astype(np.float32)


def test_log_prior_is_the_log_of_the_class_shares():
    np.testing.assert_allclose(np.exp(PRIOR), [0.7, 0.1, 0.2])
    assert np.isfinite(log_prior(np.array([0, 0, 2]), 3)).all()  # an absent class stays finite


def test_tau_zero_changes_nothing():
    probabilities = leaning_probabilities()
    adjusted = LogitAdjustment(0.0, list(PRIOR)).apply(probabilities)
    np.testing.assert_array_equal(adjusted, probabilities)
    assert stored_adjustment({}).tau == 0.0  # a run fitted without adjustment predicts unchanged
    np.testing.assert_array_equal(stored_adjustment({"history": []}).apply(probabilities), probabilities)


def test_positive_tau_moves_predictions_towards_rare_classes():
    probabilities = leaning_probabilities()
    counts = [
        np.bincount(LogitAdjustment(tau, list(PRIOR)).apply(probabilities).argmax(1), minlength=3)
        for tau in (0.0, 0.5, 1.0, 2.0)
    ]
    rare = [count[1] for count in counts]
    assert rare == sorted(rare) and rare[-1] > rare[0]  # more rare-class predictions as τ grows
    assert counts[-1][0] < counts[0][0]  # fewer majority-class predictions
    adjusted = LogitAdjustment(1.0, list(PRIOR)).apply(probabilities)
    np.testing.assert_allclose(adjusted.sum(1), 1.0, atol=1e-6)
    # Adjusting probabilities equals adjusting logits: softmax(log p − τ log π).
    expected = torch.softmax(torch.log(torch.from_numpy(probabilities).double()) - torch.from_numpy(PRIOR), dim=1)
    np.testing.assert_allclose(adjusted, expected.numpy(), atol=1e-6)


def test_tune_tau_picks_the_best_validation_macro_f1():
    probabilities = leaning_probabilities()
    adjustment = tune_tau(probabilities, LABELS, PRIOR)
    assert adjustment.tau in TAUS and adjustment.tau > 0
    assert set(adjustment.scores) == {str(tau) for tau in TAUS}
    assert adjustment.scores[str(adjustment.tau)] == max(adjustment.scores.values()) > adjustment.scores["0.0"]
    perfect = np.eye(3, dtype=np.float32)[LABELS]  # already right: no τ can help, so the smallest, 0, is kept
    assert tune_tau(perfect, LABELS, PRIOR).tau == 0.0
    with pytest.raises(ValueError, match="100 probability rows but 3 labels"):
        tune_tau(probabilities, LABELS[:3], PRIOR)


def test_plain_order_is_the_seeded_permutation():
    order = epoch_order(LABELS, False, torch.Generator().manual_seed(3))
    assert torch.equal(order, torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(3)))


def test_balanced_sampling_draws_classes_evenly():
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([epoch_order(LABELS, True, generator) for _ in range(50)])  # 50 epochs of N draws
    assert len(drawn) == 50 * len(LABELS)
    shares = np.bincount(LABELS[drawn.numpy()], minlength=3) / len(drawn)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.03)  # vs 0.7 / 0.1 / 0.2 in the labels
    again = epoch_order(LABELS, True, torch.Generator().manual_seed(0))
    assert torch.equal(again, drawn[: len(LABELS)])  # seeded


def test_fit_follows_the_balanced_sampling_option():
    rng = np.random.default_rng(0)
    labels = rng.permutation(LABELS)
    n = len(labels)
    features = PairFeatures(
        [str(i) for i in range(n)], torch.from_numpy(rng.normal(size=(n, 3, 4)) + labels[:, None, None]).half(),
        torch.ones(n, 3, dtype=torch.bool), torch.from_numpy(rng.normal(size=(n, 2, 5))).half(),
        torch.ones(n, 2, dtype=torch.bool),
    )
    head = AttentionHeadConfig(text_dim=4, image_dim=5, image_length=2, hidden=8, num_heads=2)
    train, val = features.subset(np.arange(20, n)), features.subset(np.arange(20))
    fits = {
        balanced: HeadTrainer(FitConfig(head="concat", epochs=2, batch_size=16, balanced_sampling=balanced), head)
        .fit(train, labels[20:], val, labels[:20], progress=False)
        for balanced in (False, True)
    }
    assert fits[True].history_[0]["train_loss"] != fits[False].history_[0]["train_loss"]
    assert all(np.isfinite(row["train_loss"]) for row in fits[True].history_)


def test_with_modalities_masks_the_other_modality():
    features = PairFeatures(
        ["a", "b"], torch.ones(2, 3, 4).half(), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 5, 6).half(),
        torch.ones(2, 5, dtype=torch.bool),
    )
    assert with_modalities(features, "both") is features
    text = with_modalities(features, "text")
    assert text.text_mask.all() and not text.image_mask.any()
    image = with_modalities(features, "image")
    assert image.image_mask.all() and not image.text_mask.any()
    assert features.image_mask.all() and features.text_mask.all()  # the loaded features are left alone
    with pytest.raises(ValueError, match="modalities='audio' is not one of"):
        with_modalities(features, "audio")
    with pytest.raises(ValueError, match="modalities='audio' is not one of"):
        FitConfig(modalities="audio").validate()
