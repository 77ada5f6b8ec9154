"""Every registered head at odd tiny sizes: shapes, gradients, and masks that really mask; each head's own config."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import pytest
import torch

from fusion.config import AttentionHeadConfig, FitConfig, PooledHeadConfig
from fusion.layers import NORMS, POSITIONS, AttentionBlock
from fusion.pooling import POOLINGS
from fusion.registry import HEADS, create_head, head_config_from_dict, head_names, head_options
from fusion.run import load_head

B, T, P, C = 4, 5, 3, 3  # batch, tokens, patches, classes
TEXT_DIM, IMAGE_DIM, HIDDEN, NUM_HEADS = 8, 6, 8, 2
EXTRA = 2  # masked positions appended by the padding tests


def make_head(name: str, norm: str = "layer", positions: str = "none", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    values = {
        "text_dim": TEXT_DIM,
        "image_dim": IMAGE_DIM,
        "image_length": P + EXTRA,
        "num_classes": C,
        "hidden": HIDDEN,
        "num_heads": NUM_HEADS,
        "norm": norm,
        "image_positions": positions,
    } | overrides
    head = create_head(name, head_config_from_dict(name, values, drop_foreign=True))  # num_heads, norm: attention only
    with torch.no_grad():  # zero-initialised biases and unit norm scales could hide a padding leak
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return head


def make_inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Right-padded text with rows of 5, 2, 4 and 1 real tokens; row 3 has 2 of 3 real patches."""
    generator = torch.Generator().manual_seed(seed)
    text_mask = torch.arange(T) < torch.tensor([T, 2, 4, 1])[:, None]  # (B, T)
    image_mask = torch.ones(B, P, dtype=torch.bool)  # (B, P)
    image_mask[3, 2] = False
    text = torch.randn(B, T, TEXT_DIM, generator=generator) * text_mask[..., None]  # (B, T, D_text)
    image = torch.randn(B, P, IMAGE_DIM, generator=generator) * image_mask[..., None]  # (B, P, D_image)
    return text, text_mask, image, image_mask


def pad(values: torch.Tensor, mask: torch.Tensor, extra: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Garbage in every masked position, plus ``extra`` appended masked positions of garbage."""
    generator = torch.Generator().manual_seed(seed)
    garbage = torch.randn(values.shape[0], values.shape[1] + extra, values.shape[2], generator=generator) * 7 + 3
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], dim=1)  # (B, L + extra)
    padded = torch.cat([values, torch.zeros(values.shape[0], extra, values.shape[2])], dim=1)  # (B, L + extra, D)
    return torch.where(padded_mask[..., None], padded, garbage), padded_mask


def test_registry_has_the_builtin_heads():
    assert {"cross-attention", "concat", "text-only", "image-only"} <= set(head_names())


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", head_names())
def test_shape_finite_and_gradient_on_every_parameter(name, norm, positions):
    head = make_head(name, norm, positions).train()
    logits = head(*make_inputs())
    assert logits.shape == (B, C)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    for parameter_name, parameter in head.named_parameters():
        assert parameter.grad is not None, f"{name}: {parameter_name} gets no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name}: {parameter_name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name}: {parameter_name} has an all-zero gradient"


@pytest.mark.parametrize("padded", ["text", "image", "both"])
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", head_names())
def test_padding_changes_nothing(name, norm, positions, padded):
    head = make_head(name, norm, positions).eval()
    text, text_mask, image, image_mask = make_inputs()
    with torch.no_grad():
        expected = head(text, text_mask, image, image_mask)  # (B, C)
        if padded in ("text", "both"):
            text, text_mask = pad(text, text_mask, EXTRA, seed=2)
        if padded in ("image", "both"):
            image, image_mask = pad(image, image_mask, EXTRA, seed=3)
        actual = head(text, text_mask, image, image_mask)  # (B, C)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", head_names())
def test_padding_changes_nothing_in_training_without_dropout(name, norm):
    """Batch statistics must come from real positions only, so padding is invisible in training too."""
    head = make_head(name, norm, "learned", dropout=0.0).train()
    text, text_mask, image, image_mask = make_inputs()
    expected = head(text, text_mask, image, image_mask)  # (B, C)
    text, text_mask = pad(text, text_mask, EXTRA, seed=2)
    image, image_mask = pad(image, image_mask, EXTRA, seed=3)
    torch.testing.assert_close(head(text, text_mask, image, image_mask), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool", POOLINGS)
@pytest.mark.parametrize("name", head_names())
def test_padding_changes_nothing_for_every_pooling(name, pool):
    head = make_head(name, "batch", "sinusoidal", text_pool=pool, image_pool=pool).eval()
    text, text_mask, image, image_mask = make_inputs()
    with torch.no_grad():
        expected = head(text, text_mask, image, image_mask)
        text, text_mask = pad(text, text_mask, EXTRA, seed=4)
        image, image_mask = pad(image, image_mask, EXTRA, seed=5)
        actual = head(text, text_mask, image, image_mask)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool", POOLINGS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", head_names())
def test_skipped_image_gives_finite_logits_and_gradients(name, norm, pool):
    text, text_mask, image, image_mask = make_inputs()
    image_mask[1] = False  # a skipped image: no real patch at all
    image[1] = torch.randn(P, IMAGE_DIM) * 5  # whatever lies there must not matter
    head = make_head(name, norm, "learned", image_pool=pool)
    with torch.no_grad():
        assert torch.isfinite(head.eval()(text, text_mask, image, image_mask)).all()
    logits = head.train()(text, text_mask, image, image_mask)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for parameter_name, parameter in head.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), f"{name}: {parameter_name} has a non-finite gradient"


@pytest.mark.parametrize("name", head_names())
def test_skipped_image_ignores_its_garbage(name):
    text, text_mask, image, image_mask = make_inputs()
    image_mask[1] = False
    head = make_head(name, "layer", "none").eval()
    with torch.no_grad():
        expected = head(text, text_mask, image, image_mask)
        image[1] = torch.randn(P, IMAGE_DIM) * 5 + 2
        torch.testing.assert_close(head(text, text_mask, image, image_mask), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
def test_attention_block_ignores_a_fully_masked_context(norm):
    """A query row with no real key gets no attention output: its context values do not matter at all."""
    torch.manual_seed(0)
    block = AttentionBlock(HIDDEN, NUM_HEADS, 0.0, norm).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        query, query_mask = torch.randn(B, T, HIDDEN), torch.arange(T) < torch.tensor([T, 2, 4, 1])[:, None]
        context, context_mask = torch.randn(B, P, HIDDEN), torch.ones(B, P, dtype=torch.bool)
        context_mask[2] = False
        expected = block(query, query_mask, context, context_mask)  # (B, T, D)
        context[2] = torch.randn(P, HIDDEN) * 5
        actual = block(query, query_mask, context, context_mask)
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
        no_context = block(query, query_mask, torch.zeros(B, P, HIDDEN), torch.zeros(B, P, dtype=torch.bool))
        torch.testing.assert_close(actual[2], no_context[2], atol=1e-6, rtol=0)
        assert not torch.allclose(actual[0], no_context[0])  # rows with real keys do attend


@pytest.mark.parametrize("cross", [True, False])
def test_attention_block_keeps_padding_exactly_zero(cross):
    torch.manual_seed(0)
    block = AttentionBlock(HIDDEN, NUM_HEADS, 0.0, "layer", cross=cross)
    query_mask = torch.arange(T) < torch.tensor([T, 2, 4, 1])[:, None]  # (B, T)
    query = torch.randn(B, T, HIDDEN) * query_mask[..., None]  # (B, T, D)
    context = (torch.randn(B, P, HIDDEN), torch.ones(B, P, dtype=torch.bool)) if cross else (None, None)
    out = block(query, query_mask, *context)  # (B, T, D)
    assert out.shape == (B, T, HIDDEN)
    assert torch.equal(out[~query_mask], torch.zeros(int((~query_mask).sum()), HIDDEN))


def test_unknown_head_lists_the_names():
    with pytest.raises(ValueError, match="no-such-head") as error:
        create_head("no-such-head", PooledHeadConfig())
    for name in head_names():
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("text_pool", "median", "text_pool='median'.*last"),
        ("image_pool", "sum", "image_pool='sum'.*attention"),
        ("norm", "group", "norm='group'.*batch"),
        ("image_positions", "rotary", "image_positions='rotary'.*sinusoidal"),
        ("num_heads", 3, "hidden=8 is not divisible by num_heads=3"),
        ("hidden", 0, "hidden must be at least 1"),
        ("dropout", 1.0, "dropout"),
    ],
)
def test_head_config_validate_rejects(field, value, message):
    config = AttentionHeadConfig(hidden=8, num_heads=2)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_head_config_validate_accepts_and_returns_itself():
    config = AttentionHeadConfig(hidden=8, num_heads=2, text_pool="attention", norm="batch", image_positions="learned")
    assert config.validate() is config


# ---------------------------------------------------------------- each head's own config

# config.json's "head" before each head had its own config: every option of every head, for every head.
OLD_HEAD_KEYS = {
    "text_dim": TEXT_DIM, "image_dim": IMAGE_DIM, "image_length": P, "num_classes": C, "hidden": HIDDEN,
    "num_heads": 4, "layers": 1, "dropout": 0.2, "text_pool": "attention", "image_pool": "attention", "norm": "layer",
    "image_positions": "none",
}


@pytest.mark.parametrize("name", head_names())
def test_each_head_takes_its_own_config_class(name):
    config = head_config_from_dict(name, {})
    assert type(config) is HEADS[name].config_class
    assert head_options(name) == [f.name for f in fields(config) if f.name not in ("text_dim", "image_dim",
                                                                                     "image_length", "num_classes")]
    assert create_head(name, config).config is config


def test_only_attention_heads_need_num_heads_to_divide_hidden():
    assert head_config_from_dict("gated", {"hidden": 130}).hidden == 130
    assert "num_heads" not in asdict(head_config_from_dict("concat", {"hidden": 130}))
    with pytest.raises(ValueError, match="hidden=130 is not divisible by num_heads=4"):
        head_config_from_dict("cross-attention", {"hidden": 130, "num_heads": 4})
    with pytest.raises(ValueError, match="num_heads must be at least 1"):  # not a ZeroDivisionError
        AttentionHeadConfig(num_heads=0).validate()


def test_an_option_the_head_does_not_take_is_refused_naming_its_options():
    message = "head 'concat' does not take num_heads, norm; its options are hidden, dropout, text_pool, image_pool, "
    with pytest.raises(ValueError, match=message + "image_positions$"):
        head_config_from_dict("concat", {"num_heads": 8, "norm": "batch", "hidden": 16})
    # A sweep crossing heads, or an old config.json, drops the options of other heads, but never a typo.
    assert head_config_from_dict("concat", {"num_heads": 8, "hidden": 16}, drop_foreign=True).hidden == 16
    with pytest.raises(ValueError, match="does not take hiden"):
        head_config_from_dict("concat", {"hiden": 16}, drop_foreign=True)
    with pytest.raises(ValueError, match="takes a AttentionHeadConfig, not a PooledHeadConfig"):
        create_head("cross-attention", PooledHeadConfig())


@pytest.mark.parametrize("name", head_names())
def test_a_run_with_the_old_full_head_keys_loads_and_predicts_the_same(name, tmp_path):
    """A run folder written when every head took one config with every option loads into the very same head."""
    torch.manual_seed(0)
    old = create_head(name, AttentionHeadConfig(**OLD_HEAD_KEYS).validate()).eval()  # how every head was built
    torch.manual_seed(0)
    new = create_head(name, head_config_from_dict(name, OLD_HEAD_KEYS, drop_foreign=True)).eval()
    assert list(new.state_dict()) == list(old.state_dict())  # same parameters, created in the same order
    assert all(torch.equal(new.state_dict()[key], value) for key, value in old.state_dict().items())

    torch.save(old.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"fit": asdict(FitConfig(head=name)), "head": OLD_HEAD_KEYS}))
    loaded, _ = load_head(tmp_path)
    assert set(asdict(loaded.config)) == {f.name for f in fields(HEADS[name].config_class)}  # its own options only
    with torch.no_grad():
        assert torch.equal(loaded(*make_inputs()), old(*make_inputs()))
