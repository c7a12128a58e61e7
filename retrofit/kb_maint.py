"""Keeping a knowledge base's faiss index in step with its records: build, catch up, tune, save.

A mixin of :class:`retrofit.knowledge_base.KnowledgeBase` (it relies on ``_rec``, ``_meta``, ``_cfg``,
``_deleted``, ``_main`` and the other attributes that class sets).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from retrofit.kb_index import IndexState, build_index, save_index, tune_ef_search
from retrofit.kb_whiten import IndexWhitening, apply_whitening

__all__ = ["KBIndexMixin"]

log = logging.getLogger(__name__)

_HOLDOUT = 256  # records set aside as held-out queries when efSearch is tuned at an index build


def _ranges(ids: np.ndarray) -> list[str]:
    """Sorted ids as inclusive ranges: [16..20, 22, 24..31] -> ["16-20", "22", "24-31"] (`kb delete`'s form)."""
    breaks = np.flatnonzero(np.diff(ids) != 1)
    starts, ends = np.r_[ids[0], ids[breaks + 1]], np.r_[ids[breaks], ids[-1]]
    return [f"{a}-{b}" if b > a else f"{a}" for a, b in zip(starts.tolist(), ends.tolist())]


class KBIndexMixin:
    """Index maintenance of ``KnowledgeBase``."""

    def _live_keys(self, start: int, upto: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 keys) of live records in [start, upto), in batches, for the index.

        Every chunk's checksum is checked on the way: a chunk damaged on disk is left out of the index (its
        records are then never found by a search), with a warning that says how to repair the knowledge base.
        """
        damaged: list[int] = []
        with self._txn() as txn:
            for first, rows, _ in self._rec.iter_chunks(txn, slice(0, self.key_dim), upto=upto, start=start,
                                                        damaged=damaged):
                ids = np.arange(first, first + rows.shape[0], dtype=np.int64)
                live = ~np.isin(ids, self._deleted)
                yield ids[live], rows[live].astype(np.float32)
        for c, live in self._live_in(damaged, start, upto).items():  # chunks all deleted lose nothing: not listed
            ranges = " ".join(_ranges(live))
            log.warning("%s: record chunk %d does not match its checksum (damaged on disk): its live records %s are "
                        "left out of the index. Restore the knowledge base from a copy, or drop them with "
                        "`retrofit kb delete %s %s` and `retrofit kb compact %s`, then add them again; "
                        "`retrofit kb verify %s` lists every damaged chunk", self.path, c, ranges, self.path, ranges,
                        self.path, self.path)

    def _live_in(self, chunks: list[int], start: int, upto: int) -> dict[int, np.ndarray]:
        """Chunk -> its live ids in [start, upto), for those of ``chunks`` that hold any."""
        C, out = self._rec.chunk, {}
        for c in chunks:
            ids = np.arange(max(c * C, start), min(c * C + C, upto))
            live = ids[~np.isin(ids, self._deleted)]
            if live.size:
                out[c] = live
        return out

    def _damaged_live(self) -> dict[int, np.ndarray]:
        """Chunk -> its live ids, for every record chunk whose bytes do not match their checksum (one CRC pass)."""
        damaged: list[int] = []
        with self._txn() as txn:
            for _ in self._rec.iter_chunks(txn, slice(0, 0), upto=self._meta["next_id"], damaged=damaged):
                pass
        return self._live_in(damaged, 0, self._meta["next_id"])

    def _rebuild(self) -> None:
        """Build the index from the records (the kind the live count calls for), tune efSearch, save it."""
        from tqdm.auto import tqdm

        current = self._kind() if getattr(self, "_main", None) is not None else None
        n, kind = len(self), self._cfg.kind_for(len(self), current)
        if current is not None and kind != current and self._main.ntotal:  # a switch, not the first build
            log.info("%d records: the index changes from %s to %s (flat_threshold %d)", n,
                     "exact (flat)" if current == "flat" else "HNSW", "HNSW" if kind == "hnsw" else "exact (flat)",
                     self._cfg.flat_threshold)
        index = build_index(kind, self.key_dim, self._cfg)
        t0 = time.perf_counter()
        whiten = self._fit_whitening(n) if self._cfg.whiten else None
        # HNSW with automatic efSearch: set ~256 random records aside, tune on them as held-out queries, add them last
        tune = kind == "hnsw" and self._cfg.ef_search is None and n >= 4 * _HOLDOUT
        rng = np.random.default_rng(0)
        held_ids, held_x = [], []
        buf_ids, buf_x, have = [], [], 0
        with tqdm(total=n, desc=f"building {kind} index", unit="vec", disable=n < 100_000) as bar:
            for ids, x in self._live_keys(0, self._meta["next_id"]):
                if whiten is not None:
                    x = apply_whitening(x, whiten)
                if tune:
                    hold = rng.random(len(ids)) < _HOLDOUT / n
                    held_ids.append(ids[hold])
                    held_x.append(x[hold])
                    ids, x = ids[~hold], x[~hold]
                buf_ids.append(ids)
                buf_x.append(x)
                have += len(ids)
                if have >= 65536:
                    index.add_with_ids(np.concatenate(buf_x), np.concatenate(buf_ids))
                    bar.update(have)
                    buf_ids, buf_x, have = [], [], 0
            if have:
                index.add_with_ids(np.concatenate(buf_x), np.concatenate(buf_ids))
                bar.update(have)
        ef = None
        if tune:
            hx = np.concatenate(held_x)
            ef = tune_ef_search(index, self._cfg, queries=hx)
            index.add_with_ids(hx, np.concatenate(held_ids))
        # the handle takes the new index only now, complete: an interrupt above (Ctrl-C while tuning) left it the
        # old one, whole, and the next add or open rebuilds (it took the index before the held-out records were
        # added back, and saved it without them)
        self._main, self._main_next, self._delta, self._mapped = index, self._meta["next_id"], None, False
        self._wh = None if whiten is None else IndexWhitening(whiten, self._cfg.whiten, n)
        self._ef, self._tuned_recall = ef if ef is not None else self._pick_ef()
        log.info("built %s index of %d vectors in %.1f s (efSearch %d)", kind, index.ntotal,
                 time.perf_counter() - t0, self._ef)
        self._gpu_cache.clear()
        self._state = None
        if not self.readonly:
            self.flush()

    def _fit_whitening(self, n: int) -> np.ndarray:
        """The key-whitening transform fitted on up to ``FIT_SAMPLE`` live keys drawn at random (seeded)."""
        from retrofit.kb_whiten import FIT_SAMPLE, fit_whitening, identity_whitening

        rng = np.random.default_rng(0)
        rate, sample = min(1.0, FIT_SAMPLE / max(n, 1)), []
        for _, x in self._live_keys(0, self._meta["next_id"]):
            sample.append(x if rate >= 1.0 else x[rng.random(len(x)) < rate])
        keys = np.concatenate(sample) if sample else np.zeros((0, self.key_dim), np.float32)
        if not len(keys):  # nothing to fit on yet: the identity, refitted at the next rebuild
            return identity_whitening(self.key_dim)
        return fit_whitening(keys, self._cfg.whiten)

    def _whiten_stale(self) -> bool:
        """True when the index whitens with a transform fitted on under half of today's live records (a KB grown
        by adds since its last build): the next catch-up rebuilds and fits it again (amortised O(1) per record)."""
        wh = getattr(self, "_wh", None)
        return bool(self._cfg.whiten) and wh is not None and wh.fit_n is not None and len(self) > 2 * max(wh.fit_n, 16)

    def _index_keys(self, x: np.ndarray) -> np.ndarray:
        """Keys (or unit queries) as the index holds them: whitened and normalised again when the index whitens."""
        wh = getattr(self, "_wh", None)
        return x if wh is None else apply_whitening(x, wh.transform)

    @property
    def _whiten(self) -> np.ndarray | None:
        """The index's whitening transform (None: raw cosines)."""
        wh = getattr(self, "_wh", None)
        return None if wh is None else wh.transform

    def _pick_ef(self) -> tuple[int, float | None]:
        if self._kind() != "hnsw":
            return self._cfg.tune_k, None
        if self._cfg.ef_search is not None:
            return self._cfg.ef_search, None
        return tune_ef_search(self._main, self._cfg)

    def _kind(self) -> str:
        import faiss

        inner = faiss.downcast_index(self._main.index)
        return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"

    def _storage(self) -> str:
        """How the current index stores the vectors it compares: "fp16" or "float32"."""
        import faiss

        return "fp16" if isinstance(faiss.downcast_index(self._main.index), faiss.IndexHNSWSQ) else "float32"

    def _built_ef_construction(self) -> int | None:
        """The efConstruction the current HNSW graph was built with (None for an exact index): the setting's value
        unless a compact that changed the setting was stopped after its commit, before its rebuild."""
        import faiss

        inner = faiss.downcast_index(self._main.index)
        return int(inner.hnsw.efConstruction) if isinstance(inner, faiss.IndexHNSW) else None

    def _catch_up(self) -> None:
        """Add records the in-memory index lacks (writer); rebuilds when the index kind should change or its key
        whitening was fitted on under half of the live records."""
        if self._cfg.kind_for(len(self), self._kind()) != self._kind() or self._whiten_stale():
            self._rebuild()
            return
        if self._mapped:  # never add to a mapped index: faiss would abort
            raise AssertionError("internal: writer holds a memory-mapped index")
        added = self._add_chunks(self._main, "_main_next")
        self._unsaved += added
        self._gpu_cache.clear()
        if self._bulk == 0 and self._unsaved >= max(4096, self._main.ntotal // 4):
            self.flush()

    def _extend_delta(self, start: int) -> None:
        """Readers: exact search over records newer than the index file (never touches a mapped index)."""
        if self._delta is None:
            self._delta = build_index("flat", self.key_dim, self._cfg)
        self._delta_next = start
        self._add_chunks(self._delta, "_delta_next")
        self._gpu_cache.clear()

    def _add_chunks(self, index: Any, upto_attr: str) -> int:
        """Add the live records from ``self.<upto_attr>`` on to ``index`` chunk by chunk, moving the attribute past
        each chunk as it goes in, so that an interrupt (Ctrl-C) between chunks leaves the handle's index and its
        "ids below this are in" mark in step (a second catch-up added the chunks in before the interrupt again:
        the same id twice in one result row, saved with the index). Returns the count added."""
        end, added, cur, before = self._meta["next_id"], 0, None, index.ntotal
        try:
            for ids, x in self._live_keys(getattr(self, upto_attr), end):
                if not len(ids):  # a chunk (or its tail) whose records are all deleted
                    continue
                cur = ids
                index.add_with_ids(self._index_keys(x), ids)
                added += len(ids)
                setattr(self, upto_attr, int(ids[-1]) + 1)
                cur = None
            setattr(self, upto_attr, end)
        finally:
            # interrupted between a chunk's add and the mark: the index's count says whether the chunk went in
            if cur is not None and index.ntotal - before == added + len(cur):
                added += len(cur)
                setattr(self, upto_attr, int(cur[-1]) + 1)
        return added

    def flush(self) -> None:
        """Write the in-memory index to disk atomically (writers; done automatically at close and bulk exit)."""
        self._check_writable()
        wh = getattr(self, "_wh", None)
        state = IndexState(kb_uuid=self._meta["uuid"], kind=self._kind(), file="", generation=self._meta["generation"],
                           next_id=self._main_next, ntotal=0, size=0, quick="", sha256="", ef_search=int(self._ef),
                           tuned_recall=getattr(self, "_tuned_recall", None),
                           whiten_fit_n=None if wh is None else wh.fit_n,
                           whiten_shrinkage=None if wh is None else wh.shrinkage)
        self._state = save_index(self.path, self._main, state, whiten=None if wh is None else wh.transform,
                                 whiten_saved=None if wh is None else wh.saved)
        if wh is not None:
            wh.saved = (self._state.whiten_file, self._state.whiten_sha256)
        self._unsaved = 0

    @contextlib.contextmanager
    def bulk(self) -> Iterator[Any]:
        """Defer index updates to one build when the outermost ``with kb.bulk():`` block exits. Inside the block,
        ``search`` sees only the records indexed before it: records added in it are found once it exits."""
        self._check_writable()
        self._bulk += 1
        interrupted = False
        try:
            yield self
        except (KeyboardInterrupt, SystemExit):
            # Ctrl-C / exit: no index build on the way out (minutes for a big KB; "stop within a second"). The
            # records are committed; the saved index lags behind them, and the next writer catches it up.
            interrupted = True
            raise
        finally:
            self._bulk -= 1
            if self._bulk == 0 and not interrupted:
                self._finish_index(retune=self._main_next < self._meta["next_id"])

    def _finish_index(self, retune: bool) -> None:
        """What the end of a bulk load does: rebuild the index when its kind no longer fits the size (or it is
        empty), else catch it up; with ``retune``, pick efSearch again and save it."""
        if (self._cfg.kind_for(len(self), self._kind()) != self._kind() or self._main.ntotal == 0
                or self._whiten_stale()):
            self._rebuild()
        elif retune:
            self._catch_up()
            self._ef, self._tuned_recall = self._pick_ef()
            self.flush()
