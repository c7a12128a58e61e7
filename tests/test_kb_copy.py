"""``copy_kb`` / ``retrofit kb copy``: a compacted copy of a real LMDB + faiss knowledge base gives the space of
deleted records back and keeps everything else (ids, tombstones, captions, labels, search results, damage)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrofit.errors import RetrofitError
from retrofit.kb_copy import copy_kb
from retrofit.knowledge_base import KnowledgeBase

DK, DI, DT = 16, 12, 8


def _add(kb, start: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(start, start + n)
    kb.add(torch.nn.functional.normalize(torch.randn(n, DK, generator=g), dim=1), torch.randn(n, DI, generator=g),
           torch.randn(n, DT, generator=g), labels=ids % 7, captions=[f"record {i}" for i in ids.tolist()])


def _kb(path, n=3000, index="hnsw"):
    with KnowledgeBase.create(path, DK, DI, DT, index=index, flat_threshold=100, hnsw_m=8, ef_construction=32,
                              chunk_records=64, user_meta={"owner": "test"}) as kb:
        _add(kb, 0, n, seed=0)


def _same_kb(a: KnowledgeBase, b: KnowledgeBase, ids: list[int]) -> None:
    assert len(a) == len(b) and a.info()["index"]["ntotal"] == b.info()["index"]["ntotal"]
    assert a.user_meta == b.user_meta and a.fingerprint == b.fingerprint and a.dtype == b.dtype
    for ra, rb in zip(a.get(ids, vectors=True), b.get(ids, vectors=True)):
        assert ra["id"] == rb["id"] and ra["label"] == rb["label"] and ra["caption"] == rb["caption"]
        for part in ("key", "image", "text"):
            assert torch.equal(ra[part], rb[part])
    q = a.vectors(torch.tensor(ids), "key")
    na, nb = a.search(q, 10), b.search(q, 10)
    assert torch.equal(na.ids, nb.ids) and torch.equal(na.scores, nb.scores)


def test_copy_after_deleting_most_records_is_smaller_and_the_same_kb(tmp_path):
    src, out = tmp_path / "kb", tmp_path / "copy"
    _kb(src)
    with KnowledgeBase.open(src, readonly=False) as kb:
        kb.delete(list(range(0, 2600)) + list(range(2601, 3000, 2)))
        kb.compact()
    size_before = (src / "records" / "data.mdb").stat().st_size
    with KnowledgeBase.open(src) as kb:
        free_before = kb.info()["bytes"]["records_free"]
    assert free_before > 0.5 * size_before  # what `kb info` reports as free and `kb copy` gives back
    s = copy_kb(src, out)
    assert s.records == 200  # ids 2600 and the even ids 2602..2998
    assert s.index_reused and s.source_bytes == size_before
    assert s.copy_bytes == (out / "records" / "data.mdb").stat().st_size
    assert s.copy_bytes < 0.4 * size_before, (s.copy_bytes, size_before)  # the deleted records' pages are gone
    assert (src / "records" / "data.mdb").stat().st_size == size_before  # the source is only read
    with KnowledgeBase.open(src) as a, KnowledgeBase.open(out) as b:
        _same_kb(a, b, [2600, 2602, 2998])
        assert b.verify()["ok"]
        assert b.info()["bytes"]["records_free"] < 3 * 4096  # nothing left to give back
        assert s.copy_bytes >= size_before - free_before  # every page in use was copied
        with pytest.raises(KeyError):  # deleted ids stay deleted (tombstones copied)
            b.get([5])
    with KnowledgeBase.open(out, readonly=False) as b:  # the copy is a normal KB: ids continue after the source's
        _add(b, 3000, 5, seed=1)
        assert len(b) == 205 and b.get([3004])[0]["caption"] == "record 3004"


def test_copy_catches_up_an_index_behind_its_records(tmp_path):
    """Records added by a writer that has not saved the index yet: the copy's index covers them too."""
    src, out = tmp_path / "kb", tmp_path / "copy"
    _kb(src, n=500)
    with KnowledgeBase.open(src, readonly=False) as w:
        _add(w, 500, 50, seed=3)  # committed records, index file not yet saved
        s = copy_kb(src, out)
        assert s.records == 550 and not s.index_reused
        with KnowledgeBase.open(out) as b:
            assert b.info()["index"]["ntotal"] == 550
            hit = b.search(w.vectors(torch.tensor([520]), "key"), 1).ids
            assert hit.tolist() == [[520]]


def test_a_failed_copy_leaves_nothing_and_a_killed_one_is_cleaned_up(tmp_path, monkeypatch):
    src, out = tmp_path / "kb", tmp_path / "copy"
    _kb(src, n=200, index="flat")

    import os

    def broken(fd):  # the disk fails while the copied files are synced
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"):
        copy_kb(src, out)
    assert not out.exists() and not (tmp_path / ".copy.copying").exists()
    monkeypatch.undo()
    left = tmp_path / ".copy.copying"  # what a killed copy leaves: its (no longer held) lock file and partial files
    (left / "records").mkdir(parents=True)
    (left / "records" / "data.mdb").write_bytes(b"partial")
    (left / ".kb-copy.lock").write_bytes(b"")
    assert copy_kb(src, out).records == 200
    assert not left.exists() and not (out / ".kb-copy.lock").exists()
    with KnowledgeBase.open(src) as a, KnowledgeBase.open(out) as b:
        _same_kb(a, b, [0, 199])


def test_copy_refuses_an_existing_output_and_a_missing_source(tmp_path):
    src = tmp_path / "kb"
    _kb(src, n=50, index="flat")
    (tmp_path / "taken").mkdir()
    with pytest.raises(RetrofitError, match="taken already exists"):
        copy_kb(src, tmp_path / "taken")
    with pytest.raises(RetrofitError, match="does not exist"):
        copy_kb(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.copying").exists()


def test_a_damaged_chunk_stays_visible_in_the_copy(tmp_path):
    """The copy moves bytes and their checksums as they are: verify still finds the damage (a merge would refuse
    it; storing it under a fresh checksum would hide it)."""
    src, out = tmp_path / "kb", tmp_path / "copy"
    with KnowledgeBase.create(src, 8, 12, 4, chunk_records=16, index="flat") as kb:
        image = torch.randn(40, 12)
        image[21] = 0.3
        kb.add(torch.nn.functional.normalize(torch.randn(40, 8), dim=1), image, torch.randn(40, 4))
    f = src / "records" / "data.mdb"
    raw = bytearray(f.read_bytes())
    raw[raw.find(np.full(12, 0.3, dtype=np.float16).tobytes()) + 6] ^= 0x01  # record 21, chunk 1
    f.write_bytes(bytes(raw))
    copy_kb(src, out)
    report = KnowledgeBase.verify_path(out)
    assert not report["ok"] and report["problems"][0].startswith("chunk 1 (records 16..31)")


def test_cli_kb_copy(tmp_path, capsys):
    from retrofit.cli import main

    src = tmp_path / "kb"
    _kb(src, n=300, index="flat")
    with KnowledgeBase.open(src, readonly=False) as kb:
        kb.delete(list(range(250)))
        kb.compact()
    assert main(["kb", "copy", str(src), "-o", str(tmp_path / "c"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["records"] == 50 and rec["path"] == str(tmp_path / "c") and rec["copy_bytes"] > 0
    assert main(["kb", "info", str(src)]) == 0
    assert f"retrofit kb copy {src} -o NEW" in capsys.readouterr().out  # info says the space can be given back
    assert main(["kb", "copy", str(src), "-o", str(tmp_path / "c")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_copy_never_removes_what_is_not_its_own_leftover(tmp_path):
    """A directory at the temporary name without the copy's lock file (e.g. a KB someone keeps there, or the source
    itself) is refused, never removed; a copy in progress (lock held) makes a second copy to the same output fail."""
    import fcntl
    import os

    src = tmp_path / ".c.copying"  # the source sits where a copy to c would write
    _kb(src, n=30, index="flat")
    with pytest.raises(RetrofitError, match="is \\(inside\\)"):
        copy_kb(src, tmp_path / "c")
    other = tmp_path / "kb"
    _kb(other, n=30, index="flat")
    (tmp_path / ".d.copying").mkdir()
    (tmp_path / ".d.copying" / "keep.txt").write_text("mine")
    with pytest.raises(RetrofitError, match="not a copy in progress"):
        copy_kb(other, tmp_path / "d")
    assert (tmp_path / ".d.copying" / "keep.txt").read_text() == "mine" and len(KnowledgeBase.open(src)) == 30
    running = tmp_path / ".e.copying"
    running.mkdir()
    fd = os.open(str(running / ".kb-copy.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RetrofitError, match="another `kb copy` to .*e is running"):
            copy_kb(other, tmp_path / "e")
        assert running.exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", ["index file", "index.json", "no index.json"])
def test_a_source_with_a_damaged_or_missing_index_is_copied_and_gets_an_index(tmp_path, damage):
    src, out = tmp_path / "kb", tmp_path / "copy"
    _kb(src, n=400)
    with KnowledgeBase.open(src) as kb:
        q = kb.vectors(torch.tensor([7, 300]), "key")
        want = kb.search(q, 5).ids
    (idx,) = src.glob("index-*.faiss")
    if damage == "index file":
        raw = bytearray(idx.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        idx.write_bytes(bytes(raw))
    elif damage == "index.json":
        (src / "index.json").write_text("{not json")
    else:
        (src / "index.json").unlink()
    with pytest.raises(Exception, match="damaged|missing"):
        KnowledgeBase.open(src)  # a reader refuses the source (and `kb compact` would have to write to it)
    s = copy_kb(src, out)
    assert s.records == 400 and not s.index_reused
    with KnowledgeBase.open(out) as b:
        got = b.search(q, 5).ids
        assert b.verify()["ok"]
    assert torch.equal(got[:, 0], want[:, 0]) and got.tolist()[0][0] == 7 and got.tolist()[1][0] == 300
    assert len(list(out.glob("index-*.faiss"))) == 1


def test_a_writer_replacing_the_index_during_the_copy_leaves_a_consistent_copy(tmp_path, monkeypatch):
    """The writer saves a new index between the copy's read of index.json and its records snapshot: the copy's
    index.json names the file it copied (it used to copy index.json again, naming a file the copy lacked)."""
    import shutil

    from retrofit import kb_copy

    src, out = tmp_path / "kb", tmp_path / "copy"
    _kb(src, n=300)
    with KnowledgeBase.open(src, readonly=False) as w:
        real = shutil.copyfile

        def copy_then_write(a, b, *args, **kw):
            r = real(a, b, *args, **kw)
            if str(a).endswith(".faiss"):
                _add(w, 300, 20, seed=5)
                w.flush()  # a new index file, the old one removed
            return r

        monkeypatch.setattr(kb_copy.shutil, "copyfile", copy_then_write)
        s = copy_kb(src, out)
    assert s.records == 320 and not s.index_reused  # caught up with the 20 records, not rebuilt
    with KnowledgeBase.open(out) as b:
        assert b.info()["index"]["ntotal"] == 320 and b.verify()["ok"]
    assert len(list(out.glob("index-*.faiss"))) == 1  # no stale index file left in the copy
