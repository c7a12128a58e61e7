"""Writing to a knowledge base: ``add``, ``update_meta``, ``set_class_names``, ``delete`` and ``compact``.

A mixin of :class:`retrofit.knowledge_base.KnowledgeBase`; it relies on the attributes that class sets
(``_rec`` records, ``_meta``, ``_deleted`` tombstones, ``_bulk``) and on the index maintenance of
:class:`retrofit.kb_maint.KBIndexMixin` (``_catch_up``, ``_rebuild``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from retrofit.errors import KnowledgeBaseError

__all__ = ["KBWriteMixin"]

log = logging.getLogger(__name__)


def _as_2d(name: str, x: Any, n: int | None, dim: int) -> np.ndarray:
    t = torch.as_tensor(x).detach()
    if not (t.is_floating_point()):
        raise ValueError(f"{name} must be a float tensor, got dtype {t.dtype}")
    if t.dim() != 2 or t.shape[1] != dim or (n is not None and t.shape[0] != n):
        want = f"({n if n is not None else 'N'}, {dim})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    a = t.cpu().to(torch.float32).numpy()
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf; nothing was added")
    return a


def check_meta(meta: Any, what: str) -> None:
    """``meta`` must be a dict that JSON stores as it is: NaN / inf would make ``kb info --json`` invalid JSON."""
    if not isinstance(meta, dict):
        raise ValueError(f"{what} must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable without NaN / inf ({e}); nothing was written") from None


class KBWriteMixin:
    """Write-side methods of ``KnowledgeBase``."""

    def _check_writable(self) -> None:
        self._check_process()
        if self.readonly:
            raise KnowledgeBaseError(f"{self.path} is open read-only; use KnowledgeBase.open(path, readonly=False)")
        if self._rec is None:
            raise KnowledgeBaseError(f"{self.path} is closed")

    def add(self, keys: torch.Tensor, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor | None = None,
            captions: list[str | None] | None = None, sources: list[str | None] | None = None,
            meta: dict[str, Any] | None = None) -> torch.Tensor:
        """Append a batch in ONE LMDB transaction; ``meta`` is merged into ``user_meta`` in the same one.

        Keys are L2-normalised. Returns the new ids (N,) int64. Bad input raises ``ValueError`` before anything
        is written.
        """
        self._check_writable()
        k = _as_2d("keys", keys, None, self.key_dim)  # (N, Dk)
        n = k.shape[0]
        if n == 0:
            raise ValueError("add() got an empty batch (0 records); nothing was added")
        im = _as_2d("image", image, n, self.image_dim)  # (N, Di)
        tx = _as_2d("text", text, n, self.text_dim)  # (N, Dt)
        norms = np.linalg.norm(k.astype(np.float64), axis=1, keepdims=True)  # float64: large float32 keys overflow
        if (norms == 0).any():
            raise ValueError(f"keys has {int((norms == 0).sum())} all-zero rows, which cannot be normalised")
        if labels is None:
            lab = np.full(n, -1, dtype=np.int64)
        else:
            lt = torch.as_tensor(labels)
            if lt.is_floating_point() or lt.shape != (n,):
                raise ValueError(f"labels must be ({n},) integers, got {tuple(lt.shape)} {lt.dtype}")
            lab = lt.cpu().to(torch.int64).numpy()
            hi = len(self.class_names) if self.class_names else None
            if (lab < -1).any() or (hi is not None and (lab >= hi).any()):
                raise ValueError(f"labels must be -1 (unknown) or class ids 0..{(hi or 0) - 1 if hi else 'C-1'}, "
                                 f"got {sorted(set(lab.tolist()))[:10]}")
        for name, lst in (("captions", captions), ("sources", sources)):
            if lst is None:
                continue
            if isinstance(lst, (str, bytes)) or not hasattr(lst, "__len__"):
                raise ValueError(f"{name} must be a list of {n} strings (or None), got one {type(lst).__name__}")
            if len(lst) != n:
                raise ValueError(f"{name} must be a list of {n} strings (or None), got {len(lst)} items")
            odd = next((s for s in lst if s is not None and not isinstance(s, str)), None)
            if odd is not None:
                raise ValueError(f"{name} must hold strings (or None), got a {type(odd).__name__}: {odd!r:.60}")
        texts = list(zip(captions if captions is not None else [None] * n,
                         sources if sources is not None else [None] * n))  # (arrays / Series have no truth value)
        if meta is not None:
            check_meta(meta, "meta")
        dt = self._rec.np_dtype
        with np.errstate(over="ignore"):
            rows = np.concatenate([(k / norms).astype(np.float32), im, tx], axis=1).astype(dt)  # (N, Dk+Di+Dt)
        if not np.isfinite(rows).all():
            raise ValueError(f"values exceed the {dt.name} range (max {np.finfo(dt).max:g}); nothing was added")
        try:
            with self._rec.write() as txn:
                m = self._rec.read_meta(txn)
                start = m["next_id"]
                self._rec.append(txn, start, rows, lab, texts)
                m["next_id"] += n
                m["count"] += n
                m["generation"] += 1
                if meta:
                    m["user_meta"].update(meta)
                self._rec.write_meta(txn, m)
            self._meta = self._rec.meta = m
        except BaseException:
            self._sync_meta()  # an interrupt can land just after the commit: the handle must know it happened
            raise
        if self._bulk == 0:
            self._catch_up()
        return torch.arange(start, start + n, dtype=torch.int64)

    def update_meta(self, meta: dict[str, Any]) -> None:
        """Merge ``meta`` into :attr:`user_meta` (one transaction)."""
        self._check_writable()
        check_meta(meta, "meta")
        self._commit_meta(lambda m: m["user_meta"].update(meta))

    def _commit_meta(self, change: Any) -> None:
        """One transaction: ``change(m)`` edits the stored metadata ``m`` (or raises: nothing is written), the
        generation is bumped; the handle follows what was committed, also when interrupted."""
        try:
            with self._rec.write() as txn:
                m = self._rec.read_meta(txn)
                change(m)
                m["generation"] += 1
                self._rec.write_meta(txn, m)
            self._meta = self._rec.meta = m
        except BaseException:
            self._sync_meta()
            raise

    def set_class_names(self, names: list[str]) -> None:
        """Record the class list of a knowledge base built without one (label ``i`` is ``names[i]``), in one
        transaction. Given again, the same list is a no-op; a knowledge base that has another list keeps it (its
        labels already mean those classes: rebuild, or map your classifier's names onto it). ``names`` must be
        distinct strings, at least one more than the largest label stored."""
        self._check_writable()
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names or not all(
                isinstance(n, str) and n for n in names):
            raise ValueError(f"class names must be a non-empty list of non-empty strings, got {names!r:.80}")
        names = list(names)
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"class names must be distinct, got {dup[:5]} more than once")
        if self.class_names is not None:
            if list(self.class_names) == names:
                return
            raise ValueError(f"{self.path} already has a class list ({len(self.class_names)} classes: "
                             f"{self.class_names[:4]}...); its labels mean those classes, so it is kept: rebuild "
                             "the knowledge base to number them otherwise")
        labels = self.labels()
        top = int(labels.max()) if labels.numel() else -1
        if top >= len(names):
            raise ValueError(f"{self.path} has label {top}, but {len(names)} class names name labels "
                             f"0..{len(names) - 1}; give at least {top + 1} names, in the order of its label numbers")

        def record(m: dict[str, Any]) -> None:
            if m.get("class_names") is not None:  # (set meanwhile by another writer: refused as above)
                raise ValueError(f"{self.path} got a class list meanwhile; nothing was changed")
            m["class_names"] = names

        self._commit_meta(record)

    def _sync_meta(self) -> None:
        """Re-read the committed metadata (after a write that failed or was interrupted, perhaps after its commit)."""
        try:
            self._meta = self._rec.meta = self._rec.read_meta()
        except Exception:  # the original error is the one to report
            log.debug("could not re-read the metadata after a failed write", exc_info=True)

    def delete(self, ids: torch.Tensor | list[int]) -> None:
        """Tombstone records (filtered from search at once; :meth:`compact` rebuilds the index without them)."""
        self._check_writable()
        a = np.unique(self._check_ids(ids))
        if a.size == 0:
            return
        from retrofit.kb_records import ckey

        gen = self._meta["generation"]
        try:
            with self._rec.write() as txn:
                m = self._rec.read_meta(txn)
                for i in a.tolist():
                    txn.put(ckey(i), b"", db=self._rec.db_del)
                m["count"] -= int(a.size)
                m["deleted"] += int(a.size)
                m["generation"] += 1
                self._rec.write_meta(txn, m)
            self._meta = self._rec.meta = m
            self._set_deleted(np.union1d(self._deleted, a))
        except BaseException:  # an interrupt can land just after the commit: the handle must know it happened
            self._sync_meta()
            if self._meta["generation"] != gen:  # committed: searches and get() must not return them
                self._set_deleted(np.union1d(self._deleted, a))
            raise

    def compact(self, hnsw_storage: str | None = None, whiten: float | None = None,
                ef_construction: int | None = None) -> None:
        """Rebuild the index without deleted records and drop the chunks whose records are all deleted;
        ``hnsw_storage`` ("fp16" / "float32") changes how the rebuilt HNSW index stores the keys, ``whiten`` its key
        whitening (0 = off, > 0 = the shrinkage, :mod:`retrofit.kb_whiten`), ``ef_construction`` the HNSW build's
        beam width (kept for later adds too); None keeps the KB's setting. The whitening is fitted again on the
        live records either way."""
        self._check_writable()
        from dataclasses import replace


        changes = {n: v for n, v in (("hnsw_storage", hnsw_storage), ("whiten", whiten),
                                     ("ef_construction", ef_construction)) if v is not None}
        cfg = replace(self._cfg, **changes)  # validates

        C, nxt = self._rec.chunk, self._meta["next_id"]
        gen = self._meta["generation"]
        try:
            self._compact_records(C, nxt, cfg)
        except BaseException:  # interrupted, perhaps after the commit: the handle takes what was committed (the
            self._sync_meta()  # index, not rebuilt, still filters the deleted records out; compact again to rebuild)
            if self._meta["generation"] != gen:
                self._cfg = cfg
            raise
        self._cfg = cfg
        self._rebuild()

    def _compact_records(self, C: int, nxt: int, cfg: Any) -> None:
        """compact()'s one transaction: drop the chunks whose records are all deleted, record the new settings."""
        from retrofit.kb_records import ckey

        with self._rec.write() as txn:
            m = self._rec.read_meta(txn)
            dead_per_chunk = np.bincount(self._deleted // C, minlength=(nxt + C - 1) // C)
            last = (nxt - 1) // C
            for c in np.flatnonzero(dead_per_chunk == C).tolist():
                if c != last:
                    txn.delete(ckey(c), db=self._rec.db_vec)
                    txn.delete(ckey(c), db=self._rec.db_lab)
                    txn.delete(ckey(c), db=self._rec.db_sum)
            if nxt and dead_per_chunk[last] == nxt - last * C:  # the last chunk stays (appends extend it): its
                self._rec.blank_chunk(txn, last, nxt - last * C)  # deleted rows become zeros under a fresh checksum
            for i in self._deleted.tolist():
                txn.delete(ckey(i), db=self._rec.db_txt)
            m["generation"] += 1
            m["compactions"] += 1
            m["index"] = cfg.to_meta()
            self._rec.write_meta(txn, m)
        self._meta = self._rec.meta = m
