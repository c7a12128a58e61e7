"""Memory-mapping an HNSW index file without faulting its graph in.

faiss 1.15's ``read_index(..., IO_FLAG_MMAP_IFC)`` maps the graph (``hnsw.neighbors``) and the vectors, but its
reader then checks every neighbour id, which reads the whole graph through the mapping: ~260 bytes per vector
(M = 32) become resident at open, 287 MB at a million vectors. :func:`map_hnsw` reads the same standard faiss
file (``IndexIDMap`` over ``IndexHNSWSQ`` with fp16 storage or over ``IndexHNSWFlat``, as
:func:`retrofit.kb_index.save_index` writes them) itself: the small
arrays (levels, offsets, ids: ~20 bytes per vector) are read into memory, the graph and the vectors become views of
a read-only ``numpy.memmap`` of the same open file, and the graph is checked by streaming the file through a small
buffer (page cache, not this process's memory). The checks go further than faiss's: besides every id in range and
the offsets matching the levels, the entry point must sit on the top level and every upper-level neighbour must
exist on that level (faiss's reader accepts both damages, and its search then reads past the graph).

Only the faiss versions this layout was checked against use it; anything else (another version, another index
type, another metric, trailing bytes) gives ``None`` and the caller falls back to faiss's own reader.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

from retrofit.errors import CorruptKnowledgeBaseError

__all__ = ["map_hnsw", "TESTED_FAISS"]

TESTED_FAISS = ("1.15",)  # faiss major.minor versions whose HNSW file layout this reader was checked against
_CHECK_BUFFER = 1 << 18  # int32 ids per read while checking the graph (1 MiB)
_MAX_LEVELS = 64  # longer level tables are damage (faiss draws levels with probability M ** -level)


class _Layout(Exception):
    """The file is not the layout this reader knows (the caller falls back to faiss's reader)."""


class _File:
    """Little-endian reads at a moving position of a faiss index file (faiss writes native order)."""

    def __init__(self, f: Any) -> None:
        self.fd, self.name = f.fileno(), f.name
        self.size = os.fstat(self.fd).st_size
        self.pos = 0

    def damaged(self, what: str) -> CorruptKnowledgeBaseError:
        return CorruptKnowledgeBaseError(f"index file {self.name} is damaged: {what}")

    def read_into(self, out: np.ndarray, at: int) -> None:
        view, done = memoryview(out).cast("B"), 0
        while done < out.nbytes:  # one read returns at most ~2 GiB on Linux
            got = os.preadv(self.fd, [view[done:]], at + done)
            if got <= 0:
                raise self.damaged(f"truncated at {self.size} bytes (needs {at + out.nbytes})")
            done += got

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        b = os.pread(self.fd, n, self.pos)
        if len(b) != n:
            raise self.damaged(f"truncated at {self.size} bytes (needs {self.pos + n})")
        self.pos += n
        return struct.unpack("<" + fmt, b)[0]

    def fourcc(self, expected: bytes | tuple[bytes, ...]) -> bytes:
        got = os.pread(self.fd, 4, self.pos)
        if got not in ((expected,) if isinstance(expected, bytes) else expected):
            raise _Layout
        self.pos += 4
        return got

    def header(self) -> tuple[int, int, int]:
        """faiss's index header: (d, ntotal, metric)."""
        d, ntotal = self.scalar("i"), self.scalar("q")
        self.pos += 16 + 1  # two unused int64, is_trained
        metric = self.scalar("i")
        if metric > 1:
            self.scalar("f")  # metric_arg
        return d, ntotal, metric

    def vector(self, dtype: str, count: int | None = None, at_most: int | None = None) -> np.ndarray:
        """A length-prefixed vector read into memory (``count``: its required length)."""
        out = np.empty(self._length(dtype, count, at_most), dtype=dtype)
        self.read_into(out, self.pos)
        self.pos += out.nbytes
        return out

    def skip_vector(self, dtype: str, count: int | None = None) -> tuple[int, int]:
        """A length-prefixed vector left on disk: (byte offset, element count)."""
        n = self._length(dtype, count, None)
        start = self.pos
        self.pos += n * np.dtype(dtype).itemsize
        return start, n

    def _length(self, dtype: str, count: int | None, at_most: int | None) -> int:
        n = self.scalar("Q")
        if (count is not None and n != count) or (at_most is not None and n > at_most):
            raise self.damaged(f"a {dtype} array at byte {self.pos - 8} holds {n} values where "
                               f"{count if count is not None else f'at most {at_most}'} belong")
        if self.pos + n * np.dtype(dtype).itemsize > self.size:
            raise self.damaged(f"truncated at {self.size} bytes (an array at byte {self.pos - 8} needs "
                               f"{self.pos + n * np.dtype(dtype).itemsize})")
        return n


def _upper_slots(levels: np.ndarray, offsets: np.ndarray, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the neighbour array of every upper-level slot (level >= 1), ascending, and their level."""
    nodes = np.flatnonzero(levels >= 2)
    lengths = (cum[levels[nodes]] - cum[1]).astype(np.int64)
    total = int(lengths.sum())
    first = offsets[nodes].astype(np.int64) + int(cum[1])
    starts = np.repeat(first - np.cumsum(lengths) + lengths, lengths)
    pos = starts + np.arange(total, dtype=np.int64)
    level = np.searchsorted(cum, pos - np.repeat(offsets[nodes].astype(np.int64), lengths), side="right") - 1
    return pos, level.astype(np.int32)


def _check_graph(f: _File, start: int, count: int, levels: np.ndarray, offsets: np.ndarray, cum: np.ndarray) -> None:
    """Every neighbour id in [-1, ntotal) and every upper-level neighbour on that level, read through a small reused
    buffer (the mapping is not touched)."""
    ntotal = levels.size
    upper_pos, upper_level = _upper_slots(levels, offsets, cum)
    buf = np.empty(min(_CHECK_BUFFER, max(count, 1)), dtype=np.int32)
    done = 0
    while done < count:
        view = buf[:min(count - done, buf.size)]
        f.read_into(view, start + 4 * done)
        lo, hi = int(view.min()), int(view.max())
        if lo < -1 or hi >= ntotal:
            bad = lo if lo < -1 else hi
            raise f.damaged(f"its graph names vector id {bad} (allowed -1..{ntotal - 1}) near byte "
                            f"{start + 4 * done}")
        a, b = np.searchsorted(upper_pos, [done, done + view.size])
        ids = view[upper_pos[a:b] - done]
        wrong = (ids >= 0) & (levels[np.maximum(ids, 0)] <= upper_level[a:b])
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise f.damaged(f"its graph links level {int(upper_level[a + i])} to vector {int(ids[i])}, which has "
                            f"no such level")
        done += view.size


def _check_levels(f: _File, levels: np.ndarray, offsets: np.ndarray, cum: np.ndarray, n_neighbors: int,
                  entry: int, max_level: int) -> None:
    if cum.size < 2 or cum[0] != 0 or cum[1] <= 0 or np.any(np.diff(cum) < 0):
        raise f.damaged(f"its HNSW level table {cum.tolist()} does not start 0, then a positive count, increasing")
    if int(levels.min()) < 1 or int(levels.max()) >= cum.size:
        raise f.damaged(f"HNSW levels outside 1..{cum.size - 1}")
    want = np.zeros(levels.size + 1, dtype=np.uint64)
    np.cumsum(cum[levels].astype(np.uint64), out=want[1:])
    if not np.array_equal(offsets, want) or int(offsets[-1]) != n_neighbors:
        raise f.damaged("HNSW offsets do not match its levels")
    top = int(levels.max()) - 1
    if max_level != top:
        raise f.damaged(f"HNSW max level {max_level}, but its highest node is on level {top}")
    if not 0 <= entry < levels.size or int(levels[entry]) - 1 != top:
        raise f.damaged(f"HNSW entry point {entry} is not a node of the top level {top}")


def map_hnsw(path: Path, ntotal: int) -> Any | None:
    """The ``IndexIDMap(IndexHNSWSQ fp16 | IndexHNSWFlat)`` in ``path`` with its graph and vectors mapped read-only, or
    ``None`` when this reader does not know the file's layout. Raises :class:`CorruptKnowledgeBaseError` for a
    damaged file. Never add to the result (its views are read-only)."""
    import faiss

    version = ".".join(getattr(faiss, "__version__", "").split(".")[:2])
    if ntotal <= 0 or sys.byteorder != "little" or version not in TESTED_FAISS or not hasattr(os, "preadv"):
        return None  # nothing to map / a byte order, faiss version or OS this reader was not checked against
    with open(path, "rb", buffering=0) as fh:
        f = _File(fh)
        try:
            f.fourcc(b"IxMp")
            d, n, _ = f.header()
            kind = f.fourcc((b"IHNf", b"IHNs"))  # HNSW over float32 vectors / over fp16 scalar-quantised ones
            d2, n2, metric = f.header()
        except (_Layout, CorruptKnowledgeBaseError):
            return None  # faiss's reader says what it is
        if (d2, n2) != (d, n) or metric != faiss.METRIC_INNER_PRODUCT or d <= 0:
            return None
        if n != ntotal:
            raise f.damaged(f"it holds {n} vectors, index.json says {ntotal}")
        probas = f.vector("float64", at_most=_MAX_LEVELS)
        cum = f.vector("int32", at_most=_MAX_LEVELS + 1)
        levels = f.vector("int32", n)
        offsets = f.vector("uint64", n + 1)
        graph = f.skip_vector("int32")
        entry, max_level, ef_construction, ef_search, _ = (f.scalar("i") for _ in range(5))
        _check_levels(f, levels, offsets, cum, graph[1], entry, max_level)
        try:
            f.fourcc(b"IxFI" if kind == b"IHNf" else b"IxSQ")
            if f.header() != (d, n, metric) or (kind == b"IHNs" and not _fp16_quantizer(f, d)):
                return None
        except _Layout:
            return None
        width = 4 if kind == b"IHNf" else 2  # bytes per vector component: float32 / fp16
        codes = f.skip_vector("float32", n * d) if width == 4 else f.skip_vector("uint8", n * d * 2)
        ids = f.vector("int64", n)
        if f.pos != f.size:
            return None  # trailing data: not a layout this reader knows
        _check_graph(f, *graph, levels, offsets, cum)
        # both maps come from this open file: a writer replacing the path meanwhile cannot mix two files
        neighbors = np.memmap(fh, dtype=np.int32, mode="r", offset=graph[0], shape=(graph[1],))
        code_bytes = np.memmap(fh, dtype=np.uint8, mode="r", offset=codes[0], shape=(n * d * width,))
    return _assemble(kind, d, cum, probas, levels, offsets, neighbors, code_bytes, ids,
                     (entry, max_level, ef_construction, ef_search))


def _fp16_quantizer(f: _File, d: int) -> bool:
    """Reads a ScalarQuantizer's fields: True when it is the untrained fp16 one a KB writes, at width ``d``."""
    import faiss

    qtype, _rangestat, _arg = f.scalar("i"), f.scalar("i"), f.scalar("f")
    sq_d, code_size = f.scalar("Q"), f.scalar("Q")
    trained = f.vector("float32", at_most=4 * d)
    return (qtype == faiss.ScalarQuantizer.QT_fp16 and sq_d == d and code_size == 2 * d and trained.size == 0)


def _assemble(kind: bytes, d: int, cum: np.ndarray, probas: np.ndarray, levels: np.ndarray, offsets: np.ndarray,
              neighbors: np.memmap, codes: np.memmap, ids: np.ndarray, scalars: tuple[int, int, int, int]) -> Any:
    import faiss

    from retrofit.kb_index import IndexConfig, build_index

    n, m = levels.size, max(int(cum[1]) // 2, 1)
    index = build_index("hnsw", d, IndexConfig(hnsw_m=m, hnsw_storage="float32" if kind == b"IHNf" else "fp16"))
    inner = faiss.downcast_index(index.index)
    hnsw = inner.hnsw
    for name, arr in (("assign_probas", probas), ("cum_nneighbor_per_level", cum), ("levels", levels),
                      ("offsets", offsets)):
        faiss.copy_array_to_vector(arr, getattr(hnsw, name))
    empty = faiss.MaybeOwnedVectorInt32()  # its null owner: the views' memory is kept alive from Python below
    hnsw.neighbors = faiss.MaybeOwnedVectorInt32.create_view(faiss.swig_ptr(neighbors), neighbors.size, empty.owner)
    hnsw.entry_point, hnsw.max_level, hnsw.efConstruction, hnsw.efSearch = scalars
    storage = faiss.downcast_index(inner.storage)
    storage.codes = faiss.MaybeOwnedVectorUInt8.create_view(faiss.swig_ptr(codes), codes.size, empty.owner)
    storage.ntotal = n
    inner.ntotal = n
    faiss.copy_array_to_vector(ids, index.id_map)
    index.ntotal = n
    index.referenced_objects.extend([neighbors, codes])  # the maps live as long as the index
    return index
