"""The LMDB environments of knowledge bases, one per record store per process: py-lmdb refuses a second
environment for the same files, so every handle of one KB (readers and the writer, in any thread) shares one,
counted, and the last handle to close closes it. Opening checks what makes a file unreadable (too short, truncated,
another LMDB's) and names it; reader slots of processes that died holding them are freed."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from retrofit._env import require
from retrofit.errors import CorruptKnowledgeBaseError, KnowledgeBaseError

__all__ = ["open_env", "release_env"]

log = logging.getLogger("retrofit.kb_records")  # (the record store's logger, as before this module)

# LMDB reader slots: one per reading process / thread. A forked DataLoader worker that opens the KB while its
# parent holds it open reads through the parent's environment (py-lmdb refuses a second one for the same files),
# and each worker's slot stays listed under the parent's pid (inactive, pinning nothing) until the parent closes
# the KB: 32,768 slots (a 2 MiB lock file) are room for ~32,000 worker lifetimes; then `begin` says what to do.
_MAX_READERS = 1 << 15
_MAP_SIZE = 1 << 40  # virtual address space reserved for the map; the file only grows as data is written
# py-lmdb allows one Environment per file per process: handles of the same KB share it (path -> [env, users])
_ENVS: dict[str, list[Any]] = {}
_ENVS_LOCK = threading.Lock()


def _damage_errors(lmdb: Any) -> tuple[type[BaseException], ...]:
    """LMDB's errors for a file that is not (or no longer) a valid environment, or not one this LMDB reads."""
    return (lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.VersionMismatchError,
            lmdb.BadDbiError, lmdb.IncompatibleError)


def _unreadable(path: Path, e: BaseException | str) -> str:
    name = type(e).__name__
    if name in ("VersionMismatchError", "IncompatibleError"):  # not damage: another LMDB build wrote or holds it
        return (f"{path.parent}: the record store {path / 'data.mdb'} was written or is held open by an "
                f"incompatible LMDB version ({e}); open it with the same retrofit / lmdb versions that wrote it")
    return (f"{path.parent}: the record store {path / 'data.mdb'} is not a readable LMDB environment ({e}); "
            "the records are lost: restore the knowledge base from a copy or rebuild it (retrofit kb build)")


def open_env(path: Path, readonly: bool, create: bool) -> tuple[str, Any]:
    """The shared LMDB environment of the record store at ``path`` (opened on first use): ``(key, env)``; give it
    back with :func:`release_env` (key)."""
    lmdb = require("lmdb", "knowledge bases")
    key = str(path.resolve())
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            # open writable whenever the files allow it, so that a later writer handle can share the env
            ro = readonly and not os.access(path, os.W_OK)
            data = path / "data.mdb"
            if not create and data.stat().st_size < 2 * 4096:  # not even LMDB's two meta pages
                raise CorruptKnowledgeBaseError(_unreadable(path, f"{data.stat().st_size} bytes"))
            opts = dict(map_size=_MAP_SIZE, max_dbs=8, readonly=ro, create=create, readahead=False,
                        max_readers=_MAX_READERS)
            try:
                try:
                    env = lmdb.open(str(path), lock=True, **opts)
                except lmdb.ReadonlyError:
                    if not ro:
                        raise
                    # a KB this user may only read (another user's, read-only media): LMDB cannot write its
                    # lock file, so read without it, as LMDB allows for read-only media
                    env = lmdb.open(str(path), lock=False, **opts)
                    log.warning("%s: opened without LMDB's reader lock (%s/lock.mdb is not writable by this "
                                "user): reads are exact only while no other process writes the knowledge base",
                                path.parent, path)
            except _damage_errors(lmdb) as e:
                raise CorruptKnowledgeBaseError(_unreadable(path, e)) from e
            if not create:  # a truncated file: reading a page past its end would kill the process (SIGBUS)
                need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
                have = data.stat().st_size
                if have < need:
                    env.close()
                    raise CorruptKnowledgeBaseError(_unreadable(
                        path, f"truncated: {have} bytes, its last committed page ends at {need}"))
            try:  # free the reader slots of processes that died holding them (kill -9): they pin old pages
                env.reader_check()
            except lmdb.Error:
                pass
            entry = _ENVS[key] = [env, 0]
        elif not readonly and entry[0].flags().get("readonly"):
            raise KnowledgeBaseError(f"{path.parent} is open read-only on a read-only file system")
        entry[1] += 1
    return key, entry[0]


def release_env(key: str) -> None:
    """One handle less on the environment of ``key``; the last one closes it."""
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del _ENVS[key]
                entry[0].close()
