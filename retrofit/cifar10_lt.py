"""CIFAR-10-LT: the long-tail protocol over the offline CIFAR-10 webdataset shards.

Protocol (the counts of LDAM-DRW / LIFT): with imbalance factor IF, class c keeps the first
``floor(5000 * (1/IF) ** (c / 9))`` training images of that class in the shards' order (IF=100:
5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 = 12,406 images). The training images not kept
form a pool; ``val_per_class`` of them per class (fixed seed) are a balanced validation set, and the
rest (about 37,400 at IF=100) extend the knowledge base (KB_ext). A class with fewer than
``val_per_class`` images outside the subset (class 0 keeps all 5,000) gives the missing validation
images from its subset (seeded), so that validation is balanced and disjoint from training: at IF=100
the training subset is 12,386 images, class 0 4,980 (its group, Many, is unchanged). Groups by training count:
Many > 1000, Medium 200-1000, Few < 200.

Shards hold ``.jpg`` (32x32 JPEG), ``.cls`` (label) and, for training images, ``.txt`` (a web-like
caption) per key ``train_NNNNN`` / ``test_NNNNN`` (NNNNN = index in the shards). The offline training shards are
sorted by class (keys 0-4999 class 0, ...), not in CIFAR-10's original order, so "the first n of a class" is the
first n of the source's per-class file order; LDAM-DRW itself takes a seeded random n per class (np.random.shuffle):
the same counts, other images.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GROUPS",
    "CifarSplit",
    "LongTailSplit",
    "class_counts",
    "class_groups",
    "decode_images",
    "group_accuracy",
    "iter_shard",
    "load_classes",
    "load_split",
    "load_wordnet",
    "long_tail_split",
    "prompt",
    "shard_paths",
]

logger = logging.getLogger(__name__)

GROUPS = ("many", "medium", "few")
NUM_CLASSES = 10
PER_CLASS = 5000


def class_counts(imbalance_factor: float = 100.0, n_max: int = PER_CLASS, num_classes: int = NUM_CLASSES) -> list[int]:
    """Training images per class: ``floor(n_max * (1/IF) ** (c / (C-1)))``."""
    if not imbalance_factor >= 1:  # (NaN too)
        raise ValueError(f"imbalance_factor must be >= 1 (1 = balanced), got {imbalance_factor}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    # the small epsilon keeps exact products (IF=100, c=9: 50.0) from flooring to 49 by rounding error
    counts = [int(math.floor(n_max * (1.0 / imbalance_factor) ** (c / (num_classes - 1)) + 1e-6))
              for c in range(num_classes)]
    if min(counts) < 1:
        raise ValueError(f"imbalance_factor {imbalance_factor} leaves the rarest class with {min(counts)} of {n_max} "
                         f"images; allowed: 1 <= imbalance_factor <= {n_max} (a class with no training image has "
                         "no tail to study)")
    return counts


def class_groups(counts: Sequence[int], many: int = 1000, few: int = 200) -> np.ndarray:
    """Group of each class by training count: 0 = Many (> many), 1 = Medium, 2 = Few (< few)."""
    c = np.asarray(counts)
    return np.where(c > many, 0, np.where(c < few, 2, 1)).astype(np.int64)


@dataclass(frozen=True)
class LongTailSplit:
    """Index sets into the 50,000 CIFAR-10 training images (original order), all sorted."""

    lt: np.ndarray  # (N_lt,) the long-tail training subset (KB_in)
    val: np.ndarray  # (C * val_per_class,) balanced validation images, outside ``lt``
    pool: np.ndarray  # (N_pool,) the remaining training images (KB_ext = lt + pool)
    counts: list[int]  # training images per class in ``lt`` (after any validation hold-out)
    groups: np.ndarray = field(repr=False)  # (C,) 0 Many / 1 Medium / 2 Few

    @property
    def ext(self) -> np.ndarray:
        """KB_ext: the long-tail subset followed by the pool."""
        return np.concatenate([self.lt, self.pool])


def long_tail_split(labels: Sequence[int] | np.ndarray, imbalance_factor: float = 100.0, val_per_class: int = 20,
                    seed: int = 0, num_classes: int = NUM_CLASSES) -> LongTailSplit:
    """The CIFAR-10-LT split of training ``labels`` given in the original order."""
    y = np.asarray(labels)
    if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):  # 0.5 was truncated to class 0, silently
        raise ValueError(f"labels must be class indices (whole numbers), got {y[y != np.round(y)][:5].tolist()}")
    y = y.astype(np.int64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-d sequence, got shape {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    per_class = np.bincount(y, minlength=num_classes)
    counts = class_counts(imbalance_factor, int(per_class.max()), num_classes)
    rng = np.random.default_rng(seed)
    lt, val, pool, held = [], [], [], 0
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)  # original order
        if idx.size < val_per_class + 1:
            raise ValueError(f"class {c} has {idx.size} images, too few for {val_per_class} validation images")
        keep, rest = idx[:counts[c]], idx[counts[c]:]
        if rest.size < val_per_class:
            # the class keeps (nearly) all its images (class 0 at any IF): the missing validation images
            # are held out of the long-tail subset so that validation stays balanced and disjoint
            short = val_per_class - rest.size
            take = rng.choice(keep.size, size=short, replace=False)
            mask = np.ones(keep.size, dtype=bool)
            mask[take] = False
            rest, keep = np.sort(np.concatenate([rest, keep[~mask]])), keep[mask]
            held += short
        lt.append(keep)
        pick = np.zeros(rest.size, dtype=bool)
        pick[rng.choice(rest.size, size=val_per_class, replace=False)] = True
        val.append(rest[pick])
        pool.append(rest[~pick])
    if held:
        logger.info("held %d long-tail images out for validation (classes without enough images outside it)", held)
    counts = [int(k.size) for k in lt]
    # groups from the counts the subset really has (after a large val_per_class took images out of it, the nominal
    # counts' groups no longer described it: 900 images still "Many"); at the default they are the same
    return LongTailSplit(lt=np.sort(np.concatenate(lt)), val=np.sort(np.concatenate(val)),
                         pool=np.sort(np.concatenate(pool)), counts=counts, groups=class_groups(counts))


def group_accuracy(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """Top-1 accuracy (%) overall and per group (``groups[c]`` = group of class c): floats under ``overall``,
    ``many``, ``medium``, ``few``; the list of per-class accuracies under ``per_class``."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    ok = pred == labels
    out = {"overall": 100.0 * float(ok.mean())}
    for g, name in enumerate(GROUPS):
        sel = groups[labels] == g
        out[name] = 100.0 * float(ok[sel].mean()) if sel.any() else float("nan")
    out["per_class"] = [100.0 * float(ok[labels == c].mean()) if (labels == c).any() else float("nan")
                        for c in range(len(groups))]
    return out


# ---------------------------------------------------------------------------------------------- shards


def shard_paths(data_dir: str | Path, split: str = "train") -> list[Path]:
    """The webdataset shards of ``split`` ("train" or "test") under ``data_dir/cifar10``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) / "cifar10"
    paths = sorted(root.glob(f"{split}-*.tar"))
    if not paths:
        raise FileNotFoundError(f"no {split}-*.tar shards under {root}: set RETROFIT_DATA_DIR to the directory "
                                "that holds cifar10/")
    return paths


def iter_shard(path: str | Path) -> Iterator[dict]:
    """Samples of one shard in order: dicts with ``key``, ``index`` (original index), ``jpg`` (bytes),
    ``label`` (int) and ``caption`` (str or None)."""
    from retrofit.tar_shards import open_shard, tar_members

    cur: dict | None = None
    with open_shard(Path(path)) as reader:
        for name, offset, size in tar_members(Path(path), reader):
            key, _, ext = name.partition(".")
            if cur is None or cur["key"] != key:
                if cur is not None:
                    yield _finish(cur)
                cur = {"key": key}
            cur[ext] = reader.read(offset, size)
    if cur is not None:
        yield _finish(cur)


def _finish(s: dict) -> dict:
    if "jpg" not in s or "cls" not in s:
        raise ValueError(f"sample {s['key']!r} lacks .jpg or .cls (members: {sorted(s)})")
    return {"key": s["key"], "index": int(s["key"].rpartition("_")[2]), "jpg": s["jpg"],
            "label": int(s["cls"].decode()), "caption": s["txt"].decode() if "txt" in s else None}


@dataclass
class CifarSplit:
    """One CIFAR-10 split read from its shards, in the original order."""

    jpgs: list[bytes]  # encoded 32x32 JPEGs
    labels: np.ndarray  # (N,) int64
    captions: list[str | None]  # web-like captions (training images only)


def load_split(data_dir: str | Path, split: str = "train") -> CifarSplit:
    """Read every sample of ``split``; checks that the keys run 0..N-1 in order."""
    jpgs: list[bytes] = []
    labels: list[int] = []
    captions: list[str | None] = []
    for path in shard_paths(data_dir, split):
        for s in iter_shard(path):
            if s["index"] != len(jpgs):
                raise ValueError(f"{path}: expected sample {len(jpgs)} next, found key {s['key']!r}")
            jpgs.append(s["jpg"])
            labels.append(s["label"])
            captions.append(s["caption"])
    logger.info("read %d %s samples from %s", len(jpgs), split, data_dir)
    return CifarSplit(jpgs=jpgs, labels=np.asarray(labels, dtype=np.int64), captions=captions)


def decode_images(jpgs: Sequence[bytes]) -> list:
    """Decode JPEG bytes to PIL RGB images."""
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in jpgs]


def load_classes(data_dir: str | Path) -> tuple[list[str], list[str]]:
    """Class names (CIFAR-10 order) and the CLIP prompt templates from ``classes.json``."""
    meta = json.loads((Path(data_dir) / "cifar10" / "classes.json").read_text())
    return list(meta["classes"]), list(meta.get("clip_templates") or ["a photo of a {}."])


def load_wordnet(data_dir: str | Path) -> tuple[list[list[str]], list[str]]:
    """Per class (CIFAR-10 order) the lemmas and the gloss of its first WordNet 3.0 sense from ``classes.json``
    (the gloss without its quoted usage examples): synonyms and descriptions for
    :class:`retrofit.caption_labels.CaptionLabeller`."""
    meta = json.loads((Path(data_dir) / "cifar10" / "classes.json").read_text())
    senses = meta.get("wordnet")
    if not senses or len(senses) != len(meta["classes"]):
        raise ValueError(f"{Path(data_dir) / 'cifar10' / 'classes.json'} has no 'wordnet' entry per class")
    lemmas = [list(s[0]["lemmas"]) for s in senses]
    glosses = [re.sub(r';?\s*"[^"]*"', "", s[0]["gloss"]).strip(" ;") for s in senses]
    return lemmas, glosses


def prompt(class_name: str, template: str = "a photo of a {}.") -> str:
    """The class-as-text caption of a knowledge-base entry."""
    return template.format(class_name)
