"""A training run's ``train_log.jsonl``, kept in step with its checkpoint through kills and Ctrl-C.

- A resumed run continues the log of its checkpoint, less the records a kill left past it (:func:`trim_log`).
- A run from scratch in a folder that holds an older log writes to ``train_log.jsonl.new`` until its first
  checkpoint, then renames that over the old log: a run that fails before its first checkpoint leaves the old
  log as it was (with the old checkpoint), and a dead run's records never mix with a new run's. A kill between
  the checkpoint and the rename is finished by the resume: the pending log's start record names the run
  (``run_id``, saved in the checkpoint too).
- :func:`interrupt_after` holds a Ctrl-C until a block of bookkeeping has run, so that its updates happen all or
  none (the optimizer step and its counters, an epoch's record and the move to the next epoch, a log line).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from retrofit._interrupts import interrupt_after
from retrofit.train_checkpoint import trim_log

__all__ = ["TrainLog", "interrupt_after"]

LOG_NAME = "train_log.jsonl"


def _run_id_of(path: Path) -> str | None:
    """The ``run_id`` in the start record (first line) of the log at ``path``, if any."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.readline()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


class TrainLog:
    """The JSON-lines log of a run in ``out`` (None: no log). ``state``: the checkpoint's training state of a
    resumed run (its ``run_id`` is read), or None for a run from scratch (a ``run_id`` is made: :attr:`run_id`)."""

    def __init__(self, out: Path | None, state: dict[str, Any] | None, checkpoint_run_id: str | None = None,
                 has_checkpoint: bool = False) -> None:
        """``checkpoint_run_id``: the run id of the checkpoint in ``out`` (a run from scratch first finishes the log
        switch of the run that checkpoint belongs to, if a kill interrupted it); ``has_checkpoint``: ``out`` holds
        one (a run from scratch keeps its log aside until it replaces it, even when no older log is there)."""
        self.path = out / LOG_NAME if out is not None else None
        self._pending: Path | None = None  # a run from scratch's log, waiting for its first checkpoint
        self.run_id = state.get("run_id") if state is not None else uuid.uuid4().hex
        self._f = None
        if self.path is None:
            return
        new = self.path.with_name(LOG_NAME + ".new")
        owner = self.run_id if state is not None else checkpoint_run_id  # the run the checkpoint in out belongs to
        if new.is_file():  # a run from scratch killed between its first checkpoint and its log's rename: finished
            if owner is not None and _run_id_of(new) == owner:  # now (a later run from scratch wiped it)
                os.replace(new, self.path)
            else:  # a run that died before its first checkpoint: not the checkpoint's
                new.unlink()
        if state is not None:  # resumed
            trim_log(self.path, state["epoch"], state["global_step"])
            self._f = open(self.path, "a")
        elif has_checkpoint or (self.path.is_file() and self.path.stat().st_size):
            self._pending = new
            self._f = open(new, "w")
        else:
            self._f = open(self.path, "w")

    def write(self, rec: dict[str, Any] | str) -> None:
        if self._f is not None:
            self._f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
            self._f.flush()

    def checkpointed(self) -> None:
        """Call after each checkpoint save: the first one of a run from scratch makes its log the log."""
        if self._pending is None or self._f is None:
            return
        with interrupt_after():
            self._f.close()
            os.replace(self._pending, self.path)
            self._f, self._pending = open(self.path, "a"), None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
