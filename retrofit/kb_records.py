"""The records half of a knowledge base: an LMDB environment holding vectors, labels, texts and metadata.

Layout (named LMDB databases inside ``<kb>/records/``):

- ``meta``: ``b"meta"`` -> JSON (schema version, dims, dtype, fingerprints, counts, generation, user metadata,
  sha256 checksum of the rest). No pickle anywhere.
- ``vec``: chunk number (8-byte big-endian) -> ``chunk_records`` rows of ``[key | image | text]`` in the KB dtype,
  row-major. Fixed-size chunks, not one vector per value: a 2 KiB value would spill to its own overflow page and
  double the bytes on disk. Record ``i`` lives in chunk ``i // chunk_records`` at row ``i % chunk_records``.
- ``lab``: chunk number -> int64 labels of the same rows.
- ``sum``: chunk number -> CRC-32 of its ``vec`` value and of its ``lab`` value (2 x 4 bytes, big-endian), written
  in the same transaction as the chunk, so that ``verify`` sees bit rot inside a value. Since schema 2; chunks
  written by schema 1 have none (``verify`` counts them, it cannot check them).
- ``txt``: record id (8-byte big-endian) -> JSON ``{"c": caption, "s": source}`` (only when one is given).
- ``del``: record id -> b"" for deleted records (tombstones).

Every read copies out of the ``buffers=True`` views while the transaction is still open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retrofit._env import require
from retrofit.errors import CorruptKnowledgeBaseError, KnowledgeBaseError
from retrofit.kb_env import _damage_errors, _unreadable, open_env, release_env
from retrofit.kb_snapshot import SnapshotView, gather_view, gather_view_float, snapshot_view

__all__ = ["SCHEMA_VERSION", "RecordStore", "SnapshotView", "chunk_sum", "meta_checksum", "ckey"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: chunk checksums (``sum``); a writer upgrades a schema-1 KB on its first write
_DTYPES = {"float16": np.float16, "float32": np.float32}


def ckey(i: int) -> bytes:
    """LMDB key of chunk / record number ``i`` (big-endian, so LMDB order is numeric order)."""
    return struct.pack(">Q", int(i))


def chunk_sum(vec: bytes, lab: bytes) -> bytes:
    """The ``sum`` value of a chunk: CRC-32 of its vector bytes and of its label bytes."""
    return struct.pack(">II", zlib.crc32(vec), zlib.crc32(lab))


def meta_checksum(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class RecordStore:
    """LMDB environment of one knowledge base. One writer (this process, when ``readonly`` is False), many readers."""

    def __init__(self, path: Path, readonly: bool, create: bool = False) -> None:
        lmdb = require("lmdb", "knowledge bases")
        self.path = Path(path)
        self.readonly = readonly
        if not create and not (self.path / "data.mdb").is_file():
            raise KnowledgeBaseError(f"{self.path.parent} is not a retrofit knowledge base (no records/data.mdb)")
        self._key, self.env = open_env(self.path, readonly, create)
        self._readers_full = lmdb.ReadersFullError
        self.meta: dict[str, Any] = {}
        try:
            txn_db = dict(create=not self.env.flags().get("readonly"))
            self.db_meta = self.env.open_db(b"meta", **txn_db)
            self.db_vec = self.env.open_db(b"vec", **txn_db)
            self.db_lab = self.env.open_db(b"lab", **txn_db)
            self.db_txt = self.env.open_db(b"txt", **txn_db)
            self.db_del = self.env.open_db(b"del", **txn_db)
            # a schema-1 KB has no ``sum`` database: only a writer creates it (a reader must not write to the file)
            self.db_sum = None
            if not readonly and txn_db["create"]:
                self.db_sum = self.env.open_db(b"sum", create=True)
            else:
                self.sum_db()
        except BaseException as e:
            # (opening a database takes a reader slot when the environment is read-only)
            full = self._readers_full_message() if isinstance(e, lmdb.ReadersFullError) else None
            self.close()
            if isinstance(e, _damage_errors(lmdb)):
                raise CorruptKnowledgeBaseError(_unreadable(self.path, e)) from e
            if full is not None:
                raise KnowledgeBaseError(full) from e
            raise

    def _readers_full_message(self) -> str:
        return (f"{self.path.parent}: LMDB's reader table is full ({self.env.max_readers()} slots). Each forked "
                "process (a DataLoader worker) that opened this KB while this process held it open leaves its slot "
                "listed under this process until it closes the KB: close every handle of it here (kb.close(), "
                "which frees them) and open it again; DataLoaders with persistent_workers=True or the 'spawn' "
                "start method leave none")

    def sum_db(self) -> Any:
        """The chunk-checksum database, or None while the KB has none (schema 1). Looked up again until found: a
        writer may upgrade the KB after this reader opened it."""
        if self.db_sum is None:
            lmdb = require("lmdb", "knowledge bases")
            try:
                self.db_sum = self.env.open_db(b"sum", create=False)
            except lmdb.NotFoundError:
                pass
            except lmdb.ReadersFullError as e:
                raise KnowledgeBaseError(self._readers_full_message()) from e
        return self.db_sum

    # ---------------------------------------------------------------- metadata
    def begin(self, **kw: Any) -> Any:
        """``env.begin(**kw)``; a full reader table is a :class:`KnowledgeBaseError` saying why and what to do."""
        try:
            return self.env.begin(**kw)
        except self._readers_full as e:
            raise KnowledgeBaseError(self._readers_full_message()) from e

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        """A write transaction, committed when the block exits. LMDB failing to write it (a full disk, a file-size
        limit or a failing device: LMDB reports a short write as an I/O error) is a :class:`KnowledgeBaseError`
        saying that nothing of it was committed; the knowledge base stays as it was."""
        import lmdb

        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.ReadersFullError:
            raise
        except lmdb.Error as e:
            raise KnowledgeBaseError(
                f"writing to {self.path.parent} failed ({e}); a full disk, a file-size limit (ulimit -f) or a "
                "failing device gives this. Nothing of this write was committed and the knowledge base is as it "
                "was: free space and run it again (`retrofit kb verify` checks the records)") from e

    def read_meta(self, txn=None) -> dict[str, Any]:
        """The committed metadata (checked: schema version and checksum)."""
        if txn is None:
            with self.begin() as t:
                return self.read_meta(t)
        raw = txn.get(b"meta", db=self.db_meta)
        if raw is None:
            raise KnowledgeBaseError(f"{self.path.parent} is not a retrofit knowledge base (no metadata record)")
        try:
            meta = json.loads(bytes(raw).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptKnowledgeBaseError(f"metadata of {self.path.parent} is not valid JSON ({e})") from e
        version = meta.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise KnowledgeBaseError(
                f"{self.path.parent} was written with knowledge-base schema {version!r}, but this retrofit reads "
                f"schema <= {SCHEMA_VERSION}; upgrade retrofit (pip install -U retrofit-head)")
        if meta.get("checksum") != meta_checksum(meta):
            raise CorruptKnowledgeBaseError(f"metadata checksum mismatch in {self.path.parent}: the record is damaged")
        return meta

    def write_meta(self, txn, meta: dict[str, Any]) -> None:
        meta = dict(meta)
        # this code keeps chunk checksums from here on: an older schema is upgraded (a newer one never reaches here)
        meta["schema_version"] = max(int(meta.get("schema_version") or 0), SCHEMA_VERSION)
        meta["checksum"] = meta_checksum(meta)
        txn.put(b"meta", json.dumps(meta, sort_keys=True).encode(), db=self.db_meta)

    def check_layout(self, txn, meta: dict[str, Any]) -> None:
        """Refuse metadata that does not describe the stored records (hand-edited dims, dtype or chunk size with a
        recomputed checksum crashed queries and made compact build a short index): field types, then the byte
        length of the last chunk, which every commit writes together with ``next_id``."""
        ints = ("key_dim", "image_dim", "text_dim", "chunk_records", "next_id", "count", "generation")
        bad = [k for k in ints if not isinstance(meta.get(k), int) or isinstance(meta.get(k), bool) or meta[k] < 0]
        bad += [k for k in ("key_dim", "image_dim", "text_dim", "chunk_records") if k not in bad and meta[k] == 0]
        if meta.get("dtype") not in _DTYPES:
            bad.append("dtype")
        if bad:
            raise CorruptKnowledgeBaseError(f"metadata of {self.path.parent} has invalid {', '.join(bad)}: "
                                            f"{ {k: meta.get(k) for k in bad} }")
        nxt, C = meta["next_id"], meta["chunk_records"]
        if nxt == 0:
            return
        c = (nxt - 1) // C
        want = nxt - c * C  # rows of the last chunk
        row = (meta["key_dim"] + meta["image_dim"] + meta["text_dim"]) * np.dtype(_DTYPES[meta["dtype"]]).itemsize
        buf, lab = txn.get(ckey(c), db=self.db_vec), txn.get(ckey(c), db=self.db_lab)
        if buf is None or lab is None or len(buf) != want * row or len(lab) != want * 8:
            have = "missing" if buf is None or lab is None else f"{len(buf)} bytes of vectors, {len(lab)} of labels"
            raise CorruptKnowledgeBaseError(
                f"metadata of {self.path.parent} does not match its records: the last chunk ({c}) should hold "
                f"{want} rows of {row} bytes ({meta['key_dim']}+{meta['image_dim']}+{meta['text_dim']} dims, "
                f"{meta['dtype']}, {C} records per chunk) but is {have}; restore the knowledge base from a copy")

    # ---------------------------------------------------------------- layout helpers
    @property
    def row_dim(self) -> int:
        m = self.meta
        return m["key_dim"] + m["image_dim"] + m["text_dim"]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.meta["dtype"]])

    @property
    def chunk(self) -> int:
        return int(self.meta["chunk_records"])

    # ---------------------------------------------------------------- writing
    def append(self, txn, start: int, rows: np.ndarray, labels: np.ndarray, texts: list[tuple[str | None, str | None]]
               ) -> None:
        """Write records ``start .. start + len(rows) - 1`` inside the caller's write transaction."""
        C = self.chunk
        n = rows.shape[0]
        i = 0
        while i < n:
            rid = start + i
            c, off = divmod(rid, C)
            take = min(C - off, n - i)
            kv = ckey(c)
            old_v = txn.get(kv, db=self.db_vec)
            old_l = txn.get(kv, db=self.db_lab)
            have = 0 if old_v is None else len(old_v) // (self.row_dim * self.np_dtype.itemsize)
            if have != off:
                raise CorruptKnowledgeBaseError(
                    f"chunk {c} holds {have} rows, expected {off}; run `retrofit kb verify {self.path.parent}`")
            crc = txn.get(kv, db=self.db_sum) if old_v is not None else None
            if crc is not None and bytes(crc) != chunk_sum(bytes(old_v), bytes(old_l)):
                raise CorruptKnowledgeBaseError(  # a new checksum over the old bytes would certify the damage
                    f"chunk {c} (records {c * C}..{c * C + have - 1}), which new records would extend, is damaged "
                    f"on disk; nothing was written. Restore {self.path.parent} from a copy or rebuild it "
                    f"(`retrofit kb verify {self.path.parent}` lists every damaged chunk)")
            v = (bytes(old_v) if old_v is not None else b"") + rows[i:i + take].tobytes()
            lab = (bytes(old_l) if old_l is not None else b"") + labels[i:i + take].astype("<i8").tobytes()
            txn.put(kv, v, db=self.db_vec)
            txn.put(kv, lab, db=self.db_lab)
            assert self.db_sum is not None, "a writer always has the checksum database"
            txn.put(kv, chunk_sum(v, lab), db=self.db_sum)
            i += take
        for j, (cap, src) in enumerate(texts):
            if cap is not None or src is not None:
                txn.put(ckey(start + j), json.dumps({"c": cap, "s": src}).encode(), db=self.db_txt)

    def blank_chunk(self, txn, c: int, rows: int) -> None:
        """Overwrite chunk ``c`` with ``rows`` zero rows (label -1) and their checksum, inside the caller's write
        transaction: what ``compact`` leaves of a last chunk whose records are all deleted (a damaged one too,
        which new records could otherwise never extend)."""
        v = bytes(rows * self.row_dim * self.np_dtype.itemsize)
        lab = np.full(rows, -1, dtype="<i8").tobytes()
        txn.put(ckey(c), v, db=self.db_vec)
        txn.put(ckey(c), lab, db=self.db_lab)
        txn.put(ckey(c), chunk_sum(v, lab), db=self.db_sum)

    # ---------------------------------------------------------------- reading
    def gather(self, txn, ids: np.ndarray, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``ids`` (M,) restricted to columns ``cols`` -> ((M, len(cols)) KB dtype, (M,) int64 labels).

        One LMDB get per distinct chunk; the views are copied before the transaction ends.
        """
        ids = np.asarray(ids, dtype=np.int64)
        width = len(range(*cols.indices(self.row_dim)))
        out = np.empty((ids.shape[0], width), dtype=self.np_dtype)  # (M, W)
        lab = np.empty(ids.shape[0], dtype=np.int64)  # (M,)
        if ids.shape[0] == 0:
            return out, lab
        C, D, dt = self.chunk, self.row_dim, self.np_dtype
        chunk_of, row_of = np.divmod(ids, C)
        order = np.argsort(chunk_of, kind="stable")
        sc = chunk_of[order]
        bounds = np.flatnonzero(np.diff(sc)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [len(sc)]))
        get = txn.get
        arr = None
        try:
            for s, e in zip(starts.tolist(), ends.tolist()):
                sel = order[s:e]
                kv = ckey(int(sc[s]))
                buf = get(kv, db=self.db_vec)
                lbuf = get(kv, db=self.db_lab)
                if buf is None or lbuf is None:
                    raise CorruptKnowledgeBaseError(f"records chunk {int(sc[s])} is missing in {self.path.parent}")
                arr = np.frombuffer(buf, dtype=dt).reshape(-1, D)
                r = row_of[sel]
                out[sel] = arr[r, cols]
                lab[sel] = np.frombuffer(lbuf, dtype="<i8")[r]
        finally:
            arr = None  # a view of the map: an error's traceback must not hold it past the KB's close (snapshot_view)
        return out, lab

    def snapshot_view(self, txn) -> SnapshotView | None:
        """Address tables of every chunk in a long-lived read transaction, for :meth:`gather_view`
        (:func:`retrofit.kb_snapshot.snapshot_view`: valid only while ``txn`` stays open; None when a chunk is not
        aligned for its dtype, and callers then use :meth:`gather`)."""
        return snapshot_view(self, txn)

    def gather_view(self, view: SnapshotView, ids: np.ndarray, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`gather`, vectorised over a :class:`SnapshotView` (one fancy-indexing copy, no Python loop)."""
        return gather_view(self, view, ids, cols)

    def gather_view_float(self, view: SnapshotView, ids: np.ndarray, parts: list[slice]) -> tuple[list, np.ndarray]:
        """:meth:`gather_view` with each column range of ``parts`` as a float32 torch tensor
        (:func:`retrofit.kb_snapshot.gather_view_float`)."""
        return gather_view_float(self, view, ids, parts)

    def texts(self, txn, ids: np.ndarray) -> list[tuple[str | None, str | None]]:
        res = []
        for i in np.asarray(ids).tolist():
            raw = txn.get(ckey(i), db=self.db_txt)
            if raw is None:
                res.append((None, None))
            else:
                d = json.loads(bytes(raw).decode())
                res.append((d.get("c"), d.get("s")))
        return res

    def deleted(self, txn) -> np.ndarray:
        """Sorted int64 array of every tombstoned id."""
        with txn.cursor(db=self.db_del) as cur:
            ids = [struct.unpack(">Q", bytes(k))[0] for k in cur.iternext(keys=True, values=False)]
        return np.asarray(ids, dtype=np.int64)

    def iter_chunks(self, txn, cols: slice, upto: int, start: int = 0, damaged: list[int] | None = None
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(first_id, rows[:, cols], labels)`` for ids in ``[start, upto)``, chunk by chunk (copies).

        Chunks removed by ``compact`` (all their records deleted) are skipped. With a ``damaged`` list, each
        chunk's checksum is checked first (about 1 ms per MiB) and a chunk whose bytes do not match it is skipped
        and its number appended to the list.
        """
        C, D, dt = self.chunk, self.row_dim, self.np_dtype
        db_sum = self.sum_db() if damaged is not None else None
        for c in range(start // C, (upto + C - 1) // C):
            kv = ckey(c)
            buf = txn.get(kv, db=self.db_vec)
            if buf is None:
                continue
            lbuf = txn.get(kv, db=self.db_lab)
            if db_sum is not None:
                crc = txn.get(kv, db=db_sum)
                if crc is not None and bytes(crc) != chunk_sum(bytes(buf), bytes(lbuf)):
                    damaged.append(c)
                    continue
            try:
                arr = np.frombuffer(buf, dtype=dt).reshape(-1, D)
                labs = np.frombuffer(lbuf, dtype="<i8")
                lo = max(start - c * C, 0)
                hi = min(upto - c * C, arr.shape[0])
                got = (c * C + lo, arr[lo:hi, cols].copy(), labs[lo:hi].copy()) if hi > lo else None
            finally:
                arr = labs = None  # views of the map: never kept in this frame (a traceback may hold it; see above)
            if got is not None:
                yield got

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.glob("*.mdb") if f.name == "data.mdb")

    def free_bytes(self) -> int:
        """Bytes of ``data.mdb`` in pages no database uses (left by deletions and rewrites): later writes reuse
        them, the file never shrinks; a compacting copy (``retrofit kb copy``) drops them. Counted as the file's
        pages minus the pages of every database and LMDB's two meta pages (the free list's own few pages count
        as free)."""
        st = self.env.stat()
        used = 2 + st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]  # meta pages + the main database
        with self.begin() as txn:
            for db in (self.db_meta, self.db_vec, self.db_lab, self.db_txt, self.db_del, self.sum_db()):
                if db is not None:
                    s = txn.stat(db)
                    used += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
        return max(0, self.disk_bytes() - used * st["psize"])

    def close(self) -> None:
        release_env(self._key)
