"""CLI subcommands of ``retrofit`` (registered by :mod:`retrofit.cli`), and what they share."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; a user error (bad value, missing file, a :class:`retrofit.errors.RetrofitError`) prints
    ``error: ...`` on stderr and exits 1 instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        from retrofit.errors import RetrofitError

        try:
            return fn(args)
        except (RetrofitError, ValueError, FileNotFoundError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    run.__name__ = getattr(fn, "__name__", "run")
    run.__doc__ = fn.__doc__
    return run
