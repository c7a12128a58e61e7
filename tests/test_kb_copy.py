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
    (tmp_path / ".copy.copying" / "records").mkdir(parents=True)  # what a killed copy leaves
    (tmp_path / ".copy.copying" / "records" / "data.mdb").write_bytes(b"partial")
    assert copy_kb(src, out).records == 200
    assert not (tmp_path / ".copy.copying").exists()
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
