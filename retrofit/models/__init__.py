"""Real pretrained backbones retrofit can load offline."""
