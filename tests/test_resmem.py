"""The optional ResNet-152 from the resmem wheel, on a random state dict laid out as ResMem's model.pt."""

from __future__ import annotations

import pytest
import torch
import torchvision
from PIL import Image

import extract.encoders.resmem_resnet as resmem
from extract.encoders.hf_text import EncoderUnavailableError
from extract.registry import create_encoder


@pytest.fixture(scope="module")
def resmem_file(tmp_path_factory):
    """A model.pt as ResMem ships it: the ResNet-152 under ``features.``, beside the memorability head's keys."""
    torch.manual_seed(0)
    network = torchvision.models.resnet152(weights=None, zero_init_residual=True)  # bounded activations
    for module in network.modules():  # batch-norm statistics that are not the identity, so folding is tested
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {f"features.{key}": value for key, value in network.state_dict().items()}
    state |= {"conv1.weight": torch.zeros(48, 3, 11, 11), "fc12.bias": torch.zeros(1)}
    path = tmp_path_factory.mktemp("resmem") / "model.pt"
    torch.save(state, path)
    return path, network.eval()


def test_features_are_the_resnets_last_map_on_unnormalised_pixels(resmem_file):
    path, network = resmem_file
    encoder = resmem.ResMemResNet(weights=path)
    assert (encoder.dim, encoder.length, encoder.name) == (2048, 49, "resnet152-resmem")
    picture = Image.new("RGB", (300, 200), (250, 120, 10))
    pixels = encoder.pixels(picture)  # (3, 224, 224)
    assert pixels.shape == (3, 224, 224) and float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    with torch.inference_mode():
        patches, mask = encoder(pixels[None])  # (1, 49, 2048)
        feature_map = torch.nn.Sequential(*list(network.children())[:-2])(pixels[None])  # (1, 2048, 7, 7)
        fast, _ = encoder.for_inference()(pixels[None])
    torch.testing.assert_close(patches, feature_map.flatten(2).transpose(1, 2))
    assert mask.all()
    assert float((fast - patches).abs().max()) <= 1e-4 * float(patches.abs().max())  # batch norms folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.for_inference().modules())


def test_without_the_wheel_the_encoder_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(resmem.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EncoderUnavailableError, match="pip install --no-deps resmem"):
        create_encoder("image", "resnet152-resmem")
