"""Copying a knowledge base into a new directory, compacted (``copy_kb``; ``retrofit kb copy``).

LMDB never gives a file's pages back to the file system: after ``delete`` + ``compact`` the freed pages are
reused by later adds, but ``records/data.mdb`` keeps its size. ``copy_kb`` writes a copy whose LMDB file holds
only the pages in use (LMDB's own compacting copy, ``mdb_copy -c``, from one read snapshot), so deleting most of a
KB and copying it gives the disk space back. Everything else is kept as it is: record ids, tombstones, labels,
captions, checksums, metadata, fingerprints, settings and the index file (copied with the records, then checked
and caught up on a writable open, or rebuilt when it cannot be used: a damaged or missing index in the source
does not stop a copy). Damaged record chunks stay damaged in the copy (their checksums are copied too), so
``kb verify`` still finds them.

Crash safety: the copy is written as ``.<name>.copying`` next to ``out`` (holding a lock file while it runs, so a
second copy to the same ``out`` is refused and a killed copy's leftover is recognised and removed) and renamed
into place when it is complete and synced; the source is only read (other readers and one writer may keep using
it meanwhile).

Space comes back for what LMDB has freed: the record chunks ``compact()`` dropped because none of their records
is live (records are stored in chunks of ``chunk_records`` rows), and the texts of deleted records. Deletions
scattered over every chunk free little until ``compact()`` finds whole chunks dead.
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


_MARK = ".kb-copy.lock"  # inside a copy in progress: held (flock) while it runs, removed before the rename


def _claim(tmp: Path) -> int:
    """Create ``tmp`` for this copy and lock it; returns the lock's fd. A leftover ``tmp`` is removed only when it
    is a killed copy's (its lock file is there and nobody holds it); anything else there is refused."""
    import fcntl

    if tmp.exists():
        mark = tmp / _MARK
        if not mark.is_file():
            raise RetrofitError(f"{tmp} exists and is not a copy in progress; remove it, or choose another output path")
        fd = os.open(str(mark), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RetrofitError(f"another `kb copy` to {tmp.with_name(tmp.name[1:-len('.copying')])} is running "
                                f"(it writes {tmp}); wait for it, or choose another output path") from None
        shutil.rmtree(tmp)  # left by a copy that was killed
        os.close(fd)
    tmp.mkdir()  # exist_ok=False: a concurrent copy that got here first wins
    fd = os.open(str(tmp / _MARK), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def copy_kb(src: str | os.PathLike, out: str | os.PathLike) -> CopySummary:
    """Copy the knowledge base at ``src`` to the new directory ``out`` with a compacted LMDB file (see the module
    docstring); returns a :class:`CopySummary`. Refuses an ``out`` that exists. The source's index is not loaded:
    a damaged or missing one does not stop the copy (the copy rebuilds its own from the records)."""
    import json

    from retrofit.errors import CorruptKnowledgeBaseError
    from retrofit.kb_index import IndexState, fsync_dir, state_json
    from retrofit.knowledge_base import KnowledgeBase

    src, out = Path(src), Path(out)
    if out.exists():
        raise RetrofitError(f"{out} already exists; kb copy writes a new knowledge base: remove it or choose another "
                            "output path")
    tmp = out.with_name(f".{out.name}.copying")
    s_res, t_res = src.resolve(), tmp.resolve()
    if t_res == s_res or t_res in s_res.parents:
        raise RetrofitError(f"kb copy: the source {src} is (inside) {tmp}, where the copy is written; choose "
                            "another output path")
    t0 = time.perf_counter()
    # records only (the check of their layout included): the source's index is neither needed nor loaded
    with KnowledgeBase(src, readonly=True, _records_only=True) as kb:
        lock = _claim(tmp)
        try:
            try:
                (tmp / "records").mkdir()
                # index first, records second (as readers load): the records' snapshot is never older than the index
                try:
                    state = IndexState.read(src)
                except CorruptKnowledgeBaseError:  # a damaged index.json: the copy rebuilds its index
                    state = None
                index_copied = False
                if state is not None:
                    try:
                        shutil.copyfile(src / state.file, tmp / state.file)
                        if state.whiten_file is not None:  # the index's key whitening goes with it
                            shutil.copyfile(src / state.whiten_file, tmp / state.whiten_file)
                        # index.json from the state read above, not the file again: a writer may have replaced both
                        with open(tmp / "index.json", "w") as f:
                            json.dump(state_json(state), f, indent=1)
                        index_copied = True
                    except FileNotFoundError:  # a writer replaced the index meanwhile: the copy rebuilds its own
                        (tmp / state.file).unlink(missing_ok=True)
                        if state.whiten_file is not None:
                            (tmp / state.whiten_file).unlink(missing_ok=True)
                kb._rec.env.copy(str(tmp / "records"), compact=True)  # one read snapshot, only the pages in use
                for f in tmp.rglob("*"):
                    if f.is_file() and f.name != _MARK:
                        with open(f, "rb+") as fh:
                            os.fsync(fh.fileno())
                fsync_dir(tmp / "records")
                source_bytes = _data_bytes(src)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        except BaseException:
            os.close(lock)
            raise
    try:
        try:
            # a writable open checks the copied index against the copied records (uuid, ids covered, file hash),
            # catches it up with records added after it was saved, or rebuilds it (damaged, missing, replaced)
            with KnowledgeBase.open(tmp, readonly=False) as copy:
                records = len(copy)
                index_reused = (index_copied and state.next_id == copy._meta["next_id"] and copy._state is not None
                                and copy._state.file == state.file)
            (tmp / _MARK).unlink()
            fsync_dir(tmp)
            os.replace(tmp, out)  # the complete copy appears at once
            fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(lock)
    return CopySummary(str(out), records, source_bytes, _data_bytes(out), index_reused, time.perf_counter() - t0)
