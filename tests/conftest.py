"""Test set-up shared by every test module.

- ``TRITON_INTERPRET=1`` when CUDA is absent, set here before any kernel module is imported.
- ``HF_HUB_OFFLINE=1``: a hub download would otherwise retry for ~45 s before failing.
- ``cuda`` marker: skipped without a GPU.
- ``data_dir``: the real offline data (``RETROFIT_DATA_DIR``, default ``../shared/data``).
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    """Seed Python, numpy and torch; returns the seed."""
    s = 1234
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real offline data; skips with a reason only if it is truly absent."""
    from retrofit._env import data_dir as find

    d = find()
    if d is None or not (d / "cifar10").is_dir():
        pytest.skip("real data not found: set RETROFIT_DATA_DIR to the directory holding cifar10/ and darknet-tiny/")
    return d


def read_cifar_shard(path: Path, n: int, start: int = 0) -> list[dict]:
    """The first ``n`` samples (from ``start``) of a CIFAR-10 webdataset shard, as dicts with
    ``key``, ``jpg`` (bytes), ``image`` (PIL RGB), ``label`` (int) and ``caption`` (str or None)."""
    from PIL import Image

    samples: dict[str, dict] = {}
    order: list[str] = []
    with tarfile.open(path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if key not in samples:
                if len(order) >= start + n:
                    break
                samples[key] = {"key": key}
                order.append(key)
            samples[key][ext] = tf.extractfile(m).read()
    out = []
    for key in order[start:start + n]:
        s = samples[key]
        out.append({
            "key": key,
            "jpg": s["jpg"],
            "image": Image.open(io.BytesIO(s["jpg"])).convert("RGB"),
            "label": int(s["cls"].decode()),
            "caption": s["txt"].decode() if "txt" in s else None,
        })
    return out


@pytest.fixture(scope="session")
def cifar_train_small(data_dir: Path) -> list[dict]:
    """300 real CIFAR-10 training samples (with captions) from the first shard."""
    return read_cifar_shard(data_dir / "cifar10" / "train-000000.tar", 300)


@pytest.fixture(scope="session")
def cifar_classes(data_dir: Path) -> list[str]:
    meta = json.loads((data_dir / "cifar10" / "classes.json").read_text())
    return list(meta["classes"]) if isinstance(meta, dict) and "classes" in meta else list(meta)
