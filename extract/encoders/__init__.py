"""Built-in encoders; importing a module registers its names."""

from extract.encoders import efficientnet_lite, hf_text, mpnet, resmem_resnet, torchvision_image  # noqa: F401
