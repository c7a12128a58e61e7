"""Reading the member index of a tar shard (webdataset) fast, from a read-only memory map of the file.

A webdataset shard holds a few members per sample; listing a 50,000-sample corpus means ~150,000 tar headers.
Plain ustar headers are parsed straight from the mapped bytes (no read / seek call per header) and their
checksums are verified in bulk with numpy; anything else (GNU long names, pax headers, a damaged header) falls
back to :mod:`tarfile`. A shard cut short or with junk after its last member is refused, not half-read.
"""

from __future__ import annotations

import contextlib
import mmap
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["tar_members", "mapped_file"]

_ZERO_BLOCK = bytes(512)
_CHECK_ROWS = 1 << 16  # headers verified per numpy block (32 MiB of gathered header bytes)


@contextlib.contextmanager
def mapped_file(path: Path) -> Iterator[mmap.mmap | bytes]:
    """The bytes of ``path`` as a read-only memory map (``b""`` for an empty file); slices are copies."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            yield b""
            return
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield buf
    finally:
        buf.close()


def tar_members(path: Path, buf: mmap.mmap | bytes | None = None) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of a tar, in order (``buf``: the file's bytes, if mapped
    already)."""
    if buf is None:
        with mapped_file(path) as b:
            return tar_members(path, b)
    found = _plain_members(buf)
    if found is not None:
        out, end = found
        return _checked_members(path, buf, out, end)
    try:
        with tarfile.open(path, "r:") as tf:  # shards are plain tar
            members = tf.getmembers()  # stops silently at a damaged header: the end check below catches it
    except tarfile.TarError as e:
        raise ValueError(f"shard {path} is not a readable tar file ({e})") from None
    end = max((m.offset_data + (m.size + 511) // 512 * 512 for m in members), default=0)
    return _checked_members(path, buf, [(m.name, m.offset_data, m.size) for m in members if m.isfile()], end)


def _plain_members(buf: mmap.mmap | bytes) -> tuple[list[tuple[str, int, int]], int] | None:
    """The members and the end offset if every header up to the end-of-archive block is a plain ustar / v7
    header with a right checksum; None otherwise (the caller falls back to tarfile)."""
    out: list[tuple[str, int, int]] = []
    heads: list[int] = []
    sums: list[int] = []
    pos, total = 0, len(buf)
    while True:
        h = buf[pos:pos + 512]
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
        heads.append(pos)
        if kind != b"5":
            out.append((f"{prefix}/{name}" if prefix else name, pos + 512, size))
        pos += 512 + (size + 511) // 512 * 512
        if pos > total:  # a member running past the end: _checked_members names it
            break
    return (out, pos) if _checksums_ok(buf, heads, sums) else None


def _checksums_ok(buf: mmap.mmap | bytes, heads: list[int], want: list[int]) -> bool:
    """Every header's checksum: the sum of its bytes with the checksum field read as eight spaces."""
    if not heads:
        return True
    data = np.frombuffer(buf, dtype=np.uint8)  # (file bytes,) a view: released before the map closes
    try:
        cols = np.arange(512)
        for s in range(0, len(heads), _CHECK_ROWS):
            rows = data[np.asarray(heads[s:s + _CHECK_ROWS], dtype=np.int64)[:, None] + cols]  # (n, 512)
            got = rows.sum(1, dtype=np.int64) - rows[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
            if not np.array_equal(got, np.asarray(want[s:s + _CHECK_ROWS], dtype=np.int64)):
                return False
        return True
    finally:
        del data


def _checked_members(path: Path, buf: mmap.mmap | bytes, out: list[tuple[str, int, int]], end: int
                     ) -> list[tuple[str, int, int]]:
    """Refuse a truncated or damaged shard instead of building from part of it: every member must lie inside the
    file, and what follows the last member may only be the zero blocks that end an archive."""
    total = len(buf)
    for name, off, size in out:
        if off + size > total:
            raise ValueError(f"shard {path} is truncated: member {name!r} needs bytes {off}..{off + size} but the file "
                             f"has {total}; copy or download it again")
    if out and end + 512 > total:  # a tar ends with zero blocks: without them it was cut at a member boundary
        raise ValueError(f"shard {path} is truncated: it ends after {len(out)} members without the end-of-archive "
                         "blocks a complete tar has; copy or download it again (or re-create it with tar)")
    tail = buf[end:end + min(max(total - end, 0), 1 << 20)]
    if tail.strip(b"\0"):
        at = end + len(tail) - len(tail.lstrip(b"\0"))
        raise ValueError(f"shard {path} is damaged: unreadable tar data at byte {at} after {len(out)} members; "
                         "copy or download it again")
    return out
