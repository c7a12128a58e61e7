"""CLI subcommands of ``retrofit`` (registered by :mod:`retrofit.cli`), and what they share."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

Command = Callable[[argparse.Namespace], int]


def _message(e: BaseException) -> str:
    """The error's text; a KeyError's quoted repr (``'name'``) loses its quotes, nothing else is cut. The OS's own
    wording of a path error (``[Errno 20] Not a directory: 'cat.jpg/kb/records'``) says what is wrong with the
    path and what to do instead."""
    text = getattr(e, "cli_message", None) or str(e)  # (a FingerprintMismatchError names the flag, not the keyword)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and isinstance(e, KeyError):
        text = text[1:-1]
    if isinstance(e, _PATH_ERRORS) and text.startswith("[Errno") and e.filename is not None:
        return _path_message(e)
    return text


def _path_message(e: OSError) -> str:
    from pathlib import Path

    name = str(e.filename)
    if isinstance(e, NotADirectoryError):
        parts = [p for p in (Path(name), *Path(name).parents) if p.is_file()]
        what = f"{parts[-1]} is a file" if parts else "a part of it is a file"
        return f"cannot use the path {name}: {what}, not a folder; give a path whose folders are folders"
    if isinstance(e, FileExistsError):
        kind = "a file" if Path(name).is_file() else "a folder" if Path(name).is_dir() else "something"
        return f"cannot create {name}: {kind} of that name already exists; give a new path"
    if isinstance(e, IsADirectoryError):
        return f"{name} is a folder, where a file is needed; give a file path"
    return f"{name}: permission denied ({e.strerror}); give a path this user may write, or change its permissions"


def _disk_full(e: BaseException) -> bool:
    """A full disk (or quota) anywhere in the exception chain: OSError ENOSPC / EDQUOT, or the text faiss and LMDB
    give for it."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "MDB_MAP_FULL" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def manifest_column_args(p: argparse.ArgumentParser, caption: bool = False) -> None:
    """--image-column / --label-column (and --caption-column) for commands that read CSV / JSONL / Parquet
    manifests; unset, the usual names are looked for (image, path, filename ...; label, class, target ...)."""
    p.add_argument("--image-column", default=None, metavar="NAME",
                   help="manifest column with the image path (default: image, path, filepath, filename, file ...)")
    if caption:
        p.add_argument("--caption-column", default=None, metavar="NAME",
                       help="manifest column with the caption (default: caption, text, title or description)")
    p.add_argument("--label-column", default=None, metavar="NAME",
                   help="manifest column with the label, index or name (default: label, class, category, target ...)")


def manifest_columns(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest_source() keyword arguments of the column options given."""
    return {k: v for k, v in (("image_col", getattr(args, "image_column", None)),
                              ("caption_col", getattr(args, "caption_column", None)),
                              ("label_col", getattr(args, "label_column", None))) if v is not None}


def at_least_one(value: str) -> int:
    """argparse ``type=`` for counts that must be >= 1 (batch sizes, --top): the usage error names the value."""
    return _int_at_least(value, 1)


def nonnegative(value: str) -> int:
    """argparse ``type=`` for counts that may be 0 (--workers)."""
    return _int_at_least(value, 0)


def _int_at_least(value: str, low: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = low - 1
    if n < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value!r}")
    return n


# a path that is a file where a folder is needed (or the reverse), or not writable: the user's to fix
_PATH_ERRORS = (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


def guarded(fn: Command | None = None, *, also: tuple[type[BaseException], ...] = ()) -> Any:
    """Decorate a command so that a user error prints ``error: ...`` on stderr and exits 1 instead of a
    traceback: a :class:`retrofit.errors.RetrofitError`, ``ValueError`` or ``FileNotFoundError``, plus the
    exception types in ``also``. Use as ``@guarded`` or ``@guarded(also=(KeyError,))``."""

    def wrap(f: Command) -> Command:
        def run(args: argparse.Namespace) -> int:
            from retrofit.errors import RetrofitError

            try:
                return f(args)
            except (RetrofitError, ValueError, FileNotFoundError, *_PATH_ERRORS, *also) as e:
                logging.getLogger("retrofit.cli").debug("the error's traceback (-vv):", exc_info=True)
                print(f"error: {_message(e)}", file=sys.stderr)
                return 1
            except Exception as e:
                if not _disk_full(e):
                    raise
                logging.getLogger("retrofit.cli").debug("the error's traceback (-vv):", exc_info=True)
                print(f"error: the disk refused a write ({_message(e)}): free space (or give another path) and run "
                      "the same command again; what was committed is kept and builds resume", file=sys.stderr)
                return 1

        run.__name__ = getattr(f, "__name__", "run")
        run.__doc__ = f.__doc__
        return run

    return wrap if fn is None else wrap(fn)
