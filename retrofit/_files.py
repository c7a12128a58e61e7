"""Files retrofit writes get the permissions the user's umask gives any new file (0644 under umask 022), so a head
trained by one account can be served by another and a shared feature cache is readable by every run.
``safetensors.save_file`` creates its files owner-only (0600) and ``tempfile.mkdtemp`` its folders 0700: both are
widened here to what ``open()`` / ``mkdir()`` would have made."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["save_tensors", "as_umask_allows"]


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` sets it, a race with
    other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: str | os.PathLike, directory: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open()`` (a file) or ``mkdir()`` (a folder) would have given it."""
    path = Path(path)
    directory = path.is_dir() if directory is None else directory
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def save_tensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with the file's mode as the umask allows (not 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    as_umask_allows(path, directory=False)
