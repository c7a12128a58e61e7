"""How ``KnowledgeBase`` handles live in threads and processes: locks, exit, pickling.

- Threads may share one handle. Reads of a read-only handle run together; ``refresh()`` (which swaps the snapshot
  and index a search is walking: a crash, not an error) and ``close()`` run alone. A writable handle runs every
  call alone: faiss's add into an index that another thread searches corrupts memory. (:class:`RWLock`)
- A multiprocessing child (a DataLoader worker) ends with ``os._exit``: no ``__del__``, no ``atexit``. Its handles
  are closed by a multiprocessing exit hook instead: a forked worker reads through the parent's LMDB environment,
  under the parent's pid, so a snapshot left open there would hold a reader slot that no one frees while the parent
  lives (pinned pages; after enough workers, MDB_READERS_FULL).
- A read-only handle pickles as its path and ``ef_search`` override (``torch.save`` of a whole model, spawned
  workers); unpickled where the KB no longer exists it becomes a :class:`MissingKnowledgeBase`, so that the model
  still loads and says what to do when it is used.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrofit.errors import KnowledgeBaseError

__all__ = ["install_thread_guards", "track", "reopen", "MissingKnowledgeBase", "MissingKnowledgeBaseError"]

log = logging.getLogger(__name__)

_READS = ("search", "get", "vectors", "gather", "labels", "info", "verify")
_WRITES = ("add", "update_meta", "delete", "compact", "flush")  # (refresh() and close() lock inside)


def _lock(kb: Any, write: bool) -> Any:
    if kb._pid != os.getpid():  # a forked child: say so (the lock may have been held by a parent thread at the fork)
        kb._check_process()
    return kb._rw.write() if write or not kb.readonly else kb._rw.read()


def _guard(fn: Any, write: bool) -> Any:
    @functools.wraps(fn)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _lock(self, write):
            return fn(self, *args, **kwargs)

    return guarded


def _guard_iter(fn: Any) -> Any:
    @functools.wraps(fn)
    def guarded(self: Any) -> Iterator[Any]:  # held for the whole iteration: refresh() waits for it to end
        with _lock(self, False):
            yield from fn(self)

    return guarded


def install_thread_guards(cls: type) -> None:
    """Wrap ``cls``'s public reads (and iteration) in the handle's shared lock and its writes in the exclusive one."""
    for name in _READS + _WRITES:
        setattr(cls, name, _guard(getattr(cls, name), name in _WRITES))
    cls.__iter__ = _guard_iter(cls.__iter__)


_OPEN: weakref.WeakSet = weakref.WeakSet()  # this process's open handles
_EXIT_HOOK_PID: int | None = None


def track(kb: Any) -> None:
    """Remember an open handle; in a multiprocessing child, close it when the child exits."""
    global _EXIT_HOOK_PID
    _OPEN.add(kb)
    if _EXIT_HOOK_PID != os.getpid():
        _EXIT_HOOK_PID = os.getpid()
        import multiprocessing
        import multiprocessing.util

        if multiprocessing.parent_process() is not None:
            multiprocessing.util.Finalize(None, _close_open_handles, exitpriority=100)


def _close_open_handles() -> None:
    import threading

    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if others:  # the worker's own threads still run (and may search): leave the handles to them
        return
    for kb in list(_OPEN):
        if getattr(kb, "_pid", None) == os.getpid():
            try:
                kb.close()
            except Exception:  # exiting: a handle that cannot flush keeps its records (the index catches up)
                log.debug("closing %s at exit failed", kb.path, exc_info=True)


def reopen(path: str, ef_search: int | None = None) -> Any:
    """Unpickle a read-only handle: open ``path`` again (with the ``ef_search`` the pickled handle was set to)."""
    from retrofit.knowledge_base import KnowledgeBase

    if not Path(path).exists():
        log.warning("the knowledge base %s that this object was saved with no longer exists: it loads without it "
                    "(attach another with head.attach(retrofit.KnowledgeBase.open(PATH)))", path)
        return MissingKnowledgeBase(path)
    kb = KnowledgeBase.open(path)
    if ef_search is not None:
        kb.ef_search = ef_search
    return kb


class MissingKnowledgeBaseError(KnowledgeBaseError, AttributeError):
    """Use of a :class:`MissingKnowledgeBase` (an AttributeError too: ``getattr(store, name, default)`` and
    ``hasattr`` keep working, e.g. in ``retrofit.wrap``; a search says what happened)."""


class MissingKnowledgeBase:
    """Stands in for an unpickled knowledge base whose files are gone: any use says so and what to do."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        self.path = path
        self.reason = reason  # why a KB that does exist there was not attached (it no longer fits the model)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        what = ("no longer exists" if self.reason is None
                else f"was changed since and no longer fits this model ({self.reason})")
        raise MissingKnowledgeBaseError(
            f"the knowledge base {self.path} that this model was saved with {what}: restore it there, or "
            "attach another with head.attach(retrofit.KnowledgeBase.open(PATH)) (a head's weights never depend on "
            "its KB)")

    def __len__(self) -> int:
        return self.__getattr__("len")

    def __reduce__(self) -> tuple:
        return (reopen, (self.path, None))

    def __repr__(self) -> str:
        return f"MissingKnowledgeBase({self.path!r})"
