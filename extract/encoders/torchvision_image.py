"""torchvision classification backbones by name, with their weights enums.

``resnet50`` (the design card's choice) downloads its ImageNet weights on first use;
any other torchvision classification model works as ``tv:<name>``. The classifier is
dropped and the last feature map becomes the patch sequence (7×7 at 224 px).
"""

from __future__ import annotations

from torch import nn

from extract.encoders.base import PatchImageEncoder
from extract.encoders.hf_text import EncoderUnavailableError
from extract.registry import register_image_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"  # weights="random": the architecture with random initial weights (tests, speed checks)


def _feature_map(model: nn.Module, arch: str) -> nn.Module:
    """The part of a classifier that ends in its last spatial feature map."""
    if hasattr(model, "layer4"):  # ResNet, ResNeXt, Wide ResNet: drop avgpool and fc
        return nn.Sequential(*list(model.children())[:-2])
    if hasattr(model, "features"):  # EfficientNet, MobileNet, ConvNeXt, DenseNet, VGG, RegNet-like
        return model.features
    raise ValueError(f"torchvision model {arch!r} has no 'layer4' or 'features' stage to take patches from")


class TorchvisionImageEncoder(PatchImageEncoder):
    def __init__(self, arch: str, *, name: str | None = None, weights: str | None = "DEFAULT", image_size: int = 224):
        """``weights``: a weights enum name of the model ("DEFAULT", "IMAGENET1K_V2", ...) or "random"/None."""
        super().__init__()
        import torchvision

        if weights in (None, RANDOM):
            weights = RANDOM
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown torchvision classification model {arch!r}")
        try:
            model = torchvision.models.get_model(arch, weights=None if weights == RANDOM else weights)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            raise EncoderUnavailableError(
                f"cannot load image encoder {arch!r} with weights {weights!r}: the download failed "
                f"(offline?); fetch them once online into the torch hub cache or use the embedded 'efficientnet-lite0'"
            ) from error
        self.backbone = _feature_map(model, arch).eval()
        self.name = name or arch
        self.options = {"weights": weights, "image_size": image_size}
        self.image_size = image_size
        transforms = None if weights == RANDOM else torchvision.models.get_model_weights(arch)[weights].transforms()
        self.mean = tuple(transforms.mean) if transforms is not None else IMAGENET_MEAN
        self.std = tuple(transforms.std) if transforms is not None else IMAGENET_STD
        self._set_shape()


@register_image_encoder("resnet50")
def resnet50(weights: str | None = "DEFAULT", image_size: int = 224) -> TorchvisionImageEncoder:
    """The design card's image encoder: ResNet-50, 7×7 patches × 2048 channels at 224 px."""
    return TorchvisionImageEncoder("resnet50", name="resnet50", weights=weights, image_size=image_size)
