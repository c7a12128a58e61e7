"""Reading the member index of a tar shard (webdataset) fast, through one large read buffer.

A webdataset shard holds a few members per sample; listing a 50,000-sample corpus means ~150,000 tar headers.
Plain ustar headers are parsed from a 64 KiB block buffer (no read / seek call per header; a memory map would be
faster still, but a shard truncated while mapped kills the process with SIGBUS) and their checksums verified with
numpy, a few thousand headers at a time; anything else (GNU long names, pax headers, a damaged header) falls back
to :mod:`tarfile`. A shard cut short or with junk after its last member is refused, not half-read.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["tar_members", "open_shard", "ShardReader"]

_ZERO_BLOCK = bytes(512)
_CHECK_ROWS = 4096  # headers whose checksums are verified together (2 MiB)


class ShardReader:
    """Byte ranges of a file, served from one block buffer: sequential small reads (headers, captions, labels) cost
    no system call each, and a header after a large member reads one block, not the member. ``len(reader)`` is the
    file's size when opened; a file that gets shorter while it is read is refused (ValueError)."""

    BLOCK = 64 << 10

    def __init__(self, f: BinaryIO, name: str = "") -> None:
        self.f, self.name = f, name or getattr(f, "name", "?")
        self.size = os.fstat(f.fileno()).st_size
        self.start, self.buf = 0, b""

    def __len__(self) -> int:
        return self.size

    def read(self, offset: int, n: int) -> bytes:
        """Bytes ``offset .. offset + n`` (fewer past the end of the file as it was opened)."""
        rel = offset - self.start
        if 0 <= rel and rel + n <= len(self.buf):
            return self.buf[rel:rel + n]
        self.f.seek(offset)
        if n > self.BLOCK // 2:  # a large member: read it alone, keep the buffer
            out = self.f.read(n)
        else:
            self.start, self.buf = offset, self.f.read(self.BLOCK)
            out = self.buf[:n]
        if len(out) < min(n, self.size - offset):
            raise ValueError(f"shard {self.name} got shorter while it was read (it had {self.size} bytes): it is "
                             "being rewritten or was cut; copy or download it again")
        return out


@contextlib.contextmanager
def open_shard(path: Path) -> Iterator[ShardReader]:
    """A :class:`ShardReader` of ``path``, closed on exit."""
    with open(path, "rb") as f:
        yield ShardReader(f, str(path))


def tar_members(path: Path, reader: ShardReader | None = None) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of a tar, in order (``reader``: the file, if open already)."""
    if reader is None:
        with open_shard(path) as r:
            return tar_members(path, r)
    found = _plain_members(reader)
    if found is not None:
        out, end = found
        return _checked_members(path, reader, out, end)
    try:
        with tarfile.open(path, "r:") as tf:  # shards are plain tar
            members = tf.getmembers()  # stops silently at a damaged header: the end check below catches it
    except tarfile.TarError as e:
        raise ValueError(f"shard {path} is not a readable tar file ({e})") from None
    end = max((m.offset_data + (m.size + 511) // 512 * 512 for m in members), default=0)
    return _checked_members(path, reader, [(m.name, m.offset_data, m.size) for m in members if m.isfile()], end)


def _plain_members(reader: ShardReader) -> tuple[list[tuple[str, int, int]], int] | None:
    """The members and the end offset if every header up to the end-of-archive block is a plain ustar / v7
    header with a right checksum; None otherwise (the caller falls back to tarfile)."""
    out: list[tuple[str, int, int]] = []
    heads: list[bytes] = []
    sums: list[int] = []
    pos, total = 0, len(reader)
    while True:
        h = reader.read(pos, 512)
        if len(h) < 512 or h == _ZERO_BLOCK:
            break
        kind, magic = h[156:157], h[257:262]
        if kind not in (b"0", b"\0", b"5") or magic not in (b"ustar", b"\0\0\0\0\0"):
            return None  # not a plain header: let tarfile handle the whole archive
        try:  # damaged fields (bad octal, bad UTF-8): tarfile decides
            size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            sums.append(int(h[148:156].split(b"\0", 1)[0].strip() or b"-1", 8))
            name = h[0:100].split(b"\0", 1)[0].decode()
            prefix = h[345:500].split(b"\0", 1)[0].decode() if magic == b"ustar" and h[345] else ""
        except ValueError:
            return None
        if size < 0:
            return None
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"  # an old (v7) directory entry: a regular-file type with a trailing slash, as tarfile reads it
        heads.append(h)
        if len(heads) == _CHECK_ROWS:
            if not _checksums_ok(heads, sums):
                return None
            heads, sums = [], []
        if kind != b"5":
            out.append((f"{prefix}/{name}" if prefix else name, pos + 512, size))
        pos += 512 + (size + 511) // 512 * 512
        if pos > total:  # a member running past the end: _checked_members names it
            break
    return (out, pos) if _checksums_ok(heads, sums) else None


def _checksums_ok(heads: list[bytes], want: list[int]) -> bool:
    """Every header's checksum: the sum of its bytes with the checksum field read as eight spaces."""
    if not heads:
        return True
    rows = np.frombuffer(b"".join(heads), dtype=np.uint8).reshape(len(heads), 512)
    got = rows.sum(1, dtype=np.int64) - rows[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
    return bool(np.array_equal(got, np.asarray(want, dtype=np.int64)))


def _checked_members(path: Path, reader: ShardReader, out: list[tuple[str, int, int]], end: int
                     ) -> list[tuple[str, int, int]]:
    """Refuse a truncated or damaged shard instead of building from part of it: every member must lie inside the
    file, and what follows the last member may only be the zero blocks that end an archive."""
    total = len(reader)
    for name, off, size in out:
        if off + size > total:
            raise ValueError(f"shard {path} is truncated: member {name!r} needs bytes {off}..{off + size} but the file "
                             f"has {total}; copy or download it again")
    if out and end + 512 > total:  # a tar ends with zero blocks: without them it was cut at a member boundary
        raise ValueError(f"shard {path} is truncated: it ends after {len(out)} members without the end-of-archive "
                         "blocks a complete tar has; copy or download it again (or re-create it with tar)")
    tail = reader.read(end, min(max(total - end, 0), 1 << 20))
    if tail.strip(b"\0"):
        at = end + len(tail) - len(tail.lstrip(b"\0"))
        raise ValueError(f"shard {path} is damaged: unreadable tar data at byte {at} after {len(out)} members; "
                         "copy or download it again")
    return out
