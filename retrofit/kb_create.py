"""Making a knowledge base: the checked metadata of a new one (:meth:`KnowledgeBase.create
<retrofit.knowledge_base.KnowledgeBase.create>`) and the lock that makes one process its only writer."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from retrofit.errors import KnowledgeBaseError
from retrofit.kb_index import IndexConfig, fsync_dir
from retrofit.kb_records import _DTYPES, SCHEMA_VERSION
from retrofit.store import KBFingerprint

__all__ = ["new_meta", "take_writer_lock"]

_CHUNK_BYTES = 1 << 20  # default chunk size: about this many bytes of vectors per LMDB value


def new_meta(path: Path, key_dim: int, image_dim: int, text_dim: int, fingerprint: KBFingerprint | None, *,
             class_names: list[str] | None, dtype: str, index: str, hnsw_m: int, hnsw_storage: str,
             ef_construction: int, ef_search: int | None, recall_target: float, flat_threshold: int,
             chunk_records: int | None, mmap_bytes: int, whiten: float, user_meta: dict[str, Any] | None
             ) -> dict[str, Any]:
    """The metadata of a new knowledge base at ``path`` after every check of the arguments (each error names the
    value); creates ``path/records`` last, so a refused create leaves nothing."""
    for n, v in (("key_dim", key_dim), ("image_dim", image_dim), ("text_dim", text_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{n} must be a positive int, got {v!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    fingerprint = fingerprint or KBFingerprint()
    if not isinstance(fingerprint, KBFingerprint):
        raise TypeError(f"fingerprint must be a KBFingerprint(key=..., image=..., text=...) of encoder "
                        f"fingerprints, got {type(fingerprint).__name__}")
    for n, d in (("key", key_dim), ("image", image_dim), ("text", text_dim)):
        fp = getattr(fingerprint, n)
        if fp is not None and fp.dim != d:
            raise ValueError(f"fingerprint.{n}.dim is {fp.dim} but {n}_dim is {d}")
    cfg = IndexConfig(kind=index, hnsw_m=hnsw_m, hnsw_storage=hnsw_storage, ef_construction=ef_construction,
                      ef_search=ef_search, recall_target=recall_target, flat_threshold=flat_threshold,
                      mmap_bytes=mmap_bytes, whiten=whiten)
    if class_names is not None and (isinstance(class_names, str)
                                    or not all(isinstance(c, str) for c in class_names)):
        raise ValueError(f"class_names must be a list of strings, got {class_names!r:.80}")
    if chunk_records is None:
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        chunk_records = max(16, _CHUNK_BYTES // ((key_dim + image_dim + text_dim) * itemsize))
    if not isinstance(chunk_records, int) or isinstance(chunk_records, bool) or chunk_records <= 0:
        raise ValueError(f"chunk_records must be a positive int, got {chunk_records!r}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise KnowledgeBaseError(f"{path} already exists and is not an empty directory; pick a new path")
    if user_meta is not None:
        from retrofit.kb_write import check_meta

        check_meta(user_meta, "user_meta")
    (path / "records").mkdir(parents=True, exist_ok=True)  # after every check: a refused create leaves nothing
    # (``path`` here is the creating directory of create_atomically, moved into place once complete)
    meta = {
        "schema_version": SCHEMA_VERSION, "uuid": uuid.uuid4().hex, "created": time.time(),
        "key_dim": key_dim, "image_dim": image_dim, "text_dim": text_dim, "dtype": dtype,
        "chunk_records": chunk_records, "fingerprint": fingerprint.to_dict(), "class_names": class_names,
        "index": cfg.to_meta(), "generation": 0, "next_id": 0, "count": 0, "deleted": 0, "compactions": 0,
        "user_meta": dict(user_meta or {}),
    }
    return meta


def take_writer_lock(path: Path) -> int:
    """An exclusive ``flock`` on ``path/writer.lock`` (its file descriptor), holding this process's pid for the next
    writer's error message; refused with what to do when another handle holds it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(path / "writer.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only file system or directory: PermissionError, EROFS
        raise KnowledgeBaseError(f"{path} cannot be opened for writing ({e.strerror}): it is on a read-only "
                                 "file system or not writable by this user; open it read-only "
                                 "(KnowledgeBase.open(path), `retrofit kb info|query|verify|copy`)") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if holder == str(os.getpid()):
            raise KnowledgeBaseError(f"{path} is already open for writing in this process (one writer at a "
                                     "time): use that handle, or close it first") from e
        who = f" (process {holder})" if holder.isdigit() else ""
        raise KnowledgeBaseError(f"{path} is open for writing in another process{who} (one writer at a "
                                 "time); wait for it to finish, or only read it: KnowledgeBase.open(path) "
                                 "(read-only by default), `retrofit kb info|query|verify`") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)  # who holds the lock, for the next writer's error message
    return fd


def creating_dir(path: Path) -> Path:
    """Where a knowledge base for ``path`` is created before it is moved into place, beside it; leftovers of
    creations killed in this pid's place (their process is gone) are removed first."""
    for old in path.parent.glob(f".{path.name}.creating.*") if path.parent.is_dir() else ():
        pid = old.name.rpartition(".")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = path.parent / f".{path.name}.creating.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # (this process's own leftover)
    return tmp


def move_into_place(tmp: Path, path: Path) -> bool:
    """Move the complete knowledge base ``tmp`` to ``path`` (absent, or an empty directory: replaced, keeping its
    mode). False when ``path`` is an empty directory that cannot be replaced (a mount point): the caller creates
    in place. A ``path`` that another process filled meanwhile is refused, and left as it is."""
    if path.is_dir():
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
            path.rmdir()  # (only an empty directory goes)
        except OSError:
            if path.is_dir() and not any(path.iterdir()):
                return False
            raise KnowledgeBaseError(f"{path} was filled by something else while the knowledge base was created; "
                                     "pick a new path") from None
    try:
        os.rename(tmp, path)
    except OSError as e:
        raise KnowledgeBaseError(f"cannot move the new knowledge base into {path} ({e.strerror}): did another "
                                 "process create it meanwhile? Pick a new path") from e
    fsync_dir(path.parent)  # the rename itself is durable
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_atomically(cls: Any, path: Path, settings: dict[str, Any]) -> Any:
    """``KnowledgeBase.create``: the KB is made complete (metadata, empty index) beside ``path`` and moved into
    place, so that a create killed or interrupted half-way leaves no half-made knowledge base that nothing could
    open or resume; returns it open for writing at ``path``."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):  # (new_meta checks it too: before the tmp)
        raise KnowledgeBaseError(f"{path} already exists and is not an empty directory; pick a new path")
    above = next((p for p in path.absolute().parents if p.exists()), None)  # (the error named the creating dir)
    if above is not None and not above.is_dir():
        raise KnowledgeBaseError(f"cannot create a knowledge base at {path}: {above} is a file, not a directory")
    tmp = creating_dir(path.absolute())
    try:
        try:
            meta = new_meta(tmp, **settings)
        except PermissionError:  # an empty directory made for it where this user may not create others
            if not path.is_dir():
                raise
            return cls(path, readonly=False, _create=new_meta(path, **settings))  # in place (not atomic)
        cls(tmp, readonly=False, _create=meta).close()
        if move_into_place(tmp, path):
            return cls(path, readonly=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # ``path`` is an empty directory that cannot be replaced (a mount point): created in place (not atomic)
    return cls(path, readonly=False, _create=new_meta(path, **settings))
