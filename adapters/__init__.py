"""retrofit.adapters: bolt a RetrievalHead onto timm, torchvision or any classifier (see ``retrofit.wrap``)."""
