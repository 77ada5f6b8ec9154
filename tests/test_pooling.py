"""Masked poolings: masked positions are invisible, and an empty row pools to zeros."""

from __future__ import annotations

import pytest
import torch

from fusion.layers import PatchPositions, Projection, normalise_features
from fusion.pooling import POOLINGS, Pool, project_and_pool

B, L, D = 4, 7, 5


@pytest.fixture
def sequence() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) values and a mask with right padding, a gap in the middle and a late start."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=generator)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0] = True  # all real
    mask[1, :3] = True  # right padded
    mask[2, [1, 2, 5]] = True  # holes: first real is 1, last real is 5
    mask[3, 4] = True  # a single real position
    return x, mask


def make_pool(kind: str) -> Pool:
    torch.manual_seed(0)
    return Pool(kind, D)


@pytest.mark.parametrize("kind", POOLINGS)
def test_masked_positions_are_ignored(kind, sequence):
    x, mask = sequence
    pool = make_pool(kind)
    expected = pool(x, mask)  # (B, D)
    garbage = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1)) * 100 + 50
    actual = pool(torch.where(mask[..., None], x, garbage), mask)
    assert actual.shape == (B, D)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", POOLINGS)
def test_appending_masked_positions_changes_nothing(kind, sequence):
    x, mask = sequence
    pool = make_pool(kind)
    padded = torch.cat([x, torch.full((B, 3, D), 1e4)], dim=1)  # (B, L + 3, D)
    padded_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.bool)], dim=1)  # (B, L + 3)
    torch.testing.assert_close(pool(padded, padded_mask), pool(x, mask), atol=1e-6, rtol=0)


def test_last_picks_the_last_real_token(sequence):
    x, mask = sequence
    pooled = make_pool("last")(x, mask)
    for row, position in enumerate([L - 1, 2, 5, 4]):
        torch.testing.assert_close(pooled[row], x[row, position])


def test_first_picks_the_first_real_token(sequence):
    x, mask = sequence
    pooled = make_pool("first")(x, mask)
    for row, position in enumerate([0, 0, 1, 4]):
        torch.testing.assert_close(pooled[row], x[row, position])


def test_mean_is_the_mean_of_real_positions(sequence):
    x, mask = sequence
    pooled = make_pool("mean")(x, mask)
    for row in range(B):
        torch.testing.assert_close(pooled[row], x[row][mask[row]].mean(0))


def test_max_is_the_max_of_real_positions(sequence):
    x, mask = sequence
    x = x - 10  # all negative: a padded zero would win a max that ignored the mask
    pooled = make_pool("max")(x, mask)
    for row in range(B):
        torch.testing.assert_close(pooled[row], x[row][mask[row]].amax(0))


def test_attention_is_a_convex_combination_of_real_positions(sequence):
    x, mask = sequence
    pool = make_pool("attention")
    pooled = pool(x, mask)
    for row in range(B):
        real = x[row][mask[row]]  # (L_real, D)
        weights = torch.softmax(real @ pool.query / D**0.5, dim=0)  # (L_real,)
        torch.testing.assert_close(pooled[row], weights @ real)
    torch.testing.assert_close(pooled[3], x[3, 4])  # one real position takes all the weight


@pytest.mark.parametrize("kind", POOLINGS)
def test_one_position_pools_to_itself_as_the_general_path_does(kind, sequence):
    x, mask = sequence
    one, one_mask = x[:, 4:5], mask[:, 4:5]  # rows 1 and 2 have it masked
    pool = make_pool(kind)
    garbage_after = torch.cat([one, torch.full((B, 1, D), 1e4)], dim=1)  # (B, 2, D): the general path
    general = pool(garbage_after, torch.cat([one_mask, torch.zeros(B, 1, dtype=torch.bool)], dim=1))
    torch.testing.assert_close(pool(one, one_mask), general, atol=1e-6, rtol=0)
    assert torch.equal(pool(one, one_mask)[1], torch.zeros(D))


@pytest.mark.parametrize("kind", POOLINGS)
def test_all_false_row_pools_to_zeros(kind, sequence):
    x, mask = sequence
    mask[2] = False
    x = x.clone().requires_grad_(True)
    pool = make_pool(kind)
    pooled = pool(x, mask)
    assert torch.equal(pooled[2], torch.zeros(D))
    assert torch.isfinite(pooled).all()
    pooled.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[2], torch.zeros(L, D))  # nothing flows into a row with no real position


def test_unknown_pooling_lists_the_choices():
    with pytest.raises(ValueError, match="'median'.*attention"):
        Pool("median", D)


def test_only_attention_pooling_has_parameters():
    for kind in POOLINGS:
        assert (len(list(make_pool(kind).parameters())) > 0) == (kind == "attention")


D_IN = 9  # input features wider than the pooled size, as for encoder features


def projected_setup(kind: str, positions: str, sequence):
    x, mask = sequence
    mask[2] = False  # a row with nothing to pool
    torch.manual_seed(0)
    projection, pool = Projection(D_IN, D, dropout=0.3), Pool(kind, D)
    table = PatchPositions(positions, L, D)
    features = torch.randn(B, L, D_IN, generator=torch.Generator().manual_seed(2))  # (B, L, D_in)
    return projection, pool, table, features, mask


@pytest.mark.parametrize("positions", ["none", "learned"])
@pytest.mark.parametrize("kind", POOLINGS)
@pytest.mark.parametrize("training", [False, True])
def test_project_and_pool_equals_projecting_every_position(kind, positions, training, sequence):
    """Pooling before projecting is exact: same output and same gradients, dropout included (same seed).

    Max pooling is the one pooling defined before the projection (the maximum of each encoder feature).
    """
    projection, pool, table, features, mask = projected_setup(kind, positions, sequence)
    projection.train(training)
    torch.manual_seed(3)
    fast = project_and_pool(projection, pool, features, mask, table)  # (B, D)
    fast.square().sum().backward()
    fast_grads = [p.grad.clone() for p in projection.parameters()]
    projection.zero_grad()
    torch.manual_seed(3)
    if kind == "max" and positions == "none":  # max pools the encoder features, then projects (a fixed pooling)
        direct = torch.where(mask.any(1, keepdim=True), projection(pool(features, mask)), 0.0)  # (B, D)
    else:
        direct = pool(table(projection(features)), mask)  # (B, D)
    direct.square().sum().backward()
    torch.testing.assert_close(fast, direct, atol=1e-5, rtol=1e-5)
    for fast_grad, parameter in zip(fast_grads, projection.parameters()):
        torch.testing.assert_close(fast_grad, parameter.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[2], torch.zeros(D))


def test_normalise_features_gives_zero_mean_unit_variance_and_keeps_padding_zero():
    x = torch.randn(3, 4, 16) * 7 + 3
    x[:, -1] = 0.0  # padding
    normed = normalise_features(x)
    torch.testing.assert_close(normed[:, :-1].mean(-1), torch.zeros(3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed[:, :-1].var(-1, unbiased=False), torch.ones(3, 3), atol=1e-3, rtol=0)
    assert torch.equal(normed[:, -1], torch.zeros(3, 16))
