"""Fixed poolings computed once per loaded cache: the heads train on vectors and give the same numbers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fusion.config import AttentionHeadConfig, FitConfig
from fusion.features import PairFeatures
from fusion.pooling import FIXED_POOLINGS, POOLINGS, Pool
from fusion.registry import create_head, head_names, input_poolings
from fusion.run import with_modalities
from fusion.train import HeadTrainer, predict_proba

N, T, P = 48, 6, 5  # pairs, tokens, patches
TEXT_DIM, IMAGE_DIM = 10, 7


def make_features(seed: int = 0) -> tuple[PairFeatures, np.ndarray]:
    """Pairs with ragged text, a few missing patches and one skipped image (no real patch at all)."""
    generator = torch.Generator().manual_seed(seed)
    text_mask = torch.arange(T) < torch.randint(1, T + 1, (N, 1), generator=generator)  # (N, T)
    image_mask = torch.rand(N, P, generator=generator) > 0.2  # (N, P)
    image_mask[:, 0] = True
    image_mask[3] = False  # a skipped image
    text = torch.randn(N, T, TEXT_DIM, generator=generator) * text_mask[..., None]  # (N, T, D_text)
    image = torch.randn(N, P, IMAGE_DIM, generator=generator) * image_mask[..., None]  # (N, P, D_image)
    labels = torch.randint(0, 3, (N,), generator=generator).numpy()
    features = PairFeatures([str(i) for i in range(N)], text.half(), text_mask, image.half(), image_mask)
    return features, labels


def head_config(**options) -> AttentionHeadConfig:
    return AttentionHeadConfig(text_dim=TEXT_DIM, image_dim=IMAGE_DIM, image_length=P, hidden=8, num_heads=2, **options)


POOLED_HEADS = [name for name in head_names() if input_poolings(name, head_config(text_pool="mean", image_pool="mean"))]


def test_cross_attention_pools_after_attending_so_nothing_is_shared():
    assert input_poolings("cross-attention", head_config(text_pool="mean", image_pool="mean")) == {}
    assert {"gated", "concat", "late", "text-only", "image-only"} <= set(POOLED_HEADS)


def test_only_fixed_poolings_without_patch_positions_are_shared():
    assert input_poolings("gated", head_config(text_pool="mean", image_pool="max")) == {"text": "mean", "image": "max"}
    assert input_poolings("gated", head_config(text_pool="attention", image_pool="last")) == {"image": "last"}
    assert input_poolings("gated", head_config(text_pool="first", image_pool="mean", image_positions="learned")) == {
        "text": "first"
    }
    assert input_poolings("text-only", head_config(text_pool="mean", image_pool="mean")) == {"text": "mean"}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("image_pool", FIXED_POOLINGS)
@pytest.mark.parametrize("text_pool", POOLINGS)
@pytest.mark.parametrize("name", POOLED_HEADS)
def test_logits_and_gradients_on_pooled_inputs_equal_those_on_sequences(name, text_pool, image_pool, training):
    config = head_config(text_pool=text_pool, image_pool=image_pool).validate()
    features, _ = make_features()
    pooled = features.pooled(input_poolings(name, config))
    rows = torch.arange(N)
    heads, outputs = [], []
    for inputs in (features, pooled):
        torch.manual_seed(0)
        head = create_head(name, config).train(training)
        torch.manual_seed(1)  # the same dropout masks on both paths
        logits = head(*inputs.batch(rows, head.modalities))  # (N, C)
        logits.square().sum().backward()
        heads.append(head)
        outputs.append(logits)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    for (parameter_name, on_sequences), on_vectors in zip(heads[0].named_parameters(), heads[1].parameters()):
        torch.testing.assert_close(on_vectors.grad, on_sequences.grad, atol=1e-5, rtol=1e-4, msg=parameter_name)


@pytest.mark.parametrize("kind", FIXED_POOLINGS)
def test_pooled_vectors_are_the_pooling_of_the_float32_features(kind):
    """last, first and max pool the stored float16 and convert the picks: bit for bit the float32 pooling."""
    features, _ = make_features()
    pooled = features.pooled({"text": kind, "image": kind})
    for modality in ("text", "image"):
        x, mask = getattr(features, modality), getattr(features, f"{modality}_mask")
        vectors = getattr(pooled, modality)
        assert vectors.dtype == torch.float32
        assert torch.equal(vectors[:, 0], Pool(kind, x.shape[-1])(x.float(), mask))


def test_pooled_features_are_computed_once_and_shared_by_subsets():
    features, _ = make_features()
    first = features.pooled({"text": "mean", "image": "max"})
    again = features.pooled({"image": "max"})
    assert again.image is first.image  # the memo, not a second pass over the sequences
    assert again.text is features.text  # a modality left out keeps its sequence
    assert first.text.shape == (N, 1, TEXT_DIM) and first.image_mask.shape == (N, 1)
    assert not first.image_mask[3].any() and torch.equal(first.image[3], torch.zeros(1, IMAGE_DIM))
    assert features.pooled({}) is features
    rows = np.array([5, 3, 9])
    torch.testing.assert_close(features.subset(rows).pooled({"text": "mean"}).text, first.subset(rows).text)


def test_masking_a_modality_after_pooling_masks_the_pooled_vector():
    features, _ = make_features()
    text_only = with_modalities(features.pooled({"image": "mean"}), "text")
    assert not text_only.image_mask.any()
    assert text_only._pooled == {}  # masked features never reuse pooled vectors of other masks


def test_training_on_pooled_inputs_reproduces_training_on_sequences():
    """The whole fit (batches, dropout, early stopping) gives the same history and weights either way."""
    features, labels = make_features()
    train, val = np.arange(36), np.arange(36, N)
    fit_config = FitConfig(head="gated", epochs=4, patience=4, batch_size=8, seed=3)
    config = head_config(text_pool="mean", image_pool="max").validate()
    fits = []
    for inputs in (features, features.pooled(input_poolings("gated", config))):
        trainer = HeadTrainer(copy.deepcopy(fit_config), config).fit(
            inputs.subset(train), labels[train], inputs.subset(val), labels[val], progress=False
        )
        fits.append((trainer, predict_proba(trainer.model_, features.subset(val))))
    (on_sequences, p_sequences), (on_vectors, p_vectors) = fits
    assert [h["val_macro_f1"] for h in on_vectors.history_] == [h["val_macro_f1"] for h in on_sequences.history_]
    np.testing.assert_allclose(
        [h["train_loss"] for h in on_vectors.history_], [h["train_loss"] for h in on_sequences.history_], rtol=1e-4
    )
    np.testing.assert_allclose(p_vectors, p_sequences, atol=1e-5)
