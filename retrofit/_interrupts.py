"""Holding a Ctrl-C (SIGINT) until a block of bookkeeping has run: :class:`interrupt_after`.

Training uses it around the updates that must happen all or none (an optimizer step and its counters, an epoch's
record and the move to the next epoch, a log line, the last checkpoint written after a first Ctrl-C). One
process-wide holder replaces the SIGINT handler while any block is open; blocks may nest, or interleave across
asyncio tasks. When the last one closes, the previous handler comes back and gets each held signal, in order:
Python's default handler raises KeyboardInterrupt, ``asyncio.run``'s cancels its task on the first and raises on
the second. A third Ctrl-C while held goes through at once (a save stuck on a full disk can still be stopped; the
second prints that). A block inside a generator that is dropped unfinished is closed by its finalizer, where
Python only prints an exception: a Ctrl-C it held is then printed ("Exception ignored ... KeyboardInterrupt") and
lost; an explicit ``close()`` raises it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import TracebackType
from typing import Any

__all__ = ["interrupt_after"]

_PASS_THROUGH = 3  # the held Ctrl-C that is let through at once


class _Held:
    """The holder's state: open blocks, the handler it replaced (kept until that is back), the signals held."""

    depth = 0
    prev: Any = None
    signals: list[tuple[int, Any]] = []
    generation = 0  # bumped in a forked child: blocks opened before the fork are not its bookkeeping

    @staticmethod
    def hold(signum: int, frame: Any) -> None:
        _Held.signals.append((signum, frame))
        if len(_Held.signals) == _PASS_THROUGH - 1:
            sys.stderr.write("Ctrl-C: held until the step or checkpoint being written is complete; press it again "
                             "to stop at once (that write is then lost)\n")
        elif len(_Held.signals) >= _PASS_THROUGH:
            # the user insists: the handler as it was, and every press to it now (asyncio's raises on its second)
            prev, held, _Held.signals = _Held.prev, _Held.signals, []
            signal.signal(signal.SIGINT, prev)
            for s, f in held:
                prev(s, f)


def _forked_child() -> None:
    """A child forked inside a block: its SIGINT handler is the parent's holder, and its blocks are the parent's."""
    try:
        if _Held.depth and signal.getsignal(signal.SIGINT) is _Held.hold:
            signal.signal(signal.SIGINT, _Held.prev)
    except (ValueError, OSError):  # (not the main thread)
        pass
    _Held.depth, _Held.prev, _Held.signals = 0, None, []
    _Held.generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)


class interrupt_after:
    """Hold a Ctrl-C (SIGINT) until the block has run, then hand it to the handler that was there: the block's
    updates happen all or none (see the module docstring). A block left by a KeyboardInterrupt (a third Ctrl-C)
    drops the others held; any other exception does not stop their delivery (the module docstring says what a
    generator dropped unfinished does). Only the main thread receives signals; elsewhere, and where SIGINT is
    ignored or not handled by Python, the block runs as it is. A generator suspended inside a block holds Ctrl-C
    until it finishes or is closed. Used as a function: ``with interrupt_after(): ...``."""

    def __enter__(self) -> interrupt_after:
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return self
        current = signal.getsignal(signal.SIGINT)
        if current is not _Held.hold:  # (is: an open block's, or one a block closed in another thread left)
            if callable(current):  # at depth 0, or after a pass-through or a handler set inside an open block
                _Held.prev = current
                if _Held.depth == 0:
                    _Held.signals = []
                signal.signal(signal.SIGINT, _Held.hold)
            elif _Held.depth == 0:
                return self
        _Held.depth += 1
        self._active, self._generation = True, _Held.generation
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._active or self._generation != _Held.generation:
            return
        _Held.depth -= 1
        if _Held.depth or threading.current_thread() is not threading.main_thread():
            return  # (closed in another thread, by a generator's finalizer: the next block here restores)
        prev = _Held.prev if _Held.prev is not None else signal.default_int_handler
        if signal.getsignal(signal.SIGINT) is _Held.hold:  # (a handler set inside the block stays)
            signal.signal(signal.SIGINT, prev)  # first: a Ctrl-C from here on goes to it, none is lost in between
        held, _Held.signals, _Held.prev = _Held.signals, [], None
        if not held or (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)):
            return
        for signum, frame in held:
            prev(signum, frame)
