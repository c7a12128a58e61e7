"""``KnowledgeBase``: the on-disk image-text knowledge base (LMDB records + faiss index).

A knowledge base is one directory::

    records/            LMDB environment: vectors in fixed-size float16 chunks, labels, captions, JSON metadata
    index.json          which index file is current, the LMDB generation and record ids it covers, checksums
    index-<gen>-*.faiss the faiss index (HNSW or exact flat, inner product on L2-normalised keys)

LMDB commits are the truth; the index is a cache that is caught up from the records when it is behind and
rebuilt (writers) or refused with the command that rebuilds it (readers) when it is damaged. One writer,
many readers: a read-only handle searches a consistent snapshot until :meth:`KnowledgeBase.refresh`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import numbers
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrofit._rwlock import RWLock
from retrofit.errors import CorruptKnowledgeBaseError, KnowledgeBaseError
from retrofit.kb_create import create_atomically, take_writer_lock
from retrofit.kb_handles import install_thread_guards, reopen, track
from retrofit.kb_index import IndexConfig, IndexState, load_index
from retrofit.kb_maint import KBIndexMixin
from retrofit.kb_records import RecordStore
from retrofit.kb_search import KBSearchMixin
from retrofit.kb_whiten import IndexWhitening, load_whitening
from retrofit.kb_write import KBWriteMixin
from retrofit.store import KBFingerprint

__all__ = ["KnowledgeBase", "IndexConfig"]

log = logging.getLogger(__name__)


def _fix_command(path: Path) -> str:
    return f"retrofit kb compact {path}"


# LMDB objects a forked child inherited from its parent's open handles: kept alive, never closed (see _abandon)
_INHERITED: list[Any] = []


class KnowledgeBase(KBIndexMixin, KBSearchMixin, KBWriteMixin):
    """An LMDB + faiss knowledge base of (key, image vector, text vector, label, caption, source) records.

    Create with :meth:`create`, open with :meth:`open`; use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = True, _create: dict[str, Any] | None = None,
                 _records_only: bool = False) -> None:
        self.path = Path(path).absolute()  # a later os.chdir must not move the handle to another directory
        self.readonly = readonly
        self._records_only = _records_only  # verify_path(): the records and index.json, never the index itself
        self._lock_fd: int | None = None
        self._pid = os.getpid()  # LMDB handles must not cross fork(): see _check_process
        self._ef_override: int | None = None  # ef_search set by the user (kb.ef_search = n)
        self._rw = RWLock()  # threads sharing this handle: searches together, refresh / writes alone (_guard)
        self._snap = None  # read-only handles: the LMDB read transaction that is their snapshot
        self._view = None  # numpy views of the snapshot's record chunks (None = not built, False = unavailable)
        self._bulk = 0
        self._unsaved = 0
        self._gpu_cache: dict[str, Any] = {}
        if _create is None and not self.path.exists():
            raise KnowledgeBaseError(f"knowledge base {self.path} does not exist; build one with `retrofit kb build "
                                     f"SOURCE {self.path}` or KnowledgeBase.create(...)")
        if _create is None and not (self.path / "records" / "data.mdb").is_file():
            raise KnowledgeBaseError(f"{self.path} is not a retrofit knowledge base (no records/data.mdb); create one "
                                     "with KnowledgeBase.create(...) or `retrofit kb build`")
        if not readonly:
            self._take_writer_lock()
        try:
            self._rec = RecordStore(self.path / "records", readonly=readonly, create=_create is not None)
            if _create is not None:
                with self._rec.write() as txn:
                    self._rec.write_meta(txn, _create)
            self._load_retrying()
        except BaseException:
            self._release()
            raise
        track(self)
        if (missing := self._unindexed()) and _create is None:
            log.warning("%s: %d of its %d live records are not in the index (record chunks damaged on disk were left "
                        "out when the index was rebuilt, or an index update interrupted under retrofit < 23 Nov 2026 "
                        "was saved): searches never return them. `retrofit kb verify %s` names damaged chunks "
                        "(restore the knowledge base from a copy to get them back); when it finds none, `retrofit kb "
                        "compact %s` rebuilds the index from the records", self.path, missing, len(self), self.path,
                        self.path)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path: str | os.PathLike, key_dim: int, image_dim: int, text_dim: int,
               fingerprint: KBFingerprint | None = None, *, class_names: list[str] | None = None,
               dtype: str = "float16", index: str = "auto", hnsw_m: int = 32, hnsw_storage: str = "fp16",
               ef_construction: int = 80,
               ef_search: int | None = None, recall_target: float = 0.96, flat_threshold: int = 20_000,
               chunk_records: int | None = None, mmap_bytes: int = 64 << 20, whiten: float = 0.0,
               user_meta: dict[str, Any] | None = None) -> KnowledgeBase:
        """Create an empty knowledge base in the new or empty directory ``path``; returns it open for writing.

        ``ef_construction`` is the HNSW build's beam width (faiss's default is 40): 80 builds ~1.8x slower than 40
        and lets the efSearch tuned after each build halve (1M records: 512 -> 256, queries/s 765 -> 1,554 at
        recall@32 0.97; docs/benchmarks.md).

        ``whiten`` > 0 searches in the shrinkage-whitened key space (:mod:`retrofit.kb_whiten`; 0.1 is a good
        start): usually better neighbours from a backbone's embeddings, at one (D, D) matrix product per query."""
        return create_atomically(cls, Path(path), dict(
            key_dim=key_dim, image_dim=image_dim, text_dim=text_dim, fingerprint=fingerprint, class_names=class_names,
            dtype=dtype, index=index, hnsw_m=hnsw_m, hnsw_storage=hnsw_storage, ef_construction=ef_construction,
            ef_search=ef_search, recall_target=recall_target, flat_threshold=flat_threshold,
            chunk_records=chunk_records, mmap_bytes=mmap_bytes, whiten=whiten, user_meta=user_meta))

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = True) -> KnowledgeBase:
        """Open an existing knowledge base (``readonly=False``: this process becomes its one writer)."""
        return cls(path, readonly=readonly)

    @classmethod
    def verify_path(cls, path: str | os.PathLike, progress: bool = False) -> dict[str, Any]:
        """:meth:`verify` the knowledge base at ``path`` without loading its index, so that a damaged index file
        (which :meth:`open` refuses) does not stop the check of the records: every problem found is in the report.
        Raises only when ``path`` is not a knowledge base at all."""
        try:
            kb = cls(path, readonly=True, _records_only=True)
        except CorruptKnowledgeBaseError as e:  # the metadata itself is unreadable: nothing else can be checked
            return {"ok": False, "problems": [str(e)], "records_checked": 0, "chunks_without_checksum": 0,
                    "generation": None, "index": {}}
        with kb:
            return kb.verify(progress=progress)

    def _take_writer_lock(self) -> None:
        self._lock_fd = take_writer_lock(self.path)

    def _load(self) -> None:
        """Read metadata, tombstones and the index; catch the index up (writers rebuild a damaged one)."""
        rec = self._rec
        state = None
        state_err: Exception | None = None
        try:
            state = IndexState.read(self.path)  # read before the snapshot: the snapshot is then never older
        except CorruptKnowledgeBaseError as e:
            state_err = e
        if self.readonly:
            self._snap = rec.begin(buffers=True)
            self._meta = rec.read_meta(self._snap)
        else:
            self._meta = rec.read_meta()
            for f in self.path.glob("*.tmp"):
                f.unlink()
        rec.meta = self._meta
        self._cfg = IndexConfig.from_meta(self._meta["index"], self.path)
        with self._txn() as txn:
            rec.check_layout(txn, self._meta)
            self._set_deleted(rec.deleted(txn))
        self._delta = None
        if self._records_only:
            return
        problem = state_err
        if problem is None and state is None:
            problem = CorruptKnowledgeBaseError("index.json is missing")
        if problem is None and (state.kb_uuid != self._meta["uuid"] or state.next_id > self._meta["next_id"]):
            problem = CorruptKnowledgeBaseError(
                f"the index ({state.file}, up to id {state.next_id}) does not belong to these records "
                f"(up to id {self._meta['next_id']})")
        built_with = 0.0 if state is None or state.whiten_file is None else state.whiten_shrinkage
        if problem is None and not self.readonly and built_with != self._cfg.whiten:
            # the settings changed (compact(whiten=...)) but the index was not rebuilt: a writer killed in between
            # (None: a transform saved without its shrinkage, by a development version). A writer rebuilds it;
            # readers search the index as it is (consistent with its own transform, or none), as while a compact runs
            problem = CorruptKnowledgeBaseError(
                f"the index ({state.file}) was built with key whitening {built_with} but the knowledge base's "
                f"settings ask for {self._cfg.whiten:g} (0 = none; a rebuild that did not finish)")
        if problem is None:
            prev = getattr(self, "_state", None)
            if prev is not None and prev.file == state.file and getattr(self, "_main", None) is not None:
                self._state = state  # refresh(): the same index file is still current, keep it
            else:
                try:
                    whiten = None
                    if state.whiten_file is not None:  # first: a reader must not pair an index with another's
                        whiten = load_whitening(self.path, state.whiten_file, state.whiten_sha256, self.key_dim)
                    big = state.size >= self._cfg.mmap_bytes
                    self._main = load_index(self.path, state, mmap=self.readonly and big)
                    self._mapped = self.readonly and big
                    self._state = state
                    self._wh = None if whiten is None else IndexWhitening(
                        whiten, state.whiten_shrinkage, state.whiten_fit_n, (state.whiten_file, state.whiten_sha256))
                except CorruptKnowledgeBaseError as e:
                    problem = e
        if problem is not None:
            if self.readonly:
                raise CorruptKnowledgeBaseError(f"{self.path}: {problem}. Rebuild the index from the records with: "
                                                f"{_fix_command(self.path)}") from problem
            if self._meta["next_id"]:
                log.warning("%s: %s; rebuilding the index from the records", self.path, problem)
            self._rebuild()
            return
        self._main_next = state.next_id
        self._ef, self._tuned_recall = state.ef_search, state.tuned_recall
        if self._main_next < self._meta["next_id"]:
            if self.readonly:
                self._extend_delta(self._main_next)
            else:
                self._catch_up()

    def _load_retrying(self) -> None:
        """Readers retry a failed index load: a writer may have replaced the file between index.json and the read."""
        for attempt in range(3):
            try:
                self._load()
                return
            except CorruptKnowledgeBaseError:
                if not self.readonly or attempt == 2:
                    raise
                self._view = None
                if self._snap is not None:
                    self._snap.abort()
                    self._snap = None
                time.sleep(0.05)

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise KnowledgeBaseError(
                f"this KnowledgeBase handle of {self.path} was opened in process {self._pid} and cannot be used in "
                f"process {os.getpid()} after fork() (LMDB forbids it): open the knowledge base inside each worker "
                "instead, e.g. in a DataLoader worker_init_fn")
        if getattr(self, "_rec", None) is None:
            raise KnowledgeBaseError(f"this KnowledgeBase handle of {self.path} is closed; open the knowledge base "
                                     "again (KnowledgeBase.open) or keep using it inside its `with` block")

    @contextlib.contextmanager
    def _txn(self) -> Iterator[Any]:
        """A read transaction on this handle's view: the snapshot (readers) or the latest commit (writer)."""
        self._check_process()
        if self._snap is not None:
            yield self._snap
        else:
            with self._rec.begin(buffers=True) as txn:
                yield txn

    def _unindexed(self, exact: bool = False) -> int:
        """Live records that no index holds: damaged record chunks a rebuild left out (0 for a sound KB). Without
        ``exact``, a lower bound that costs nothing (deleted records still in the index hide as many missing ones);
        ``exact`` reads the indexes' id maps."""
        indexes = [i for i in (getattr(self, "_main", None), self._delta) if i is not None]
        if not indexes or self._bulk:  # records only, or a bulk load whose index is built at its end
            return 0
        held = sum(int(i.ntotal) for i in indexes)
        if exact and self._deleted.size:
            import faiss

            held -= sum(int(np.isin(faiss.vector_to_array(i.id_map), self._deleted).sum()) for i in indexes)
        return max(0, len(self) - held)

    def _set_deleted(self, deleted: np.ndarray) -> None:
        self._deleted = np.sort(np.asarray(deleted, dtype=np.int64))
        self._sel = None
        self._gpu_cache.clear()
        if self._deleted.size:
            import faiss

            batch = faiss.IDSelectorBatch(self._deleted)
            self._sel = faiss.IDSelectorNot(batch)
            self._sel_keep = batch  # the Not selector points into it

    def _check_ids(self, ids: Any) -> np.ndarray:
        self._check_process()  # also: not closed
        if isinstance(ids, (list, tuple)) and not ids:
            return np.zeros(0, dtype=np.int64)  # torch would make an empty list float32
        try:
            a = torch.as_tensor(ids).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"ids must be integers (an int, a list, a numpy array or a tensor), got {ids!r:.80}") \
                from None
        if a.is_floating_point() or a.dtype == torch.bool:
            raise ValueError(f"ids must be integers, got {a.dtype}")
        a = a.cpu().to(torch.int64).numpy()
        bad = (a < 0) | (a >= self._meta["next_id"]) | np.isin(a, self._deleted)
        if bad.any():
            raise KeyError(f"unknown or deleted ids {a[bad][:10].tolist()} (valid ids: live records in "
                           f"0..{self._meta['next_id'] - 1})")
        return a

    # ------------------------------------------------------------------ properties
    key_dim = property(lambda self: int(self._meta["key_dim"]), doc="width of the search keys (the query encoder's)")
    image_dim = property(lambda self: int(self._meta["image_dim"]), doc="width of the stored image vectors")
    text_dim = property(lambda self: int(self._meta["text_dim"]), doc="width of the stored text vectors")
    generation = property(lambda self: int(self._meta["generation"]), doc="increases with every committed change")
    class_names = property(lambda self: self._meta.get("class_names"),
                           doc="the class names that labels index (label i is class_names[i]), or None")
    dtype = property(lambda self: self._meta["dtype"], doc='storage dtype of the vectors: "float16" or "float32"')
    user_meta = property(lambda self: dict(self._meta["user_meta"]), doc="free JSON metadata (e.g. build progress)")

    @property
    def fingerprint(self) -> KBFingerprint:
        """The encoders of the keys, image and text vectors (checked against a head's and a backbone's)."""
        return KBFingerprint.from_dict(self._meta["fingerprint"])

    @property
    def ef_search(self) -> int:
        """HNSW efSearch used by :meth:`search` (raised to k + exclusions per call when smaller): the KB's own
        (tuned at index build, saved in index.json) unless set on this handle."""
        return int(self._ef if self._ef_override is None else self._ef_override)

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"ef_search must be a positive int, got {value!r}")
        self._ef_override = int(value)  # outlives refresh(), index rebuilds and pickling

    def __len__(self) -> int:
        return int(self._meta["count"])

    def __repr__(self) -> str:
        mode = "read-only" if self.readonly else "writable"
        return (f"KnowledgeBase({str(self.path)!r}, {len(self)} records, dims key/image/text "
                f"{self.key_dim}/{self.image_dim}/{self.text_dim}, {mode})")

    # ------------------------------------------------------------------ life cycle
    def refresh(self) -> bool:
        """Readers: move to the latest committed generation (and index file). Returns True if anything changed."""
        self._check_process()
        if not self.readonly:
            return False
        with self._rw.read():  # a look first, beside other threads' searches: most refreshes find nothing new
            try:
                state = IndexState.read(self.path)
                same = (int(self._rec.read_meta()["generation"]) == self.generation
                        and state is not None and state.file == self._state.file)
            except Exception:  # the reload below raises its own, clearer error
                same = False
        if same:
            return False
        with self._rw.write():  # swapping the snapshot and index under a search would crash it
            self._check_process()  # again: another thread may have closed the handle meanwhile
            old_gen, old_file = self.generation, self._state.file
            before = dict(vars(self))  # the handle as it is: restored when the new generation cannot be loaded
            rec_meta = self._rec.meta
            self._view = None  # points into the old snapshot, which stays open until the new one has loaded
            self._snap = None
            try:
                self._load_retrying()
            except BaseException:
                if self._snap is not None:
                    self._snap.abort()
                self.__dict__.update(before)  # still on the old snapshot: searches keep answering from it
                self._rec.meta = rec_meta
                raise
            before["_snap"].abort()
            return self.generation != old_gen or self._state.file != old_file

    def close(self) -> None:
        """Flush unsaved writes (a writer) and release the files and the writer lock; idempotent. The handle is
        unusable afterwards. Also what ``with KnowledgeBase.open(...) as kb:`` does on exit."""
        if getattr(self, "_rec", None) is None:
            return
        if os.getpid() != self._pid:  # (before the lock: a forked child may have inherited it held)
            self._abandon()
            return
        with self._rw.write():  # not under a search of another thread
            if getattr(self, "_rec", None) is None:
                return
            try:
                if not self.readonly and self._unsaved:
                    self.flush()
            finally:
                self._release()

    @contextlib.contextmanager
    def bulk(self) -> Iterator[Any]:
        """Defer index updates to one build when the outermost ``with kb.bulk():`` block exits. Inside the block,
        ``search`` sees only the records indexed before it: records added in it are found once it exits. The block
        holds the handle: other threads' calls wait for it."""
        self._check_process()  # before the lock: a forked child may have inherited it held
        with self._rw.write(), super().bulk() as kb:
            yield kb

    # ------------------------------------------------------------------ copies and pickling
    def __deepcopy__(self, memo: dict) -> KnowledgeBase:
        """The handle itself: a KB is files on disk, like an open file. Deep copies of a model that holds it (EMA /
        SWA averaging, ``copy.deepcopy(head)``) share it instead of failing on LMDB's transaction objects."""
        return self

    def __reduce__(self) -> tuple:
        """Read-only handles pickle as their path (and ``ef_search`` setting) and reopen (read-only) where they are
        unpickled: ``torch.save`` of a whole model, spawned DataLoader workers; a KB gone by then loads as a
        :class:`~retrofit.kb_handles.MissingKnowledgeBase`. A writable handle refuses (a KB has one writer)."""
        self._check_process()
        if not self.readonly:
            raise TypeError(f"a writable KnowledgeBase ({self.path}) cannot be pickled: a knowledge base has one "
                            "writer. Attach a read-only handle (KnowledgeBase.open(path)), which pickles as its path "
                            "and reopens where it is unpickled; or save the head alone with head.save(dir)")
        return (reopen, (str(self.path.absolute()), self._ef_override))

    def _abandon(self) -> None:
        """In a forked child: drop the inherited handles without touching them. Aborting the parent's snapshot
        or closing its environment here would free the parent's LMDB reader slot (shared memory) under it, so
        the objects are parked for the life of the child instead of being closed."""
        _INHERITED.append((self._snap, getattr(self, "_rec", None)))
        self._snap = self._rec = self._view = None
        self._lock_fd = None  # the parent's descriptor; closing our copy would not release its lock anyway

    def _release(self) -> None:
        if os.getpid() != getattr(self, "_pid", os.getpid()):
            self._abandon()
            return
        self._view = None
        if self._snap is not None:
            self._snap.abort()
            self._snap = None
        if getattr(self, "_rec", None) is not None:
            self._rec.close()
            self._rec = None
        if self._lock_fd is not None:
            # unlocked first: a forked child (a DataLoader worker) shares the lock's open file, and closing only
            # this process's descriptor kept the KB locked for writing until every such child had exited
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __del__(self) -> None:
        # a handle dropped without close(): free the LMDB environment and the writer lock (the index is caught up
        # from the records at the next open, so nothing is lost by not flushing here)
        try:
            self._release()
        except Exception:
            pass

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()



install_thread_guards(KnowledgeBase)
