"""Key whitening of a knowledge base's index (IndexConfig.whiten): the fit, search in the whitened space, and the
transform's life on disk (saved with the index, checked, refitted, copied, merged) on real LMDB + faiss."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from retrofit.cli import main
from retrofit.errors import CorruptKnowledgeBaseError
from retrofit.kb_index import IndexConfig
from retrofit.kb_whiten import apply_whitening, check_shrinkage, fit_whitening
from retrofit.knowledge_base import KnowledgeBase

DK, DI, DT = 16, 4, 3
SCALES = np.geomspace(8.0, 0.05, DK)  # anisotropic keys: a few directions dominate every cosine


def keys_like(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(size=(n, DK)) * SCALES + 2.0, dtype=torch.float32)  # off-centre, as embeddings


def make(path, n: int = 400, seed: int = 0, **kw) -> KnowledgeBase:
    kb = KnowledgeBase.create(path, DK, DI, DT, class_names=["a", "b", "c"], **kw)
    kb.add(keys_like(n, seed), torch.arange(n, dtype=torch.float32)[:, None].repeat(1, DI), torch.randn(n, DT),
           labels=torch.arange(n) % 3)
    return kb


def whitened_topk(kb: KnowledgeBase, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k in the KB's whitened space, from its stored keys and its transform (the reference)."""
    ids = torch.arange(kb.info()["next_id"])
    x = apply_whitening(kb.vectors(ids, "key").numpy(), kb._whiten)
    qn = apply_whitening(torch.nn.functional.normalize(q, dim=1).numpy(), kb._whiten)
    s = torch.from_numpy(qn @ x.T)
    top = s.topk(k, dim=1)
    return ids[top.indices], top.values


def test_fit_whitens_the_spread_and_keeps_unspanned_directions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, DK)) * SCALES + 1.0
    t = fit_whitening(x, 1e-5)  # shrinkage 1e-5 * sigma_1 = 8e-5, far below the smallest sigma (0.05)
    assert t.shape == (DK + 1, DK) and t.dtype == np.float32
    assert np.allclose(t[0], x.mean(0), atol=1e-5)
    y = (x - t[0]) @ t[1:]
    ev = np.linalg.eigvalsh(np.cov(y.T))
    assert ev.max() / ev.min() < 1.1  # ~isotropic (the raw keys: (8 / 0.05)^2 = 25,600)
    # a strong shrinkage keeps most of the original anisotropy
    ys = (x - t[0]) @ fit_whitening(x, 10.0)[1:]
    evs = np.linalg.eigvalsh(np.cov(ys.T))
    assert evs.max() / evs.min() > 1000
    # keys spanning 3 of 16 directions: the other 13 keep the smallest scale instead of dividing by zero
    low = rng.normal(size=(200, 3)) @ rng.normal(size=(3, DK))
    tl = fit_whitening(low, 0.1)
    assert np.isfinite(tl).all() and np.linalg.matrix_rank(tl[1:]) == DK
    # no spread at all (one key repeated): the identity, no centring
    same = np.tile(rng.normal(size=(1, DK)), (10, 1))
    ti = fit_whitening(same, 0.1)
    assert np.array_equal(ti[0], np.zeros(DK, np.float32)) and np.array_equal(ti[1:], np.eye(DK, dtype=np.float32))
    z = apply_whitening(same, ti)
    assert np.allclose(z, same / np.linalg.norm(same, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), 1e4, True, "0.1", None])
def test_bad_shrinkage_is_refused_naming_it(tmp_path, bad):
    with pytest.raises(ValueError, match="whiten must be 0 .* got"):
        check_shrinkage(bad)
    with pytest.raises(ValueError, match="whiten"):
        IndexConfig(whiten=bad)
    with pytest.raises(ValueError, match="whiten"):
        KnowledgeBase.create(tmp_path / "kb", DK, DI, DT, whiten=bad)
    assert not (tmp_path / "kb").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="shrinkage > 0"):
        fit_whitening(np.ones((3, DK)), 0.0)


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_search_is_the_topk_of_the_whitened_space(tmp_path, index):
    kb = make(tmp_path / "kb", n=600, whiten=0.1, index=index, ef_search=256)
    info = kb.info()["index"]
    assert info["whitened"] and info["config"]["whiten"] == 0.1 and info["whiten_fitted_on"] == 600
    q = keys_like(20, seed=1)
    nb = kb.search(q, 10)
    ids, scores = whitened_topk(kb, q, 10)
    if index == "flat":
        assert torch.equal(nb.ids, ids)
    else:  # HNSW: approximate, with a wide beam
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(nb.ids, ids)])
        assert recall >= 0.95
    assert torch.allclose(nb.scores[:, 0], scores[:, 0], atol=2e-3)  # cosines in the whitened space
    assert torch.equal(nb.image[..., 0], nb.ids.float())  # records gathered as before
    # whitening changes who is nearest on these anisotropic keys (else this test would prove nothing)
    raw = torch.nn.functional.normalize(q, dim=1) @ kb.vectors(torch.arange(600), "key").T
    assert not torch.equal(raw.topk(10, dim=1).indices, ids)
    kb.close()


def test_the_transform_is_saved_with_the_index_and_readers_use_it(tmp_path):
    path = tmp_path / "kb"
    kb = make(path, whiten=0.1)
    q = keys_like(6, seed=2)
    want = kb.search(q, 8)
    kb.close()
    state = json.loads((path / "index.json").read_text())
    assert state["whiten_file"].startswith("whiten-") and state["whiten_sha256"].startswith("sha256:")
    assert sorted(p.name for p in path.glob("whiten-*.npy")) == [state["whiten_file"]]
    with KnowledgeBase.open(path) as r:
        got = r.search(q, 8)
        assert torch.equal(got.ids, want.ids) and torch.allclose(got.scores, want.scores)
        assert r.verify()["ok"]
    # a writer adding a few records (its index not saved yet): a reader opened now finds them through an
    # in-memory index of its own, whitened with the same transform
    w = KnowledgeBase.open(path, readonly=False)
    new = keys_like(5, seed=3)
    w.add(new, torch.full((5, DI), -1.0), torch.randn(5, DT), labels=torch.zeros(5, dtype=torch.int64))
    with KnowledgeBase.open(path) as r:
        assert r.info()["index"]["pending_in_memory"] == 5
        got, ref = r.search(new, 3), w.search(new, 3)
        assert torch.equal(got.ids, ref.ids) and (got.ids[:, 0] >= 400).all()
    w.close()


def test_damaged_or_missing_transform_is_caught_and_a_writer_rebuilds_it(tmp_path):
    path = tmp_path / "kb"
    make(path, whiten=0.1).close()
    name = json.loads((path / "index.json").read_text())["whiten_file"]
    f = path / name
    b = bytearray(f.read_bytes())
    b[-5] ^= 0xFF
    f.write_bytes(bytes(b))
    rep = KnowledgeBase.verify_path(path)  # what `retrofit kb verify` runs: opens the records only
    assert not rep["ok"] and any("whitening file" in p for p in rep["problems"])
    with pytest.raises(CorruptKnowledgeBaseError, match="whitening file .* damaged.*kb compact"):
        KnowledgeBase.open(path)
    with KnowledgeBase.open(path, readonly=False) as w:  # rebuilds index and transform from the records
        assert w.info()["index"]["whitened"]
    with KnowledgeBase.open(path) as r:
        assert r.verify()["ok"] and len(r.search(keys_like(2, 5), 4).ids[0]) == 4
    (path / json.loads((path / "index.json").read_text())["whiten_file"]).unlink()
    with pytest.raises(CorruptKnowledgeBaseError, match="whitening file .* missing"):
        KnowledgeBase.open(path)


def test_an_index_without_the_whitening_the_settings_ask_for_is_stale(tmp_path):
    """Meta committed with whitening but the index never rebuilt (a compact killed in between, or still running):
    readers search the index as it is (raw cosines, as while a compact runs), a writer rebuilds it."""
    path = tmp_path / "kb"
    make(path).close()
    saved = tmp_path / "saved"
    saved.mkdir()
    state = json.loads((path / "index.json").read_text())
    for n in ("index.json", state["file"]):
        shutil.copy(path / n, saved / n)
    with KnowledgeBase.open(path, readonly=False) as w:
        w.compact(whiten=0.1)
    for f in list(path.glob("index-*.faiss")) + list(path.glob("whiten-*.npy")) + [path / "index.json"]:
        f.unlink()
    for n in ("index.json", state["file"]):  # the unwhitened index back in place, under the whitening settings
        shutil.copy(saved / n, path / n)
    q = keys_like(4, seed=6)
    with KnowledgeBase.open(path) as r:  # the old, unwhitened index: consistent, raw cosines
        assert not r.info()["index"]["whitened"] and r.info()["index"]["config"]["whiten"] == 0.1
        raw = torch.nn.functional.normalize(q, dim=1) @ r.vectors(torch.arange(400), "key").T
        assert torch.equal(r.search(q, 5).ids, raw.topk(5, dim=1).indices)
    with KnowledgeBase.open(path, readonly=False) as w:
        assert w.info()["index"]["whitened"]
        assert torch.equal(w.search(q, 5).ids, whitened_topk(w, q, 5)[0])


def test_compact_turns_it_on_and_off_and_refits(tmp_path):
    path = tmp_path / "kb"
    kb = make(path, n=300)
    q = keys_like(5, seed=7)
    raw = kb.search(q, 6)
    kb.compact(whiten=0.3)
    assert kb.info()["index"]["config"]["whiten"] == 0.3 and kb.info()["index"]["whitened"]
    assert torch.equal(kb.search(q, 6).ids, whitened_topk(kb, q, 6)[0])
    kb.compact()  # keeps the setting
    assert kb.info()["index"]["whitened"]
    kb.compact(whiten=0)
    assert not kb.info()["index"]["whitened"] and not list(path.glob("whiten-*.npy"))
    assert torch.equal(kb.search(q, 6).ids, raw.ids)
    kb.close()
    with KnowledgeBase.open(path) as r:
        assert "whiten" not in r._meta["index"]  # the setting at its default is not stored
        assert r.info()["index"]["config"]["whiten"] == 0.0


def test_a_growing_kb_refits_when_its_records_double(tmp_path):
    kb = KnowledgeBase.create(tmp_path / "kb", DK, DI, DT, whiten=0.1)
    assert kb.info()["index"]["whiten_fitted_on"] == 0  # empty: the identity for now
    for n, seed in ((10, 0), (30, 1), (200, 2), (50, 3)):
        kb.add(keys_like(n, seed), torch.zeros(n, DI), torch.zeros(n, DT))
    info = kb.info()["index"]
    assert info["ntotal"] == 290 and info["whiten_fitted_on"] == 240  # refitted at 40 and 240, not at 290
    q = keys_like(3, seed=9)
    assert torch.equal(kb.search(q, 5).ids, whitened_topk(kb, q, 5)[0])
    kb.close()


def test_copy_and_merge_keep_the_whitening(tmp_path):
    from retrofit.ingest import merge_kbs
    from retrofit.kb_copy import copy_kb

    a = make(tmp_path / "a", n=200, whiten=0.1)
    q = keys_like(4, seed=8)
    want = a.search(q, 5)
    a.close()
    summary = copy_kb(tmp_path / "a", tmp_path / "copy")
    assert summary.index_reused
    with KnowledgeBase.open(tmp_path / "copy") as c:
        assert torch.equal(c.search(q, 5).ids, want.ids) and c.verify()["ok"]
    make(tmp_path / "b", n=150, seed=1).close()  # not whitened: the first input's settings carry over
    merge_kbs([tmp_path / "a", tmp_path / "b"], tmp_path / "m", dedup=False, progress=False)
    with KnowledgeBase.open(tmp_path / "m") as m:
        assert len(m) == 350 and m.info()["index"]["whitened"] and m.info()["index"]["whiten_fitted_on"] == 350
        assert torch.equal(m.search(q, 5).ids, whitened_topk(m, q, 5)[0])


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_merge_can_set_the_whitening_and_builds_what_compact_would(tmp_path, index):
    """``merge_kbs(..., whiten=w)``: the merged KB's index is whitened at ``w`` whatever its first input has, and
    searches as the plain merge compacted with ``whiten=w`` afterwards (the index built once instead of twice); a
    bad shrinkage is refused by name before anything is written."""
    from retrofit.ingest import merge_kbs

    make(tmp_path / "a", n=300, index=index).close()  # not whitened
    make(tmp_path / "b", n=200, seed=1, index=index).close()
    q = keys_like(6, seed=9)
    merge_kbs([tmp_path / "a", tmp_path / "b"], tmp_path / "once", dedup=False, progress=False, whiten=0.3)
    merge_kbs([tmp_path / "a", tmp_path / "b"], tmp_path / "twice", dedup=False, progress=False)
    with KnowledgeBase.open(tmp_path / "twice", readonly=False) as t:
        assert not t.info()["index"]["whitened"]
        t.compact(whiten=0.3)
        want = t.search(q, 8)
    with KnowledgeBase.open(tmp_path / "once") as m:
        info = m.info()["index"]
        assert info["config"]["whiten"] == 0.3 and info["whitened"] and info["whiten_fitted_on"] == 500
        got = m.search(q, 8)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
        assert torch.equal(got.ids, whitened_topk(m, q, 8)[0]) and m.verify()["ok"]
    merge_kbs([tmp_path / "once", tmp_path / "b"], tmp_path / "off", dedup=False, progress=False, whiten=0)
    with KnowledgeBase.open(tmp_path / "off") as m:  # 0 turns the first input's whitening off
        assert m.info()["index"]["config"]["whiten"] == 0.0 and not m.info()["index"]["whitened"]
    for bad in (-1, float("nan"), True):
        with pytest.raises(ValueError, match="whiten must be 0"):
            merge_kbs([tmp_path / "a", tmp_path / "b"], tmp_path / "bad", progress=False, whiten=bad)
        assert not (tmp_path / "bad").exists()


def test_cli_compact_whiten_and_info(tmp_path, capsys):
    path = str(tmp_path / "kb")
    make(path).close()
    assert main(["kb", "compact", path, "--whiten", "0.1"]) == 0
    capsys.readouterr()
    assert main(["kb", "info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index"]["config"]["whiten"] == 0.1 and info["index"]["whitened"]
    assert main(["kb", "info", path]) == 0
    assert "key whitening shrinkage 0.1, fitted on 400 records" in " ".join(capsys.readouterr().out.split())
    assert main(["kb", "compact", path, "--whiten", "-1"]) != 0
    assert "whiten must be 0 (off) or the whitening shrinkage" in capsys.readouterr().err
    with KnowledgeBase.open(path) as r:  # the refused compact changed nothing
        assert r.info()["index"]["config"]["whiten"] == 0.1 and r.verify()["ok"]
    make(tmp_path / "b", n=100, seed=1).close()
    merged = str(tmp_path / "m")
    assert main(["kb", "merge", str(tmp_path / "b"), path, "-o", merged, "--whiten", "0.2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["kb", "info", merged, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index"]["config"]["whiten"] == 0.2 and info["index"]["whiten_fitted_on"] == 500
    assert main(["kb", "merge", str(tmp_path / "b"), path, "-o", str(tmp_path / "m2"), "--whiten", "-1"]) != 0
    assert "whiten must be 0 (off) or the whitening shrinkage" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


@pytest.mark.cuda
def test_cuda_queries_are_whitened_too(tmp_path):
    kb = make(tmp_path / "kb", n=300, whiten=0.1, index="flat")
    q = keys_like(5, seed=4)
    cpu = kb.search(q, 8)
    gpu = kb.search(q.cuda(), 8)
    assert gpu.ids.is_cuda and torch.equal(gpu.ids.cpu(), cpu.ids)
    assert torch.allclose(gpu.scores.cpu(), cpu.scores, atol=1e-4)
    kb.close()


def test_a_reader_refreshing_across_a_whitening_change_takes_the_new_transform(tmp_path):
    path = tmp_path / "kb"
    make(path).close()
    r = KnowledgeBase.open(path)
    q = keys_like(5, seed=11)
    assert r._whiten is None
    with KnowledgeBase.open(path, readonly=False) as w:
        w.compact(whiten=0.1)
        want = w.search(q, 6)
        transform = w._whiten.copy()
    assert r.refresh()
    assert np.array_equal(r._whiten, transform) and torch.equal(r.search(q, 6).ids, want.ids)
    assert torch.equal(r.search(q, 6).ids, whitened_topk(r, q, 6)[0])
    with KnowledgeBase.open(path, readonly=False) as w:
        w.compact(whiten=0)
    assert r.refresh() and r._whiten is None
    raw = torch.nn.functional.normalize(q, dim=1) @ r.vectors(torch.arange(400), "key").T
    assert torch.equal(r.search(q, 6).ids, raw.topk(6, dim=1).indices)
    r.close()


def test_an_unwhitened_index_json_has_no_whitening_fields(tmp_path):
    """index.json of a KB without whitening stays as earlier versions wrote it (they refuse unknown fields)."""
    path = tmp_path / "kb"
    make(path).close()
    assert not {"whiten_file", "whiten_sha256", "whiten_fit_n"} & set(json.loads((path / "index.json").read_text()))
    with KnowledgeBase.open(path, readonly=False) as w:
        w.compact(whiten=0.1)
    assert json.loads((path / "index.json").read_text())["whiten_fit_n"] == 400


def test_a_copy_of_an_unwhitened_kb_keeps_its_index_json_plain(tmp_path):
    from retrofit.kb_copy import copy_kb

    make(tmp_path / "a").close()
    assert copy_kb(tmp_path / "a", tmp_path / "b").index_reused
    assert not {"whiten_file", "whiten_sha256", "whiten_fit_n", "whiten_shrinkage"} & \
        set(json.loads((tmp_path / "b" / "index.json").read_text()))


def test_an_index_fitted_with_another_shrinkage_is_rebuilt_by_a_writer(tmp_path):
    """A compact from 0.1 to 0.3 killed after committing the setting: the index still holds the 0.1 fit. Readers
    use it as it is; a writer refits at 0.3."""
    path = tmp_path / "kb"
    make(path, whiten=0.1).close()
    saved = tmp_path / "saved"
    saved.mkdir()
    state = json.loads((path / "index.json").read_text())
    assert state["whiten_shrinkage"] == 0.1
    for n in ("index.json", state["file"], state["whiten_file"]):
        shutil.copy(path / n, saved / n)
    with KnowledgeBase.open(path, readonly=False) as w:
        w.compact(whiten=0.3)
    for f in list(path.glob("index-*.faiss")) + list(path.glob("whiten-*.npy")) + [path / "index.json"]:
        f.unlink()
    for n in ("index.json", state["file"], state["whiten_file"]):
        shutil.copy(saved / n, path / n)
    keys = None
    with KnowledgeBase.open(path) as r:
        assert r.info()["index"]["whiten_shrinkage"] == 0.1 and r.info()["index"]["config"]["whiten"] == 0.3
        keys = r.vectors(torch.arange(400), "key").numpy()
        old = r._whiten.copy()
    with KnowledgeBase.open(path, readonly=False) as w:
        assert w.info()["index"]["whiten_shrinkage"] == 0.3
        assert np.allclose(w._whiten, fit_whitening(keys, 0.3), atol=1e-4)
        assert not np.allclose(w._whiten, old, atol=1e-2)
