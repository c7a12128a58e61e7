"""Real pretrained backbones retrofit can load offline."""

from retrofit.models.darknet import DarknetTiny, darknet_tiny

__all__ = ["DarknetTiny", "darknet_tiny"]
