"""DataLoader worker processes that decode images: they follow their parent out, whatever ends it.

Two ways a build or a prediction used to leave workers behind or wait on them:

- Ctrl-C reaches the whole process group: each worker got its own KeyboardInterrupt, left its loop without
  cancelling the join of its result queue, and then hung on exit with undelivered batches in the pipe until the
  parent's shutdown gave up on it (~5 s per worker). Workers now ignore SIGINT; the parent alone handles it and
  shuts them down cleanly.
- ``kill -9`` of the parent left its workers running (holding their share of ``/dev/shm`` and the source files):
  on Linux every worker asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), and exits at
  once if the parent died before that request was in place.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["decode_loader", "worker_init"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def worker_init(parent_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of retrofit's DataLoaders (bind ``parent_pid`` with :func:`functools.partial`)."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts the workers down
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the worker outlives a killed parent, as before
            pass
    if os.getppid() != parent_pid:  # the parent died before the request above was made
        os._exit(1)


def decode_loader(refs: Sequence[Any], preprocess: Callable[[Any], Any], *, batch_size: int, num_workers: int,
                  offset: int = 0, prefetch_factor: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader of decoded batches (:func:`retrofit.sources.collate_decoded`) of ``refs[offset:]`` in order,
    whose workers ignore Ctrl-C and die with their parent."""
    from retrofit.sources import DecodeDataset, collate_decoded

    ds = DecodeDataset(refs, preprocess, offset=offset)
    extra: dict[str, Any] = {}
    if num_workers:
        extra = {"worker_init_fn": functools.partial(worker_init, os.getpid()), "persistent_workers": False}
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate_decoded, **extra)
