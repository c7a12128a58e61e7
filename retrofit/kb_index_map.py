"""Memory-mapping an HNSW index file without faulting its graph in.

faiss 1.15's ``read_index(..., IO_FLAG_MMAP_IFC)`` maps the graph (``hnsw.neighbors``) and the vectors, but its
reader then checks every neighbour id, which reads the whole graph through the mapping: ~260 bytes per vector
(M = 32) become resident at open, 270 MB at a million vectors. :func:`map_hnsw` reads the same standard faiss
file (``IndexIDMap`` over ``IndexHNSWFlat``, as :func:`retrofit.kb_index.save_index` writes it) itself: the small
arrays (levels, offsets, ids: ~20 bytes per vector) are read into memory, the graph and the vectors become views of
a read-only ``numpy.memmap``, and the graph's ids are checked by streaming the file through a small buffer (page
cache, not this process's memory), so the check is as strict as faiss's and the open stays small.

Anything but that exact layout gives ``None`` and the caller falls back to faiss's own reader.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from retrofit.errors import CorruptKnowledgeBaseError

__all__ = ["map_hnsw"]

_CHECK_BUFFER = 1 << 18  # int32 ids per read while checking the graph (1 MiB)


class _Layout(Exception):
    """The file is not the layout this reader knows (the caller falls back to faiss's reader)."""


class _File:
    """Sequential little-endian reads of a faiss index file (faiss writes native order; x86 / ARM: little)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb", buffering=0)  # map_hnsw closes it
        self.size = os.fstat(self.f.fileno()).st_size
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise CorruptKnowledgeBaseError(f"index file {self.f.name} is truncated (needs byte {self.pos + n}, "
                                            f"has {self.size})")
        b = os.pread(self.f.fileno(), n, self.pos)
        self.pos += n
        return b

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def fourcc(self, expected: bytes) -> None:
        if self.take(4) != expected:
            raise _Layout

    def header(self) -> tuple[int, int, int]:
        """faiss's index header: (d, ntotal, metric)."""
        d, ntotal = self.scalar("i"), self.scalar("q")
        self.take(16 + 1)  # two unused int64, is_trained
        metric = self.scalar("i")
        if metric > 1:
            self.scalar("f")  # metric_arg
        return d, ntotal, metric

    def vector(self, dtype: str, count: int | None = None) -> np.ndarray:
        """A length-prefixed vector read into memory (an owned array; ``count`` checks its length)."""
        out = np.empty(self._length(dtype, count), dtype=dtype)
        self.f.seek(self.pos)
        if self.f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise CorruptKnowledgeBaseError(f"index file {self.f.name} is truncated")
        self.pos += out.nbytes
        return out

    def skip_vector(self, dtype: str, count: int | None = None) -> tuple[int, int]:
        """A length-prefixed vector left on disk: (byte offset, element count)."""
        n = self._length(dtype, count)
        start = self.pos
        self.pos += n * np.dtype(dtype).itemsize
        if self.pos > self.size:
            raise CorruptKnowledgeBaseError(f"index file {self.f.name} is truncated")
        return start, n

    def _length(self, dtype: str, count: int | None) -> int:
        n = self.scalar("Q")
        if count is not None and n != count:
            raise CorruptKnowledgeBaseError(f"index file {self.f.name} is damaged: a {dtype} array holds {n} "
                                            f"values where {count} belong")
        if self.pos + n * np.dtype(dtype).itemsize > self.size:
            raise CorruptKnowledgeBaseError(f"index file {self.f.name} is truncated")
        return n


def _check_graph(f: _File, start: int, count: int, ntotal: int) -> None:
    """Every neighbour id in [-1, ntotal), read through a small reused buffer (no mapping is touched)."""
    buf = np.empty(min(_CHECK_BUFFER, max(count, 1)), dtype=np.int32)
    f.f.seek(start)
    left = count
    while left:
        m = min(left, buf.size)
        view = buf[:m]
        if f.f.readinto(memoryview(view).cast("B")) != view.nbytes:
            raise CorruptKnowledgeBaseError(f"index file {f.f.name} is truncated")
        if int(view.min()) < -1 or int(view.max()) >= ntotal:
            raise CorruptKnowledgeBaseError(f"index file {f.f.name} is damaged: its graph names vector ids outside "
                                            f"0..{ntotal - 1}")
        left -= m


def _check_levels(name: str, levels: np.ndarray, offsets: np.ndarray, cum: np.ndarray, n_neighbors: int,
                  entry: int, max_level: int, ntotal: int) -> None:
    bad = CorruptKnowledgeBaseError
    if cum.size < 2 or cum[0] != 0 or np.any(np.diff(cum) < 0):
        raise bad(f"index file {name} is damaged: its HNSW level table is not increasing")
    if levels.size and (int(levels.min()) < 1 or int(levels.max()) >= cum.size):
        raise bad(f"index file {name} is damaged: HNSW levels outside 1..{cum.size - 1}")
    want = np.zeros(levels.size + 1, dtype=np.uint64)
    np.cumsum(cum[levels].astype(np.uint64), out=want[1:])
    if not np.array_equal(offsets, want) or int(offsets[-1]) != n_neighbors:
        raise bad(f"index file {name} is damaged: HNSW offsets do not match its levels")
    if ntotal and not (0 <= entry < ntotal and max_level == int(levels.max()) - 1):
        raise bad(f"index file {name} is damaged: HNSW entry point {entry} / max level {max_level}")


def map_hnsw(path: Path, ntotal: int) -> Any | None:
    """The ``IndexIDMap(IndexHNSWFlat)`` in ``path`` with its graph and vectors memory-mapped read-only, or
    ``None`` when the file has another layout. Never add to the result (its views are read-only)."""
    import sys

    import faiss

    if ntotal == 0 or sys.byteorder != "little" or not hasattr(faiss, "MaybeOwnedVectorUInt8"):
        return None  # nothing to map / a byte order this reader does not handle / a faiss without views
    f = _File(path)
    try:
        try:
            f.fourcc(b"IxMp")
            d, n, _ = f.header()
            f.fourcc(b"IHNf")
            d2, n2, metric = f.header()
        except (_Layout, CorruptKnowledgeBaseError):
            return None
        if (d2, n2) != (d, n) or n != ntotal or metric != faiss.METRIC_INNER_PRODUCT:
            return None
        probas = f.vector("float64")
        cum = f.vector("int32")
        levels = f.vector("int32", n)
        offsets = f.vector("uint64", n + 1)
        nb_start, nb_count = f.skip_vector("int32")
        entry, max_level, ef_construction, ef_search, _ = (f.scalar("i") for _ in range(5))
        _check_levels(str(path), levels, offsets, cum, nb_count, entry, max_level, n)
        try:
            f.fourcc(b"IxFI")
            if f.header() != (d, n, metric):
                return None
        except _Layout:
            return None
        codes_start, _ = f.skip_vector("float32", n * d)
        ids = f.vector("int64", n)
        if f.pos != f.size:
            return None  # trailing data: not a layout this reader knows
        _check_graph(f, nb_start, nb_count, n)
    finally:
        f.f.close()
    return _assemble(path, d, cum, probas, levels, offsets, (nb_start, nb_count), (entry, max_level, ef_construction,
                     ef_search), codes_start, ids)


def _assemble(path: Path, d: int, cum: np.ndarray, probas: np.ndarray, levels: np.ndarray, offsets: np.ndarray,
              graph: tuple[int, int], scalars: tuple[int, int, int, int], codes_start: int, ids: np.ndarray) -> Any:
    import faiss

    n = levels.size
    nb_start, nb_count = graph
    neighbors = np.memmap(path, dtype=np.int32, mode="r", offset=nb_start, shape=(max(nb_count, 1),))
    codes = np.memmap(path, dtype=np.uint8, mode="r", offset=codes_start, shape=(max(n * d * 4, 1),))
    inner = faiss.IndexHNSWFlat(d, max(int(cum[1]) // 2, 1), faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIDMap(inner)
    hnsw = inner.hnsw
    for name, arr in (("assign_probas", probas), ("cum_nneighbor_per_level", cum), ("levels", levels),
                      ("offsets", offsets)):
        faiss.copy_array_to_vector(arr, getattr(hnsw, name))
    empty = faiss.MaybeOwnedVectorInt32()  # its null owner: the views' memory is kept alive from Python below
    hnsw.neighbors = faiss.MaybeOwnedVectorInt32.create_view(faiss.swig_ptr(neighbors), nb_count, empty.owner)
    hnsw.entry_point, hnsw.max_level, hnsw.efConstruction, hnsw.efSearch = scalars
    storage = faiss.downcast_index(inner.storage)
    storage.codes = faiss.MaybeOwnedVectorUInt8.create_view(faiss.swig_ptr(codes), n * d * 4, empty.owner)
    storage.ntotal = n
    inner.ntotal = n
    faiss.copy_array_to_vector(ids, index.id_map)
    index.ntotal = n
    index.referenced_objects.extend([neighbors, codes])  # the maps live as long as the index
    return index
