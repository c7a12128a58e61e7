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
import shutil
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


def read_cifar_members(path: Path, start: int, n: int) -> list[tuple[str, dict[str, bytes]]]:
    """Raw members ``(key, {ext: bytes})`` of samples ``start .. start + n - 1`` (index within the shard)
    of a CIFAR-10 webdataset shard, reading only those members' bytes."""
    from retrofit.sources import tar_members

    out: dict[str, dict[str, bytes]] = {}
    with open(path, "rb") as f:
        for name, offset, size in tar_members(path):
            key, _, ext = name.partition(".")
            if start <= int(key.rsplit("_", 1)[1]) % 10000 < start + n:
                f.seek(offset)
                out.setdefault(key, {})[ext] = f.read(size)
    return list(out.items())


def read_cifar_block(path: Path, start: int, n: int) -> list[dict]:
    """Samples ``start .. start + n - 1`` of a CIFAR-10 shard, as dicts with ``key``, ``jpg`` (bytes),
    ``image`` (PIL RGB), ``label`` (int) and ``caption`` (str or None)."""
    from PIL import Image

    return [{"key": k, "jpg": s["jpg"], "image": Image.open(io.BytesIO(s["jpg"])).convert("RGB"),
             "label": int(s["cls"]), "caption": s["txt"].decode() if "txt" in s else None}
            for k, s in read_cifar_members(path, start, n)]


def read_cifar_balanced(data_dir: Path, per_class: int) -> list[dict]:
    """``per_class`` real training samples of each CIFAR-10 class, classes interleaved.

    The shards hold the classes in blocks of 5,000 (shard i: classes 2i and 2i+1), so the first samples
    of a shard are all one class."""
    samples = []
    for i in range(5):
        path = data_dir / "cifar10" / f"train-00000{i}.tar"
        samples += read_cifar_block(path, 0, per_class) + read_cifar_block(path, 5000, per_class)
    assert sorted({s["label"] for s in samples}) == list(range(10))
    return sorted(samples, key=lambda s: (int(s["key"][-5:]) % 5000, s["label"]))


@pytest.fixture(scope="session")
def cifar_train_small(data_dir: Path) -> list[dict]:
    """300 real CIFAR-10 training samples (30 per class, classes interleaved, with captions)."""
    return read_cifar_balanced(data_dir, 30)


@pytest.fixture(scope="session")
def cifar_classes(data_dir: Path) -> list[str]:
    meta = json.loads((data_dir / "cifar10" / "classes.json").read_text())
    return list(meta["classes"]) if isinstance(meta, dict) and "classes" in meta else list(meta)


def clustered_kb_and_queries(path: Path, seed: int, num_classes: int, key_dim: int, image_dim: int, text_dim: int,
                             kb_per_class: int, queries_per_class: int, host_scale: float, class_names: list[str]):
    """A real KnowledgeBase whose labels are the truth (one Gaussian cluster per class, keys = image vectors cut
    to ``image_dim``) and a labelled FeatureSet of queries from the same clusters whose host logits are pure
    noise (``host_scale`` * N(0, 1)): the label vote is the only informative input. Returns ``(kb, features,
    generator)``, the generator seeded with ``seed`` and left where the draws stopped (for the caller's next ones)."""
    from retrofit.feature_cache import FeatureSet
    from retrofit.knowledge_base import KnowledgeBase

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, key_dim, generator=g) * 3
    y_kb = torch.arange(num_classes).repeat(kb_per_class)
    kb = KnowledgeBase.create(path, key_dim, image_dim, text_dim, class_names=class_names)
    x = centres[y_kb] + torch.randn(len(y_kb), key_dim, generator=g)
    kb.add(x, x[:, :image_dim], torch.randn(len(y_kb), text_dim, generator=g), labels=y_kb)
    y = torch.arange(num_classes).repeat(queries_per_class)
    fs = FeatureSet(z=centres[y] + torch.randn(len(y), key_dim, generator=g), labels=y,
                    host_logits=host_scale * torch.randn(len(y), num_classes, generator=g))
    return kb, fs, g


# ---------------------------------------------------------------- a miniature copy of the real data (demo tests)


def _test_samples(path: Path, per_class: int) -> list[dict]:
    """The first ``per_class`` samples of every class in a real CIFAR-10 test shard."""
    out, seen = [], {}
    with tarfile.open(path) as tf:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            members.setdefault(key, {})[ext] = m
        for ms in members.values():
            label = int(tf.extractfile(ms["cls"]).read().decode())
            if seen.get(label, 0) < per_class:
                seen[label] = seen.get(label, 0) + 1
                out.append({"label": label, "jpg": tf.extractfile(ms["jpg"]).read(), "caption": None})
    return out


@pytest.fixture(scope="session")
def mini_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory laid out as ``../shared/data``: cifar10/ with one train and one test shard of real images
    (keys numbered in order, as the demo checks), classes.json, and the real Tiny Darknet weights."""
    from test_sources import _pick, write_shard

    root = tmp_path_factory.mktemp("mini_data")
    (root / "cifar10").mkdir()
    shutil.copy(data_dir / "cifar10" / "classes.json", root / "cifar10" / "classes.json")
    (root / "darknet-tiny").symlink_to(data_dir / "darknet-tiny")
    train = [dict(s, key=f"train_{i:06d}") for i, s in enumerate(_pick(data_dir, 40))]
    test = [dict(s, key=f"test_{i:06d}") for i, s in enumerate(_test_samples(data_dir / "cifar10" / "test-000000.tar",
                                                                               10))]
    assert len(train) == 400 and len(test) == 100
    write_shard(root / "cifar10" / "train-000000.tar", train)
    write_shard(root / "cifar10" / "test-000000.tar", test)
    return root


def mini_settings(mini_data: Path) -> dict:
    """DemoConfig fields for the miniature data: IF 10 (40 -> 4 images per class), 2 validation images per class,
    a tiny head trained for one epoch, short grids."""
    return dict(data_dir=str(mini_data), imbalance_factor=10.0, val_per_class=2, k=4, dim=8, heads=2, epochs=1,
                batch_size=32, posthoc=(0.0, 0.5, 1.0), vote_scales=(1.0, 2.0), vote_temperatures=(0.05,),
                progress=False)
