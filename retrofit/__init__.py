"""retrofit: retrieval-augmented heads for image classifiers that already exist.

The public API is listed in ``__all__``. Everything is imported lazily on first use, so that
``import retrofit`` stays fast and never imports faiss, lmdb, triton, timm, torchvision or open_clip.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from retrofit._version import __version__
from retrofit.errors import (
    CorruptKnowledgeBaseError,
    FingerprintMismatchError,
    KnowledgeBaseError,
    MissingDependencyError,
    RetrofitError,
)
from retrofit.fingerprint import EncoderFingerprint

if TYPE_CHECKING:  # what type checkers see (py.typed); at run time these are imported on first use (__getattr__)
    from retrofit._env import data_dir  # noqa: F401
    from retrofit.adapters import RetrofittedModel, wrap  # noqa: F401
    from retrofit.build_config import BuildConfig  # noqa: F401
    from retrofit.calibration import choose_vote_scale  # noqa: F401
    from retrofit.encoders import load_image_encoder, load_text_encoder  # noqa: F401
    from retrofit.evaluation import evaluate  # noqa: F401
    from retrofit.fusion import CrossFusionLayer  # noqa: F401
    from retrofit.head import HeadConfig, HeadOutput, RetrievalHead  # noqa: F401
    from retrofit.ingest import add_to_kb, build_kb  # noqa: F401
    from retrofit.kb_merge import merge_kbs  # noqa: F401
    from retrofit.knowledge_base import KnowledgeBase  # noqa: F401
    from retrofit.neighbors import Neighbors  # noqa: F401
    from retrofit.prediction import predict_logits  # noqa: F401
    from retrofit.store import InMemoryStore, KBFingerprint, Store  # noqa: F401
    from retrofit.training import TrainConfig, train  # noqa: F401

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "Neighbors": "retrofit.neighbors",
    "Store": "retrofit.store",
    "KBFingerprint": "retrofit.store",
    "InMemoryStore": "retrofit.store",
    "KnowledgeBase": "retrofit.knowledge_base",
    "RetrievalHead": "retrofit.head",
    "HeadConfig": "retrofit.head",
    "HeadOutput": "retrofit.head",
    "CrossFusionLayer": "retrofit.fusion",
    "wrap": "retrofit.adapters",
    "RetrofittedModel": "retrofit.adapters",
    "build_kb": "retrofit.ingest",
    "BuildConfig": "retrofit.build_config",
    "add_to_kb": "retrofit.ingest",
    "merge_kbs": "retrofit.kb_merge",
    "load_image_encoder": "retrofit.encoders",
    "load_text_encoder": "retrofit.encoders",
    "train": "retrofit.training",
    "TrainConfig": "retrofit.training",
    "evaluate": "retrofit.evaluation",
    "predict_logits": "retrofit.prediction",
    "choose_vote_scale": "retrofit.calibration",
    "data_dir": "retrofit._env",
}

__all__ = [
    "__version__",
    "RetrofitError",
    "MissingDependencyError",
    "FingerprintMismatchError",
    "KnowledgeBaseError",
    "CorruptKnowledgeBaseError",
    "EncoderFingerprint",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # a submodule (`retrofit.encoders.host_encoder`, `retrofit.models.darknet_tiny()`) without importing it first
        if name.isidentifier() and not name.startswith("__"):
            try:
                found = importlib.util.find_spec(f"retrofit.{name}") is not None
            except ImportError:
                found = False
            if found:
                return importlib.import_module(f"retrofit.{name}")
        raise AttributeError(f"module 'retrofit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # the public API and the submodules already imported (not this file's own helpers: Any, importlib, ...)
    mods = {n for n, v in globals().items()
            if not n.startswith("_") and getattr(v, "__name__", "").startswith("retrofit.")}
    return sorted(set(__all__) | mods)

