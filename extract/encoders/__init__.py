"""Built-in encoders; importing a module registers its names."""

from extract.encoders import efficientnet_lite, hf_text, mpnet, torchvision_image  # noqa: F401
