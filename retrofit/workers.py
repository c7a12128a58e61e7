"""DataLoader worker processes that decode images: they follow their parent out, whatever ends it.

Two ways a build or a prediction used to leave workers behind or wait on them:

- Ctrl-C reaches the whole process group: each worker got its own KeyboardInterrupt, left its loop without
  cancelling the join of its result queue, and then hung on exit with undelivered batches in the pipe until the
  parent's shutdown gave up on it (~5 s per worker). Workers now ignore SIGINT, and when the parent stops
  iterating early (Ctrl-C, an error, a ``break``) it terminates them at once instead of waiting for the sample
  each one is decoding.
- ``kill -9`` of the parent left its workers running (holding their share of ``/dev/shm`` and the source files):
  on Linux a worker forked by the main thread asks the kernel for SIGKILL when its parent dies
  (``PR_SET_PDEATHSIG``), and exits at once if the parent died before that request was in place. Elsewhere (other
  systems, the forkserver / spawn start methods, iteration started from another thread, whose exit would fire the
  signal) torch's own watchdog ends an idle worker within seconds of its parent's death.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["decode_loader", "stop_workers", "worker_init"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def worker_init(parent_pid: int, die_with_parent: bool, worker_id: int) -> None:
    """``worker_init_fn`` of retrofit's DataLoaders: ``parent_pid`` is the process iterating the loader;
    ``die_with_parent``: it iterates from its main thread (PR_SET_PDEATHSIG follows the creating thread)."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    if os.getppid() != parent_pid:  # forkserver (another process forked us), or the parent is gone already
        parent = multiprocessing.parent_process()
        if parent is not None and not parent.is_alive():
            os._exit(1)
        return
    if die_with_parent and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: torch's watchdog is left
            return
        if os.getppid() != parent_pid:  # the parent died between our fork and the request
            os._exit(1)


def stop_workers(iterator: Any) -> None:
    """Terminate the worker processes of a DataLoader iterator now: torch's own shutdown would first wait ~5 s
    for each worker still decoding a sample whose batch nobody will read. (Reads torch's ``_workers`` and
    ``_shutdown_workers``; a torch without them is left to shut down on its own.)"""
    for w in getattr(iterator, "_workers", ()):
        if w.is_alive():
            w.terminate()
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


class _DecodeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose iterators bind the iterating process / thread into the workers' init and stop the
    workers as soon as the iteration ends early."""

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers:
            main = threading.current_thread() is threading.main_thread()
            self.worker_init_fn = functools.partial(worker_init, os.getpid(), main)
        return _stopping(super().__iter__())


def _stopping(it: Any) -> Iterator[Any]:
    try:
        yield from it
    finally:  # exhausted, or closed early (an exception in the consumer or in here, a break, garbage collection)
        stop_workers(it)


def decode_loader(refs: Sequence[Any], preprocess: Callable[[Any], Any], *, batch_size: int, num_workers: int,
                  offset: int = 0, prefetch_factor: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader of decoded batches (:func:`retrofit.decode.collate_decoded`) of ``refs[offset:]`` in order,
    whose workers ignore Ctrl-C, are stopped when the iteration ends early and die with their parent."""
    from retrofit.decode import DecodeDataset, collate_decoded

    ds = DecodeDataset(refs, preprocess, offset=offset)
    extra: dict[str, Any] = {}
    if num_workers:
        extra = {"persistent_workers": False}
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return _DecodeLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                         collate_fn=collate_decoded, **extra)
