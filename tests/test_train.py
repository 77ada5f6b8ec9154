"""HeadTrainer on small synthetic cached features: seeding, early stopping, loss options, probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.config import AttentionHeadConfig, FitConfig
from fusion.features import PairFeatures
from fusion.metrics import evaluate
from fusion.registry import head_names
from fusion.train import HeadTrainer, predict_proba

N, T, P, C = 120, 6, 4, 3
TEXT_DIM, IMAGE_DIM = 8, 6
N_VAL = 30


def synthetic(labels: np.ndarray, seed: int, signal: float = 1.0) -> PairFeatures:
    """Features whose real tokens and patches lean towards a per-class direction; padding holds garbage."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    y = torch.as_tensor(labels)
    text_direction = torch.randn(C, TEXT_DIM, generator=torch.Generator().manual_seed(100))  # (C, D_text)
    image_direction = torch.randn(C, IMAGE_DIM, generator=torch.Generator().manual_seed(101))  # (C, D_image)
    lengths = torch.randint(2, T + 1, (n,), generator=generator)  # (N,)
    text_mask = torch.arange(T) < lengths[:, None]  # (N, T), right padded
    image_mask = torch.ones(n, P, dtype=torch.bool)  # (N, P)
    image_mask[torch.rand(n, generator=generator) < 0.1] = False  # some skipped images
    text = torch.randn(n, T, TEXT_DIM, generator=generator) + signal * text_direction[y][:, None]  # (N, T, D_text)
    image = torch.randn(n, P, IMAGE_DIM, generator=generator) + signal * image_direction[y][:, None]  # (N, P, D_image)
    text = torch.where(text_mask[..., None], text, torch.randn(n, T, TEXT_DIM, generator=generator) * 5)
    image = torch.where(image_mask[..., None], image, torch.randn(n, P, IMAGE_DIM, generator=generator) * 5)
    return PairFeatures([f"g{i}" for i in range(n)], text.half(), text_mask, image.half(), image_mask)


def make_data(labels: np.ndarray | None = None, signal: float = 1.5):
    if labels is None:
        labels = np.random.default_rng(0).permutation(np.arange(N) % C)
    features = synthetic(labels, seed=0, signal=signal)
    train_rows, val_rows = np.arange(N_VAL, N), np.arange(N_VAL)
    return features.subset(train_rows), labels[train_rows], features.subset(val_rows), labels[val_rows]


def head_config(**overrides) -> AttentionHeadConfig:
    values = {
        "text_dim": TEXT_DIM,
        "image_dim": IMAGE_DIM,
        "image_length": P,
        "num_classes": C,
        "hidden": 8,
        "num_heads": 2,
        "dropout": 0.1,
    } | overrides
    return AttentionHeadConfig(**values).validate()


def fit(data, head: str = "concat", **overrides) -> HeadTrainer:
    values = {"head": head, "epochs": 8, "patience": 8, "batch_size": 32, "lr": 1e-2} | overrides
    return HeadTrainer(FitConfig(**values).validate(), head_config()).fit(*data, progress=False)


def val_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    log_p = torch.log(torch.from_numpy(probabilities).clamp_min(1e-12))
    return float(torch.nn.functional.nll_loss(log_p, torch.as_tensor(labels)))


@pytest.fixture(scope="module")
def data():
    return make_data()


def test_init_only_stores(data):
    trainer = HeadTrainer(FitConfig(head="concat"), head_config())
    assert not any(hasattr(trainer, name) for name in ("model_", "best_epoch_", "history_", "val_metrics_"))


def test_fit_returns_self_sets_state_and_learns(data):
    config = FitConfig(head="concat", epochs=8, patience=8, batch_size=32, lr=1e-2).validate()
    trainer = HeadTrainer(config, head_config())
    assert trainer.fit(*data, progress=False) is trainer
    assert isinstance(trainer.model_, torch.nn.Module) and not trainer.model_.training
    assert [row["epoch"] for row in trainer.history_] == list(range(1, 9))
    assert set(trainer.history_[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1"}
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"]) for row in trainer.history_)
    f1s = [row["val_macro_f1"] for row in trainer.history_]
    assert 1 <= trainer.best_epoch_ <= len(f1s)
    assert trainer.val_metrics_["macro_f1"] == f1s[trainer.best_epoch_ - 1] == max(f1s)
    assert f1s.index(max(f1s)) + 1 == trainer.best_epoch_  # the first epoch reaching the best is kept
    assert trainer.history_[-1]["train_loss"] < trainer.history_[0]["train_loss"]
    assert trainer.val_metrics_["macro_f1"] > 0.9  # the signal is learnable
    assert trainer.fit_seconds_ > 0


@pytest.mark.parametrize("name", head_names())
def test_same_seed_same_run(data, name):
    first = fit(data, name, epochs=3, patience=3, seed=7)
    second = fit(data, name, epochs=3, patience=3, seed=7)
    assert first.history_ == second.history_
    assert first.val_metrics_ == second.val_metrics_
    assert first.best_epoch_ == second.best_epoch_
    for (key, a), (_, b) in zip(first.model_.state_dict().items(), second.model_.state_dict().items()):
        assert torch.equal(a, b), key
    other = fit(data, name, epochs=3, patience=3, seed=8)
    assert [row["train_loss"] for row in other.history_] != [row["train_loss"] for row in first.history_]


def test_early_stopping_keeps_the_best_epoch():
    data = make_data(signal=0.35)  # weak signal: validation F1 wanders, so the last epoch is not the best
    _, _, val, y_val = data
    epochs, patience = 60, 3
    trainer = fit(data, epochs=epochs, patience=patience, lr=3e-2, seed=1)
    history = trainer.history_
    assert len(history) < epochs
    f1s = [row["val_macro_f1"] for row in history]
    assert f1s.index(max(f1s)) + 1 == trainer.best_epoch_  # a tie is no improvement: the first best is kept
    assert len(history) == trainer.best_epoch_ + patience  # ... and patience counts from it
    best = history[trainer.best_epoch_ - 1]
    assert all(row["val_macro_f1"] <= best["val_macro_f1"] for row in history)
    assert history[-1]["val_loss"] != best["val_loss"]  # keeping the last weights would show

    probabilities = predict_proba(trainer.model_, val)
    assert evaluate(y_val, probabilities.argmax(1))["macro_f1"] == trainer.val_metrics_["macro_f1"]
    assert val_loss(probabilities, y_val) == pytest.approx(best["val_loss"], rel=1e-6)


def test_class_weights_and_focal_change_the_loss():
    labels = np.random.default_rng(1).permutation(np.array([0] * 80 + [1] * 28 + [2] * 12))
    data = make_data(labels)
    plain = fit(data, epochs=3, patience=3)
    weighted = fit(data, epochs=3, patience=3, class_weights=True)
    focal = fit(data, epochs=3, patience=3, loss="focal", focal_gamma=2.0)
    both = fit(data, epochs=3, patience=3, loss="focal", class_weights=True, label_smoothing=0.1)
    for trainer in (weighted, focal, both):
        assert len(trainer.history_) == 3
        assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"]) for row in trainer.history_)
        assert 0.0 <= trainer.val_metrics_["macro_f1"] <= 1.0
    assert weighted.history_[0]["train_loss"] != plain.history_[0]["train_loss"]
    assert focal.history_[0]["train_loss"] < plain.history_[0]["train_loss"]  # (1 − p)^γ · CE ≤ CE


def test_predict_proba_rows_sum_to_one(data):
    trainer = fit(data, epochs=2, patience=2)
    _, _, val, _ = data
    probabilities = predict_proba(trainer.model_, val)
    assert probabilities.shape == (len(val), C)
    assert (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    # Chunks are cut to their own longest text, so small batches must agree with one big batch.
    np.testing.assert_allclose(predict_proba(trainer.model_, val, batch_size=7), probabilities, atol=1e-5)
    empty = predict_proba(trainer.model_, val.subset(np.arange(0)))
    assert empty.shape == (0, C)


def test_batch_cuts_text_to_the_longest_real_sequence(data):
    train, _, _, _ = data
    rows = torch.tensor([0, 1, 2])
    text, text_mask, image, image_mask = train.batch(rows)
    longest = int(train.text_mask[rows].sum(1).max())
    assert text.shape == (3, longest, TEXT_DIM) and text.dtype == torch.float32
    assert text_mask.shape == (3, longest) and text_mask.dtype == torch.bool
    assert image.shape == (3, P, IMAGE_DIM) and image_mask.shape == (3, P)
    assert torch.equal(text_mask.sum(1), train.text_mask[rows].sum(1))


def test_batch_gives_an_unread_or_empty_modality_one_masked_position(data):
    train, _, _, _ = data
    rows = torch.tensor([0, 1, 2])
    text, text_mask, image, image_mask = train.batch(rows, ("text",))
    assert image.shape == (3, 1, IMAGE_DIM) and not image_mask.any()
    assert torch.equal(text_mask.sum(1), train.text_mask[rows].sum(1))
    skipped = torch.nonzero(~train.image_mask.any(1)).flatten()[:2]  # rows whose image was skipped
    _, _, image, image_mask = train.batch(skipped)
    assert image.shape == (len(skipped), 1, IMAGE_DIM) and not image_mask.any()


@pytest.mark.parametrize("name", ["text-only", "image-only"])
def test_unimodal_head_predicts_the_same_without_the_other_modality(data, name):
    """The trainer copies only what a head reads; the unread modality must not matter."""
    train, y_train, val, y_val = data
    trainer = HeadTrainer(FitConfig(head=name, epochs=2), head_config()).fit(train, y_train, val, y_val, progress=False)
    model = trainer.model_
    full = model(*val.batch(torch.arange(len(val))))
    reduced = model(*val.batch(torch.arange(len(val)), model.modalities))
    torch.testing.assert_close(full, reduced)


def test_from_encoders_normalises_real_positions_and_keeps_padding_zero():
    text = torch.randn(2, 3, TEXT_DIM) * 4 + 2
    text[1, 2] = 0.0  # padding
    image = torch.randn(2, P, IMAGE_DIM) * 3
    text_mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    image_mask = torch.ones(2, P, dtype=torch.bool)
    features = PairFeatures.from_encoders(["a", "b"], [(text, text_mask)], [(image, image_mask)])
    assert features.text.dtype == torch.float16 and features.image.dtype == torch.float16
    torch.testing.assert_close(features.text[0].float().mean(-1), torch.zeros(3), atol=2e-3, rtol=0)
    torch.testing.assert_close(features.image.float().std(-1, unbiased=False), torch.ones(2, P), atol=2e-2, rtol=0)
    assert torch.equal(features.text[1, 2], torch.zeros(TEXT_DIM, dtype=torch.float16))
