"""A readers-writer lock for one ``KnowledgeBase`` handle shared by threads.

Many threads may search a read-only handle at once (faiss releases the GIL), but ``refresh()`` swaps the LMDB
snapshot and the index under them, and a writer's ``add`` grows the faiss index that a search walks: those take
the lock exclusively. Both modes are re-entrant in the thread that holds them (the handle's methods call each
other), and a waiting writer holds back new readers so that a steady stream of searches cannot starve it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RWLock"]


class RWLock:
    """Shared (``read()``) or exclusive (``write()``) access; context managers, re-entrant per thread."""

    def __init__(self) -> None:
        # taken with ``with self._lock`` (C code throughout): Python checks for signals where a Python-level
        # __exit__ starts, so a Ctrl-C in Condition.__exit__ could leave the lock itself held (a hang). An RLock
        # (never re-entered here): Condition.wait re-takes it in C, where a plain Lock's re-take is Python and a
        # second Ctrl-C could skip it (the release after would then free a lock not held)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._readers = 0  # threads holding the shared mode
        self._writer: int | None = None  # thread holding the exclusive mode
        self._depth = 0  # its nesting depth
        self._waiting = 0  # writers waiting: new readers queue behind them
        self._mine = threading.local()  # this thread's shared-mode nesting depth

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        taken = None  # what this call took, set in the same locked block as the counts (released in the finally):
        try:  # an exception (a Ctrl-C) between taking and the try left a read hold behind for good
            with self._lock:
                if self._writer == me:  # the writer reads: already exclusive
                    self._depth += 1
                    taken = "write"
                else:
                    n = getattr(self._mine, "n", 0)
                    if n == 0:  # a thread that already reads goes on (waiting for a writer would deadlock it)
                        while self._writer is not None or self._waiting:
                            self._cond.wait()
                        self._readers += 1
                    self._mine.n = n + 1
                    taken = "read"
            yield
        finally:
            if taken is not None:
                with self._lock:
                    if taken == "write":
                        self._depth -= 1
                    else:
                        self._mine.n -= 1
                        if self._mine.n == 0:
                            self._readers -= 1
                            if self._readers == 0:
                                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        taken = False
        try:
            with self._lock:
                if self._writer == me:
                    self._depth += 1
                else:
                    if getattr(self._mine, "n", 0):
                        raise RuntimeError("a thread that holds a knowledge base's read lock cannot take its write "
                                           "lock: a refresh() (or write) while this thread iterates or searches the "
                                           "handle; finish or close the iteration first")
                    self._waiting += 1
                    try:
                        while self._writer is not None or self._readers:
                            self._cond.wait()
                    finally:
                        self._waiting -= 1
                        if not self._waiting:  # (a writer that gave up, a Ctrl-C: the readers queued behind it go)
                            self._cond.notify_all()
                    self._writer, self._depth = me, 1
                taken = True
            yield
        finally:
            if taken:
                with self._lock:
                    self._depth -= 1
                    if self._depth == 0:
                        self._writer = None
                        self._cond.notify_all()
