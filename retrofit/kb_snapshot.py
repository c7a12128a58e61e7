"""Zero-copy reads of a knowledge base's records: numpy views straight into the LMDB map of one long-lived read
transaction, so a batch of neighbour vectors is one fancy-indexing copy instead of a Python loop over chunks.
Everything here is valid only while that transaction is open; no view may outlive the KB's close (a traceback
printer reading one after it would read unmapped memory)."""

from __future__ import annotations

import ctypes
import struct
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from retrofit.errors import CorruptKnowledgeBaseError

if TYPE_CHECKING:
    from retrofit.kb_records import RecordStore

__all__ = ["SnapshotView", "snapshot_view", "gather_view", "gather_view_float"]


@dataclass(repr=False)
class SnapshotView:
    """Zero-copy numpy views of all record chunks of one read transaction (valid only while it is open)."""

    vec: np.ndarray  # overlapping (elements, row_dim) view of the LMDB map: row e = elements e .. e + row_dim
    vec_off: np.ndarray  # (chunks,) element offset of each vector chunk in ``vec``; -1 = chunk absent
    lab: np.ndarray  # (elements,) int64 view of the map over the label chunks
    lab_off: np.ndarray  # (chunks,) element offset of each label chunk in ``lab``; -1 = chunk absent
    # ``vec`` as a torch tensor over the same memory, for :func:`gather_view_float`: made before ``vec`` was marked
    # read-only (torch warns about read-only arrays, and a per-call warnings filter is not thread-safe); never
    # written to (the map is read-only memory)
    vec_t: Any = None

    def __repr__(self) -> str:
        # never the arrays' values: once the KB is closed the map is gone and reading them is a segfault (a
        # traceback printer showing a frame's arguments, pytest's or a debugger's, did exactly that)
        return (f"SnapshotView(vec=<LMDB map view {self.vec.shape} {self.vec.dtype}>, "
                f"chunks={int((self.vec_off >= 0).sum())})")


def snapshot_view(rec: RecordStore, txn: Any) -> SnapshotView | None:
    """Address tables of every chunk in a long-lived read transaction, for :func:`gather_view`.

    Valid only while ``txn`` stays open (the owner drops it before ending the transaction). None when a chunk
    is not aligned for its dtype (small values stored inside LMDB leaf pages); callers then use ``RecordStore.gather``.
    """
    import torch

    views: list = []
    a = flat = rows = tens = None
    try:
        for db, dt, width in ((rec.db_vec, rec.np_dtype, rec.row_dim), (rec.db_lab, np.dtype("<i8"), 1)):
            keys, addr, size = [], [], []
            with txn.cursor(db=db) as cur:
                for k, v in cur.iternext(keys=True, values=True):
                    keys.append(struct.unpack(">Q", bytes(k))[0])
                    a = np.frombuffer(v, dtype=np.uint8)
                    addr.append(a.__array_interface__["data"][0])
                    size.append(a.nbytes)
            if not keys:
                return None
            addr_a, size_a = np.asarray(addr, dtype=np.int64), np.asarray(size, dtype=np.int64)
            if (addr_a % dt.itemsize).any():
                return None
            lo, hi = int(addr_a.min()), int((addr_a + size_a).max())
            flat = np.frombuffer((ctypes.c_char * (hi - lo)).from_address(lo), dtype=dt)  # the map, no copy
            # rows may start at any element: an overlapping strided view gives row i = elements i .. i + width
            # (made by the C constructor: numpy's as_strided is Python, and a Ctrl-C in its frame left a
            # traceback holding a view of the map, a segfault when printed with locals after close)
            rows = np.ndarray((flat.shape[0] - width + 1, width), dtype=dt, buffer=flat,
                              strides=(dt.itemsize, dt.itemsize))
            tens = torch.from_numpy(rows) if db is rec.db_vec else None  # (C; before the flag: no warning)
            rows.flags.writeable = False
            off = np.full(max(keys) + 1, -1, dtype=np.int64)
            off[np.asarray(keys)] = (addr_a - lo) // dt.itemsize
            views.append((rows, off, tens))
        return SnapshotView(vec=views[0][0], vec_off=views[0][1], lab=views[1][0][:, 0], lab_off=views[1][1],
                            vec_t=views[0][2])
    except BaseException as e:  # the frames it went through (numpy's, say) may hold views of the map too
        traceback.clear_frames(e.__traceback__.tb_next if e.__traceback__ is not None else None)
        raise
    finally:
        # an error here leaves this frame in its traceback: no local may still view the map once the KB is
        # closed (a traceback printer showing locals would read unmapped memory: a segfault)
        a = flat = rows = tens = None
        views.clear()

def _locate(rec: RecordStore, view: SnapshotView, ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """(chunk, row in chunk) of each id; a chunk the snapshot lacks is a CorruptKnowledgeBaseError."""
    ids = np.asarray(ids, dtype=np.int64)
    c, r = np.divmod(ids, rec.chunk)
    if ids.size and (c.max() >= len(view.vec_off) or (view.vec_off[c] < 0).any()):
        raise CorruptKnowledgeBaseError(f"records chunk of ids {ids[:5].tolist()} is missing in {rec.path.parent}")
    return c, r


def gather_view(rec: RecordStore, view: SnapshotView, ids: np.ndarray, cols: slice
                ) -> tuple[np.ndarray, np.ndarray]:
    """Like ``RecordStore.gather``, vectorised over a :class:`SnapshotView` (one fancy-indexing copy, no loop)."""
    c, r = _locate(rec, view, ids)
    out = view.vec[view.vec_off[c] + r * rec.row_dim, cols]  # (M, W) copy out of the map
    lab = view.lab[view.lab_off[c] + r]  # (M,)
    return out, lab


def gather_view_float(rec: RecordStore, view: SnapshotView, ids: np.ndarray, parts: list[slice]
                      ) -> tuple[list, np.ndarray]:
    """Like :func:`gather_view`, with each column range of ``parts`` as its own contiguous float32 torch tensor
    (M, width): one torch gather per range straight out of the map, then one cast. A search's 256 x 32
    neighbours' image and text vectors took ~3.3 ms as numpy's fancy index (one thread) and a torch cast, ~1.6 ms
    so (both run on torch's threads; the same values, bit for bit)."""
    import torch

    c, r = _locate(rec, view, ids)
    rows = torch.from_numpy(view.vec_off[c] + r * rec.row_dim)  # (M,) first element of each row in ``view.vec``
    try:
        out = [view.vec_t.narrow(1, p.start, p.stop - p.start).index_select(0, rows).float() for p in parts]
    except BaseException as e:  # the frames below (the comprehension's; a torch-function mode's, such as
        # torch.set_default_device's, in Python) hold views of the map: an error's traceback must not keep them
        # past the KB's close (a traceback printer showing locals would read unmapped memory)
        traceback.clear_frames(e.__traceback__.tb_next if e.__traceback__ is not None else None)
        raise
    return out, view.lab[view.lab_off[c] + r]
