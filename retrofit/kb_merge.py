"""Merging knowledge bases built with the same encoders (``merge_kbs``; ``retrofit kb merge``).

The merged KB is written under a temporary name next to ``out`` and renamed into place only when it is
complete, so an error, a crash or a kill never leaves a partial KB at ``out``; the inputs are only read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from retrofit.errors import FingerprintMismatchError, RetrofitError

__all__ = ["merge_kbs"]


def _add_records(dst: Any, recs: list[dict[str, Any]]) -> int:
    """Append records as ``KnowledgeBase.get(..., vectors=True)`` returns them; empties ``recs``."""
    n = len(recs)
    if n:
        dst.add(torch.stack([r["key"] for r in recs]), torch.stack([r["image"] for r in recs]),
                torch.stack([r["text"] for r in recs]), labels=torch.tensor([r["label"] for r in recs]),
                captions=[r.get("caption") for r in recs], sources=[r.get("source") for r in recs])
        recs.clear()
    return n


def _check_compatible(inputs: list[str | Path], kbs: list[Any]) -> None:
    first = kbs[0]
    for p, kb in zip(inputs[1:], kbs[1:]):
        for part in ("key", "image", "text"):
            a, b = getattr(first.fingerprint, part), getattr(kb.fingerprint, part)
            if (a is None) != (b is None) or (a is not None and not a.matches(b)):
                raise FingerprintMismatchError(f"cannot merge: {part} vectors of {inputs[0]} come from {a}, those "
                                               f"of {p} from {b}; rebuild one with the other's encoders")
        if (first.key_dim, first.image_dim, first.text_dim) != (kb.key_dim, kb.image_dim, kb.text_dim):
            raise RetrofitError(f"cannot merge {inputs[0]} and {p}: dimensions differ")
        if first.class_names != kb.class_names:
            raise RetrofitError(f"cannot merge: {inputs[0]} has classes {first.class_names}, {p} has "
                                f"{kb.class_names}; rebuild with the same class_names"
                                + (" (or record the list a knowledge base lacks: `retrofit kb classes PATH --set "
                                   "FILE`, KnowledgeBase.set_class_names)"
                                   if None in (first.class_names, kb.class_names) else ""))


@contextlib.contextmanager
def _one_merge_into(out: Path) -> Iterator[None]:
    """One merge into ``out`` at a time (a lock file beside it): a second one used to delete the first's work in
    progress as a killed merge's leftover, and the first then reported success for a broken KB."""
    import fcntl

    lock = out.with_name(f".{out.name}.merging.lock")
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(str(lock), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RetrofitError(f"another merge into {out} is running (it writes .{out.name}.merging beside it); "
                                "wait for it, or choose another output path") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # the lock file at the path (not one a finishing merge unlinked after we opened it)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # while still held: a merge that opened it before gets no lock
    finally:
        os.close(fd)


def merge_kbs(inputs: list[str | Path], out: str | Path, *, dedup: bool = True, batch: int = 4096,
              progress: bool = True, whiten: float | None = None) -> Any:
    """Combine KBs built with the same encoders into a new KB at ``out`` (ids renumbered, input order kept);
    returns a :class:`retrofit.ingest.BuildSummary`.

    Refuses inputs whose fingerprints, dimensions or class lists differ, and an ``out`` that already exists. The
    new KB takes the first input's storage dtype, index settings (kind, M, HNSW storage, efConstruction, a fixed
    efSearch, recall target, key whitening) and recorded encoder specs; ``whiten`` sets the key whitening of the
    new index instead (0 = none, > 0 = the shrinkage, :mod:`retrofit.kb_whiten`; fitted on the merged keys), the
    index that ``kb.compact(whiten=...)`` would rebuild afterwards, built once.
    ``dedup`` drops records whose image hash (recorded at build time) was already merged. ``out`` appears
    only when the merge is complete (written as ``.<name>.merging`` beside it, then renamed).
    """
    from tqdm.auto import tqdm

    from retrofit.ingest import BuildSummary, _hash_of_source
    from retrofit.knowledge_base import KnowledgeBase

    if len(inputs) < 2:
        raise ValueError(f"merge needs at least two knowledge bases, got {len(inputs)}")
    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if whiten is not None:
        from retrofit.kb_whiten import check_shrinkage

        whiten = check_shrinkage(whiten)  # ValueError naming the value, before anything is written
    out = Path(out)
    with _one_merge_into(out):
        if out.exists():
            raise RetrofitError(f"{out} already exists; merge writes a new knowledge base: remove it or choose "
                                "another output path")
        tmp = out.with_name(f".{out.name}.merging")
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an earlier merge that was killed
        t0 = time.perf_counter()
        kbs = [KnowledgeBase.open(p) for p in inputs]
        try:
            _check_compatible(inputs, kbs)
            for p, kb in zip(inputs, kbs):  # the merge would store damaged records under fresh, valid checksums
                bad = kb._damaged_live()
                if bad:
                    from retrofit.errors import CorruptKnowledgeBaseError
                    from retrofit.kb_maint import _ranges

                    ids = " ".join(r for live in bad.values() for r in _ranges(live))
                    raise CorruptKnowledgeBaseError(
                        f"{p}: record chunks {sorted(bad)} are damaged on disk (live records {ids}); nothing was "
                        f"merged. Restore it from a copy, or drop those records (`retrofit kb delete {p} {ids}` and "
                        f"`retrofit kb compact {p}`) and merge again")
            first = kbs[0]
            total = sum(len(kb) for kb in kbs)
            written = dups = 0
            seen: set[str] = set()
            from retrofit.ingest import SPECS_KEY

            specs = first.user_meta.get(SPECS_KEY)  # same encoders in every input (checked): `kb add` can use them
            info = first.info()  # the first input's storage and index settings carry over
            c = info["index"]["config"]
            settings = dict(dtype=info["dtype"], index=c["kind"], hnsw_m=c["hnsw_m"], hnsw_storage=c["hnsw_storage"],
                            ef_construction=c["ef_construction"], ef_search=c["ef_search"],
                            recall_target=c["recall_target"], flat_threshold=c["flat_threshold"],
                            mmap_bytes=c["mmap_bytes"], whiten=c.get("whiten", 0.0) if whiten is None else whiten)
            with KnowledgeBase.create(tmp, first.key_dim, first.image_dim, first.text_dim, first.fingerprint,
                                      class_names=first.class_names, **settings,
                                      user_meta={SPECS_KEY: specs} if specs else None) as dst, dst.bulk():
                bar = tqdm(total=total, unit="rec", desc="kb merge", disable=not progress)
                for kb in kbs:
                    buf: list[dict[str, Any]] = []
                    for r in kb:  # live records in id order, with vectors
                        bar.update(1)
                        h = _hash_of_source(r.get("source"))
                        if dedup and h is not None and h in seen:
                            dups += 1
                            continue
                        if h is not None:
                            seen.add(h)
                        buf.append(r)
                        if len(buf) >= batch:
                            written += _add_records(dst, buf)
                    written += _add_records(dst, buf)
                bar.close()
                size = len(dst)
            os.replace(tmp, out)  # the complete KB appears at once
            from retrofit.kb_index import fsync_dir

            fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            for kb in kbs:
                kb.close()
    secs = time.perf_counter() - t0
    return BuildSummary(str(out), total, written, 0, dups, 0, secs, 0.0, total / max(secs, 1e-9), 0, "",
                        kb_size=size)
