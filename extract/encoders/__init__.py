"""Built-in encoders; importing a module registers its names."""

from extract.encoders import (  # noqa: F401
    efficientnet_lite,
    face_emotions,
    hf_text,
    mpnet,
    resmem_resnet,
    torchvision_image,
)
