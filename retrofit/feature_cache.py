"""Frozen-backbone features for head training, in memory (``FeatureSet``) and on disk (``FeatureCache``).

The backbone never changes while the head trains, so the embedding ``z``, the host's logits and the
neighbour ids of every sample are computed once. ``FeatureCache`` stores them as safetensors + JSON (no
pickle) in two levels, so that a knowledge-base update re-runs retrieval but not the backbone:

- ``features-<key>``: ``z``, ``labels``, ``host_logits``, ``keys``, ``exclude`` — keyed by the model and data
  fingerprints;
- ``neighbors-<key>``: ``neighbor_ids`` / ``neighbor_scores`` / ``neighbor_labels`` — keyed additionally by
  the KB fingerprint, its generation and size, ``k`` and the exclusion policy.

Any change of a key part gives a new key; stale entries with the same name are removed on write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from retrofit.errors import RetrofitError
from retrofit.fingerprint import file_sha256

__all__ = [
    "FeatureSet", "FeatureCache", "NeighborVectors", "cache_key", "extract_features", "neighbors_from_ids", "retrieve",
    "store_vectors",
]

log = logging.getLogger(__name__)

_FEATURE_FIELDS = ("z", "labels", "host_logits", "keys", "exclude")
# ``exclude`` too: the neighbour step sets the self-exclusion ids (they come from the KB), and training reads them
# again (mixup keeps a mixed sample from its partner's own entry): a cache hit lost them
_NEIGHBOR_FIELDS = ("neighbor_ids", "neighbor_scores", "neighbor_labels", "exclude")


@dataclass
class FeatureSet:
    """Everything the head needs per sample, computed once from a frozen backbone (all on CPU)."""

    z: torch.Tensor  # (N, Dq) float32 backbone embedding fed to the head
    labels: torch.Tensor  # (N,) int64 class labels (-1 = unknown, e.g. at prediction)
    host_logits: torch.Tensor | None = None  # (N, C) float32 logits of the host classifier, None = no host branch
    keys: torch.Tensor | None = None  # (N, Dk) retrieval keys when they differ from z (a separate retriever)
    exclude: torch.Tensor | None = None  # (N, m) int64 KB ids a sample must not retrieve (its own entry), -1 pad
    neighbor_ids: torch.Tensor | None = None  # (N, k) int64 cached neighbour ids, -1 = empty slot; None = live
    neighbor_scores: torch.Tensor | None = None  # (N, k) float32 similarity of each cached neighbour
    neighbor_labels: torch.Tensor | None = None  # (N, k) int64 label of each cached neighbour, -1 unknown
    meta: dict[str, Any] = field(default_factory=dict)  # free-form provenance (specs, fingerprints), JSON-able

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy arrays (and lists for labels) are taken as tensors
            t = getattr(self, f.name)
            if f.name != "meta" and t is not None and not isinstance(t, torch.Tensor):
                try:
                    setattr(self, f.name, torch.as_tensor(t))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"FeatureSet.{f.name} must be a tensor or an array, got {type(t).__name__} "
                                     f"({e})") from None
        n = self.z.shape[0]
        if self.z.dim() != 2:
            raise ValueError(f"FeatureSet.z must be (N, D), got shape {tuple(self.z.shape)}")
        for f in fields(self):
            t = getattr(self, f.name)
            if isinstance(t, torch.Tensor) and t.shape[0] != n:
                raise ValueError(f"FeatureSet.{f.name} has {t.shape[0]} rows but z has {n}")
        if self.labels.dim() != 1:
            raise ValueError(f"FeatureSet.labels must be (N,), got shape {tuple(self.labels.shape)}")
        for name in ("labels", "exclude", "neighbor_ids", "neighbor_labels"):  # uint8 / int32 ids: int64 (indexing)
            t = getattr(self, name)
            if t is not None and not t.is_floating_point() and not t.is_complex() and t.dtype not in (torch.int64,
                                                                                                     torch.bool):
                setattr(self, name, t.long())

    def __len__(self) -> int:
        return self.z.shape[0]

    @property
    def retrieval_keys(self) -> torch.Tensor:
        """(N, Dk) the vectors the KB is searched with (``keys`` if given, else ``z``), L2-normalised."""
        return torch.nn.functional.normalize((self.keys if self.keys is not None else self.z).float(), dim=1)

    @property
    def has_neighbors(self) -> bool:
        return self.neighbor_ids is not None

    def subset(self, rows: torch.Tensor | slice) -> FeatureSet:
        """The samples ``rows`` (an index tensor, boolean mask or slice)."""
        kw = {f.name: (t[rows] if isinstance(t := getattr(self, f.name), torch.Tensor) else t) for f in fields(self)}
        return FeatureSet(**kw)

    def tensors(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).contiguous() for n in names if getattr(self, n) is not None}

    def with_neighbors(self, ids: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        return replace(self, neighbor_ids=ids, neighbor_scores=scores, neighbor_labels=labels)


def _canonical(obj: Any) -> Any:
    """JSON-able form of fingerprints, dataclasses, paths, tuples."""
    if hasattr(obj, "to_dict"):
        return _canonical(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 (first 20 hex) of the canonical JSON of ``parts``."""
    blob = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def store_vectors(store: Any, ids: torch.Tensor, which: str) -> torch.Tensor:
    """The ``which`` ("image" | "text" | "key") vectors of KB entries ``ids`` (M,), as float32 on CPU."""
    if which not in ("image", "text", "key"):
        raise ValueError(f"which={which!r}; allowed: 'image', 'text', 'key'")
    ids = ids.to(torch.int64).cpu()
    if hasattr(store, "vectors"):
        return store.vectors(ids, which=which).float().cpu()
    attr = {"image": "image", "text": "text", "key": "keys"}[which]
    table = getattr(store, attr, None)  # InMemoryStore keeps its vectors as tensors
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{type(store).__name__} has neither vectors(ids, which=...) nor a '{attr}' tensor")
    return table[ids].float()


class NeighborVectors:
    """The image / text vectors of every KB entry a cached neighbour list refers to, held in RAM.

    Built once per run from the unique ids (one read of the store), then ``gather(ids)`` is a tensor index
    that works the same for every store and device, and is far smaller than caching (N, k, D) vectors.
    Per batch it costs about what a vectorised KB read does: ~1 ms of the demo head's ~26 ms CPU training step.
    """

    def __init__(self, store: Any, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        flat = ids[ids >= 0].reshape(-1)
        self.ids = torch.unique(flat)  # (M,) sorted
        if self.ids.numel():
            self.image = store_vectors(store, self.ids, "image").to(dtype)  # (M, Di)
            self.text = store_vectors(store, self.ids, "text").to(dtype)  # (M, Dt)
        else:
            self.image = torch.zeros(0, store.image_dim, dtype=dtype)
            self.text = torch.zeros(0, store.text_dim, dtype=dtype)
        # one zero row at the end for empty slots
        self.image = torch.cat([self.image, self.image.new_zeros(1, self.image.shape[1])])
        self.text = torch.cat([self.text, self.text.new_zeros(1, self.text.shape[1])])

        m = self.ids.numel()
        top = int(self.ids.max()) + 1 if m else 0
        self.row_of = torch.full((top + 2,), m, dtype=torch.int64)  # KB id -> table row; m = the zero row
        self.row_of[self.ids] = torch.arange(m)

    def to(self, device: torch.device | str) -> NeighborVectors:
        self.image, self.text, self.ids = self.image.to(device), self.text.to(device), self.ids.to(device)
        self.row_of = self.row_of.to(device)
        return self

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id in the tables; empty slots (-1) and unknown ids map to the zero row."""
        top = self.row_of.numel() - 1  # an id past every known one: maps to the zero row
        return self.row_of[torch.where(ids < 0, top, ids.clamp_max(top))]

    def gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (B, k, Di), text (B, k, Dt)) for neighbour ids (B, k)."""
        r = self.rows(ids).reshape(-1)  # index_select: ~3x faster than advanced indexing on CPU, same values
        return (self.image.index_select(0, r).view(*ids.shape, self.image.shape[1]),
                self.text.index_select(0, r).view(*ids.shape, self.text.shape[1]))


def _complete(entry: Path) -> bool:
    return (entry / "tensors.safetensors").is_file() and (entry / "meta.json").is_file()


class FeatureCache:
    """On-disk cache of ``FeatureSet`` parts under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0  # entries read from disk during this object's life
        self.misses = 0  # entries computed

    def _dir(self, kind: str, name: str, key: str) -> Path:
        return self.root / f"{name}.{kind}-{key}"

    def _write(self, kind: str, name: str, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Store an entry; a cache that cannot be written (full disk, read-only) costs the reuse, not the result."""
        try:
            self._write_entry(kind, name, key, tensors, meta)
        except OSError as e:
            log.warning("could not store cache entry %s (%s): continuing without it", self._dir(kind, name, key), e)

    def _write_entry(self, kind: str, name: str, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from retrofit._files import as_umask_allows, save_tensors

        self.root.mkdir(parents=True, exist_ok=True)
        final = self._dir(kind, name, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-", dir=self.root))
        try:
            as_umask_allows(tmp, directory=True)  # (mkdtemp: 0700, unreadable by another user sharing the cache)
            save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
            meta = {**meta, "sha256": file_sha256(tmp / "tensors.safetensors")}  # damage inside the data is caught
            (tmp / "meta.json").write_text(json.dumps(_canonical(meta), indent=1))
            if final.exists() and not _complete(final):  # (entries are renamed in whole: not from this code)
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError as e:
                if not _complete(final):  # another process is removing it as stale (its run uses other settings)
                    log.warning("could not store cache entry %s (%s): continuing without it", final, e)
                # else another process stored the same entry first (same key: the same content): keep theirs
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        for stale in self._entries(name, kind):  # same name, other key: out of date
            if stale != final:
                log.info("removing stale cache entry %s", stale)
                shutil.rmtree(stale, ignore_errors=True)

    def _entries(self, name: str, kind: str | None = None) -> list[Path]:
        """The entry folders of ``name`` (of ``kind``, or both): by exact prefix, not a glob ("train" is not
        "train.v2"; "t[1]" is a name, not a pattern)."""
        if not self.root.is_dir():
            return []
        prefixes = tuple(f"{name}.{k}-" for k in ((kind,) if kind else ("features", "neighbors")))
        return [d for d in self.root.iterdir() if d.name.startswith(prefixes) and d.is_dir()]

    def _read(self, kind: str, name: str, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        from safetensors.torch import load_file

        d = self._dir(kind, name, key)
        if not (d / "tensors.safetensors").is_file() or not (d / "meta.json").is_file():
            return None
        try:
            meta = json.loads((d / "meta.json").read_text())
            want = meta.get("sha256")  # (entries written before checksums have none)
            if want is not None and file_sha256(d / "tensors.safetensors") != want:
                raise ValueError("its tensors do not match their checksum")
            return load_file(str(d / "tensors.safetensors")), meta
        except Exception as e:  # a damaged entry is recomputed, never trusted
            log.warning("cache entry %s is unreadable (%s); recomputing it", d, e)
            shutil.rmtree(d, ignore_errors=True)
            return None

    def get_or_compute(
        self,
        name: str,
        feature_parts: dict[str, Any],
        compute_features: Callable[[], FeatureSet],
        neighbor_parts: dict[str, Any] | None = None,
        compute_neighbors: Callable[[FeatureSet], FeatureSet] | None = None,
    ) -> FeatureSet:
        """The cached ``FeatureSet`` called ``name``, computing (and storing) what is missing.

        ``feature_parts`` identify the backbone features (model and data fingerprints, preprocessing);
        ``neighbor_parts`` the retrieval (KB fingerprint, generation, size, k, exclusion policy). When
        ``compute_neighbors`` is None the result has no neighbours (live retrieval).
        """
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"cache entry name {name!r} must be a plain non-empty file name")
        if self.root.exists() and not self.root.is_dir():  # said before the work, not after it
            raise NotADirectoryError(f"feature cache {self.root} is a file, not a directory: give another cache "
                                     "directory (--cache-dir), or --no-cache")
        fkey = cache_key(feature_parts)
        got = self._read("features", name, fkey)
        if got is None:
            self.misses += 1
            fs = compute_features()
            self._write("features", name, fkey, fs.tensors(_FEATURE_FIELDS),
                        {"parts": feature_parts, "meta": fs.meta, "n": len(fs)})
        else:
            self.hits += 1
            tensors, meta = got
            fs = FeatureSet(**tensors, meta=meta.get("meta", {}))
        if compute_neighbors is None:
            return fs
        nkey = cache_key({"features": fkey, **(neighbor_parts or {}), "entry": 2})  # 2: stores ``exclude``
        got = self._read("neighbors", name, nkey)
        if got is None:
            self.misses += 1
            fs = compute_neighbors(fs)
            if fs.neighbor_ids is None:
                raise RetrofitError("compute_neighbors returned a FeatureSet without neighbor_ids")
            self._write("neighbors", name, nkey, fs.tensors(_NEIGHBOR_FIELDS), {"parts": neighbor_parts or {}})
        else:
            self.hits += 1
            tensors, _ = got
            if tensors["neighbor_ids"].shape[0] != len(fs):
                raise RetrofitError(f"cache entry {self._dir('neighbors', name, nkey)} does not match its features; "
                                    "delete it")
            fs = fs.with_neighbors(tensors["neighbor_ids"], tensors["neighbor_scores"], tensors["neighbor_labels"])
            if "exclude" in tensors:
                fs = replace(fs, exclude=tensors["exclude"])
        return fs

    def clear(self, name: str | None = None) -> int:
        """Remove cached entries (of ``name``, or all); returns how many were removed."""
        if not self.root.is_dir():
            return 0
        entries = self._entries(name) if name else [d for d in self.root.glob("*.*-*") if d.is_dir()]
        for d in entries:
            shutil.rmtree(d, ignore_errors=True)
        return len(entries)


def retrieve(fs: FeatureSet, store: Any, k: int, batch_size: int = 1024, progress: bool = False) -> FeatureSet:
    """``fs`` with the ``k`` nearest KB entries of every sample (its ``exclude`` ids left out)."""
    from tqdm.auto import tqdm

    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    keys = fs.retrieval_keys  # (N, Dk)
    if keys.shape[1] != store.key_dim:
        raise ValueError(f"retrieval keys have dim {keys.shape[1]} but the knowledge base's keys have dim "
                         f"{store.key_dim}: the KB was built with another encoder")
    ids, scores, labels = [], [], []
    for s in tqdm(range(0, len(fs), batch_size), desc="retrieving", disable=not progress, leave=False):
        ex = fs.exclude[s:s + batch_size] if fs.exclude is not None else None
        nb = store.search(keys[s:s + batch_size], k, exclude=ex)
        ids.append(nb.ids.cpu())
        scores.append(nb.scores.float().cpu())
        labels.append(nb.labels.cpu())
    if not ids:
        empty = torch.zeros(0, k)
        return fs.with_neighbors(empty.long(), empty, empty.long())
    return fs.with_neighbors(torch.cat(ids), torch.cat(scores), torch.cat(labels))


def neighbors_from_ids(ids: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, table: NeighborVectors):
    """A :class:`~retrofit.neighbors.Neighbors` batch from cached ids, with vectors gathered from ``table``."""
    from retrofit.neighbors import Neighbors

    dev = table.image.device
    ids, scores, labels = ids.to(dev), scores.to(dev), labels.to(dev)
    image, text = table.gather(ids)  # (B, k, Di), (B, k, Dt)
    mask = ids >= 0  # (B, k)
    return Neighbors(ids=ids, scores=scores.masked_fill(~mask, float("-inf")), mask=mask, image=image, text=text,
                     labels=labels.masked_fill(~mask, -1))


@torch.no_grad()
def extract_features(featurize: Callable[[torch.Tensor], Any], batches: Any, *, meta: dict[str, Any] | None = None,
                     progress: bool = False, total: int | None = None) -> FeatureSet:
    """Run a frozen backbone once over ``batches`` of ``(images (B, 3, H, W), labels (B,))`` (or of
    ``(images, labels, exclude (B, m))``); ``featurize(images)`` returns ``z`` or ``(z, host_logits)``."""
    from tqdm.auto import tqdm

    zs, hs, ys, exs = [], [], [], []
    for batch in tqdm(batches, desc="features", disable=not progress, total=total, leave=False):
        images, labels = batch[0], batch[1]
        out = featurize(images)
        z, h = (out if isinstance(out, tuple) else (out, None))
        zs.append(z.detach().float().cpu())
        ys.append(torch.as_tensor(labels, dtype=torch.int64).reshape(-1))
        if h is not None:
            hs.append(h.detach().float().cpu())
        if len(batch) > 2 and batch[2] is not None:
            exs.append(torch.as_tensor(batch[2], dtype=torch.int64).reshape(len(z), -1))
    if not zs:
        raise ValueError("extract_features got no batches (is the data source empty?)")
    return FeatureSet(z=torch.cat(zs), labels=torch.cat(ys), host_logits=torch.cat(hs) if hs else None,
                      exclude=torch.cat(exs) if exs else None, meta=dict(meta or {}))
