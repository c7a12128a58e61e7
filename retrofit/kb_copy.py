"""Copying a knowledge base into a new directory, compacted (``copy_kb``; ``retrofit kb copy``).

LMDB never gives a file's pages back to the file system: after ``delete`` + ``compact`` the freed pages are
reused by later adds, but ``records/data.mdb`` keeps its size. ``copy_kb`` writes a copy whose LMDB file holds
only the pages in use (LMDB's own compacting copy, ``mdb_copy -c``, from one read snapshot), so deleting most of a
KB and copying it gives the disk space back. Everything else is kept as it is: record ids, tombstones, labels,
captions, checksums, metadata, fingerprints, settings and the index file (copied with the records, then checked
and caught up on a writable open, or rebuilt when it cannot be used). Damaged record chunks stay damaged in the
copy (their checksums are copied too), so ``kb verify`` still finds them.

Crash safety: the copy is written as ``.<name>.copying`` next to ``out`` and renamed into place when it is
complete; the source is only read (other readers and one writer may keep using it meanwhile).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from retrofit.errors import RetrofitError

__all__ = ["CopySummary", "copy_kb"]


@dataclass(frozen=True)
class CopySummary:
    """What :func:`copy_kb` did; sizes are the LMDB record files' (``records/data.mdb``) in bytes."""

    path: str  # the new knowledge base
    records: int  # live records
    source_bytes: int
    copy_bytes: int
    index_reused: bool  # the source's index file covered every record and serves the copy as it is (False:
    # rebuilt, or caught up with records added after it was saved)
    seconds: float


def _data_bytes(kb_dir: Path) -> int:
    return (kb_dir / "records" / "data.mdb").stat().st_size


def copy_kb(src: str | os.PathLike, out: str | os.PathLike) -> CopySummary:
    """Copy the knowledge base at ``src`` to the new directory ``out`` with a compacted LMDB file (see the module
    docstring); returns a :class:`CopySummary`. Refuses an ``out`` that exists."""
    from retrofit.kb_index import IndexState, fsync_dir
    from retrofit.knowledge_base import KnowledgeBase

    src, out = Path(src), Path(out)
    if out.exists():
        raise RetrofitError(f"{out} already exists; kb copy writes a new knowledge base: remove it or choose another "
                            "output path")
    t0 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.copying")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an earlier copy that was killed
    with KnowledgeBase.open(src) as kb:  # read-only: checks it is a KB and its layout
        try:
            (tmp / "records").mkdir(parents=True)
            # index first, records second (as readers load): the records' snapshot is never older than the index
            state = IndexState.read(src)
            index_copied = False
            if state is not None:
                try:
                    shutil.copyfile(src / state.file, tmp / state.file)
                    shutil.copyfile(src / "index.json", tmp / "index.json")
                    index_copied = True
                except FileNotFoundError:  # a writer replaced the index meanwhile: the copy rebuilds its own
                    for name in (state.file, "index.json"):
                        (tmp / name).unlink(missing_ok=True)
            kb._rec.env.copy(str(tmp / "records"), compact=True)  # one read snapshot, only the pages in use
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
            source_bytes = _data_bytes(src)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        # a writable open checks the copied index against the copied records (uuid, ids covered, file hash),
        # catches it up with records added after it was saved, or rebuilds it
        with KnowledgeBase.open(tmp, readonly=False) as copy:
            records = len(copy)
            index_reused = (index_copied and state.next_id == copy._meta["next_id"] and copy._state is not None
                            and copy._state.file == state.file)
        os.replace(tmp, out)  # the complete copy appears at once
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CopySummary(str(out), records, source_bytes, _data_bytes(out), index_reused, time.perf_counter() - t0)
