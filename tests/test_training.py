"""Head training end to end on real data: 300 CIFAR-10 images, Tiny Darknet features, a small KB whose
entries are 200 of those images with MiniLM caption vectors (so training must exclude each sample's own entry)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_cifar_balanced

from retrofit.errors import RetrofitError
from retrofit.evaluation import METRIC_KEYS, evaluate, markdown_table, save_results
from retrofit.feature_cache import FeatureCache, FeatureSet, extract_features, retrieve
from retrofit.head import HeadConfig, RetrievalHead
from retrofit.linear_probe import cross_fit_logits, fit_linear_probe
from retrofit.plots import plot_per_class_accuracy
from retrofit.store import InMemoryStore, KBFingerprint
from retrofit.training import TrainConfig, lr_at, predict_logits, train

N_KB = 200  # the first 200 samples are the training set AND the knowledge base
K = 8


@pytest.fixture(scope="module")
def real(data_dir):
    from retrofit.encoders import load_text_encoder
    from retrofit.models import darknet_tiny

    samples = read_cifar_balanced(data_dir, 30)  # 300 real samples, 30 per class, classes interleaved
    model = darknet_tiny(pretrained=True)
    pre = model.preprocess(64)
    images = torch.stack([pre(s["image"]) for s in samples])  # (300, 3, 64, 64)
    labels = torch.tensor([s["label"] for s in samples])
    with torch.no_grad():
        z = model.forward_head(model.forward_features(images), pre_logits=True)  # (300, 512)
    text_enc = load_text_encoder("minilm")
    captions = [s["caption"] for s in samples[:N_KB]]
    text = text_enc.encode(captions)  # (200, 384)
    store = InMemoryStore(512, 512, 384, KBFingerprint(key=model.fingerprint, image=model.fingerprint,
                                                          text=text_enc.fingerprint))
    ids = store.add(z[:N_KB], torch.nn.functional.normalize(z[:N_KB], dim=1), text, labels[:N_KB], captions)
    assert ids.tolist() == list(range(N_KB))
    return {"model": model, "images": images, "labels": labels, "z": z, "store": store}


def _features(real, store, rows, exclude_self: bool) -> FeatureSet:
    z, y = real["z"][rows], real["labels"][rows]
    ex = rows[:, None].clone() if exclude_self else None  # (N, 1): KB id of each sample's own entry
    return retrieve(FeatureSet(z=z, labels=y, exclude=ex), store, K)


@pytest.fixture(scope="module")
def data(real):
    store = real["store"]
    tr = torch.arange(N_KB)
    va = torch.arange(N_KB, 300)
    train_fs = _features(real, store, tr, exclude_self=True)
    # host branch: a linear probe; out-of-fold logits for its own training set (no leakage of the host's fit)
    train_fs.host_logits = cross_fit_logits(train_fs.z, train_fs.labels, 10, folds=3)
    probe = fit_linear_probe(train_fs.z, train_fs.labels, 10)
    val_fs = _features(real, store, va, exclude_self=False)
    with torch.no_grad():
        val_fs.host_logits = probe(val_fs.z)
    return train_fs, val_fs, probe


def _head(seed: int = 0) -> RetrievalHead:
    torch.manual_seed(seed)
    return RetrievalHead(HeadConfig(query_dim=512, image_dim=512, text_dim=384, num_classes=10, dim=64, depth=2,
                                    heads=4, k=K, dropout=0.1))


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=50, lr=3e-3, progress=False, log_every=2, seed=3)
    return TrainConfig(**{**base, **kw})


def test_self_exclusion(data):
    train_fs, _, _ = data
    own = torch.arange(N_KB)[:, None]
    assert not (train_fs.neighbor_ids == own).any(), "a training sample retrieved its own KB entry"
    assert (train_fs.neighbor_ids >= 0).all() and train_fs.neighbor_ids.shape == (N_KB, K)


def test_cache_hit_and_invalidation(real, tmp_path):
    calls = {"encoder": 0, "search": 0}
    model, images, labels = real["model"], real["images"][:64], real["labels"][:64]
    store = InMemoryStore(512, 512, 384, real["store"].fingerprint)
    s = real["store"]
    store.add(s.keys[:N_KB], s.image[:N_KB], s.text[:N_KB], s.labels[:N_KB])

    def featurize(x):
        calls["encoder"] += 1
        with torch.no_grad():
            return model.forward_head(model.forward_features(x), pre_logits=True)

    def batches():
        return [(images[i:i + 16], labels[i:i + 16], torch.arange(i, i + 16)[:, None]) for i in range(0, 64, 16)]

    def neighbours(fs):
        calls["search"] += 1
        return retrieve(fs, store, K)

    def get(cache, fp):
        return cache.get_or_compute(
            "train", {"model": fp, "data": "cifar10 train[:64] @64px"}, lambda: extract_features(featurize, batches()),
            {"kb": store.fingerprint, "generation": store.generation, "size": len(store), "k": K}, neighbours)

    first = get(FeatureCache(tmp_path), model.fingerprint)
    assert calls == {"encoder": 4, "search": 1}
    cache = FeatureCache(tmp_path)  # a new run
    second = get(cache, model.fingerprint)
    assert calls == {"encoder": 4, "search": 1} and cache.hits == 2 and cache.misses == 0
    for name in ("z", "labels", "exclude", "neighbor_ids", "neighbor_scores", "neighbor_labels"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not (second.neighbor_ids == torch.arange(64)[:, None]).any()
    # the KB changes (new generation): retrieval is redone, the backbone is not; the stale entry is removed
    store.add(s.keys[N_KB:N_KB + 1], s.image[N_KB:N_KB + 1], s.text[N_KB:N_KB + 1])
    get(FeatureCache(tmp_path), model.fingerprint)
    assert calls == {"encoder": 4, "search": 2}
    assert len(list(tmp_path.glob("train.neighbors-*"))) == 1
    # another model: everything is recomputed
    from dataclasses import replace
    get(FeatureCache(tmp_path), replace(model.fingerprint, weights="sha256:0000"))
    assert calls == {"encoder": 8, "search": 3}
    # a neighbour step that sets the self-exclusion ids itself (retrofit.pipeline's does: they come from the KB):
    # a cache hit keeps them (it lost them, and training's mixup reads them)
    def with_exclude(fs):
        calls["search"] += 1
        return retrieve(replace(fs, exclude=torch.arange(len(fs))[:, None]), store, K)

    def get2(cache):
        return cache.get_or_compute("plain", {"data": "no exclude"},
                                    lambda: replace(extract_features(featurize, batches()), exclude=None),
                                    {"kb": store.fingerprint, "generation": store.generation}, with_exclude)

    fresh, cached = get2(FeatureCache(tmp_path)), get2(FeatureCache(tmp_path))
    assert calls["search"] == 4 and cached.exclude is not None and torch.equal(fresh.exclude, cached.exclude)


def test_training_reduces_loss_then_evaluate_and_plot(data, real, tmp_path):
    train_fs, val_fs, _ = data
    head = _head()

    def train_nll() -> float:  # cross-entropy on the training set, no smoothing / mixup
        logits = predict_logits(head, train_fs, real["store"])["logits"]
        return torch.nn.functional.cross_entropy(logits, train_fs.labels).item()

    before = train_nll()  # a fresh head gives the host's logits
    res = train(head, train_fs, _cfg(epochs=8, batch_size=25, lr=1e-2, mixup_alpha=0.0), store=real["store"],
                val_features=val_fs, out_dir=tmp_path / "run")  # mixup is exercised by the other tests
    losses = [h["train_loss"] for h in res.history]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.02, losses
    after = train_nll()
    assert after < before - 0.02, (before, after)
    assert all("val_top1" in h and "val_nll" in h for h in res.history)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and sum(r["event"] == "epoch" for r in log) == 8
    assert any(r["event"] == "step" and r["samples_per_s"] > 0 for r in log)
    assert (tmp_path / "run" / "head" / "config.json").is_file()
    loaded = RetrievalHead.load(tmp_path / "run" / "head")
    pred = predict_logits(loaded, val_fs, real["store"])
    pred_live = predict_logits(loaded, FeatureSet(z=val_fs.z, labels=val_fs.labels, host_logits=val_fs.host_logits),
                               real["store"])  # live retrieval gives the same result as cached ids
    torch.testing.assert_close(pred["logits"], pred_live["logits"], rtol=1e-5, atol=1e-5)
    results = {
        "host": evaluate(pred["host_logits"], val_fs.labels, train_fs.labels, cutoffs=(25, 15)),
        "retrofitted": evaluate(pred["logits"], val_fs.labels, train_fs.labels, cutoffs=(25, 15)),
    }
    assert 0.0 <= results["retrofitted"]["top1"] <= results["retrofitted"]["top5"] <= 1.0
    save_results(results, tmp_path / "eval.json", tmp_path / "eval.md")
    back = json.loads((tmp_path / "eval.json").read_text())
    for r in back.values():
        assert set(METRIC_KEYS) <= set(r), set(METRIC_KEYS) - set(r)
    assert "| retrofitted |" in markdown_table(results)
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # the caller's own backend (a notebook's inline one, say)
    try:
        png = plot_per_class_accuracy(results, tmp_path / "per_class.png")
        assert matplotlib.get_backend() == "svg"  # untouched (it was switched to Agg: later plt.show() went silent)
    finally:
        matplotlib.use(backend)
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).ndim == 3


def test_interrupt_leaves_checkpoint_and_resume_matches(data, real, tmp_path):
    train_fs, _, _ = data
    cfg = _cfg(epochs=2)
    straight = _head()
    train(straight, train_fs, cfg, store=real["store"])

    head = _head()
    seen = {"n": 0}

    def stop(module, args, output):
        seen["n"] += 1
        if seen["n"] == 6:  # the 6th step: epoch 2, step 2 of 4
            raise KeyboardInterrupt

    handle = head.register_forward_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        train(head, train_fs, cfg, store=real["store"], out_dir=tmp_path)
    handle.remove()
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 1, 5)
    interrupted = RetrievalHead.load(tmp_path / "head")  # usable as it stands
    torch.testing.assert_close(interrupted.state_dict()["readout.fc.weight"], head.state_dict()["readout.fc.weight"])
    resumed_head = _head(seed=99)  # different init: everything must come from the checkpoint
    res = train(resumed_head, train_fs, cfg, store=real["store"], out_dir=tmp_path, resume=True)
    assert len(res.step_losses) == 2 * 4 - 5 and len(res.history) == 2
    for (n, a), b in zip(straight.state_dict().items(), resumed_head.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{n} differs after resume")


def test_resume_after_an_interrupt_past_the_optimizer_step(data, real, tmp_path, monkeypatch):
    """A Ctrl-C after the optimizer step but before the step was counted (float(loss) waits for the GPU there)
    made a resume apply that step twice (one inside the optimizer's own update cannot be made atomic). The resumed
    epoch's train_loss also averaged only the steps after the resume, and a kill between an epoch's log record and
    its checkpoint left that record twice in the log."""
    train_fs, _, _ = data
    cfg = _cfg(epochs=2)
    straight = _head()
    ref = train(straight, train_fs, cfg, store=real["store"])
    real_update, calls = torch.amp.GradScaler.update, {"n": 0}

    def update_then_stop(self, *a, **kw):  # right after the optimizer step, as a Ctrl-C landing there
        real_update(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, step 2 of 4
            raise KeyboardInterrupt

    monkeypatch.setattr(torch.amp.GradScaler, "update", update_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path)
    monkeypatch.setattr(torch.amp.GradScaler, "update", real_update)
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 2, 6)
    log_path = tmp_path / "train_log.jsonl"
    with open(log_path, "a") as f:  # as if killed after logging epoch 2 but before its checkpoint
        f.write(json.dumps({"event": "epoch", "epoch": 2, "train_loss": 9.9}) + "\n")
    with open(log_path, "ab") as f:  # and a damaged line (not UTF-8): kept, it no longer stops the resume
        f.write(b"\xff\xfe garbage\n")
    import tqdm.auto

    real_bar = tqdm.auto.tqdm

    def bar_then_stop(*a, **kw):  # a second Ctrl-C right after resuming, before the epoch's loop starts
        monkeypatch.setattr(tqdm.auto, "tqdm", real_bar)
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.auto, "tqdm", bar_then_stop)
    with pytest.raises(KeyboardInterrupt):  # (it saved an empty partial loss for the epoch)
        train(_head(seed=5), train_fs, cfg, store=real["store"], out_dir=tmp_path, resume=True)
    resumed = _head(seed=99)
    res = train(resumed, train_fs, cfg, store=real["store"], out_dir=tmp_path, resume=True)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{n} differs after resume"
    assert [h["train_loss"] for h in res.history] == pytest.approx([h["train_loss"] for h in ref.history])
    lines = log_path.read_bytes().splitlines()
    assert b"\xff\xfe garbage" in lines
    recs = [json.loads(x) for x in lines if b"garbage" not in x]
    assert [r["epoch"] for r in recs if r["event"] == "epoch"] == [1, 2]
    # the step the interrupt landed after was counted: its record is written too (it was lost), once
    assert [r["global_step"] for r in recs if r["event"] == "step"] == [2, 4, 6, 8]


def test_corrupt_checkpoint_is_named(data, real, tmp_path):
    train_fs, _, _ = data
    train(_head(), train_fs, _cfg(epochs=1), store=real["store"], out_dir=tmp_path)
    w = tmp_path / "checkpoints" / "last" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(RetrofitError, match="corrupt") as e:
        train(_head(), train_fs, _cfg(epochs=2), store=real["store"], out_dir=tmp_path, resume=True)
    assert str(w.parent) in str(e.value) and "delete" in str(e.value)
    other = RetrievalHead(HeadConfig(query_dim=512, image_dim=512, text_dim=384, num_classes=10, dim=32, depth=1,
                                     heads=4, k=K))
    train(_head(), train_fs, _cfg(epochs=1), store=real["store"], out_dir=tmp_path / "b")
    with pytest.raises(RetrofitError, match="trained with head.depth=2, head.dim=64, .*this run has head.depth=1"):
        train(other, train_fs, _cfg(epochs=2), store=real["store"], out_dir=tmp_path / "b", resume=True)
    state = tmp_path / "b" / "checkpoints" / "last" / "state.json"
    doc = json.loads(state.read_text())
    del doc["run"]  # a checkpoint from before run signatures: the weights' shapes still tell
    state.write_text(json.dumps(doc))
    with pytest.raises(RetrofitError, match="does not fit this head"):
        train(other, train_fs, _cfg(epochs=2), store=real["store"], out_dir=tmp_path / "b", resume=True)


def test_damaged_checkpoints_are_named_not_raw_errors(data, real, tmp_path):
    """A damaged state.json gave AttributeError / KeyError / TypeError, a flipped byte in the weights loaded
    silently, an optimizer moment of another shape failed at the first step: each is a RetrofitError naming the
    checkpoint and what is wrong."""
    import shutil

    from safetensors.torch import load_file, save_file

    train_fs, _, _ = data
    good = tmp_path / "good"
    train(_head(), train_fs, _cfg(epochs=1), store=real["store"], out_dir=good)

    def resume_after(name, damage, match):
        out = tmp_path / name
        shutil.copytree(good, out)
        last = out / "checkpoints" / "last"
        damage(last)
        with pytest.raises(RetrofitError, match=match) as e:
            train(_head(), train_fs, _cfg(epochs=2), store=real["store"], out_dir=out, resume=True)
        assert str(last) in str(e.value) and "delete" in str(e.value)

    def edit(f):
        def damage(last):
            doc = json.loads((last / "state.json").read_text())
            doc = f(doc)
            (last / "state.json").write_text(json.dumps(doc))
        return damage

    def flip(last):
        raw = bytearray((last / "weights.safetensors").read_bytes())
        raw[-9] ^= 0x40  # inside the tensor data: the file still parses
        (last / "weights.safetensors").write_bytes(bytes(raw))

    def moment(last):
        t = load_file(str(last / "optimizer.safetensors"))
        key = next(n for n in t if n.endswith("exp_avg") and t[n].dim() == 2)
        t[key] = t[key][:1].clone()
        save_file(t, str(last / "optimizer.safetensors"))
        edit(lambda d: {**d, "sha256": None})(last)  # as a checkpoint written before checksums

    resume_after("list", edit(lambda d: []), "state.json holds a list")
    resume_after("epoch", edit(lambda d: {**d, "epoch": "1"}), "epoch is '1', not a count")
    resume_after("history", edit(lambda d: {k: v for k, v in d.items() if k != "history"}), "history is missing")
    resume_after("flip", flip, "weights.safetensors does not match its checksum")
    resume_after("moment", moment, r"optimizer moment exp_avg has shape \(1, \d+\)")


def test_class_count_mismatch(data, real):
    train_fs, _, _ = data
    with torch.no_grad():
        imagenet_logits = real["model"](real["images"][:N_KB])  # (200, 1000): the raw ImageNet head
    bad = FeatureSet(z=train_fs.z, labels=train_fs.labels, host_logits=imagenet_logits,
                     neighbor_ids=train_fs.neighbor_ids, neighbor_scores=train_fs.neighbor_scores,
                     neighbor_labels=train_fs.neighbor_labels)
    with pytest.raises(RetrofitError, match="1000 classes but the head has 10"):
        train(_head(), bad, _cfg(epochs=1), store=real["store"])
    small = RetrievalHead(HeadConfig(query_dim=512, image_dim=512, text_dim=384, num_classes=5, dim=32, depth=1,
                                     heads=4, k=K))
    with pytest.raises(RetrofitError, match="host classifier has 1000 outputs but the head has 10"):
        train(_head(), bad, _cfg(epochs=1), store=real["store"], host_classifier=torch.nn.Linear(512, 1000))
    with pytest.raises(RetrofitError, match="out of range for a head with 5 classes"):
        train(small, FeatureSet(z=train_fs.z, labels=train_fs.labels), _cfg(epochs=1), store=real["store"])


def test_lace_joint_host_and_live_retrieval(data, real):
    train_fs, val_fs, probe = data
    host = fit_linear_probe(train_fs.z, train_fs.labels, 10, max_iter=20)
    w0 = host.weight.detach().clone()
    live = FeatureSet(z=train_fs.z, labels=train_fs.labels, exclude=train_fs.exclude)  # no cached ids
    res = train(_head(), live, _cfg(epochs=1, loss="lace", train_host=True, host_lr=1e-3), store=real["store"],
                host_classifier=host, val_features=val_fs)
    assert all(torch.isfinite(torch.tensor(res.step_losses)))
    assert not torch.equal(w0, res.host_classifier.weight.detach())
    assert 0.0 <= res.history[0]["val_top1"] <= 1.0
    # a frozen host layer supplies the host logits of features that have none; it is not trained
    w1 = probe.weight.detach().clone()
    bare = FeatureSet(z=train_fs.z, labels=train_fs.labels, neighbor_ids=train_fs.neighbor_ids,
                      neighbor_scores=train_fs.neighbor_scores, neighbor_labels=train_fs.neighbor_labels)
    res = train(_head(), bare, _cfg(epochs=1), store=real["store"], host_classifier=probe)
    assert torch.equal(probe.weight, w1)
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(probe(bare.z), bare.labels, label_smoothing=0.1).item()
    assert res.step_losses[0] < first + 1.0  # the fresh head starts from the host's logits (zero readout)


def test_lr_schedule_and_config_errors():
    lrs = [lr_at(s, 100, 10, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < 1e-5
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    with pytest.raises(ValueError, match="allowed"):
        TrainConfig(loss="focal").validate()
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0).validate()
    for field, bad in (("min_lr_ratio", -1.0), ("min_lr_ratio", 1.5), ("grad_clip", -1.0), ("host_lr", -1e-3),
                       ("grad_clip", float("inf"))):  # were accepted: a negative lr, clipping silently off
        with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
            TrainConfig(**{field: bad}).validate()
    assert TrainConfig.from_dict(TrainConfig(lr=1e-3).to_dict()) == TrainConfig(lr=1e-3)


@pytest.mark.cuda
def test_cuda_amp_training_and_resume(data, real, tmp_path):
    train_fs, val_fs, _ = data
    res = train(_head(), train_fs, _cfg(epochs=2, device="cuda", amp=True), store=real["store"],
                val_features=val_fs, out_dir=tmp_path)
    assert all(torch.isfinite(torch.tensor(res.step_losses)))
    assert next(res.head.parameters()).device.type == "cuda"
    res2 = train(_head(), train_fs, _cfg(epochs=3, device="cuda", amp=True), store=real["store"], out_dir=tmp_path,
                 resume=True)
    assert len(res2.history) == 3 and len(res2.step_losses) == 4


def test_neighbor_vectors_map_ids_to_rows(real):
    from retrofit.feature_cache import NeighborVectors

    store = real["store"]
    ids = torch.tensor([[5, -1, 7], [7, 199, 3]])
    table = NeighborVectors(store, ids)
    image, text = table.gather(torch.tensor([[7, -1, 5, 3, 10_000, 199, 8]]))  # 10_000: unknown, 8: not loaded
    torch.testing.assert_close(image[0, [0, 2, 3, 5]], store.image[[7, 5, 3, 199]])
    torch.testing.assert_close(text[0, [0, 2, 3, 5]], store.text[[7, 5, 3, 199]])
    assert not image[0, [1, 4, 6]].any() and not text[0, [1, 4, 6]].any()


def test_cross_fitted_host_logits_do_not_leak(data):
    train_fs, _, probe = data
    y = train_fs.labels
    with torch.no_grad():
        in_sample = probe(train_fs.z)  # the probe saw these samples: the leak the head must not learn from
    acc_in = (in_sample.argmax(1) == y).float().mean().item()
    acc_cf = (train_fs.host_logits.argmax(1) == y).float().mean().item()
    nll_in = torch.nn.functional.cross_entropy(in_sample, y).item()
    nll_cf = torch.nn.functional.cross_entropy(train_fs.host_logits, y).item()
    assert acc_in > acc_cf + 0.2 and nll_cf > nll_in, (acc_in, acc_cf, nll_in, nll_cf)
    assert 0.2 < acc_cf < 0.9  # real, better-than-chance predictions from probes that never saw the sample
    # every sample twice (an oversampled set): a twin in another fold handed the probe the held-out sample
    # (out-of-fold accuracy 0.46 -> 0.71 in a stress test); twins now share a fold
    from retrofit.linear_probe import _same_fold_for_twins, stratified_folds

    z2, y2 = torch.cat([train_fs.z, train_fs.z]), torch.cat([y, y])
    fold = _same_fold_for_twins(z2, stratified_folds(y2, 3, 0))
    n = len(y)
    assert torch.equal(fold[:n], fold[n:])
    base = stratified_folds(y, 3, 0)
    assert torch.equal(_same_fold_for_twins(train_fs.z, base), base)  # no duplicates: the folds as they were
    with pytest.raises(ValueError, match="z must be \\(N, D\\) with N = 5 labels"):
        cross_fit_logits(train_fs.z, y[:5], 10)
    assert cross_fit_logits(train_fs.z[:60].numpy(), y[:60], 10, folds=2, max_iter=5).shape == (60, 10)


def test_predict_logits_says_when_cached_neighbours_fall_short(data, real, caplog):
    """Found by a stress test: cached neighbours fewer than k ran silently with fewer; an empty FeatureSet gave {}
    (no 'logits'); a vector table built for other features read zero vectors for the ids it lacked."""
    from retrofit.feature_cache import NeighborVectors

    train_fs, val_fs, _ = data
    head = _head()
    few = val_fs.subset(slice(0, 20))
    short = FeatureSet(z=few.z, labels=few.labels, host_logits=few.host_logits, neighbor_ids=few.neighbor_ids[:, :2],
                       neighbor_scores=few.neighbor_scores[:, :2], neighbor_labels=few.neighbor_labels[:, :2])
    with caplog.at_level("WARNING", logger="retrofit.prediction"):
        out = predict_logits(head, short, store=real["store"], device="cpu")
    assert out["neighbor_ids"].shape == (20, 2) and f"fewer than k={K}" in caplog.text
    import numpy as np

    assert predict_logits(head, few, store=real["store"], batch_size=np.int64(7), device="cpu")["logits"].shape == (
        20, 10)
    empty = predict_logits(head, few.subset(slice(0, 0)), store=real["store"], device="cpu")
    assert empty["logits"].shape == (0, 10)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        predict_logits(head, few, store=real["store"], batch_size=0)
    other = NeighborVectors(real["store"], train_fs.neighbor_ids[:3])
    with pytest.raises(RetrofitError, match="table= lacks the vectors"):
        predict_logits(head, few, store=real["store"], table=other, device="cpu")


def test_class_balance_weights_and_loss():
    from retrofit.training import class_balance_weights, soft_cross_entropy

    y = torch.tensor([0] * 8 + [1] * 2)  # class 0 is 4x as frequent
    w = class_balance_weights(y, 3, 1.0)
    assert w[y].mean() == pytest.approx(1.0) and w[1] / w[0] == pytest.approx(4.0)
    assert torch.allclose(class_balance_weights(y, 3, 0.0)[:2], torch.ones(2))
    assert class_balance_weights(y, 3, 0.5)[1] / class_balance_weights(y, 3, 0.5)[0] == pytest.approx(2.0)
    logits = torch.randn(10, 3)
    tgt = torch.nn.functional.one_hot(y, 3).float()
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert soft_cross_entropy(logits, tgt, w) == pytest.approx(float((per * w[y]).mean()), rel=1e-5)
    assert soft_cross_entropy(logits, tgt) == pytest.approx(float(per.mean()), rel=1e-5)
    for bad in (-0.1, 1.5, "1"):
        with pytest.raises(ValueError, match="class_balance"):
            TrainConfig(class_balance=bad).validate()
    # a class with no sample weighs 0: smoothed targets spread mass over it, and a single sample's weight there
    # (the largest) added smoothing / C * w to every sample (tail / head weight ratio 27 -> 2 with one empty class)
    w_empty = class_balance_weights(y, 3, 1.0)
    assert w_empty[2] == 0 and w_empty[1] / w_empty[0] == pytest.approx(4.0)
    smooth = tgt * 0.9 + 0.1 / 3
    assert soft_cross_entropy(logits, smooth, w_empty) < 2 * soft_cross_entropy(logits, smooth)
    # a class whose host logit is -inf and whose target weight is 0 adds nothing (0 * -inf was NaN)
    masked = logits.clone()
    masked[:, 2] = float("-inf")
    ref = torch.nn.functional.cross_entropy(masked, y)
    assert soft_cross_entropy(masked, tgt) == pytest.approx(float(ref), rel=1e-5)


def test_class_balanced_training_weights_rare_classes(data, real):
    train_fs, _, _ = data
    # balanced training labels: the weights are all 1 and training is unchanged
    a = train(_head(), train_fs, _cfg(epochs=1), store=real["store"])
    b = train(_head(), train_fs, _cfg(epochs=1, class_balance=1.0), store=real["store"])
    assert a.step_losses == pytest.approx(b.step_losses, rel=1e-5)
    # an imbalanced subset (classes 5-9 keep 4 of 20): the weighted run follows another path
    keep = torch.tensor([i for i, c in enumerate(train_fs.labels.tolist()) if c < 5 or i % 5 == 0])
    sub = train_fs.subset(keep)
    a = train(_head(), sub, _cfg(epochs=1), store=real["store"])
    b = train(_head(), sub, _cfg(epochs=1, class_balance=1.0), store=real["store"])
    assert all(torch.isfinite(torch.tensor(b.step_losses)))
    assert a.step_losses != pytest.approx(b.step_losses, rel=1e-3)


def test_per_class_plot_of_balanced_training_data_fits_its_figure(tmp_path):
    """Every class with 10 training images and the default cut-offs (many > 100, few < 20): the group labels
    outside the data's range are left out (the 'many' label used to sit far off the axes and break the layout)."""
    import warnings

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(100) % 10
    logits = torch.randn(100, 10, generator=g) + 2 * torch.nn.functional.one_hot(labels, 10)
    r = evaluate(logits, labels, torch.arange(100) % 10)  # 10 training images per class
    assert r["cutoffs"] == {"many_above": 100, "few_below": 20}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Tight layout not applied" is a UserWarning
        png = plot_per_class_accuracy({"host": r, "retrofitted": r}, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("lam", [0.7, 0.3])
def test_mixup_never_shows_a_sample_its_own_entry(lam):
    """Sample 0's partner (1) retrieved sample 0's own KB entry (id 10): mixing it in would show sample 0 its own
    vector (and, when the partner dominates, its own label), which the exclusion exists to prevent."""
    from retrofit.neighbors import Neighbors
    from retrofit.training import _mix

    ids = torch.tensor([[20, 21], [10, 22]])  # (b, k); sample i's own entry is id 10 + i
    image = torch.tensor([[[1.0], [2.0]], [[100.0], [200.0]]])  # (b, k, 1)
    nb = Neighbors(ids=ids, scores=torch.ones(2, 2), mask=torch.ones(2, 2, dtype=torch.bool), image=image,
                   text=image.clone(), labels=torch.tensor([[3, 4], [5, 6]]))
    j = torch.tensor([1, 0])
    exclude = torch.tensor([[10], [11]])
    z, tgt = torch.zeros(2, 4), torch.eye(2)
    _, _, mixed, _ = _mix(lam, j, z, None, nb, tgt, exclude)
    assert mixed.image[0, 0, 0] == pytest.approx(lam * 1.0)  # slot 0 of the partner (id 10) is not mixed in
    assert mixed.image[0, 1, 0] == pytest.approx(lam * 2.0 + (1 - lam) * 200.0)
    if lam < 0.5:  # the labels follow the partner: its slot holding sample 0's entry reads as unknown
        assert mixed.labels[0].tolist() == [-1, 6]
    else:
        assert mixed.labels[0].tolist() == [3, 4]
    # the mirror case: sample 1's own neighbour in slot 0 is its partner's (sample 0's) own entry, id 10
    assert mixed.image[1, 0, 0] == pytest.approx((1 - lam) * 1.0)  # only the partner's slot 0 (id 20) remains
    assert mixed.image[1, 1, 0] == pytest.approx(lam * 200.0 + (1 - lam) * 2.0)
    assert mixed.labels[1].tolist() == ([-1, 6] if lam >= 0.5 else [3, 4])
    _, _, plain, _ = _mix(lam, j, z, None, nb, tgt)  # without exclusions: plain slot-wise mixup
    assert plain.image[0, 0, 0] == pytest.approx(lam * 1.0 + (1 - lam) * 100.0)


def test_stratified_folds_spread_rare_classes():
    """Each class used to start at fold 0: five singleton classes all landed there (fold sizes 14, 9, 9, 8, 8),
    so the probe fitted without fold 0 had seen none of them."""
    from retrofit.linear_probe import stratified_folds

    labels = torch.tensor([0] * 20 + [1] * 13 + [2, 3, 4, 5, 6])
    fold = stratified_folds(labels, 5, seed=0)
    sizes = torch.bincount(fold, minlength=5)
    assert int(sizes.max() - sizes.min()) <= 1, sizes
    assert len(set(fold[labels >= 2].tolist())) == 5  # the singletons are in five different folds
    for c in (0, 1):  # still stratified: each class spread as evenly as it can be
        per = torch.bincount(fold[labels == c], minlength=5)
        assert int(per.max() - per.min()) <= 1
    assert torch.equal(fold, stratified_folds(labels, 5, seed=0))  # seeded


def test_resume_refuses_other_settings_but_allows_more_epochs(data, real, tmp_path, caplog):
    """train(resume=True) with another batch size and lr continued silently: the saved step was past the new
    epoch's end, so it ran 0 steps. Settings that change the run are refused by name; more epochs continue."""
    import dataclasses

    train_fs, _, _ = data
    train(_head(), train_fs, _cfg(epochs=1), store=real["store"], out_dir=tmp_path)
    with pytest.raises(RetrofitError, match=r"trained with batch_size=50, lr=0\.003, this run asks for batch_size=64, "
                                            r"lr=0\.5"):
        train(_head(), train_fs, _cfg(epochs=1, batch_size=64, lr=0.5), store=real["store"], out_dir=tmp_path,
              resume=True)
    state = tmp_path / "checkpoints" / "last" / "state.json"  # a checkpoint written before class_balance existed
    doc = json.loads(state.read_text())
    del doc["config"]["class_balance"]
    state.write_text(json.dumps(doc))
    # other training data or another head: refused by name too (half the data left the saved step past the
    # epoch's end: an epoch of no steps, then lr 0; a head with tau=4 got the checkpoint's tau 2 and said 4)
    with pytest.raises(RetrofitError, match=r"trained with labels_sha1=.*n=200, this run has labels_sha1=.*n=100"):
        train(_head(), train_fs.subset(slice(0, 100)), _cfg(epochs=1), store=real["store"], out_dir=tmp_path,
              resume=True)
    shuffled = dataclasses.replace(train_fs, labels=train_fs.labels.roll(1))
    with pytest.raises(RetrofitError, match=r"trained with labels_sha1="):
        train(_head(), shuffled, _cfg(epochs=1), store=real["store"], out_dir=tmp_path, resume=True)
    torch.manual_seed(0)
    other = RetrievalHead(dataclasses.replace(_head().config, tau=4.0))
    with pytest.raises(RetrofitError, match=r"trained with head\.tau=2\.0, this run has head\.tau=4\.0"):
        train(other, train_fs, _cfg(epochs=1), store=real["store"], out_dir=tmp_path, resume=True)
    more = dataclasses.replace(_cfg(epochs=2), progress=False, log_every=7, device="cpu")
    with caplog.at_level("WARNING", logger="retrofit.training"):
        res = train(_head(), train_fs, more, store=real["store"], out_dir=tmp_path, resume=True)
    assert len(res.history) == 2 and len(res.step_losses) == 4  # the second epoch's 4 steps
    assert "resuming a 1-epoch run as a 2-epoch one: the cosine schedule is stretched" in caplog.text
    # fewer epochs than the checkpoint ran: it returned the 2-epoch head as a 1-epoch run's, silently
    with pytest.raises(RetrofitError, match=r"cannot resume with epochs=1: the checkpoint has run 2 epoch\(s\)"):
        train(_head(), train_fs, _cfg(epochs=1), store=real["store"], out_dir=tmp_path, resume=True)


def test_validation_features_must_match_the_training_features_host_logits(data, real):
    """Training features with host logits and validation features without them scored the head without the host
    (val_top1 far below the model's): refused, saying what to give."""
    train_fs, val_fs, _ = data
    bare = FeatureSet(z=val_fs.z, labels=val_fs.labels, neighbor_ids=val_fs.neighbor_ids,
                      neighbor_scores=val_fs.neighbor_scores, neighbor_labels=val_fs.neighbor_labels)
    with pytest.raises(ValueError, match="training features carry host logits but the validation features do not"):
        train(_head(), train_fs, _cfg(epochs=1), store=real["store"], val_features=bare)


def test_train_host_trains_a_host_that_wrap_froze(data, real):
    """train(train_host=True, host_classifier=...) after retrofit.wrap (which freezes the host): the host's
    parameters had requires_grad=False, got no gradient and never changed. They train, and are frozen again after."""
    train_fs, _, probe = data
    host = torch.nn.Linear(512, 10)
    host.load_state_dict(probe.state_dict())
    host.requires_grad_(False)  # as wrap leaves it
    before = host.weight.detach().clone()
    train(_head(), train_fs, _cfg(epochs=1, train_host=True), store=real["store"], host_classifier=host)
    assert not torch.equal(host.weight, before)
    assert not host.weight.requires_grad and not host.bias.requires_grad
    # host_lr=0.0 trains nothing of the host (0.0 was read as "unset": the full lr)
    before = host.weight.detach().clone()
    train(_head(), train_fs, _cfg(epochs=1, train_host=True, host_lr=0.0), store=real["store"], host_classifier=host)
    assert torch.equal(host.weight, before)


def test_a_warm_up_longer_than_the_run_is_said(data, real, caplog):
    """--epochs 1 --warmup-epochs 5 trained silently at a fifth of the learning rate at most."""
    train_fs, _, _ = data
    with caplog.at_level("WARNING", logger="retrofit.training"):
        res = train(_head(), train_fs, _cfg(epochs=1, warmup_epochs=5.0), store=real["store"])
    assert "warmup_epochs=5 is longer than epochs=1" in caplog.text and "ends at 0.2 of lr=0.003" in caplog.text
    assert max(r["lr"] for r in res.history) <= 0.2 * 3e-3 + 1e-12
    caplog.clear()
    with caplog.at_level("WARNING", logger="retrofit.training"):
        train(_head(), train_fs, _cfg(epochs=1, warmup_epochs=1.0), store=real["store"])  # (the demo's 1-epoch head)
    assert "warmup_epochs" not in caplog.text


def test_a_host_classifier_is_scored_in_eval_mode_and_given_back_as_it_came(data, real):
    """predict_logits (and so train()'s validation) ran a caller's host in whatever mode it was in: dropout in the
    host's logits when it came in training mode, or with train_host=True; and train() left the host in training
    mode. Now it is scored in eval mode and given back in its own mode."""
    train_fs, val_fs, probe = data
    host = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(512, 10))
    host[1].load_state_dict(probe.state_dict())
    host.train()
    out = predict_logits(_head(), val_fs, real["store"], host_classifier=host)
    with torch.no_grad():
        want = probe(val_fs.z)
    torch.testing.assert_close(out["host_logits"], want)  # no dropout in the host's logits
    assert host.training and host[0].training  # given back in training mode, as it came
    host.eval()
    res = train(_head(), train_fs, _cfg(epochs=1, train_host=True), store=real["store"], host_classifier=host,
                val_features=val_fs)
    assert not host.training and not host[0].training  # trained, then given back in eval mode, as it came
    pred = predict_logits(res.head, val_fs, real["store"], host_classifier=host)
    with torch.no_grad():
        top1 = float((pred["logits"].argmax(1) == val_fs.labels).float().mean())
    assert res.history[0]["val_top1"] == pytest.approx(top1)  # validation scored the eval-mode host too


def test_integer_labels_of_any_width_and_a_k_that_differs_from_the_heads(data, real, caplog):
    """uint8 / int32 labels crashed training (scatter needs int64); TrainConfig.k != HeadConfig.k trains with one k
    and predicts with the other, now said."""
    train_fs, _, _ = data
    small = train_fs.subset(slice(0, 64))
    for dtype in (torch.uint8, torch.int32):
        fs = FeatureSet(z=small.z, labels=small.labels.to(dtype), host_logits=small.host_logits,
                        neighbor_ids=small.neighbor_ids.int(), neighbor_scores=small.neighbor_scores,
                        neighbor_labels=small.neighbor_labels.int())
        assert fs.labels.dtype == fs.neighbor_ids.dtype == torch.int64
        with caplog.at_level("WARNING", logger="retrofit.training"):
            res = train(_head(), fs, _cfg(epochs=1, k=2), store=real["store"])
        assert all(torch.isfinite(torch.tensor(res.step_losses)))
    assert "TrainConfig.k=2 differs from the head's k=" in caplog.text


def test_masked_host_logits_with_label_smoothing_say_what_to_do(data, real):
    """-inf host logits (masked classes) with the default label smoothing gave an infinite loss, reported as
    "lower the learning rate / disable AMP"."""
    train_fs, _, _ = data
    small = train_fs.subset(slice(0, 64))
    hl = small.host_logits.clone()
    hl[:, 9] = float("-inf")
    hl[small.labels == 9, 9] = 0.0  # the samples of class 9 keep it
    fs = FeatureSet(z=small.z, labels=small.labels, host_logits=hl, neighbor_ids=small.neighbor_ids,
                    neighbor_scores=small.neighbor_scores, neighbor_labels=small.neighbor_labels)
    with pytest.raises(ValueError, match="hold -inf .* label_smoothing=0.1 spreads target mass"):
        train(_head(), fs, _cfg(epochs=1, label_smoothing=0.1), store=real["store"])
    res = train(_head(), fs, _cfg(epochs=1, label_smoothing=0.0, mixup_alpha=0.0), store=real["store"])
    assert all(torch.isfinite(torch.tensor(res.step_losses)))
    bad = FeatureSet(z=small.z, labels=small.labels, host_logits=hl.nan_to_num(nan=0.0, neginf=float("nan")))
    with pytest.raises(ValueError, match="hold NaN or \\+inf"):
        train(_head(), bad, _cfg(epochs=1), store=real["store"])


def test_feature_cache_under_concurrent_runs_damage_and_odd_names(tmp_path):
    """Found by a stress test: two runs filling one cache crashed each other (rename onto the other's entry); a
    cache dir that is a file failed only after the backbone pass; clear("train") also removed "train.v2", and a
    name with glob characters was never cleared; the demo's own cache files, cut by a kill, stopped every run."""
    from retrofit.demo_build import _load_or_empty, _save_atomic

    z = torch.randn(6, 4)
    calls = []

    def compute() -> FeatureSet:
        calls.append(1)
        return FeatureSet(z=z, labels=torch.arange(6))

    cache = FeatureCache(tmp_path / "c")
    fs = cache.get_or_compute("train", {"a": 1}, compute)
    entry = next((tmp_path / "c").glob("train.features-*"))
    # another process stores the same entry while this one computes: its write keeps theirs, no error
    cache._write("features", "train", entry.name.split("-", 1)[1], fs.tensors(("z", "labels")), {"n": 6})
    assert torch.equal(cache.get_or_compute("train", {"a": 1}, compute).z, z) and len(calls) == 1
    for name in ("train.v2", "t[1]"):
        cache.get_or_compute(name, {"a": 1}, compute)
    assert cache.clear("train") == 1 and cache.clear("t[1]") == 1
    assert [p.name.split(".features")[0] for p in (tmp_path / "c").glob("*.features-*")] == ["train.v2"]
    # flipped bytes inside an entry's tensor data (bit rot): caught by its checksum and recomputed (they loaded)
    data = next((tmp_path / "c").glob("train.v2.features-*")) / "tensors.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-8:] = bytes(8)
    data.write_bytes(bytes(raw))
    n = len(calls)
    assert torch.equal(cache.get_or_compute("train.v2", {"a": 1}, compute).z, z) and len(calls) == n + 1
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        FeatureCache(tmp_path / "afile").get_or_compute("train", {"a": 1}, compute)
    assert len(calls) == 4  # refused before computing
    path = tmp_path / "host.safetensors"
    _save_atomic({"x": z}, path)
    assert torch.equal(_load_or_empty(path)["x"], z)
    path.write_bytes(path.read_bytes()[:40])  # cut short by a kill (before writes were atomic)
    assert _load_or_empty(path) == {}  # recomputed, not a failure of every later run


def test_a_head_trains_and_predicts_with_the_prior_of_the_kb_it_is_given(real, data):
    """``train(head, fs, store=kb)`` on a head not attached to ``kb`` trained a balanced vote without the KB's class
    prior (all zeros), which loading the head with its KB then switched on: served logits differed from trained
    ones. ``predict_logits(head, fs, store=other)`` used the attached KB's prior with the other KB's neighbours."""
    _, val_fs, _ = data
    s, y = real["store"], real["labels"][:N_KB]
    keep = torch.cat([torch.nonzero(y == c).flatten()[:2 + 2 * c] for c in range(10)]).sort().values
    lt = InMemoryStore(512, 512, 384, s.fingerprint)  # a long-tailed KB: 2 .. 20 entries per class
    lt.add(s.keys[keep], s.image[keep], s.text[keep], s.labels[keep])
    torch.manual_seed(0)
    head = RetrievalHead(HeadConfig(query_dim=512, image_dim=512, text_dim=384, num_classes=10, dim=32, depth=1,
                                    heads=2, k=K, label_vote=True, vote_balance=True))
    fs = retrieve(FeatureSet(z=real["z"][N_KB:], labels=real["labels"][N_KB:], host_logits=val_fs.host_logits), lt, K)
    train(head, fs, _cfg(epochs=2, batch_size=25, lr=5e-2), store=lt)
    prior = head.vote.label_log_prior.clone()
    assert head.store is lt and prior[0] < 0 < prior[9]  # trained with the long-tailed KB's prior
    head.attach(s)
    want = predict_logits(head, val_fs)["logits"]  # served with the balanced KB: its (flat) prior
    head.attach(lt)
    got = predict_logits(head, val_fs, s)["logits"]
    assert torch.allclose(got, want, atol=1e-6) and head.vote.effective_weight != 0
    assert not torch.allclose(got, predict_logits(head, retrieve(val_fs, lt, K))["logits"])
    assert head.store is lt and torch.equal(head.vote.label_log_prior, prior)  # the head itself never changed
    view = head.attached_to(s)  # what predict_logits uses: same weights, its own KB and prior; head untouched
    assert view.store is s and head.store is lt and torch.equal(head.vote.label_log_prior, prior)
    assert view.readout.fc.weight is head.readout.fc.weight
    assert torch.allclose(predict_logits(view, val_fs)["logits"], want, atol=1e-6)
    # a head attached with the encoder check waived keeps it waived where the library attaches for it
    import copy
    from dataclasses import replace

    from retrofit.fingerprint import EncoderFingerprint

    other_text = EncoderFingerprint("open_clip", "ViT-B-32", "openai", 384)
    odd = [InMemoryStore(512, 512, 384, replace(s.fingerprint, text=other_text)) for _ in range(2)]
    for st in odd:
        st.add(s.keys, s.image, s.text, s.labels)
    head.attach(odd[0], allow_fingerprint_mismatch=True)
    assert predict_logits(head, val_fs, odd[1])["logits"].shape == (100, 10)  # raised FingerprintMismatchError
    assert copy.deepcopy(head).store is not None and head.store is odd[0]


def test_predict_logits_takes_a_head_without_a_config(data, real):
    """predict_logits / train take any nn.Module head; one without a HeadConfig crashed on head.config (no k given)
    or on the empty neighbour set's dims (k=0)."""
    from torch import nn

    from retrofit.head import HeadOutput

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(512, 10)

        def forward(self, z, host_logits=None, neighbors=None):
            r = self.fc(z) + 0 * neighbors.scores.sum()  # uses the neighbours it is given (k of them)
            return HeadOutput(logits=r if host_logits is None else host_logits + r, retrieval_logits=r,
                              host_logits=host_logits, neighbors=neighbors)

    _, val_fs, _ = data
    torch.manual_seed(0)
    plain = Plain()
    for k in (None, 0, 3):
        out = predict_logits(plain, val_fs, real["store"], k=k, device="cpu")
        assert out["logits"].shape == (100, 10) and out["neighbor_ids"].shape[1] == (K if k is None else k)


def test_linear_probe_refuses_what_it_cannot_fit(data):
    """NaN features failed deep inside L-BFGS ("cannot be converted to type float without overflow"), identical
    rows said "got no samples", labels 1.7 were truncated to class 1, numpy fold counts were refused."""
    import numpy as np

    train_fs, _, _ = data
    z, y = train_fs.z[:60].clone(), train_fs.labels[:60]
    z[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"z holds NaN or inf in 1 row\(s\) \(e\.g\. \[3\]\)"):
        cross_fit_logits(z, y, 10, folds=3, max_iter=5)
    with pytest.raises(ValueError, match="all 20 rows are identical"):
        cross_fit_logits(torch.ones(20, 8), torch.arange(20) % 2, 2, folds=3, max_iter=5)
    with pytest.raises(ValueError, match=r"labels must be class indices \(whole numbers\), got \[1\.7"):
        fit_linear_probe(train_fs.z[:3], torch.tensor([0.0, 1.7, 2.0]), 10, max_iter=5)
    ok = cross_fit_logits(train_fs.z[:60], y.double(), 10, folds=np.int64(3), max_iter=5)  # whole floats, numpy int
    assert ok.shape == (60, 10)


def test_an_interrupt_while_a_step_is_logged_never_duplicates_it(data, real, tmp_path, monkeypatch):
    """A Ctrl-C landing while a step's record is prepared is redone by the interrupt handler, once; past that point
    (the write itself) the handler does not write it again (it duplicated the record, for good)."""
    train_fs, _, _ = data
    cfg = _cfg(epochs=2)
    real_dumps, hit = json.dumps, []

    def dumps_then_stop(obj, *a, **kw):
        if isinstance(obj, dict) and obj.get("event") == "step" and obj.get("global_step") == 4 and not hit:
            hit.append(1)
            raise KeyboardInterrupt
        return real_dumps(obj, *a, **kw)

    monkeypatch.setattr(json, "dumps", dumps_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path)
    monkeypatch.setattr(json, "dumps", real_dumps)
    train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path, resume=True)
    recs = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    steps = [r["global_step"] for r in recs if r["event"] == "step"]
    assert steps == [2, 4, 6, 8]
    # and a Ctrl-C in the write's flush (the record is out): not written again
    out2, hit = tmp_path / "b", []

    class StopAfterStep4:  # the training log's file, interrupted right after step 4's record is flushed
        def __init__(self, *a, **kw):
            self.f = open(*a, **kw)

        def write(self, text):
            self.last = text
            return self.f.write(text)

        def flush(self):
            self.f.flush()
            if '"global_step": 4,' in getattr(self, "last", "") and not hit:
                hit.append(1)
                raise KeyboardInterrupt

        def close(self):
            self.f.close()

    monkeypatch.setattr("retrofit.train_log.open", StopAfterStep4, raising=False)
    with pytest.raises(KeyboardInterrupt):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=out2)
    monkeypatch.delattr("retrofit.train_log.open")
    train(_head(), train_fs, cfg, store=real["store"], out_dir=out2, resume=True)
    recs = [json.loads(x) for x in (out2 / "train_log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in recs if r["event"] == "step"] == [2, 4, 6, 8]


@pytest.fixture
def default_sigint() -> None:
    """Tests that send a real SIGINT need Python's default handler (a runner may install its own)."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has another handler here")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_real_ctrl_c_inside_the_optimizer_step_waits_for_the_whole_step(data, real, tmp_path, monkeypatch,
                                                                         default_sigint):
    """Found by a kill soak: on CPU AdamW updates the parameters one by one, and a Ctrl-C landing midway left some
    updated, saved as 'before the step', which the resume applied again (the final head differed)."""
    import os
    import signal

    import torch.optim.adam as adam

    train_fs, _, _ = data
    cfg = _cfg(epochs=2, device="cpu")  # (on CUDA, AdamW takes its foreach path, not the one patched here)
    straight = _head()
    train(straight, train_fs, cfg, store=real["store"])
    orig, calls = adam._single_tensor_adam, {"n": 0}

    def half_then_ctrl_c(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kw):
        calls["n"] += 1
        if calls["n"] != 7:  # (2 parameter groups a step: the 4th step's first group)
            return orig(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kw)
        m = len(params) // 2
        orig(params[:m], grads[:m], exp_avgs[:m], exp_avg_sqs[:m], max_exp_avg_sqs[:m], state_steps[:m], **kw)
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, between two parameters' updates
        return orig(params[m:], grads[m:], exp_avgs[m:], exp_avg_sqs[m:], max_exp_avg_sqs[m:], state_steps[m:], **kw)

    monkeypatch.setattr(adam, "_single_tensor_adam", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path)
    monkeypatch.undo()
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state["global_step"] == 4  # the step went in whole, and was counted
    resumed = _head(seed=99)
    train(resumed, train_fs, cfg, store=real["store"], out_dir=tmp_path, resume=True)
    assert _same_weights(straight, resumed)


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in train() handles it."""


def test_a_kill_anywhere_in_a_save_or_before_the_first_checkpoint_resumes_to_the_same_run(data, real, tmp_path,
                                                                                          monkeypatch):
    """Found by a kill soak: (a) killed between the last epoch's checkpoint and its head save, the resume had nothing
    left to train and left head/ one epoch stale for good; (b) killed before the first checkpoint, the resume
    (from scratch) appended to the dead run's log: two starts, steps logged twice; (c) an interrupt right after an
    epoch's record went into the history saved it with the epoch unfinished: the resume recorded it twice."""
    import os

    import retrofit.train_checkpoint as ckpt
    import retrofit.training as rt

    train_fs, _, _ = data
    cfg = _cfg(epochs=2)
    straight = _head()
    ref = train(straight, train_fs, cfg, store=real["store"])
    real_save, saves = ckpt.save_training_state, {"n": 0}

    def killed_at_the_last_checkpoint(*a, **kw):
        saves["n"] += 1
        if saves["n"] == 2:
            raise _Killed
        return real_save(*a, **kw)

    monkeypatch.setattr(ckpt, "save_training_state", killed_at_the_last_checkpoint)
    with pytest.raises(_Killed):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "a")
    monkeypatch.undo()
    train(_head(seed=7), train_fs, cfg, store=real["store"], out_dir=tmp_path / "a", resume=True)
    assert _same_weights(straight, RetrievalHead.load(tmp_path / "a" / "head"))  # head/ is the finished run's

    real_dumps = json.dumps

    def killed_after_step_2(obj, *a, **kw):
        if isinstance(obj, dict) and obj.get("event") == "step" and obj.get("global_step") == 4:
            raise _Killed  # (step 2's record is in the log; no checkpoint yet)
        return real_dumps(obj, *a, **kw)

    monkeypatch.setattr(json, "dumps", killed_after_step_2)
    with pytest.raises(_Killed):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "b")
    monkeypatch.undo()
    assert not (tmp_path / "b" / "checkpoints" / "last").exists()
    train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "b", resume=True)  # from scratch
    recs = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "start" for r in recs) == 1
    assert [r["global_step"] for r in recs if r["event"] == "step"] == [2, 4, 6, 8]
    # a new run over that finished one, failing before its first checkpoint: the old run's log stays as it was,
    # with its checkpoint (it was emptied, or had the new run's records appended)
    before = (tmp_path / "b" / "train_log.jsonl").read_bytes()
    monkeypatch.setattr(json, "dumps", killed_after_step_2)
    with pytest.raises(_Killed):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "b")
    monkeypatch.undo()
    assert (tmp_path / "b" / "train_log.jsonl").read_bytes() == before
    # ... and killed between its head/ and its first checkpoint: the resume (of the old, finished run) has nothing
    # to train but puts the finished run's weights back in head/ (they stayed the new run's, for good)
    finished = RetrievalHead.load(tmp_path / "b" / "head")
    saves["n"] = 1  # the next checkpoint save is the "second": killed
    monkeypatch.setattr(ckpt, "save_training_state", killed_at_the_last_checkpoint)
    with pytest.raises(_Killed):
        train(_head(seed=3), train_fs, _cfg(epochs=2, seed=4), store=real["store"], out_dir=tmp_path / "b")
    monkeypatch.undo()
    assert not _same_weights(finished, RetrievalHead.load(tmp_path / "b" / "head"))
    train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "b", resume=True)
    assert _same_weights(finished, RetrievalHead.load(tmp_path / "b" / "head"))
    assert (tmp_path / "b" / "train_log.jsonl").read_bytes() == before  # (the dead run's pending log: dropped)
    assert not (tmp_path / "b" / "train_log.jsonl.new").exists()
    # a run from scratch killed right after its first checkpoint, before its log replaced the old one: the resume
    # finishes the switch (the old run's records were kept for good)
    real_replace = os.replace

    def killed_at_the_switch(src, dst):
        if str(src).endswith("train_log.jsonl.new"):
            raise _Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_switch)
    with pytest.raises(_Killed):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "b")
    monkeypatch.undo()
    # another run from scratch, killed before its own first checkpoint, first finishes that switch (it wiped the
    # pending log, and the resume kept the older run's records with the new run's weights)
    monkeypatch.setattr(json, "dumps", killed_after_step_2)
    with pytest.raises(_Killed):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "b")
    monkeypatch.undo()
    train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "b", resume=True)
    recs = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("run_id") for r in recs if r["event"] == "start"] == [ckpt.saved_run_id(tmp_path / "b" / "checkpoints"
                                                                                          / "last")]
    assert [r["global_step"] for r in recs if r["event"] == "step"] == [2, 4, 6, 8]
    assert [r["epoch"] for r in recs if r["event"] == "epoch"] == [1, 2]
    # a checkpoint whose log was deleted by hand: a run from scratch that dies before its first checkpoint leaves
    # no records in a log the resume of that checkpoint then continues
    (tmp_path / "b" / "train_log.jsonl").unlink()
    monkeypatch.setattr(json, "dumps", killed_after_step_2)
    with pytest.raises(_Killed):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "b")
    monkeypatch.undo()
    train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "b", resume=True)
    assert not (tmp_path / "b" / "train_log.jsonl").exists() or "start" not in (tmp_path / "b" / "train_log.jsonl"
                                                                                 ).read_text()

    real_info = rt.log.info

    def ctrl_c_at_epoch_1s_record(msg, *a, **kw):
        if msg.startswith("epoch %d") and a[0] == 1:
            raise KeyboardInterrupt
        return real_info(msg, *a, **kw)

    monkeypatch.setattr(rt.log, "info", ctrl_c_at_epoch_1s_record)
    with pytest.raises(KeyboardInterrupt):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "c")
    monkeypatch.undo()
    res = train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path / "c", resume=True)
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert [h["train_loss"] for h in res.history] == pytest.approx([h["train_loss"] for h in ref.history])


def test_non_finite_features_and_settings_are_refused_before_training(data, real):
    """NaN in the embeddings said 'lower the learning rate' (training) or was scored silently (validation); NaN
    settings passed every check (nan < 0 is False) and failed mid-run, after `train --overwrite` had cleared the
    old run."""
    import dataclasses

    train_fs, val_fs, _ = data
    bad = train_fs.z.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"training features .* NaN or inf in 1 of .* rows \(first: \[3\]\)"):
        train(_head(), dataclasses.replace(train_fs, z=bad), _cfg(epochs=1), store=real["store"])
    vbad = val_fs.z.clone()
    vbad[0] = float("inf")
    with pytest.raises(ValueError, match="validation features"):
        train(_head(), train_fs, _cfg(epochs=1), store=real["store"], val_features=dataclasses.replace(val_fs, z=vbad))
    for field, value in (("warmup_epochs", float("nan")), ("lr", float("inf")), ("weight_decay", float("nan")),
                         ("tau_la", float("nan")), ("mixup_alpha", float("nan")), ("seed", -1), ("seed", 1 << 64),
                         ("betas", (0.9, 1.5))):
        with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
            _cfg(**{field: value}).validate()
    import numpy as np

    c = _cfg(lr=np.float32(0.5), grad_clip=np.float64(1.0), seed=np.int64(3), betas=np.array([0.9, 0.99]),
             weight_decay=np.array(0.01), tau_la=np.array([1.5]))
    c.validate()  # numpy numbers (a sweep's) become plain ones: the run's JSON failed on them mid-run
    assert json.dumps(c.to_dict()) and type(c.lr) is float and type(c.seed) is int and c.betas == (0.9, 0.99)
    assert (c.weight_decay, c.tau_la) == (0.01, 1.5)


def test_interrupt_after_holds_ctrl_c_under_other_handlers_and_hands_it_on(default_sigint):
    """interrupt_after held a Ctrl-C only under Python's default handler: inside ``asyncio.run`` (which installs
    its own) a second Ctrl-C raised in the middle of the block (an optimizer step applied by half). Now any Python
    handler gets the held signals after the block, in order."""
    import asyncio
    import os
    import signal
    import time

    from retrofit.train_log import interrupt_after

    calls = []
    prev = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupt_after():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (the handler runs between two bytecodes of this thread: time for it to come)
            assert calls == []  # held
        assert calls == [signal.SIGINT]  # handed on once the block was done
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # that handler is back
    finally:
        signal.signal(signal.SIGINT, prev)

    done = []

    async def main():
        with interrupt_after():
            for _ in range(2):  # two presses: asyncio's handler cancels on the first, raises on the second
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            done.append("block")
        await asyncio.sleep(5)

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(main())
    assert done == ["block"]  # the block ran whole
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # blocks open in two tasks at once, left in another order than entered (a review found the first block's holder
    # put back for good: every later Ctrl-C swallowed, also after asyncio.run returned)
    async def task(seconds):
        with interrupt_after():
            await asyncio.sleep(seconds)

    async def interleaved():
        await asyncio.gather(task(0.05), task(0.1))
        done.append(signal.getsignal(signal.SIGINT))
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(5)

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(interleaved())
    assert "Runner._on_sigint" in repr(done[-1])  # asyncio's own handler was back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # a block left by an error still hands on what it held (a review found Ctrl-Cs lost when a generator's block was
    # closed, or an asyncio task's cancelled): the KeyboardInterrupt comes with the error as its context
    with pytest.raises(KeyboardInterrupt) as ei:
        with interrupt_after():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise ValueError("boom")
    assert isinstance(ei.value.__context__, ValueError)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_third_ctrl_c_goes_through_and_a_forked_child_is_not_held(capfd, default_sigint):
    """A save stuck on a full disk could not be stopped by any number of Ctrl-Cs (a review): the second says so, the
    third goes through at once. A child forked inside a block got the parent's holder (Ctrl-C swallowed there)."""
    import os
    import signal
    import time

    from retrofit._interrupts import _Held, interrupt_after

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt_after():
            for i in range(3):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                reached.append(i)
    assert reached == [0, 1]  # the third press stopped the block
    assert "press it again to stop at once" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and _Held.depth == 0

    with interrupt_after():
        pid = os.fork()
        if pid == 0:  # the child: Python's own handler, no open block of the parent's
            ok = signal.getsignal(signal.SIGINT) is signal.default_int_handler and _Held.depth == 0
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and _Held.depth == 0


def test_a_second_ctrl_c_waits_for_the_last_checkpoint(data, real, tmp_path, monkeypatch, default_sigint):
    """A second Ctrl-C while train() wrote its last checkpoint after the first stopped it before the save (a review
    found it): the run resumed from the previous epoch's checkpoint. The save now runs whole, then the interrupt."""
    import os
    import signal

    import torch.optim.adam as adam

    import retrofit.training as rt

    train_fs, _, _ = data
    cfg = _cfg(epochs=2, device="cpu")
    orig, calls = adam._single_tensor_adam, {"n": 0}

    def ctrl_c_at_step_4(*a, **kw):
        calls["n"] += 1
        out = orig(*a, **kw)
        if calls["n"] == 8:  # after the 4th step's second parameter group
            os.kill(os.getpid(), signal.SIGINT)
        return out

    real_warning = rt.log.warning

    def second_ctrl_c(msg, *a, **kw):
        real_warning(msg, *a, **kw)
        if msg.startswith("interrupted at epoch"):
            os.kill(os.getpid(), signal.SIGINT)  # pressed again while the last checkpoint is being written

    monkeypatch.setattr(adam, "_single_tensor_adam", ctrl_c_at_step_4)
    monkeypatch.setattr(rt.log, "warning", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(_head(), train_fs, cfg, store=real["store"], out_dir=tmp_path)
    monkeypatch.undo()
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state["global_step"] == 4
    recs = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert recs[-1]["event"] == "interrupted"


def test_a_ctrl_c_held_in_a_closed_generator_block_arrives_and_blocks_after_a_pass_through_hold(default_sigint):
    """Reviews: a generator's block closed by ``close()`` dropped the Ctrl-C it held (GeneratorExit counted as an
    error); after a third Ctrl-C went through inside an open block, later blocks held nothing; under asyncio the
    third press only cancelled the task (a stuck block ran on)."""
    import asyncio
    import os
    import signal
    import time

    from retrofit._interrupts import _Held, interrupt_after


    def press(n):
        for _ in range(n):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    def gen():
        with interrupt_after():
            yield 1
            yield 2

    g = gen()
    next(g)
    press(1)
    with pytest.raises(KeyboardInterrupt):
        g.close()
    assert _Held.depth == 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt_after():  # an outer block stays open
            with pytest.raises(KeyboardInterrupt):
                with interrupt_after():
                    press(3)  # the third goes through
            with interrupt_after():
                press(1)  # held again
                reached.append("after")
    assert reached == ["after"] and _Held.depth == 0

    async def stuck():
        with interrupt_after():
            press(3)  # asyncio's handler: the first cancels, the second raises; the third press gives it both
            reached.append("not reached")

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(stuck())
    assert reached == ["after"] and _Held.depth == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("cached", [True, False])
def test_a_k_above_the_kb_size_trains_on_the_filled_slots_only(data, real, monkeypatch, cached):
    """k = 250 on the 200-entry KB: each batch reaches the head without the slots no sample fills (they cost
    attention over 251 tokens for nothing), and the run is the one on all 250 slots (masked slots are absent)."""
    train_fs, _, _ = data
    rows = torch.arange(N_KB)
    fs = FeatureSet(z=train_fs.z, labels=train_fs.labels, host_logits=train_fs.host_logits, exclude=rows[:, None])
    if cached:
        fs = retrieve(fs, real["store"], 250)
        assert fs.neighbor_ids.shape[1] == 250 and (fs.neighbor_ids[:, N_KB - 1:] == -1).all()

    def run():
        torch.manual_seed(0)
        head = RetrievalHead(HeadConfig(query_dim=512, image_dim=512, text_dim=384, num_classes=10, dim=32,
                                        depth=1, heads=2, k=250))
        widths = []
        head.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["neighbors"].k), with_kwargs=True)
        res = train(head, fs, _cfg(epochs=2), store=real["store"])
        return head, res, widths

    head, res, widths = run()
    assert set(widths) == {N_KB - 1}  # every sample's 199 other entries; its own is excluded
    monkeypatch.setattr("retrofit.prediction._filled_width", lambda valid: valid.shape[1])  # the old behaviour
    head_all, res_all, widths_all = run()
    assert set(widths_all) == {250}
    torch.testing.assert_close(torch.tensor(res.step_losses), torch.tensor(res_all.step_losses), rtol=1e-5,
                               atol=1e-6)
    for (name, a), b in zip(head.state_dict().items(), head_all.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
