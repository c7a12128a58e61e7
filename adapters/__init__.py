"""retrofit.adapters: bolt a RetrievalHead onto timm, torchvision or any classifier (see ``retrofit.wrap``)."""

from retrofit.adapters.base import BackboneAdapter
from retrofit.adapters.generic import HookAdapter, find_classifier
from retrofit.adapters.retrofitted import Embedder, RetrofittedModel, adapter_for, backbone, embedder, wrap
from retrofit.adapters.timm_adapter import TimmAdapter
from retrofit.adapters.torchvision_adapter import TORCHVISION_HEADS, HeadlessTorchvisionAdapter, TorchvisionAdapter

__all__ = [
    "wrap",
    "RetrofittedModel",
    "adapter_for",
    "backbone",
    "embedder",
    "Embedder",
    "BackboneAdapter",
    "TimmAdapter",
    "TorchvisionAdapter",
    "HeadlessTorchvisionAdapter",
    "HookAdapter",
    "find_classifier",
    "TORCHVISION_HEADS",
]
