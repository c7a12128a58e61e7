"""The index half of a knowledge base: faiss HNSW or exact flat search over the L2-normalised keys.

The index is a cache of the records: LMDB is the truth. Each index file ``index-<generation>-<tag>.faiss`` is
written to a temporary name, fsync'ed and renamed; then ``index.json`` (which file, the LMDB generation and the
highest record id it covers, its size and checksums, the tuned ``efSearch``) is replaced the same way. An index
behind the records is caught up from them; a damaged one is rebuilt (writers) or refused with the command that
rebuilds it (readers).

Ids inside faiss are the knowledge-base record ids (``IndexIDMap``), so they stay stable across compactions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from retrofit._env import require
from retrofit.errors import CorruptKnowledgeBaseError
from retrofit.kb_index_map import map_hnsw

__all__ = ["IndexConfig", "IndexState", "build_index", "save_index", "load_index", "search_index", "tune_ef_search",
           "EF_LADDER", "HNSW_STORAGES", "fsync_dir"]

log = logging.getLogger(__name__)

HNSW_STORAGES = ("fp16", "float32")
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
_VISITED_WARN = 0.5  # an HNSW search visiting more than this share of the vectors is no faster than flat


@dataclass
class IndexConfig:
    """How the search index of a knowledge base is built (stored in the KB metadata)."""

    kind: str = "auto"  # "auto" (flat below flat_threshold records, else HNSW), "hnsw" or "flat" (exact)
    hnsw_m: int = 32  # HNSW graph degree M
    # how HNSW stores the keys it compares: "fp16" (faiss IndexHNSWSQ, QT_fp16: half the index file, faster search,
    # same recall; the records hold float16 keys anyway) or "float32" (IndexHNSWFlat)
    hnsw_storage: str = "fp16"
    # HNSW efConstruction (build-time beam width). 80 since 24 Nov 2026 (40, faiss's default, before): ~1.8x the
    # build time for ~2x the queries/s at the same recall target (1M records; docs/benchmarks.md). A KB keeps the
    # value it was created with (its metadata); `compact(ef_construction=...)` changes it.
    ef_construction: int = 80
    ef_search: int | None = None  # HNSW efSearch; None = tuned after each build against recall_target
    recall_target: float = 0.96  # recall@tune_k the automatic efSearch aims for on held-out records (0.01 margin)
    tune_k: int = 32  # k used when tuning efSearch
    flat_threshold: int = 20_000  # "auto" uses exact search below this many records
    mmap_bytes: int = 64 << 20  # read-only opens memory-map index files at least this large
    # Key whitening (retrofit.kb_whiten): 0 = off (cosine on the keys as given); a number > 0 = search in the
    # shrinkage-whitened key space, each principal direction of the keys scaled by 1 / (sigma_i + whiten * sigma_1)
    whiten: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "hnsw", "flat"):
            raise ValueError(f"index must be 'auto', 'hnsw' or 'flat', got {self.kind!r}")
        if self.hnsw_storage not in HNSW_STORAGES:
            raise ValueError(f"hnsw_storage must be one of {HNSW_STORAGES}, got {self.hnsw_storage!r}")
        for n in ("hnsw_m", "ef_construction", "tune_k", "flat_threshold"):
            v = getattr(self, n)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        if self.ef_search is not None and (not isinstance(self.ef_search, int) or self.ef_search <= 0):
            raise ValueError(f"ef_search must be a positive int or None (auto), got {self.ef_search!r}")
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target!r}")
        from retrofit.kb_whiten import check_shrinkage

        self.whiten = check_shrinkage(self.whiten)

    def kind_for(self, n: int, current: str | None = None) -> str:
        """The index kind for ``n`` records; an HNSW index stays HNSW down to half the threshold (no flapping)."""
        if self.kind != "auto":
            return self.kind
        if current == "hnsw" and n >= self.flat_threshold // 2:
            return "hnsw"
        return "flat" if n < self.flat_threshold else "hnsw"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_meta(self) -> dict[str, Any]:
        """What the KB metadata stores: :meth:`to_dict` less ``hnsw_storage`` and ``whiten`` at their defaults (a
        missing key reads as the default), so KBs with default settings stay readable by retrofit versions from
        before those options."""
        d = self.to_dict()
        if d["hnsw_storage"] == "fp16":
            del d["hnsw_storage"]
        if d["whiten"] == 0.0:
            del d["whiten"]
        return d

    @classmethod
    def from_meta(cls, d: dict[str, Any], where: Any) -> IndexConfig:
        from retrofit.errors import KnowledgeBaseError

        if unknown := set(d) - set(cls.__dataclass_fields__):
            raise KnowledgeBaseError(f"{where}: index settings {sorted(unknown)} come from a newer retrofit; upgrade "
                                     "retrofit to open this knowledge base")
        return cls(**d)


@dataclass
class IndexState:
    """What ``index.json`` records about the current index file."""

    kb_uuid: str  # the knowledge base this index belongs to
    kind: str  # "hnsw" or "flat"
    file: str  # file name inside the KB directory
    generation: int  # LMDB generation the index was built / saved at
    next_id: int  # every live record id < next_id at that generation is in the index
    ntotal: int  # vectors in the index
    size: int  # file size in bytes
    quick: str  # sha256 of the file's size, first and last MiB (checked on every open)
    sha256: str  # sha256 of the whole file (checked by verify)
    ef_search: int  # efSearch used by searches (>= k is enforced per search)
    tuned_recall: float | None = None  # recall@tune_k measured when ef_search was tuned (None = not tuned)
    whiten_file: str | None = None  # the key-whitening transform the index was built with (None = none)
    whiten_sha256: str | None = None  # its checksum
    whiten_fit_n: int | None = None  # live records when it was fitted (the index is rebuilt once they double)
    whiten_shrinkage: float | None = None  # the shrinkage it was fitted with (a writer rebuilds on a mismatch)

    @classmethod
    def read(cls, kb_dir: Path) -> IndexState | None:
        p = kb_dir / "index.json"
        if not p.is_file():
            return None
        try:
            state = cls(**json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise CorruptKnowledgeBaseError(f"{p} is damaged ({e})") from e
        for f in fields(cls):  # a field of another type ("200", null) would fail later as a bare TypeError
            v, kinds = getattr(state, f.name), _FIELD_TYPES[f.name]
            if not isinstance(v, kinds) or isinstance(v, bool):
                raise CorruptKnowledgeBaseError(f"{p} is damaged ({f.name} = {v!r}, not "
                                                f"{' or '.join(t.__name__ for t in kinds)}); rebuild the index "
                                                f"with: retrofit kb compact {kb_dir}")
        return state


_WHITEN_FIELDS = ("whiten_file", "whiten_sha256", "whiten_fit_n", "whiten_shrinkage")
_NONE = type(None)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "kb_uuid": (str,), "kind": (str,), "file": (str,), "generation": (int,), "next_id": (int,), "ntotal": (int,),
    "size": (int,), "quick": (str,), "sha256": (str,), "ef_search": (int,), "tuned_recall": (float, int, _NONE),
    "whiten_file": (str, _NONE), "whiten_sha256": (str, _NONE), "whiten_fit_n": (int, _NONE),
    "whiten_shrinkage": (float, int, _NONE)}


def state_json(state: IndexState) -> dict[str, Any]:
    """``state`` as ``index.json`` holds it: the whitening fields only when set, so that an unwhitened KB's file
    stays readable by earlier versions (they refuse unknown fields)."""
    return {k: v for k, v in asdict(state).items() if not (k in _WHITEN_FIELDS and v is None)}


def _faiss():
    return require("faiss", "knowledge-base search")


def fsync_dir(d: Path) -> None:
    fd = os.open(str(d), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HASH_BUF = 64 << 10  # hashing streams files through one buffer this size: no file-sized bytes objects, no mmap


def _hash_range(h, f, start: int, length: int | None) -> None:
    """Feed ``length`` bytes of the unbuffered file ``f`` from ``start`` (None: to the end) to ``h``, through one
    fixed-size buffer."""
    view = memoryview(bytearray(_HASH_BUF))
    f.seek(start)
    left = length
    while left is None or left > 0:
        got = f.readinto(view if left is None else view[:min(_HASH_BUF, left)])
        if not got:
            break
        h.update(view[:got])
        if left is not None:
            left -= got


def _quick_hash(path: Path, size: int) -> str:
    """sha256 of ``size``, the first MiB and (files over 2 MiB) the last MiB; checked on every open."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb", buffering=0) as f:
        _hash_range(h, f, 0, 1 << 20)
        if size > 2 << 20:
            _hash_range(h, f, size - (1 << 20), None)
    return "sha256:" + h.hexdigest()[:32]


def full_hash(path: Path) -> str:
    """sha256 of the whole file (``verify``), streamed: memory use does not grow with the file."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        _hash_range(h, f, 0, None)
    return "sha256:" + h.hexdigest()


def build_index(kind: str, dim: int, cfg: IndexConfig):
    """An empty ``IndexIDMap`` over HNSW (fp16 or float32 storage, ``cfg.hnsw_storage``) or exact flat
    inner-product search."""
    faiss = _faiss()
    if kind == "hnsw":
        if cfg.hnsw_storage == "fp16":
            inner = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            inner = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = cfg.ef_construction
    elif kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    else:
        raise ValueError(f"index kind must be 'hnsw' or 'flat', got {kind!r}")
    return faiss.IndexIDMap(inner)  # faiss's Python wrapper keeps a reference to ``inner``


def inner_index(index):
    return _faiss().downcast_index(index.index)


def save_index(kb_dir: Path, index, state: IndexState, whiten: np.ndarray | None = None,
               whiten_saved: tuple[str, str] | None = None) -> IndexState:
    """Write ``index`` (and its key-whitening transform, if any) atomically and point ``index.json`` at them;
    removes the previous files, and any other: one that a writer killed between its rename and the ``index.json``
    update left behind, never named by ``index.json`` (so no reader loads it), would otherwise stay for good.
    ``whiten_saved``: (file, sha256) of ``whiten`` saved by an earlier call for this index (kept, not rewritten)."""
    faiss = _faiss()
    # the current ones (readers have them loaded) and orphans
    stale = [f.name for pat in ("index-*.faiss", "whiten-*.npy") for f in kb_dir.glob(pat)]
    state.whiten_file = state.whiten_sha256 = None
    if whiten is not None and whiten_saved is not None and (kb_dir / whiten_saved[0]).is_file():
        state.whiten_file, state.whiten_sha256 = whiten_saved
    elif whiten is not None:
        from retrofit.kb_whiten import save_whitening

        state.whiten_file, state.whiten_sha256 = save_whitening(kb_dir, whiten, state.generation)
    name = f"index-{state.generation}-{uuid.uuid4().hex[:8]}.faiss"
    tmp = kb_dir / (name + ".tmp")
    faiss.write_index(index, str(tmp))
    fd = os.open(str(tmp), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, kb_dir / name)
    size = (kb_dir / name).stat().st_size
    state.file, state.size, state.ntotal = name, size, int(index.ntotal)
    state.quick = _quick_hash(kb_dir / name, size)
    state.sha256 = full_hash(kb_dir / name)
    jtmp = kb_dir / "index.json.tmp"
    with open(jtmp, "w") as f:
        json.dump(state_json(state), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(jtmp, kb_dir / "index.json")
    fsync_dir(kb_dir)
    for f in stale:
        if f not in (name, state.whiten_file):
            (kb_dir / f).unlink(missing_ok=True)
    return state


def load_index(kb_dir: Path, state: IndexState, mmap: bool):
    """Read the index file ``state`` names; ``mmap`` maps it read-only (never add to such an index)."""
    faiss = _faiss()
    p = kb_dir / state.file
    if not p.is_file():
        raise CorruptKnowledgeBaseError(f"index file {p} is missing")
    try:
        size = p.stat().st_size
        if size != state.size:
            raise CorruptKnowledgeBaseError(f"index file {p} is damaged: {size} bytes, index.json says {state.size}")
        if _quick_hash(p, size) != state.quick:
            raise CorruptKnowledgeBaseError(f"index file {p} is damaged: its checksum does not match index.json's")
        # an index read into memory may be added to and saved (writers): a damage anywhere in it would be saved
        # under a fresh checksum, so the whole file is checked (a mapped read-only index is checked by map_hnsw)
        if not mmap and full_hash(p) != state.sha256:
            raise CorruptKnowledgeBaseError(f"index file {p} is damaged: its sha256 does not match index.json's")
        index = map_hnsw(p, state.ntotal) if mmap else None  # graph and vectors mapped, not faulted in
        if index is None:
            index = faiss.read_index(str(p), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except RuntimeError as e:
        raise CorruptKnowledgeBaseError(f"index file {p} cannot be read by faiss ({str(e).splitlines()[0]})") from e
    except OSError as e:  # e.g. a writer replaced and removed it since index.json was read (readers retry)
        raise CorruptKnowledgeBaseError(f"index file {p} cannot be read ({e})") from e
    if not isinstance(index, faiss.IndexIDMap) or index.ntotal != state.ntotal:
        raise CorruptKnowledgeBaseError(f"index file {p} does not hold the {state.ntotal} vectors index.json names")
    return index


def search_index(index, q: np.ndarray, k: int, ef: int, sel) -> tuple[np.ndarray, np.ndarray]:
    """faiss search with efSearch >= k and an optional IDSelector; returns (scores (B,k), ids (B,k))."""
    faiss = _faiss()
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(int(ef), int(k))
    else:
        params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel
    scores, ids = index.search(q, k, params=params)  # (B, k), (B, k)
    return scores, ids


def tune_ef_search(index, cfg: IndexConfig, queries: np.ndarray | None = None, n_queries: int = 256,
                   seed: int = 0) -> tuple[int, float]:
    """Smallest efSearch on ``EF_LADDER`` reaching ``cfg.recall_target`` recall@k against exact search.

    ``queries``: held-out vectors of the data's distribution that are NOT in the index (the KB's rebuild sets
    some records aside for this and adds them afterwards). Without them, stored keys are used leave-one-out,
    which is optimistic: the query is a graph node itself. Returns (ef_search, measured recall).
    """
    faiss = _faiss()
    hnsw = faiss.downcast_index(inner_index(index))
    storage = faiss.downcast_index(hnsw.storage)
    n, k = hnsw.ntotal, cfg.tune_k
    if n <= k + 1:
        return max(EF_LADDER[0], k), 1.0
    if queries is not None and len(queries):
        q, self_pos, extra = np.ascontiguousarray(queries, dtype=np.float32), None, 0
    else:
        rng = np.random.default_rng(seed)
        self_pos = rng.choice(n, size=min(n_queries, n), replace=False)
        q, extra = np.vstack([storage.reconstruct(int(p)) for p in self_pos]).astype(np.float32), 1  # (Q, D)

    def top(res: np.ndarray) -> list[set[int]]:
        if self_pos is None:
            return [set(r[:k].tolist()) for r in res]
        return [set(r[r != p].tolist()[:k]) for r, p in zip(res, self_pos)]

    truth = top(storage.search(q, k + extra)[1])  # exact
    best = (EF_LADDER[-1], 0.0)
    for ef in [e for e in EF_LADDER if e >= k]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef
        faiss.cvar.hnsw_stats.reset()
        got = top(hnsw.search(q, k + extra, params=params)[1])
        best = (ef, float(np.mean([len(t & g) / k for t, g in zip(truth, got)])))
        if best[1] >= cfg.recall_target:
            break
    if best[1] < cfg.recall_target:
        log.warning("efSearch %d reaches recall@%d %.3f only (target %.2f)", best[0], k, best[1], cfg.recall_target)
    visited = faiss.cvar.hnsw_stats.ndis / max(len(q), 1) / n  # distance computations per query, as a share of n
    if visited > _VISITED_WARN:
        log.warning("the HNSW index compares each query with %.0f%% of its %d vectors at efSearch %d (recall@%d "
                    "%.3f): no faster than exact search on these keys, which the graph cannot narrow down "
                    "(random or near-duplicate vectors?). index='flat' (KnowledgeBase.create, `retrofit kb build "
                    "--index flat`) keeps exact search", 100 * visited, n, best[0], k, best[1])
    return best
