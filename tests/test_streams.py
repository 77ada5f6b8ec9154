"""Several encoders per modality: the block-diagonal join of their features, and extract → fit → predict on it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from extract.cache import cache_path
from extract.dataset import image_path
from extract.registry import IMAGE_ENCODERS, create_encoder, stream_names
from fusion.features import PairFeatures, joined_streams
from tests.conftest import build_tiny_image_encoder
from tests.test_cli import FIT_OPTIONS, MAX_TOKENS, POST, invoke, one_line_error, read_submission, succeeded


def _stream(n: int, length: int, dim: int, real: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.tensor(real)[:, None]  # (N, L)
    features = (torch.randn(n, length, dim, generator=generator) * 3 + 1) * mask[..., None]  # (N, L, D)
    return features, mask


def test_joined_streams_lay_each_encoder_in_its_own_block():
    first, second = _stream(2, 3, 4, [3, 1], seed=0), _stream(2, 5, 6, [2, 5], seed=1)
    joined, mask = joined_streams([first, second])
    assert joined.shape == (2, 8, 10) and joined.dtype == torch.float16 and mask.shape == (2, 8)
    assert torch.equal(mask, torch.cat([first[1], second[1]], dim=1))
    alone = [joined_streams([stream])[0] for stream in (first, second)]  # each normalised on its own
    assert torch.equal(joined[:, :3, :4], alone[0]) and torch.equal(joined[:, 3:, 4:], alone[1])
    assert not joined[:, :3, 4:].any() and not joined[:, 3:, :4].any()  # no feature leaks into another's block
    # A linear map of the joined features is the sum of one linear map per encoder: a projection per encoder.
    weight = torch.randn(10, 7)
    projected = joined.float() @ weight  # (2, 8, 7)
    torch.testing.assert_close(projected[:, :3], alone[0].float() @ weight[:4])
    torch.testing.assert_close(projected[:, 3:], alone[1].float() @ weight[4:])


def test_one_stream_is_the_single_encoder_input():
    features, mask = _stream(3, 4, 5, [4, 2, 0], seed=2)
    pair = PairFeatures.from_encoders(["a", "b", "c"], [(features, mask)], [(features, mask)])
    torch.testing.assert_close(pair.text.float().std(-1, unbiased=False)[0], torch.ones(4), atol=2e-2, rtol=0)
    assert not pair.text[2].any()  # an empty row stays all zero


@pytest.mark.parametrize("names", ["a,,b", "a,a", ","])
def test_encoder_lists_refuse_empty_and_repeated_names(names):
    with pytest.raises(ValueError, match="empty or repeated"):
        stream_names(names)


def test_commands_taking_one_encoder_refuse_a_list():
    with pytest.raises(ValueError, match="only extract and fit take a list"):
        create_encoder("text", "minilm,mpnet")


@pytest.fixture
def second_image_encoder(_tiny_image_encoder_template):
    """A second tiny image encoder (other weights, 96 px: 3×3 = 9 patches) registered as ``tiny-resnet18-b``."""
    from extract.encoders.torchvision_image import TorchvisionImageEncoder

    with torch.random.fork_rng():
        torch.manual_seed(1)
        template = TorchvisionImageEncoder("resnet18", name="tiny-resnet18-b", weights=None, image_size=96)
    IMAGE_ENCODERS["tiny-resnet18-b"] = lambda **options: copy.deepcopy(template)
    yield "tiny-resnet18-b"
    IMAGE_ENCODERS.pop("tiny-resnet18-b", None)


def test_extract_fit_predict_with_two_encoders_per_modality(
    data_dir, data_spec, tmp_path, tiny_text_encoder_dir, tiny_image_encoder_name, second_image_encoder
):
    text = f"{tiny_text_encoder_dir},{tiny_text_encoder_dir}+vader"  # 32-d tokens, and 32 + 4 VADER scores
    image = f"{tiny_image_encoder_name},{second_image_encoder}"  # 2×2 and 3×3 patches of 512
    shared = ["--data", data_dir, "--cache", tmp_path / "cache", "--text-encoder", text, "--image-encoder", image]
    succeeded(invoke("extract", *shared, "--max-tokens", MAX_TOKENS, "--workers", 0))
    for kind, names in (("text", text), ("image", image)):
        assert all(cache_path(tmp_path / "cache", data_dir, kind, name).is_file() for name in stream_names(names))

    run = tmp_path / "run"
    succeeded(invoke("fit", *shared, "--out", run, "--head", "cross-attention", *FIT_OPTIONS))
    config = json.loads((run / "config.json").read_text())
    assert (config["head"]["text_dim"], config["head"]["image_dim"], config["head"]["image_length"]) == (68, 1024, 13)
    assert [s["encoder"] for s in config["encoders"]["image"]["streams"]] == stream_names(image)

    submission = tmp_path / "sub.csv"
    succeeded(invoke("predict", *shared[:4], "--run", run, "--out", submission))
    assert [guid for guid, _ in read_submission(submission)[1:]] == data_spec.test
    post = succeeded(invoke("predict", "--run", run, "--text", "so happy", "--image", image_path(data_dir, "1")))
    assert POST.search(post.output), post.output

    refused = invoke("finetune", "--from-run", run, "--out", tmp_path / "ft", "--data", data_dir)
    one_line_error(refused, "several text encoders", "end-to-end models take one")
    assert not (tmp_path / "ft").exists()

    # The run's second image stream must come from the encoder it was trained on.
    other = cache_path(tmp_path / "cache", data_dir, "image", second_image_encoder)
    other.unlink()
    with torch.random.fork_rng():
        torch.manual_seed(2)
        impostor = build_tiny_image_encoder(second_image_encoder)  # same name, other weights and size
    IMAGE_ENCODERS[second_image_encoder] = lambda **options: copy.deepcopy(impostor)
    succeeded(invoke("extract", *shared, "--only", "image", "--workers", 0))
    one_line_error(invoke("predict", *shared[:4], "--run", run, "--out", submission), "fingerprint")
