"""Building knowledge bases from real CIFAR-10 samples with the real Tiny Darknet and MiniLM encoders:
every source kind, bad data, duplicates, resume after SIGKILL and Ctrl-C, add, merge, configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_sources import (  # noqa: F401  (mini_samples is a fixture)
    make_imagefolder,
    make_manifest,
    make_shards,
    mini_samples,
    real_encoders,
    write_shard,
)

from retrofit.encoders import load_image_encoder
from retrofit.errors import FingerprintMismatchError, KnowledgeBaseError, RetrofitError
from retrofit.ingest import REPORT_NAME, add_to_kb, build_kb, merge_kbs
from retrofit.knowledge_base import KnowledgeBase
from retrofit.sources import webdataset_source

FAST = {"batch_size": 32, "num_workers": 1, "progress": False}


@pytest.fixture(scope="module")
def encoders():
    return real_encoders()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, mini_samples, cifar_classes):  # noqa: F811
    return make_shards(tmp_path_factory.mktemp("wds"), mini_samples, cifar_classes)


@pytest.fixture(scope="module")
def clean_kb(tmp_path_factory, shards, encoders) -> Path:
    """A clean, uninterrupted build of the 100 mini samples (the reference for the resume tests)."""
    path = tmp_path_factory.mktemp("clean") / "kb"
    build_kb(shards, path, **encoders, batch_size=10, commit_every=20, num_workers=1, progress=False)
    return path


def _records(path: Path) -> list[dict]:
    with KnowledgeBase.open(path) as kb:
        return list(kb)


def test_build_from_webdataset(clean_kb, shards, mini_samples, cifar_classes, encoders):  # noqa: F811
    order = mini_samples[0::2] + mini_samples[1::2]
    with KnowledgeBase.open(clean_kb) as kb:
        assert len(kb) == 100 and kb.class_names == cifar_classes
        assert kb.fingerprint.image.matches(encoders["image_encoder"].fingerprint)
        assert kb.fingerprint.key.matches(encoders["image_encoder"].fingerprint)
        assert kb.fingerprint.text.matches(encoders["text_encoder"].fingerprint)
        recs = kb.get(torch.arange(100))
        assert [r["label"] for r in recs] == [o["label"] for o in order]
        assert [r["caption"] for r in recs] == [o["caption"].strip() for o in order]
        assert recs[3]["source"].startswith(f"mini-000000.tar/{order[3]['key']}|sha1:")
        # a training image, decoded and encoded afresh, finds itself first
        import io

        from PIL import Image

        enc = encoders["image_encoder"]
        picks = [0, 17, 55, 99]
        x = torch.stack([enc.preprocess(Image.open(io.BytesIO(order[i]["jpg"])).convert("RGB")) for i in picks])
        nb = kb.search(enc.encode(x), 5)
        assert nb.ids[:, 0].tolist() == picks
        assert (nb.scores[:, 0] > 0.999).all()
        # the build's workers sent uint8 pixels (darknet-tiny has them), scaled by encode: the very same vectors
        assert enc.pixels is not None
        assert torch.equal(kb.vectors(torch.tensor(picks), which="image"), enc.encode(x).half().float())
        # stored text vectors are the captions' MiniLM vectors (float16 storage)
        t = kb.vectors(torch.tensor(picks), which="text")
        ref = encoders["text_encoder"].encode([order[i]["caption"].strip() for i in picks])
        assert torch.allclose(t, ref, atol=2e-3)
        progress = next(v for n, v in kb.user_meta.items() if n.startswith("ingest:"))
        assert (progress["written"], progress["skipped"], progress["duplicates"], progress["done"]) == (100, 0, 0, True)
    # re-running a finished build does nothing
    again = build_kb(shards, clean_kb, **encoders, **FAST)
    assert again.written == 100 and again.encode_s == 0.0 and len(_records(clean_kb)) == 100


def test_build_from_imagefolder_and_manifest(tmp_path, mini_samples, cifar_classes, encoders):  # noqa: F811
    root = make_imagefolder(tmp_path / "if", mini_samples[:40], cifar_classes)
    s = build_kb(root, tmp_path / "kb_if", **encoders, **FAST, class_names=cifar_classes)
    assert s.written == 40
    recs = _records(tmp_path / "kb_if")
    for r in recs:
        assert r["caption"] == f"a photo of a {cifar_classes[r['label']]}."
        assert r["source"].split("/")[0] == cifar_classes[r["label"]]
    assert sorted(r["label"] for r in recs) == sorted(s["label"] for s in mini_samples[:40])
    # JSONL manifest with class names, mapped onto a classifier with another class order
    target = list(reversed(cifar_classes))
    man = make_manifest(tmp_path / "man", mini_samples[::5], cifar_classes)
    s = build_kb(man, tmp_path / "kb_man", **encoders, **FAST, class_names=target)
    assert s.written == 20
    recs = _records(tmp_path / "kb_man")
    assert [target[r["label"]] for r in recs] == [cifar_classes[m["label"]] for m in mini_samples[::5]]
    assert [r["caption"] for r in recs] == [m["caption"].strip() for m in mini_samples[::5]]
    # a misspelt caption column: every sample would be skipped; refused before anything is created
    from retrofit.sources import manifest_source

    with pytest.raises(ValueError, match="has no 'text' column; columns: .* --caption-column"):
        build_kb(manifest_source(man, caption_col="text"), tmp_path / "kb_typo", **encoders, **FAST)
    assert not (tmp_path / "kb_typo").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(KnowledgeBaseError, match="exists and holds other files, not a knowledge base"):
        build_kb(man, tmp_path / "notes", **encoders, **FAST)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and len(list((tmp_path / "notes").iterdir())) == 1


def test_bad_data_is_skipped_and_reported(tmp_path, mini_samples, cifar_classes, encoders):  # noqa: F811
    good = mini_samples[:20]
    corrupt = dict(good[0], key="corrupt", jpg=good[0]["jpg"][:100] + b"\xff\x00" * 40)
    nocap = dict(good[1], key="nocap", caption=None)
    empty = dict(good[2], key="emptycap", caption="   ")
    dup = dict(good[3], key="dup_of_3")
    write_shard(tmp_path / "bad.tar", good + [corrupt, nocap, empty, dup],
                extra=[("noimage.txt", b"a caption whose image is missing"), ("noimage.cls", b"1")])
    s = build_kb(str(tmp_path / "bad.tar"), tmp_path / "kb", **encoders, **FAST, class_names=cifar_classes)
    assert (s.written, s.skipped, s.duplicates, s.total) == (20, 4, 1, 25)
    report = [json.loads(x) for x in (tmp_path / "kb" / REPORT_NAME).read_text().splitlines()]
    reasons = {e["key"].split("/")[1]: e["reason"] for e in report}
    assert set(reasons) == {"corrupt", "nocap", "emptycap", "noimage"}
    assert reasons["corrupt"].startswith("undecodable image")
    assert reasons["nocap"] == "no caption" and reasons["emptycap"] == "empty caption"
    assert reasons["noimage"] == "missing image member"
    assert len(_records(tmp_path / "kb")) == 20
    # without exact dedup the duplicate is kept
    s2 = build_kb(str(tmp_path / "bad.tar"), tmp_path / "kb2", **encoders, **FAST, dedup=False)
    assert (s2.written, s2.duplicates) == (21, 0)


def test_near_duplicates(tmp_path, shards, encoders):
    src = webdataset_source(shards)
    src.refs = src.refs[:40]
    s = build_kb(src, tmp_path / "kb", **encoders, **FAST, near_dup=0.85)
    assert s.near_duplicates > 0 and s.written + s.near_duplicates == 40
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        k = kb.vectors(torch.arange(len(kb)), which="key")
        sim = k @ k.T - 2 * torch.eye(len(kb))
        assert sim.max() < 0.85 + 2e-3  # float16 storage


_CHILD = textwrap.dedent("""
    import logging, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from retrofit.encoders import load_image_encoder, load_text_encoder
    from retrofit.ingest import build_kb
    img = load_image_encoder("darknet-tiny")
    raw = img._embed
    def slow(x):  # the real encoder, slowed so that the parent can kill the build half-way
        time.sleep(0.4)
        return raw(x)
    img._embed = slow
    print("ready", file=sys.stderr, flush=True)
    build_kb(sys.argv[1], sys.argv[2], image_encoder=img, text_encoder=load_text_encoder("minilm"),
             batch_size=10, commit_every=20, num_workers=1, progress=False)
""")


def _same_kb(a: Path, b: Path) -> None:
    ra, rb = _records(a), _records(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert (x["id"], x["label"], x["caption"], x["source"]) == (y["id"], y["label"], y["caption"], y["source"])
        for v in ("key", "image", "text"):
            assert torch.allclose(x[v], y[v], atol=3e-3), (x["id"], v)


def test_resume_after_sigkill_equals_clean_build(tmp_path, shards, encoders, clean_kb):
    kb = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-c", _CHILD, shards, str(kb)], stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in p.stderr:
            lines.append(line)
            if "committed" in line:  # at least one commit is on disk, and the build is still running
                p.send_signal(signal.SIGKILL)
                break
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "".join(lines[-20:])
    with KnowledgeBase.open(kb) as k:
        progress = next(v for n, v in k.user_meta.items() if n.startswith("ingest:"))
        assert 0 < progress["next"] < 100 and not progress.get("done")
        assert len(k) == progress["written"] == progress["next"]
    s = build_kb(shards, kb, **encoders, batch_size=10, commit_every=20, num_workers=1, progress=False)
    assert s.resumed_from == progress["next"] and s.written == 100
    _same_kb(kb, clean_kb)


def _interrupting_encoder():
    """A real Tiny Darknet encoder whose third batch raises KeyboardInterrupt (Ctrl-C mid-build), and its own
    forward, to put back with ``img._embed = raw`` before resuming."""
    img = load_image_encoder("darknet-tiny")
    raw, calls = img._embed, []

    def interrupt_on_third(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return raw(x)

    img._embed = interrupt_on_third
    return img, raw


def test_resume_after_ctrl_c(tmp_path, shards, encoders, clean_kb):
    img, raw = _interrupting_encoder()
    with pytest.raises(KeyboardInterrupt):
        build_kb(shards, tmp_path / "kb", image_encoder=img, text_encoder=encoders["text_encoder"], **FAST)
    with KnowledgeBase.open(tmp_path / "kb") as k:
        assert len(k) == 64  # the two encoded batches were committed on the way out
        # ... and not indexed on the way out (a full index build after Ctrl-C took minutes on a big KB); readers
        # search them all the same, and the resumed build indexes them
        assert k._main_next == 0
        nb = k.search(k.vectors(list(range(64)), "key"), 1)
        assert torch.equal(nb.ids[:, 0], torch.arange(64))
    img._embed = raw
    s = build_kb(shards, tmp_path / "kb", image_encoder=img, text_encoder=encoders["text_encoder"], **FAST)
    assert s.resumed_from == 64 and s.written == 100
    assert "resumed at sample 64" in str(s) and "100 written" in str(s)
    _same_kb(tmp_path / "kb", clean_kb)
    again = build_kb(shards, tmp_path / "kb", image_encoder=img, text_encoder=encoders["text_encoder"], **FAST)
    assert str(again).startswith(f"{tmp_path / 'kb'}: already complete, nothing to do")


def test_a_build_interrupted_while_indexing_is_indexed_by_the_rerun(tmp_path, shards, encoders, monkeypatch):
    """Found by a stress test: `kb build` killed while building the final index (after the commit that records
    "done") left a KB whose index lacked the records; the re-run said "already complete" and every reader
    searched the unindexed records exactly, for good."""
    calls = []

    def interrupted(orig):
        def run(self, *a, **k):
            if not self._meta["next_id"]:
                return orig(self, *a, **k)  # the empty KB's first index, at create()
            calls.append(1)
            raise KeyboardInterrupt  # Ctrl-C (or a kill) inside the final index build
        return run

    for name in ("_rebuild", "_catch_up"):
        monkeypatch.setattr(KnowledgeBase, name, interrupted(getattr(KnowledgeBase, name)))
    with pytest.raises(KeyboardInterrupt):
        build_kb(shards, tmp_path / "kb", **encoders, **FAST)
    monkeypatch.undo()
    with KnowledgeBase.open(tmp_path / "kb") as k:
        progress = next(v for n, v in k.user_meta.items() if n.startswith("ingest:"))
        assert calls and progress["done"] and len(k) == 100 and k._main_next < 100  # records in, index behind
    again = build_kb(shards, tmp_path / "kb", **encoders, **FAST)
    assert str(again).startswith(f"{tmp_path / 'kb'}: already complete, nothing to do")
    with KnowledgeBase.open(tmp_path / "kb") as k:
        assert k._main_next == 100 and k.verify()["ok"]


def test_add_and_merge(tmp_path, mini_samples, cifar_classes, encoders):  # noqa: F811
    write_shard(tmp_path / "a.tar", mini_samples[0:100:4])
    write_shard(tmp_path / "b.tar", mini_samples[2:100:4])
    kw = dict(**encoders, **FAST, class_names=cifar_classes)
    build_kb(str(tmp_path / "a.tar"), tmp_path / "kb_a", **kw)
    s = add_to_kb(tmp_path / "kb_a", str(tmp_path / "b.tar"), **kw)
    assert s.written == 25 and len(_records(tmp_path / "kb_a")) == 50
    with KnowledgeBase.open(tmp_path / "kb_a") as kb:  # the incrementally extended index finds new records
        q = kb.vectors(torch.tensor([10, 45]), which="key")
        assert kb.search(q, 1).ids[:, 0].tolist() == [10, 45]
    again = add_to_kb(tmp_path / "kb_a", str(tmp_path / "b.tar"), **kw, commit_every=1000)
    assert again.written == 25 and again.encode_s == 0.0  # the same add, already complete: nothing new
    assert "already complete" in str(again) and "`retrofit kb add --again`" in str(again)
    # records deleted since: --again reads the source anew and adds only what the KB lacks
    with KnowledgeBase.open(tmp_path / "kb_a", readonly=False) as kb:
        gone = [r["caption"] for r in kb.get(list(range(30, 35)))]
        kb.delete(list(range(30, 35)))
    back = add_to_kb(tmp_path / "kb_a", str(tmp_path / "b.tar"), **kw, again=True)
    assert (back.written, back.duplicates, back.kb_size) == (5, 20, 50)
    assert sorted(r["caption"] for r in _records(tmp_path / "kb_a")[-5:]) == sorted(gone)
    with pytest.raises(ValueError, match="needs dedup"):
        add_to_kb(tmp_path / "kb_a", str(tmp_path / "b.tar"), **kw, again=True, dedup=False)
    # merge: in-domain KB + another pool; duplicates by image hash dropped
    build_kb(str(tmp_path / "b.tar"), tmp_path / "kb_b", **kw)
    m = merge_kbs([tmp_path / "kb_a", tmp_path / "kb_b"], tmp_path / "merged", progress=False)
    assert (m.written, m.duplicates, m.kb_size) == (50, 25, 50)
    ma, mm = _records(tmp_path / "kb_a"), _records(tmp_path / "merged")
    assert [r["caption"] for r in ma] == [r["caption"] for r in mm]
    assert torch.allclose(ma[7]["image"], mm[7]["image"])
    # a KB with another text encoder cannot be merged
    from retrofit.fingerprint import EncoderFingerprint
    from retrofit.store import KBFingerprint

    with KnowledgeBase.open(tmp_path / "kb_b") as kb:
        fp = kb.fingerprint
        other = KBFingerprint(fp.key, fp.image, EncoderFingerprint("sentence-transformers", "other", "x", 384))
        with KnowledgeBase.create(tmp_path / "kb_c", kb.key_dim, kb.image_dim, kb.text_dim, other,
                                  class_names=cifar_classes) as c:
            c.add(kb.vectors([0], "key"), kb.vectors([0], "image"), kb.vectors([0], "text"))
    with pytest.raises(FingerprintMismatchError, match="text vectors"):
        merge_kbs([tmp_path / "kb_a", tmp_path / "kb_c"], tmp_path / "merged2", progress=False)
    # a second merge into the same output while one runs is refused (it deleted the first's work in progress)
    from retrofit.kb_merge import _one_merge_into

    with _one_merge_into(tmp_path / "merged3"):
        (tmp_path / ".merged3.merging").mkdir()  # the running merge's folder
        with pytest.raises(RetrofitError, match="another merge into .*merged3 is running"):
            merge_kbs([tmp_path / "kb_a", tmp_path / "kb_b"], tmp_path / "merged3", progress=False)
        assert (tmp_path / ".merged3.merging").is_dir()
    assert merge_kbs([tmp_path / "kb_a", tmp_path / "kb_b"], tmp_path / "merged3", progress=False).kb_size == 50
    deep = tmp_path / "new" / "deeper" / "merged"  # a parent that does not exist yet is created (as before the lock)
    assert merge_kbs([tmp_path / "kb_a", tmp_path / "kb_b"], deep, progress=False).kb_size == 50
    with pytest.raises(FingerprintMismatchError):
        add_to_kb(tmp_path / "kb_c", str(tmp_path / "b.tar"), **kw)


def test_configuration_errors_before_any_work(tmp_path, shards, cifar_classes, encoders):
    out = tmp_path / "kb"
    with pytest.raises(ValueError, match="match no class"):
        build_kb(shards, out, **encoders, class_names=cifar_classes[:5])
    with pytest.raises(ValueError, match="unknown build options"):
        build_kb(shards, out, **encoders, batchsize=3)
    with pytest.raises(ValueError, match="unknown image encoder family"):
        build_kb(shards, out, image_encoder="resnet:50", text_encoder=encoders["text_encoder"])
    with pytest.raises(FileNotFoundError):
        build_kb(str(tmp_path / "nothing-{000000..000001}.tar"), out, **encoders)
    with pytest.raises(ValueError, match="commit_every"):
        build_kb(shards, out, **encoders, commit_every=0)
    assert not out.exists()
    with pytest.raises(KnowledgeBaseError, match="not a knowledge base"):
        add_to_kb(out, shards, **encoders)
    # a different build into an existing KB is refused
    src = webdataset_source(shards)
    src.refs = src.refs[:8]
    build_kb(src, out, **encoders, **FAST)
    with pytest.raises(KnowledgeBaseError, match="already holds"):
        build_kb(src, out, **encoders, **FAST, dedup=False)
    # a class list in another order is refused before the encoders load (it took their ~10 s): an encoder spec
    # that cannot load shows that it is not reached
    with pytest.raises(ValueError, match="this build maps labels onto"):
        add_to_kb(out, src, class_names=cifar_classes[::-1], image_encoder="resnet:50",
                  text_encoder=encoders["text_encoder"], **FAST)
    # another encoder is refused by its spec before it loads (it took ~10 s): a checkpoint that does not exist shows
    # that the loader is not reached (it raises FileNotFoundError)
    for spec, what in (("timm:resnet18@/no/such/ckpt.pth", "of another family and name"),
                       ("darknet-tiny@96", "of another input_size")):
        with pytest.raises(FingerprintMismatchError, match=f"key vectors of .*{what}"):
            add_to_kb(out, src, image_encoder=spec, text_encoder=encoders["text_encoder"], **FAST)
    with pytest.raises(FingerprintMismatchError, match="text vectors of .*open_clip vectors of another family"):
        add_to_kb(out, src, image_encoder=encoders["image_encoder"], text_encoder="open_clip:RN50@/no/such.bin",
                  **FAST)
    with pytest.raises(FileNotFoundError):  # the same family and size: it gets to the loader
        add_to_kb(out, src, image_encoder=encoders["image_encoder"],
                  text_encoder="sentence-transformers:/no/such/model", **FAST)
    with KnowledgeBase.open(out) as kb:
        assert len(kb) == 8  # nothing written by the refused adds


def test_cli_build_merge(tmp_path, mini_samples, cifar_classes, capsys):  # noqa: F811
    from retrofit.cli import main

    write_shard(tmp_path / "a.tar", mini_samples[1:100:10])
    write_shard(tmp_path / "b.tar", mini_samples[3:100:10])
    classes = ",".join(cifar_classes)
    for name in ("a", "b"):
        index = ["--index", "hnsw", "--ef-construction", "24"] if name == "a" else []  # b: the defaults
        rc = main(["kb", "build", str(tmp_path / f"{name}.tar"), str(tmp_path / f"kb_{name}"), "--classes", classes,
                   "--batch-size", "8", "--quiet", "--json", *index])
        assert rc == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out["written"], out["skipped"]) == (10, 0)
    with KnowledgeBase.open(tmp_path / "kb_a") as a:
        assert a.info()["index"]["kind"] == "hnsw" and a.info()["index"]["config"]["ef_construction"] == 24
    assert main(["kb", "merge", str(tmp_path / "kb_a"), str(tmp_path / "kb_b"), "-o", str(tmp_path / "m"),
                 "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kb_size"] == 20
    with KnowledgeBase.open(tmp_path / "m") as m:  # the first input's index settings
        assert m.info()["index"]["kind"] == "hnsw" and m.info()["index"]["config"]["ef_construction"] == 24
    with pytest.raises(SystemExit) as e:  # a beam width under 1: the usage, exit 2, nothing built
        main(["kb", "build", str(tmp_path / "a.tar"), str(tmp_path / "kb_0"), "--ef-construction", "0"])
    assert e.value.code == 2 and "--ef-construction: must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "kb_0").exists()
    assert main(["kb", "merge", str(tmp_path / "kb_a"), str(tmp_path / "kb_b"), "-o", str(tmp_path / "m2"),
                 "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "20 written" in line and "records/s" in line and "encoders" not in line and "report" not in line
    assert main(["kb", "build", str(tmp_path / "a.tar"), str(tmp_path / "kb_x"), "--classes", "cat,dog"]) == 1
    assert "match no class" in capsys.readouterr().err
    assert not (tmp_path / "kb_x").exists()


def test_merge_is_all_or_nothing(tmp_path, shards, cifar_classes, encoders):
    kw = dict(**encoders, **FAST, class_names=cifar_classes)
    build_kb(shards, tmp_path / "kb_a", **kw)
    build_kb(shards, tmp_path / "kb_b", **kw)
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match="batch"):
        merge_kbs([tmp_path / "kb_a", tmp_path / "kb_b"], out, batch=0, progress=False)
    with pytest.raises(KnowledgeBaseError, match="missing does not exist"):  # nothing is left at out
        merge_kbs([tmp_path / "kb_a", tmp_path / "missing"], out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    import retrofit.kb_merge as km

    real_add, calls = km._add_records, []

    def failing_add(dst, recs):  # the disk fills up after the first batch was written
        calls.append(len(recs))
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_add(dst, recs)

    km._add_records = failing_add
    try:
        with pytest.raises(OSError, match="No space"):
            merge_kbs([tmp_path / "kb_a", tmp_path / "kb_b"], out, batch=10, dedup=False, progress=False)
    finally:
        km._add_records = real_add
    assert len(calls) == 2 and not out.exists() and not list(tmp_path.glob(".merged*"))
    (tmp_path / ".merged.merging").mkdir()  # left by a killed merge: cleared, not mistaken for a KB
    m = merge_kbs([tmp_path / "kb_a", tmp_path / "kb_b"], out, dedup=False, progress=False)
    assert m.kb_size == 2 * len(_records(tmp_path / "kb_a")) and not list(tmp_path.glob(".merged*"))
    with KnowledgeBase.open(out) as kb:
        q = kb.vectors(torch.tensor([3]), which="key")
        assert 3 in kb.search(q, 2).ids[0].tolist()
    with pytest.raises(RetrofitError, match="already exists"):
        merge_kbs([tmp_path / "kb_a", tmp_path / "kb_b"], out, progress=False)


def _web_manifest(root: Path, samples: list[dict], classes: list[str]) -> Path:
    """Web-like data: image, caption, and a label on every tenth row only (another class than the true one)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, s in enumerate(samples):
        (root / "img" / f"{s['key']}.jpg").write_bytes(s["jpg"])
        given = classes[(s["label"] + 1) % 10] if n % 10 == 0 else ""
        rows.append({"image": f"img/{s['key']}.jpg", "caption": s["caption"], "label": given})
    man = root / "web.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return man


def test_build_without_any_label_warns(tmp_path, mini_samples, cifar_classes, encoders, caplog):  # noqa: F811
    """Web data built without caption_labels: every record is unlabelled, which the build says."""
    rows = mini_samples[:12]
    man = _web_manifest(tmp_path, rows, cifar_classes)
    man.write_text("".join(json.dumps({**json.loads(line), "label": ""}) + "\n"
                           for line in man.read_text().splitlines()))
    with caplog.at_level("WARNING", logger="retrofit.ingest"):
        s = build_kb(man, tmp_path / "kb", **encoders, **FAST, class_names=cifar_classes)
    assert s.written == 12 and all(r["label"] == -1 for r in _records(tmp_path / "kb"))
    assert any("no sample of" in r.message and "--labels-from-captions" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="retrofit.ingest"):  # labelled data: no such warning
        build_kb(_web_manifest(tmp_path / "b", rows, cifar_classes), tmp_path / "kb2", **encoders, **FAST,
                 class_names=cifar_classes)
    assert not any("no sample of" in r.message for r in caplog.records)


def test_labels_from_captions_for_web_data(tmp_path, mini_samples, cifar_classes, encoders, data_dir, capsys):  # noqa: F811
    """A manifest of web-like data: most rows have no label; caption_labels reads one from each caption."""
    from retrofit.cifar10_lt import load_wordnet

    man = _web_manifest(tmp_path, mini_samples, cifar_classes)
    lemmas, glosses = load_wordnet(data_dir)
    syn = {c: lemmas[i] for i, c in enumerate(cifar_classes)}
    s = build_kb(man, tmp_path / "kb", **encoders, **FAST, class_names=cifar_classes, caption_labels=True,
                 class_synonyms=syn, class_descriptions=dict(zip(cifar_classes, glosses)))
    recs = _records(tmp_path / "kb")
    assert s.written == len(recs) == 100
    labels = [r["label"] for r in recs]
    truth = [m["label"] for m in mini_samples]
    for n in range(0, 100, 10):  # a given label is never overwritten
        assert labels[n] == (truth[n] + 1) % 10
    read = [n for n in range(100) if n % 10]
    right = sum(labels[n] == truth[n] for n in read) / len(read)
    unknown = sum(labels[n] == -1 for n in read) / len(read)
    assert 0.6 <= right <= 0.95 and 0.0 < unknown <= 0.25, (right, unknown)
    assert s.extra["labels_from_captions"] == sum(labels[n] >= 0 for n in read)
    assert f"; {s.extra['labels_from_captions']} labelled from their captions" in str(s)  # not only in --json
    # the rate leaves out loading the encoders (a small CLI build said 67 images/s while it ran at ~900)
    assert 0 <= s.extra["load_s"] < s.seconds
    assert s.images_per_s == pytest.approx(s.total / (s.seconds - s.extra["load_s"]))
    # without the option the same rows stay unlabelled
    plain = build_kb(man, tmp_path / "kb_plain", **encoders, **FAST, class_names=cifar_classes)
    assert plain.written == 100 and "labels_from_captions" not in plain.extra
    assert [r["label"] for r in _records(tmp_path / "kb_plain")][1:10] == [-1] * 9
    # bad settings fail before any work and leave nothing behind
    for kw, msg in (({"caption_labels": True}, "class names"),
                    ({"caption_labels": True, "class_names": cifar_classes, "class_synonyms": {"kitten": ["cat"]}},
                     "not among the class names"),
                    ({"class_names": cifar_classes, "class_synonyms": syn}, "only used with caption_labels"),
                    ({"caption_labels": True, "class_names": cifar_classes, "class_synonyms": {"cat": "kitty"}},
                     "lists of names"),
                    ({"caption_labels": True, "class_names": cifar_classes, "caption_min_similarity": 2.0},
                     "cosine")):
        with pytest.raises(ValueError, match=msg):
            build_kb(man, tmp_path / "kb_bad", **encoders, **FAST, **kw)
        assert not (tmp_path / "kb_bad").exists()
    # the CLI flags
    from retrofit.cli import main

    (tmp_path / "syn.json").write_text(json.dumps(syn))
    rc = main(["kb", "build", str(man), str(tmp_path / "kb_cli"), "--classes", ",".join(cifar_classes), "--quiet",
               "--labels-from-captions", "--class-synonyms", str(tmp_path / "syn.json"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cli_labels = [r["label"] for r in _records(tmp_path / "kb_cli")]  # no glosses here: close to, not equal to, s
    assert out["extra"]["labels_from_captions"] == sum(cli_labels[n] >= 0 for n in read)
    assert sum(a == b for a, b in zip(cli_labels, labels)) >= 85
    (tmp_path / "bad.json").write_text(json.dumps({"cat": "kitty"}))
    rc = main(["kb", "build", str(man), str(tmp_path / "kb_cli2"), "--classes", ",".join(cifar_classes), "--quiet",
               "--labels-from-captions", "--class-synonyms", str(tmp_path / "bad.json")])
    assert rc == 1 and "expected a JSON object" in capsys.readouterr().err
    rc = main(["kb", "build", str(man), str(tmp_path / "kb_cli3"), "--classes", ",".join(cifar_classes), "--quiet",
               "--caption-min-similarity", "0.3"])
    assert rc == 1 and "only used with --labels-from-captions" in capsys.readouterr().err
    # resuming a caption-labelled build: the count is over the whole build, like written / skipped
    again = build_kb(man, tmp_path / "kb", **encoders, **FAST, class_names=cifar_classes, caption_labels=True,
                     class_synonyms=syn, class_descriptions=dict(zip(cifar_classes, glosses)))
    assert again.written == 100 and again.encode_s == 0.0
    assert again.extra["labels_from_captions"] == s.extra["labels_from_captions"]


def test_caption_labels_resume_after_ctrl_c(tmp_path, mini_samples, cifar_classes, encoders):  # noqa: F811
    """An interrupted caption-labelled build resumes to the clean build's records and count."""
    man = _web_manifest(tmp_path, mini_samples, cifar_classes)
    kw = dict(**FAST, class_names=cifar_classes, caption_labels=True, text_encoder=encoders["text_encoder"])
    clean = build_kb(man, tmp_path / "clean", image_encoder=encoders["image_encoder"], **kw)
    img, raw = _interrupting_encoder()
    with pytest.raises(KeyboardInterrupt):
        build_kb(man, tmp_path / "kb", image_encoder=img, **kw)
    img._embed = raw
    s = build_kb(man, tmp_path / "kb", image_encoder=img, **kw)
    assert s.resumed_from == 64 and s.written == 100
    assert s.extra["labels_from_captions"] == clean.extra["labels_from_captions"] > 0
    _same_kb(tmp_path / "kb", tmp_path / "clean")


def test_first_build_failing_before_any_record_leaves_nothing(tmp_path, shards, encoders):
    """An encoder whose preprocessing returns PIL images fails on the first batch: the KB this build created is
    removed (a re-run with the fixed encoder would otherwise be refused as 'another build'); a later failure of
    a build that has records keeps them for resuming."""
    from retrofit.encoders import ImageEncoder

    img = encoders["image_encoder"]
    broken = ImageEncoder(img._embed, lambda im: im, img.fingerprint, module=img.module)  # no ToTensor
    with pytest.raises(TypeError):
        build_kb(shards, tmp_path / "kb", image_encoder=broken, text_encoder=encoders["text_encoder"], **FAST)
    assert not (tmp_path / "kb").exists()
    s = build_kb(shards, tmp_path / "kb", **encoders, **FAST)  # the fixed build goes through
    assert s.written == 100
    from retrofit.ingest import BuildConfig

    with pytest.raises(ValueError, match="float16 or float32"):
        BuildConfig(dtype="bfloat16").validate()
    # a comma-separated string was read letter by letter ("class_names has duplicates ...: airplane,automobile")
    with pytest.raises(ValueError, match=r"list of class-name strings, got 'airplane,automobile' \(split it"):
        build_kb(shards, tmp_path / "kb2", class_names="airplane,automobile", **encoders, **FAST)
    assert not (tmp_path / "kb2").exists()


def test_cli_build_where_every_sample_is_bad_fails(tmp_path, mini_samples, capsys):  # noqa: F811
    """`retrofit kb build` that writes nothing (every image undecodable) exits 1 naming the report (it exited 0)."""
    from retrofit.cli import main

    bad = [dict(s, key=f"bad{i}", jpg=s["jpg"][:50] + b"\xff\x00" * 20) for i, s in enumerate(mini_samples[:3])]
    write_shard(tmp_path / "bad.tar", bad)
    rc = main(["kb", "build", str(tmp_path / "bad.tar"), str(tmp_path / "kb"), "--workers", "0", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "every one of the 3 samples was skipped" in err and REPORT_NAME in err


def test_cli_add_uses_the_kbs_own_encoders(tmp_path, mini_samples, cifar_classes, capsys):  # noqa: F811
    """`kb add` without encoder options takes the specs the KB was built with (it used the defaults and failed on
    a KB built with another encoder, pointing to a flag `kb add` does not have); a wrong one is named with the fix."""
    from retrofit.cli import main

    for name, part in (("a", 1), ("b", 3), ("c", 5)):
        write_shard(tmp_path / f"{name}.tar", mini_samples[part:100:10])
    kb = str(tmp_path / "kb")
    common = ["--classes", ",".join(cifar_classes), "--batch-size", "8", "--quiet", "--json"]
    assert main(["kb", "build", str(tmp_path / "a.tar"), kb, "--image-encoder", "torchvision:resnet18@random",
                 *common]) == 0
    capsys.readouterr()
    with KnowledgeBase.open(kb) as k:
        assert k.user_meta["encoder_specs"] == {"image": "torchvision:resnet18@random", "text": "minilm"}
    assert main(["kb", "add", kb, str(tmp_path / "b.tar"), *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 10
    assert main(["kb", "add", kb, str(tmp_path / "c.tar"), "--image-encoder", "darknet-tiny", *common]) == 1
    err = capsys.readouterr().err
    assert "built with --image-encoder torchvision:resnet18@random" in err and "leave --image-encoder out" in err
    with KnowledgeBase.open(kb) as k:
        assert len(k) == 20  # the refused add wrote nothing
    # a *build* into it with another encoder: the hint names the spec, never "leave it out" (that means the default)
    assert main(["kb", "build", str(tmp_path / "a.tar"), kb, *common]) == 1
    err = capsys.readouterr().err
    assert "built with --image-encoder torchvision:resnet18@random" in err and "leave" not in err
    # a merge keeps the specs, so `kb add` to the merged KB works too
    assert main(["kb", "merge", kb, kb, "-o", str(tmp_path / "m"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["kb", "add", str(tmp_path / "m"), str(tmp_path / "c.tar"), *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 10


def test_recorded_checkpoint_paths_work_from_another_directory(
        tmp_path, mini_samples, cifar_classes, monkeypatch, capsys):  # noqa: F811
    """A relative checkpoint path given at build is recorded absolute: `kb add` from elsewhere finds it."""
    import torchvision

    from retrofit.cli import main

    for name, part in (("a", 1), ("b", 3)):
        write_shard(tmp_path / f"{name}.tar", mini_samples[part:100:10])
    work = tmp_path / "work"
    work.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), work / "mnv3.pth")
    common = ["--classes", ",".join(cifar_classes), "--batch-size", "8", "--quiet", "--json"]
    monkeypatch.chdir(work)
    assert main(["kb", "build", "../a.tar", "../kb", "--image-encoder", "torchvision:mobilenet_v3_small@mnv3.pth",
                 *common]) == 0
    monkeypatch.chdir(tmp_path)
    with KnowledgeBase.open("kb") as k:
        assert k.user_meta["encoder_specs"]["image"] == f"torchvision:mobilenet_v3_small@{work / 'mnv3.pth'}"
    capsys.readouterr()
    assert main(["kb", "add", "kb", "b.tar", *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 10


def test_merge_keeps_the_first_inputs_storage_and_index_settings(tmp_path):
    g = torch.Generator().manual_seed(8)
    settings = dict(dtype="float32", index="hnsw", hnsw_m=16, hnsw_storage="float32", ef_construction=24,
                    recall_target=0.9)
    for name in ("a", "b"):
        with KnowledgeBase.create(tmp_path / name, 8, 8, 4, **settings) as kb:
            kb.add(torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, 4, generator=g))
    merge_kbs([tmp_path / "a", tmp_path / "b"], tmp_path / "m", progress=False)
    with KnowledgeBase.open(tmp_path / "m") as m, KnowledgeBase.open(tmp_path / "a") as a:
        assert len(m) == 80 and m.info()["dtype"] == "float32" and m.info()["index"]["kind"] == "hnsw"
        assert m.info()["index"]["config"] == a.info()["index"]["config"]
        assert torch.equal(m.vectors([0, 1], "image"), a.vectors([0, 1], "image"))  # float32 kept exactly


def test_a_build_is_the_same_build_however_its_source_path_is_spelled(
        tmp_path, mini_samples, cifar_classes, encoders, monkeypatch):  # noqa: F811
    """Re-running (or resuming) a build as ./x.tar, /abs/x.tar or from another directory was refused as 'built from
    other data'; the build id now holds the resolved paths (ids recorded before still match)."""
    from retrofit import ingest

    write_shard(tmp_path / "a.tar", mini_samples[0:40:4])
    kw = dict(**encoders, **FAST, class_names=cifar_classes)
    monkeypatch.chdir(tmp_path)
    first = build_kb("./a.tar", "kb", **kw)
    assert first.written == 10
    again = build_kb(str(tmp_path / "a.tar"), tmp_path / "kb", **kw, commit_every=1000)
    assert again.encode_s == 0.0 and again.written == 10  # already complete: nothing encoded
    # a KB whose build was recorded under the old id (the path as given) is still recognised
    real_id = ingest._build_id
    monkeypatch.setattr(ingest, "_build_id", lambda *a, resolved=True: real_id(*a, resolved=False))
    build_kb("./a.tar", "kb_old", **kw)
    monkeypatch.setattr(ingest, "_build_id", real_id)
    with KnowledgeBase.open(tmp_path / "kb_old") as kb:
        (key,) = [k for k in kb.user_meta if k.startswith(ingest._META_PREFIX)]
    cfg = ingest._config(None, {**FAST, "class_names": cifar_classes})
    with KnowledgeBase.open(tmp_path / "kb_old") as kb:
        fp = kb.fingerprint
    src = ingest.open_source("./a.tar")
    assert key != ingest._META_PREFIX + real_id("build", src, cfg, fp, cifar_classes)  # recorded the old way
    old = build_kb("./a.tar", "kb_old", **kw, commit_every=1000)
    assert old.encode_s == 0.0 and old.written == 10


def test_a_source_without_captions_is_told_the_fix_for_its_kind(tmp_path, mini_samples, encoders):  # noqa: F811
    """Shards without caption members were told to pass --caption-column, which only manifests have."""
    write_shard(tmp_path / "nocap-000000.tar", [dict(s, caption=None) for s in mini_samples[:5]])
    with pytest.raises(ValueError, match=r"has a caption, so every sample would be skipped; add \.txt .* members to "
                                         r"the shards, or build without captions \(--allow-missing-captions"):
        build_kb(str(tmp_path / "nocap-000000.tar"), tmp_path / "kb", **encoders, **FAST)
    assert not (tmp_path / "kb").exists()


def test_kb_add_ctrl_c_after_a_commit_adds_nothing_twice(tmp_path, mini_samples, cifar_classes, encoders,  # noqa: F811
                                                         monkeypatch):
    """Found by a crash soak: Ctrl-C while add() updated the index, after the LMDB commit, made the builder's
    interrupt handler commit the same records again (duplicates, kept by the resume)."""
    import retrofit.kb_maint as km

    write_shard(tmp_path / "a.tar", mini_samples[0:40])
    write_shard(tmp_path / "b.tar", mini_samples[40:100])
    kw = dict(**encoders, **FAST, class_names=cifar_classes)
    build_kb(str(tmp_path / "a.tar"), tmp_path / "kb", **kw)
    real, calls = km.KBIndexMixin._catch_up, [0]

    def catch_up(self):
        real(self)
        calls[0] += 1
        if calls[0] == 2:  # the second commit's records are in (and indexed): then the Ctrl-C lands
            raise KeyboardInterrupt

    monkeypatch.setattr(km.KBIndexMixin, "_catch_up", catch_up)
    with pytest.raises(KeyboardInterrupt):
        add_to_kb(tmp_path / "kb", str(tmp_path / "b.tar"), **{**kw, "batch_size": 16}, commit_every=16)
    monkeypatch.undo()
    sources = [r["source"] for r in _records(tmp_path / "kb")]
    assert len(sources) == len(set(sources)) == 40 + 32  # two commits of 16, each once
    add_to_kb(tmp_path / "kb", str(tmp_path / "b.tar"), **{**kw, "batch_size": 16}, commit_every=16)  # resume
    sources = [r["source"] for r in _records(tmp_path / "kb")]
    assert len(sources) == len(set(sources)) == 100


def test_class_lists_from_the_data_and_from_the_kb_are_kept_apart(tmp_path, mini_samples, cifar_classes,  # noqa: F811
                                                                  encoders, caplog):
    """Found by a review of the class-list inference for manifests of class names: (a) added to a KB that numbers
    its labels without names, the manifest's sorted names numbered cats 0 and dogs 1, silently; (b) caption
    labelling refused the class list a webdataset source brings (classes.json)."""
    import csv

    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for s in mini_samples[:20]:
        (img / f"{s['key']}.jpg").write_bytes(s["jpg"])
        rows.append({"image": f"img/{s['key']}.jpg", "caption": s["caption"] or "x", "label": s["label"]})
    with open(tmp_path / "ints.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    with caplog.at_level("WARNING", logger="retrofit.ingest"):
        s = build_kb(str(tmp_path / "ints.csv"), tmp_path / "kb", **encoders, **FAST)  # numbers, no class list
    assert s.written == 20
    assert "labels are class numbers and no class list names them" in caplog.text  # said at build, not at train
    assert "pass --classes" in caplog.text and "retrofit kb classes KB --set FILE" in caplog.text
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        assert kb.class_names is None
    names = make_manifest(tmp_path / "names", mini_samples[20:30], cifar_classes)  # labels 'cat', 'dog', ...
    with pytest.raises(ValueError, match=r"are class names, but .*kb has no class list to number them by.*--classes"):
        add_to_kb(tmp_path / "kb", str(names), **encoders, **FAST)
    folder = make_imagefolder(tmp_path / "folder", mini_samples[30:36], cifar_classes)  # the same for folder names
    with pytest.raises(ValueError, match=r"are folder names, but .*kb has no class list"):
        add_to_kb(tmp_path / "kb", str(folder), **encoders, **FAST)
    assert len(_records(tmp_path / "kb")) == 20
    assert add_to_kb(tmp_path / "kb", str(names), **encoders, **FAST, class_names=cifar_classes).written == 10
    # (b) a webdataset's classes.json is the data's own list: caption labelling takes it
    web = make_shards(tmp_path / "web", [dict(m, label=-1) for m in mini_samples[:12]], cifar_classes, n=1)
    s = build_kb(web, tmp_path / "kb_web", **encoders, **FAST, caption_labels=True)
    assert s.written == 12 and s.extra["labels_from_captions"] > 0


def test_a_ctrl_c_during_a_batchs_bookkeeping_waits_for_it(tmp_path, shards, encoders):
    """A Ctrl-C landing between a batch's records and its source position (or between two of its lists) committed
    records past the recorded position: the resume wrote them twice (--no-dedup: 250 records for 200 samples) or
    the commit on the way out failed ("labels must be (100,) integers, got (50,)"). The bookkeeping now holds the
    Ctrl-C until it is done. A real SIGINT is sent from inside it here (by a tracer), on the second batch."""
    import inspect
    import os
    import signal
    import sys

    import retrofit.kb_builder as kbb

    lines, first = inspect.getsourcelines(kbb._Builder._take)
    target = first + next(i for i, t in enumerate(lines) if 'self._pos = batch["index"][-1] + 1' in t)
    hits = []

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != kbb.__file__:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == target:
                hits.append(1)
                if len(hits) == 2:  # the second batch, inside its bookkeeping
                    os.kill(os.getpid(), signal.SIGINT)
            return local
        return local

    opts = dict(FAST, batch_size=16, commit_every=64, dedup=False)
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            build_kb(shards, tmp_path / "kb", **encoders, **opts)
    finally:
        sys.settrace(None)
    with KnowledgeBase.open(tmp_path / "kb") as k:
        progress = next(v for n, v in k.user_meta.items() if n.startswith("ingest:"))
        assert len(k) == progress["written"] == progress["next"] == 32  # both batches, whole, at position 32
    s = build_kb(shards, tmp_path / "kb", **encoders, **opts)
    assert s.resumed_from == 32 and s.kb_size == 100  # every sample once
