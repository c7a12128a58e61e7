"""retrofit.kb_index_map: an HNSW index file mapped without faulting its graph in (real faiss files, real KBs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrofit.errors import CorruptKnowledgeBaseError
from retrofit.kb_index_map import map_hnsw
from retrofit.knowledge_base import KnowledgeBase

faiss = pytest.importorskip("faiss")

D = 24


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((20, D)).astype("float32")
    x = c[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, D)).astype("float32")
    faiss.normalize_L2(x)
    return x


def hnsw_file(path, n: int = 3000, m: int = 16, storage: str = "fp16"):
    """A KB-style index file: IndexIDMap over HNSW with fp16 (the default) or float32 vector storage."""
    x = clustered(n, 0)
    if storage == "fp16":
        inner = faiss.IndexHNSWSQ(D, faiss.ScalarQuantizer.QT_fp16, m, faiss.METRIC_INNER_PRODUCT)
    else:
        inner = faiss.IndexHNSWFlat(D, m, faiss.METRIC_INNER_PRODUCT)
    inner.hnsw.efConstruction = 40
    index = faiss.IndexIDMap(inner)
    index.add_with_ids(x, np.arange(n, dtype=np.int64) * 5 + 3)  # ids that are not positions
    faiss.write_index(index, str(path))
    return index, x


@pytest.mark.parametrize("storage", ["fp16", "float32"])
def test_mapped_index_searches_exactly_like_faiss_reader(tmp_path, storage):
    p = tmp_path / "i.faiss"
    index, x = hnsw_file(p, storage=storage)
    mapped = map_hnsw(p, index.ntotal)
    assert mapped is not None and mapped.ntotal == index.ntotal
    ref = faiss.read_index(str(p), faiss.IO_FLAG_MMAP_IFC)
    q = clustered(64, 1)
    for ef in (16, 64):
        faiss.downcast_index(mapped.index).hnsw.efSearch = ef
        faiss.downcast_index(ref.index).hnsw.efSearch = ef
        d1, i1 = mapped.search(q, 10)
        d2, i2 = ref.search(q, 10)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(d1, d2)
    assert set(np.unique(i1)) <= set(range(3, 5 * 3000 + 3, 5))
    h1, h2 = faiss.downcast_index(mapped.index).hnsw, faiss.downcast_index(ref.index).hnsw
    assert (h1.entry_point, h1.max_level, h1.efConstruction) == (h2.entry_point, h2.max_level, h2.efConstruction)
    assert not h1.neighbors.is_owned  # a view of the file, not a copy
    assert not faiss.downcast_index(faiss.downcast_index(mapped.index).storage).codes.is_owned
    # the vectors are the file's: reconstruct through the map equals faiss's (the added vectors, fp16-rounded)
    st1, st2 = faiss.downcast_index(mapped.index).storage, faiss.downcast_index(ref.index).storage
    np.testing.assert_array_equal(st1.reconstruct(7), st2.reconstruct(7))
    want = x[7] if storage == "float32" else x[7].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(st1.reconstruct(7), want)


def _damage(p, offset: int, value: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(value)


def _neighbors_offset(p, index) -> int:
    """Byte offset of hnsw.neighbors' data in the file (just after its 8-byte length, which equals its size)."""
    nb = faiss.vector_to_array(faiss.downcast_index(index.index).hnsw.neighbors)
    blob = np.fromfile(p, dtype=np.uint8).tobytes()
    at = blob.find(np.uint64(nb.size).tobytes() + nb[:8].tobytes())
    assert at > 0
    return at + 8


def test_a_graph_id_out_of_range_is_refused(tmp_path):
    p = tmp_path / "i.faiss"
    index, _ = hnsw_file(p)
    at = _neighbors_offset(p, index)
    for bad in (index.ntotal, -2, 2**31 - 1):
        _damage(p, at + 4 * 1000, np.int32(bad).tobytes())
        with pytest.raises(CorruptKnowledgeBaseError, match=rf"vector id {bad} \(allowed -1..2999\)"):
            map_hnsw(p, index.ntotal)
    # the same damage stops faiss's own reader too: the check is as strict as faiss's
    with pytest.raises(RuntimeError):
        faiss.read_index(str(p), faiss.IO_FLAG_MMAP_IFC)


def test_damaged_levels_offsets_and_lengths_are_refused(tmp_path):
    p = tmp_path / "i.faiss"
    index, _ = hnsw_file(p)
    h = faiss.downcast_index(index.index).hnsw
    levels = faiss.vector_to_array(h.levels)
    blob = p.read_bytes()
    lv_at = blob.find(np.uint64(levels.size).tobytes() + levels[:16].tobytes()) + 8
    _damage(p, lv_at, np.int32(99).tobytes())  # a level past the level table
    with pytest.raises(CorruptKnowledgeBaseError, match="levels outside"):
        map_hnsw(p, index.ntotal)
    p.write_bytes(blob)
    _damage(p, lv_at, np.int32(1 if levels[0] > 1 else 2).tobytes())  # offsets no longer follow the levels
    with pytest.raises(CorruptKnowledgeBaseError, match="offsets do not match"):
        map_hnsw(p, index.ntotal)
    p.write_bytes(blob)
    with pytest.raises(CorruptKnowledgeBaseError, match="holds 3000 vectors, index.json says 2999"):
        map_hnsw(p, index.ntotal - 1)
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptKnowledgeBaseError, match="truncated"):
        map_hnsw(p, index.ntotal)


def test_other_layouts_fall_back_to_faiss(tmp_path):
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(D))
    flat.add_with_ids(clustered(50, 2), np.arange(50, dtype=np.int64))
    faiss.write_index(flat, str(tmp_path / "flat.faiss"))
    assert map_hnsw(tmp_path / "flat.faiss", 50) is None
    l2 = faiss.IndexIDMap(faiss.IndexHNSWFlat(D, 8))  # L2 metric: not what a KB writes
    l2.add_with_ids(clustered(50, 2), np.arange(50, dtype=np.int64))
    faiss.write_index(l2, str(tmp_path / "l2.faiss"))
    assert map_hnsw(tmp_path / "l2.faiss", 50) is None
    sq8 = faiss.IndexIDMap(faiss.IndexHNSWSQ(D, faiss.ScalarQuantizer.QT_8bit, 8, faiss.METRIC_INNER_PRODUCT))
    sq8.train(clustered(200, 3))  # 8-bit codes: trained ranges, not what a KB writes
    sq8.add_with_ids(clustered(50, 2), np.arange(50, dtype=np.int64))
    faiss.write_index(sq8, str(tmp_path / "sq8.faiss"))
    assert map_hnsw(tmp_path / "sq8.faiss", 50) is None
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    assert map_hnsw(tmp_path / "junk.faiss", 50) is None
    p = tmp_path / "i.faiss"
    index, _ = hnsw_file(p, n=300)
    blob = p.read_bytes()
    p.write_bytes(blob + b"\0" * 8)  # trailing bytes: a layout this reader does not know
    assert map_hnsw(p, 300) is None
    storage_at = blob.rfind(b"IxSQ") + 4
    p.write_bytes(blob[:storage_at] + np.int32(D + 1).tobytes() + blob[storage_at + 4:])  # storage of another width
    assert map_hnsw(p, 300) is None
    p.write_bytes(blob)
    assert map_hnsw(p, 300) is not None


def test_an_untested_faiss_version_falls_back(tmp_path, monkeypatch):
    p = tmp_path / "i.faiss"
    hnsw_file(p, n=200)
    monkeypatch.setattr(faiss, "__version__", "1.99.0")
    assert map_hnsw(p, 200) is None


def _levels_and_offsets(index):
    h = faiss.downcast_index(index.index).hnsw
    return (faiss.vector_to_array(h.levels), faiss.vector_to_array(h.offsets),
            faiss.vector_to_array(h.cum_nneighbor_per_level), h)


def _scalars_offset(p, index) -> int:
    """Byte offset of (entry_point, max_level, efConstruction, efSearch, upper_beam): right after the graph."""
    return _neighbors_offset(p, index) + 4 * faiss.downcast_index(index.index).hnsw.neighbors.size()


_SEARCH_IN_CHILD = """
import sys, numpy as np, faiss
from retrofit.errors import CorruptKnowledgeBaseError
from retrofit.kb_index_map import map_hnsw
try:
    index = map_hnsw(sys.argv[1], int(sys.argv[2]))
except CorruptKnowledgeBaseError as e:
    print("refused:", e)
    sys.exit(0)
index.search(np.random.default_rng(0).standard_normal((64, int(sys.argv[3]))).astype("float32"), 10)
print("searched")
"""


def _map_in_child(p, n: int) -> str:
    """map_hnsw + a search in a subprocess: a damage that slips through crashes the child, not pytest."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _SEARCH_IN_CHILD, str(p), str(n), str(D)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"child died with {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


@pytest.mark.parametrize("storage", ["fp16", "float32"])
def test_damage_faiss_accepts_but_crashes_its_search_is_refused(tmp_path, storage):
    """An entry point below the top level, or an upper-level link to a node without that level: faiss's reader
    loads both, and its search then follows links that do not exist (reads past the graph: a segfault in a review's
    reproduction); ours refuses them. The search runs in a child process, so a regression fails, not crashes."""
    p = tmp_path / "i.faiss"
    index, _ = hnsw_file(p, storage=storage)
    levels, offsets, cum, h = _levels_and_offsets(index)
    blob = p.read_bytes()
    assert "searched" in _map_in_child(p, 3000)  # the undamaged file maps and searches
    low = int(np.flatnonzero(levels == 1)[0])  # a node on level 0 only
    at = _scalars_offset(p, index)
    assert np.frombuffer(blob[at:at + 8], np.int32).tolist() == [h.entry_point, h.max_level]
    _damage(p, at, np.int32(low).tobytes())
    assert f"entry point {low} is not a node of the top level" in _map_in_child(p, 3000)
    p.write_bytes(blob)
    top = h.entry_point  # its level-1 list: put the level-0-only node in its first slot
    slot = int(offsets[top]) + int(cum[1])
    _damage(p, _neighbors_offset(p, index) + 4 * slot, np.int32(low).tobytes())
    assert f"links level 1 to vector {low}, which has no such level" in _map_in_child(p, 3000)
    p.write_bytes(blob)
    _damage(p, at + 4, np.int32(h.max_level + 1).tobytes())
    assert f"max level {h.max_level + 1}, but its highest node is on level {h.max_level}" in _map_in_child(p, 3000)


def test_a_damaged_level_table_is_refused(tmp_path):
    p = tmp_path / "i.faiss"
    index, _ = hnsw_file(p, n=500)
    _, _, cum, _ = _levels_and_offsets(index)
    blob = p.read_bytes()
    at = blob.find(np.uint64(cum.size).tobytes() + cum.tobytes()) + 8
    assert at > 8
    p.write_bytes(blob[:at + 8] + np.int32(cum[1] - 1).tobytes() + blob[at + 12:])  # cum[2] < cum[1]
    with pytest.raises(CorruptKnowledgeBaseError, match="level table"):
        map_hnsw(p, 500)
    p.write_bytes(blob[:at - 8] + np.uint64(10**9).tobytes() + blob[at:])  # an absurd length: refused before reading
    with pytest.raises(CorruptKnowledgeBaseError, match="at most 65 belong"):
        map_hnsw(p, 500)


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_opening_leaves_the_graph_unread_where_faiss_reads_it_all(tmp_path):
    p = tmp_path / "big.faiss"
    index, _ = hnsw_file(p, n=20_000, m=32)
    graph_kib = 4 * faiss.downcast_index(index.index).hnsw.neighbors.size() // 1024
    del index
    mapped = map_hnsw(p, 20_000)
    ours = _resident_kib(p)
    theirs_index = faiss.read_index(str(p), faiss.IO_FLAG_MMAP_IFC)
    both = _resident_kib(p)
    print(f"resident KiB of the file's mappings: ours {ours}, with faiss's too {both}, graph {graph_kib}")
    assert graph_kib > 4000 and ours < graph_kib // 20, (ours, graph_kib)
    assert both - ours > graph_kib // 2, (both, ours, graph_kib)  # faiss's reader pulls the graph in
    assert mapped.ntotal == theirs_index.ntotal == 20_000


@pytest.mark.parametrize("storage", [None, "fp16", "float32"])
def test_knowledge_base_reader_uses_the_map_and_finds_the_same_neighbours(tmp_path, storage):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(10, 16, generator=g)
    keys = c[torch.randint(0, 10, (800,), generator=g)] + 0.4 * torch.randn(800, 16, generator=g)
    opts = {} if storage is None else {"hnsw_storage": storage}  # None: the default, fp16
    with KnowledgeBase.create(tmp_path / "kb", 16, 4, 4, index="hnsw", ef_construction=40, mmap_bytes=1,
                              **opts) as kb:
        kb.add(keys, torch.randn(800, 4, generator=g), torch.randn(800, 4, generator=g))
        kb.flush()
        owned = kb.search(keys[:50], 8)
        want = faiss.IndexHNSWFlat if storage == "float32" else faiss.IndexHNSWSQ
        assert isinstance(faiss.downcast_index(kb._main.index), want)
        assert kb.info()["index"]["config"]["hnsw_storage"] == (storage or "fp16")
    with KnowledgeBase.open(tmp_path / "kb") as r:
        assert r.info()["index"]["memory_mapped"]
        assert isinstance(faiss.downcast_index(r._main.index), want)
        assert any(isinstance(o, np.memmap) for o in r._main.referenced_objects)  # retrofit's reader, not faiss's
        mapped = r.search(keys[:50], 8)
    assert torch.equal(mapped.ids, owned.ids) and torch.equal(mapped.image, owned.image)


def test_bit_rot_in_a_kb_graph_is_refused_at_open_with_the_fix(tmp_path):
    """Damage in the middle of a large index file (outside the first / last MiB the open-time checksum reads)."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(12_000, 16, generator=g)
    with KnowledgeBase.create(tmp_path / "kb", 16, 2, 2, index="hnsw", ef_construction=16, mmap_bytes=1) as kb:
        kb.add(keys, torch.zeros(12_000, 2), torch.zeros(12_000, 2))
        kb.flush()
        want = kb.search(keys[:20], 5).ids
    p = next((tmp_path / "kb").glob("index-*.faiss"))
    size = p.stat().st_size
    assert size > 3 << 20
    index = faiss.read_index(str(p))
    at = _neighbors_offset(p, index)
    nb_bytes = 4 * faiss.downcast_index(index.index).hnsw.neighbors.size()
    mid = at + (nb_bytes // 2) // 4 * 4
    assert (1 << 20) < mid < size - (1 << 20)
    _damage(p, mid, np.int32(10**6).tobytes())
    with pytest.raises(CorruptKnowledgeBaseError, match=r"vector id 1000000 \(allowed -1..11999\).*retrofit kb"):
        KnowledgeBase.open(tmp_path / "kb")
    with KnowledgeBase.open(tmp_path / "kb", readonly=False) as w:  # a writer rebuilds it from the records
        assert len(w) == 12_000
    with KnowledgeBase.open(tmp_path / "kb") as r:
        assert r.info()["index"]["memory_mapped"]
        assert torch.equal(r.search(keys[:20], 5).ids[:, 0], want[:, 0])


def _edit_meta(path, edit) -> None:
    """Rewrite a KB's metadata in place (as an older or a newer retrofit would have written it)."""
    import json

    import lmdb

    from retrofit.kb_records import meta_checksum

    env = lmdb.open(str(path / "records"), max_dbs=8)
    with env.begin(write=True) as txn:
        db_meta = env.open_db(b"meta", txn=txn)
        meta = json.loads(bytes(txn.get(b"meta", db=db_meta)))
        edit(meta)
        meta["checksum"] = meta_checksum(meta)
        txn.put(b"meta", json.dumps(meta, sort_keys=True).encode(), db=db_meta)
    env.close()


def test_a_kb_from_before_fp16_storage_keeps_working_and_compacts_to_fp16(tmp_path):
    """An older KB: a float32 HNSW file and no hnsw_storage in its metadata. Readers map it, a writer's catch-up
    adds to it as it is, `compact` rebuilds it as fp16 (the config's default); default KBs store no such key."""
    from retrofit.errors import KnowledgeBaseError

    g = torch.Generator().manual_seed(2)
    keys = torch.randn(900, 16, generator=g)
    path = tmp_path / "kb"
    with KnowledgeBase.create(path, 16, 2, 2, index="hnsw", hnsw_storage="float32", mmap_bytes=1) as kb:
        kb.add(keys[:800], torch.zeros(800, 2), torch.zeros(800, 2))
    _edit_meta(path, lambda m: m["index"].pop("hnsw_storage"))
    with KnowledgeBase.open(path) as r:
        info = r.info()["index"]
        assert info["storage"] == "float32" and info["config"]["hnsw_storage"] == "fp16" and info["memory_mapped"]
        assert torch.equal(r.search(keys[:5], 1).ids[:, 0], torch.arange(5))
    with KnowledgeBase.open(path, readonly=False) as w:
        w.add(keys[800:], torch.zeros(100, 2), torch.zeros(100, 2))
        w.flush()
        assert w.info()["index"]["storage"] == "float32" and len(w) == 900  # caught up in place
        w.compact()
        assert w.info()["index"]["storage"] == "fp16"
    with KnowledgeBase.open(path) as r:
        assert r.info()["index"]["storage"] == "fp16" and r.info()["index"]["memory_mapped"]
        assert torch.equal(r.search(keys[800:805], 1).ids[:, 0], torch.arange(800, 805))
    with KnowledgeBase.open(path, readonly=False) as w:  # either way on request, and the choice is kept
        w.compact(hnsw_storage="float32")
        with pytest.raises(ValueError, match="hnsw_storage must be one of"):
            w.compact(hnsw_storage="int4")
    from retrofit.cli import main

    with KnowledgeBase.open(path, readonly=False) as w:
        assert w.info()["index"]["config"]["hnsw_storage"] == "float32"
        w.compact()
        assert w.info()["index"]["storage"] == "float32"
    assert main(["kb", "compact", str(path), "--hnsw-storage", "fp16"]) == 0
    with KnowledgeBase.open(path) as r:
        assert r.info()["index"]["storage"] == "fp16" and len(r) == 900
    with KnowledgeBase.create(tmp_path / "new", 16, 2, 2) as kb:
        pass
    seen = {}
    _edit_meta(tmp_path / "new", lambda m: seen.update(m["index"]))
    assert "hnsw_storage" not in seen  # the default is not written: older retrofit versions can open it
    _edit_meta(tmp_path / "new", lambda m: m["index"].update(from_the_future=1))
    with pytest.raises(KnowledgeBaseError, match=r"index settings \['from_the_future'\] come from a newer retrofit"):
        KnowledgeBase.open(tmp_path / "new")


def test_ef_construction_is_set_at_create_and_changed_by_compact(tmp_path, capsys, monkeypatch):
    """The HNSW build's beam width: chosen at create (and build), kept in the metadata and by later adds, changed by
    `compact(ef_construction=...)` / `kb compact --ef-construction`, which rebuild the graph with it."""
    import faiss

    from retrofit.cli import main
    from retrofit.kb_index import inner_index

    def built_with(kb: KnowledgeBase) -> int:  # what the faiss graph in use was built with
        return int(faiss.downcast_index(inner_index(kb._main)).hnsw.efConstruction)

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(600, 16, generator=g)
    path = tmp_path / "kb"
    with KnowledgeBase.create(path, 16, 2, 2, index="hnsw", ef_construction=24) as kb:
        kb.add(keys[:500], torch.zeros(500, 2), torch.zeros(500, 2))
        assert kb.info()["index"]["config"]["ef_construction"] == 24 and built_with(kb) == 24
    with KnowledgeBase.open(path, readonly=False) as w:
        w.add(keys[500:], torch.zeros(100, 2), torch.zeros(100, 2))  # an add keeps the setting
        assert w.info()["index"]["config"]["ef_construction"] == 24
        w.compact(ef_construction=64)
        assert w.info()["index"]["config"]["ef_construction"] == 64 and built_with(w) == 64
        with pytest.raises(ValueError, match="ef_construction must be a positive int, got 0"):
            w.compact(ef_construction=0)
        assert w.info()["index"]["config"]["ef_construction"] == 64  # the refused compact changed nothing
    with KnowledgeBase.open(path) as r:
        assert r.info()["index"]["config"]["ef_construction"] == 64 and built_with(r) == 64
        assert torch.equal(r.search(keys[100:110], 1).ids[:, 0], torch.arange(100, 110))
    assert main(["kb", "compact", str(path), "--ef-construction", "32"]) == 0
    capsys.readouterr()
    assert main(["kb", "info", str(path)]) == 0
    assert "efConstruction 32," in capsys.readouterr().out
    with KnowledgeBase.open(path, readonly=False) as w:  # a compact stopped after its commit, before its rebuild
        def stopped(self):
            raise KeyboardInterrupt("stand-in for a Ctrl-C during the rebuild")
        monkeypatch.setattr(type(w), "_rebuild", stopped)
        with pytest.raises(KeyboardInterrupt):
            w.compact(ef_construction=48)
        monkeypatch.undo()
    with KnowledgeBase.open(path) as r:  # the setting is committed, the graph is the old one: info tells both
        idx = r.info()["index"]
        assert (idx["config"]["ef_construction"], idx["ef_construction_built"], built_with(r)) == (48, 32, 32)
        assert len(r) == 600 and torch.equal(r.search(keys[:5], 1).ids[:, 0], torch.arange(5))
    assert main(["kb", "info", str(path)]) == 0
    assert "efConstruction 48 (the graph was built with 32: `retrofit kb compact` rebuilds it)" in \
        capsys.readouterr().out
    assert main(["kb", "compact", str(path)]) == 0
    with KnowledgeBase.open(path) as r:
        assert r.info()["index"]["ef_construction_built"] == 48 and built_with(r) == 48
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["kb", "compact", str(path), "--ef-construction", "-1"])
    assert e.value.code == 2 and "must be an integer >= 1" in capsys.readouterr().err
    with KnowledgeBase.create(tmp_path / "flat", 16, 2, 2) as kb:  # a flat index keeps it, saying it does nothing
        kb.add(keys[:10], torch.zeros(10, 2), torch.zeros(10, 2))
        assert kb.info()["index"]["config"]["ef_construction"] == 80  # the default (faiss's 40 before 24 Nov)
    assert main(["kb", "compact", str(tmp_path / "flat"), "--ef-construction", "80"]) == 0
    assert "--ef-construction 80 is kept in the settings but has no effect on this flat" in capsys.readouterr().err


def test_build_config_checks_the_index_settings():
    from retrofit.ingest import BuildConfig

    with pytest.raises(ValueError, match="hnsw_storage must be one of"):
        BuildConfig(hnsw_storage="int8").validate()
    with pytest.raises(ValueError, match="index must be 'auto', 'hnsw' or 'flat'"):
        BuildConfig(index="ivf").validate()
    with pytest.raises(ValueError, match="ef_construction must be a positive int, got 0"):
        BuildConfig(ef_construction=0).validate()
    # one default everywhere it is spelled out
    import inspect

    from retrofit.cli import build_parser
    from retrofit.kb_index import IndexConfig

    create = inspect.signature(KnowledgeBase.create).parameters["ef_construction"].default
    cli = build_parser().parse_args(["kb", "build", "src", "dst"]).ef_construction
    assert BuildConfig().ef_construction == IndexConfig().ef_construction == create == cli == 80
