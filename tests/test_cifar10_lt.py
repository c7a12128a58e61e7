"""CIFAR-10-LT protocol on the real shards: counts, disjoint splits, groups, shard reading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sources import make_shards, mini_samples, real_encoders  # noqa: F401  (mini_samples: fixture)

from retrofit.cifar10_lt import (
    class_counts,
    class_groups,
    group_accuracy,
    iter_shard,
    load_classes,
    load_split,
    long_tail_split,
    prompt,
    shard_paths,
)

PROTOCOL_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_class_counts_if100():
    counts = class_counts(100)
    assert counts == PROTOCOL_IF100
    assert sum(counts) == 12406
    assert class_counts(1) == [5000] * 10
    assert class_counts(10)[-1] == 500
    with pytest.raises(ValueError, match="imbalance_factor"):
        class_counts(0.5)


def test_groups_cutoffs():
    g = class_groups(PROTOCOL_IF100)
    assert g.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # Many > 1000, Medium 200-1000, Few < 200
    assert class_groups([1001, 1000, 200, 199]).tolist() == [0, 1, 1, 2]


@pytest.fixture(scope="module")
def train(data_dir):
    return load_split(data_dir, "train")


def test_real_split_counts_and_disjoint(train):
    assert len(train.jpgs) == 50000 and np.bincount(train.labels).tolist() == [5000] * 10
    s = long_tail_split(train.labels, 100, val_per_class=20, seed=0)
    lt_counts = np.bincount(train.labels[s.lt], minlength=10).tolist()
    # class 0 keeps all 5000 images in the protocol: its 20 validation images are held out of the subset
    assert lt_counts == [4980] + PROTOCOL_IF100[1:] == s.counts
    assert len(s.lt) == 12406 - 20
    assert np.bincount(train.labels[s.val], minlength=10).tolist() == [20] * 10
    assert len(s.lt) + len(s.val) + len(s.pool) == 50000
    assert not set(s.val) & set(s.lt) and not set(s.val) & set(s.pool) and not set(s.lt) & set(s.pool)
    assert not set(s.val) & set(s.ext) and len(s.ext) == 50000 - 200
    # every long-tail image of classes 1..9 is among the first count[c] images of its class (original order)
    for c in range(1, 10):
        first = np.flatnonzero(train.labels == c)[:PROTOCOL_IF100[c]]
        assert np.array_equal(np.sort(s.lt[train.labels[s.lt] == c]), first)
    assert s.groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    # fixed seed: same split; another seed: another validation set
    assert np.array_equal(long_tail_split(train.labels, 100, seed=0).val, s.val)
    assert not np.array_equal(long_tail_split(train.labels, 100, seed=1).val, s.val)


def test_split_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        long_tail_split(np.array([0, 1, 12]))
    with pytest.raises(ValueError, match="too few"):
        long_tail_split(np.repeat(np.arange(10), 5), 5, val_per_class=20)
    y = np.repeat(np.arange(10), 100)
    with pytest.raises(ValueError, match=r"whole numbers\), got \[0\.5"):  # was truncated to class 0, silently
        long_tail_split(y + 0.5, 10)
    for bad in (float("nan"), float("inf"), 1e6):  # NaN crashed; inf / 1e6 gave classes with no image at all
        with pytest.raises(ValueError, match="imbalance_factor"):
            class_counts(bad)
    s = long_tail_split(y, 10, val_per_class=60)  # class 0 keeps 40: the groups follow the counts it really has
    assert s.counts[0] == 40 and s.groups.tolist() == class_groups(s.counts).tolist()


def test_shard_reading(data_dir, train):
    paths = shard_paths(data_dir, "train")
    assert len(paths) == 5
    first = []
    for s in iter_shard(paths[0]):
        first.append(s)
        if len(first) == 3:
            break
    assert [s["index"] for s in first] == [0, 1, 2]
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in first)  # JPEG magic
    assert [s["label"] for s in first] == train.labels[:3].tolist()
    assert all(isinstance(c, str) for c in train.captions[:100])
    with pytest.raises(ValueError, match="split must be"):
        shard_paths(data_dir, "val")


def test_group_accuracy_and_prompts(data_dir):
    labels = np.array([0, 0, 5, 5, 9, 9])
    pred = np.array([0, 1, 5, 5, 0, 9])
    acc = group_accuracy(pred, labels, class_groups(PROTOCOL_IF100))
    assert acc["overall"] == pytest.approx(100 * 4 / 6)
    assert acc["many"] == 50.0 and acc["medium"] == 100.0 and acc["few"] == 50.0
    names, templates = load_classes(data_dir)
    assert names[0] == "airplane" and len(names) == 10 and len(templates) >= 1
    assert prompt(names[9]) == "a photo of a truck."


# ------------------------------------------------------------------------------------ demo pieces (small)


def test_knn_probs_and_fixed_fusion():
    import torch

    from retrofit.demo_rules import fixed_fusion, knn_probs

    ids = torch.tensor([[0, 1, 2], [3, -1, -1]])
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.0, 0.0]])
    labels = torch.tensor([[1, 1, 2], [0, -1, -1]])
    p = knn_probs(ids, scores, labels, 3, temperature=0.05)
    assert p.shape == (2, 3)
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert p[0].argmax() == 1 and p[1].tolist() == [1.0, 0.0, 0.0]  # empty slots carry no vote
    # a neighbour of unknown label (-1, e.g. an uninformative caption) carries no vote either
    q = knn_probs(ids, scores, torch.tensor([[-1, 2, 2], [-1, -1, -1]]), 3, temperature=0.05)
    assert q[0].tolist() == pytest.approx([0.0, 0.0, 1.0]) and q[1].tolist() == [0.0, 0.0, 0.0]
    fused = fixed_fusion(torch.tensor([[0.0, 0.0, 10.0], [0.0, 0.0, 0.0]]), p)
    assert fused.shape == (2, 3) and torch.isfinite(fused).all()
    assert torch.allclose(fused.exp().sum(1), torch.ones(2), atol=1e-5)
    # the rule itself: half the host's probabilities, half the vote (row 1: uniform host, vote all on class 0)
    assert fused[1].exp().tolist() == pytest.approx([2 / 3, 1 / 6, 1 / 6], abs=1e-6)
    host0 = torch.softmax(torch.tensor([0.0, 0.0, 10.0]), 0)
    assert fused[0].exp().tolist() == pytest.approx((0.5 * host0 + 0.5 * p[0]).tolist(), abs=1e-6)


def test_posthoc_choice_uses_validation_only():
    import torch

    from retrofit.demo_rules import choose_adjustment

    lp = torch.tensor([-0.1, -3.0])  # class 1 is rare
    logits = torch.tensor([[2.0, 0.0]] * 4)  # raw logits always say class 0
    labels = torch.tensor([0, 1, 1, 1])
    a = choose_adjustment(logits, labels, lp, (0.0, 0.5, 1.0))
    assert a == 1.0  # 2 - 1 * (-0.1) < 0 - 1 * (-3): the rare class wins, 3 of 4 right
    assert choose_adjustment(logits, torch.tensor([0, 0, 0, 0]), lp, (0.0, 0.5, 1.0)) == 0.0


def test_vote_scale_and_adjustment_are_chosen_jointly_on_validation():
    import torch

    from retrofit.demo import DemoConfig
    from retrofit.demo_rules import choose_scale_and_adjustment

    lp = torch.tensor([-0.1, -3.0])
    labels = torch.tensor([0, 1, 1, 1])
    weak = torch.tensor([[2.0, 0.0]] * 4)  # needs a = 1 to get 3 of 4
    strong = torch.tensor([[0.0, 5.0], [0.0, 5.0], [0.0, 5.0], [0.0, 5.0]])  # 3 of 4 with a = 0
    # both reach 3 of 4: the trained vote (scale 1) is kept, with the adjustment it needs
    assert choose_scale_and_adjustment({1.0: weak, 2.0: strong}, labels, lp, (0.0, 0.5, 1.0)) == (1.0, 1.0)
    # equal accuracy: the scale nearest 1 wins, then the smallest |a|
    assert choose_scale_and_adjustment({0.5: strong, 1.0: strong, 3.0: strong}, labels, lp, (0.0, 1.0)) == (1.0, 0.0)
    exact = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # all right with a = 0
    assert choose_scale_and_adjustment({1.0: weak, 1.5: exact}, labels, lp, (0.0, 0.5, 1.0)) == (1.5, 0.0)
    for bad in ((), (-1.0,), (float("inf"),)):
        with pytest.raises(ValueError, match="vote_scales"):
            DemoConfig(vote_scales=bad).validate()
    with pytest.raises(ValueError, match="vote_scale_on"):
        DemoConfig(vote_scale_on="test").validate()
    with pytest.raises(ValueError, match="ext_labels"):
        DemoConfig(ext_labels="web").validate()
    with pytest.raises(ValueError, match="vote_form must be 'log' or 'mix', got 'sum'"):
        DemoConfig(vote_form="sum").validate()
    assert (DemoConfig().results_stem, DemoConfig(ext_labels="captions").results_stem) == (
        "cifar10_lt", "cifar10_lt_ext_captions")


def test_balanced_top1_weighs_classes_equally():
    import torch

    from retrofit.demo_rules import balanced_top1

    labels = torch.tensor([0, 0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0.0]] * 5)  # always class 0: 4 of 5 right, but class 1 never
    assert balanced_top1(logits, labels) == pytest.approx(0.5)
    assert balanced_top1(torch.tensor([[0.0, 1.0]] * 5), labels) == pytest.approx(0.5)
    assert balanced_top1(torch.eye(2)[labels], labels) == pytest.approx(1.0)


def test_paired_gap_by_hand():
    from retrofit.demo_rules import paired_gap

    ref = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)  # 50%
    s0 = torch.tensor([1, 1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)  # 62.5%: one more
    s1 = torch.tensor([1, 0, 1, 1, 1, 0, 1, 0], dtype=torch.bool)  # 62.5%: two more, one fewer
    g = paired_gap([s0, s1], ref)
    assert g["gap"] == pytest.approx(0.125) and g["per_seed"] == pytest.approx([0.125, 0.125])
    # per image, the seed-mean hit minus the reference's: [0, -.5, 1, .5, 0, 0, 0, 0]
    d = torch.tensor([0, -0.5, 1, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    assert g["se"] == pytest.approx(float(d.std()) / 8 ** 0.5)
    assert paired_gap([ref], ref) == {"gap": 0.0, "se": 0.0, "per_seed": [0.0]}


def test_table_and_config_validation():
    from retrofit.demo import DemoConfig, format_table
    from retrofit.demo_rules import mean_std

    runs = [{"top1": 0.70, "many": 0.8, "medium": 0.7, "few": 0.6, "per_class_acc": [0.5, 0.7], "seed": 0},
            {"top1": 0.72, "many": 0.8, "medium": 0.7, "few": 0.7, "per_class_acc": [0.7, 0.7], "seed": 1}]
    m = mean_std(runs)
    assert m["top1"] == pytest.approx(0.71) and m["few_std"] == pytest.approx(0.0707, abs=1e-3)
    assert m["per_class_acc"] == pytest.approx([0.6, 0.7]) and len(m["seeds"]) == 2
    table = format_table({"4": m, "g_in": runs[0]}, seeds=2)
    assert "| 4 | retrofit: head on KB_in (LACE) | 80.0 ± 0.0 | 70.0 ± 0.0 | 65.0 ± 7.1 | 71.0 ± 1.4 |" in table
    assert "fixed 50/50 fusion" in table
    with pytest.raises(ValueError, match="unknown rows"):
        DemoConfig(rows=("1", "9")).validate()
    with pytest.raises(TypeError, match="got the string '1,2'"):  # it said "unknown rows [',']"
        DemoConfig(rows="1,2").validate()
    with pytest.raises(ValueError, match="seeds"):
        DemoConfig(seeds=0).validate()


def test_head_cache_key_covers_the_training_inputs(tmp_path):
    from types import SimpleNamespace

    import torch

    from retrofit.demo import DemoConfig
    from retrofit.demo_heads import head_cache_dir

    data = SimpleNamespace(root=tmp_path, kb_digest=lambda kb: f"labels-of-{kb}",  # the cache root, KB digests
                           features_digest=lambda kb, noisy: f"features-of-{kb}-{noisy}")
    cfg = DemoConfig()
    shift = torch.tensor([0.1, -2.0])
    base = head_cache_dir(cfg, data, "in", 0, "image+text", False, shift, True)
    assert base == head_cache_dir(DemoConfig(), data, "in", 0, "image+text", False, shift.clone(), True)
    assert base.parent == tmp_path / "heads"
    others = [head_cache_dir(cfg, data, "ext", 0, "image+text", False, shift, True),
              head_cache_dir(cfg, data, "in", 1, "image+text", False, shift, True),
              head_cache_dir(cfg, data, "in", 0, "image", False, shift, True),
              head_cache_dir(cfg, data, "in", 0, "image+text", True, shift, True),
              head_cache_dir(cfg, data, "in", 0, "image+text", False, None, True),
              head_cache_dir(cfg, data, "in", 0, "image+text", False, shift, False),
              head_cache_dir(DemoConfig(epochs=11), data, "in", 0, "image+text", False, shift, True),
              head_cache_dir(DemoConfig(k=8), data, "in", 0, "image+text", False, shift, True),
              head_cache_dir(DemoConfig(whiten_in=0.1), data, "in", 0, "image+text", False, shift, True),
              head_cache_dir(cfg, SimpleNamespace(root=tmp_path, kb_digest=lambda kb: "relabelled",
                                                  features_digest=data.features_digest), "in", 0,
                             "image+text", False, shift, True),  # same KB name, other labels
              head_cache_dir(cfg, SimpleNamespace(root=tmp_path, kb_digest=lambda kb: f"labels-of-{kb}",
                                                  features_digest=lambda kb, noisy: "other neighbours"),
                             "in", 0, "image+text", False, shift, True)]  # same KB, other training neighbours
    assert len({base, *others}) == 1 + len(others)
    # a KB's whitening keys the heads trained on that KB only (neighbours differ), and 0 keeps the older keys
    ext = head_cache_dir(cfg, data, "ext", 0, "image+text", False, shift, True)
    assert head_cache_dir(DemoConfig(whiten_ext=0.3), data, "ext", 0, "image+text", False, shift, True) != ext
    assert head_cache_dir(DemoConfig(whiten_ext=0.3), data, "in", 0, "image+text", False, shift, True) == base
    # demo.py's source is not in the key, so every DemoConfig field that training reads must be
    import inspect
    import re

    from retrofit import demo_train

    read = set(re.findall(r"\bcfg\.(\w+)", inspect.getsource(demo_train.train_head)))
    keyed = set(re.findall(r'"(\w+)"', inspect.getsource(demo_train.head_cache_dir)))
    assert read - keyed <= {"label_vote", "reuse_heads", "progress"}, read - keyed  # vote: its own key part
    for name in sorted(read - {"label_vote", "reuse_heads", "progress"}):  # and changing it changes the key
        v = getattr(cfg, name)
        other = {"vote_form": {"mix": "log", "log": "mix"}}  # string settings: another allowed value
        changed = DemoConfig(**{name: other[name][v] if isinstance(v, str) else (not v) if isinstance(v, bool)
                                else v * 2 + 1})
        assert head_cache_dir(changed, data, "in", 0, "image+text", False, shift, True) != base, name


def test_demo_command_is_registered():
    from retrofit.cli import build_parser

    args = build_parser().parse_args(["demo", "--seeds", "3", "--rows", "1,2", "--no-plot", "--retrain",
                                      "--ext-labels", "captions"])
    assert args.seeds == 3 and args.rows == "1,2" and args.no_plot and args.retrain and callable(args.func)
    assert args.ext_labels == "captions"


def test_demo_caption_labelled_pool(tmp_path, mini_samples, cifar_classes, data_dir):  # noqa: F811
    """The demo's caption-labelled copy of a pool KB (real encoders, real WordNet, 100 real captioned samples):
    same records, labels read from the stored caption vectors, the labeller digest recorded, an unfinished
    earlier attempt replaced, and a pool encoded by another text encoder refused."""
    import json

    import torch

    from retrofit.demo_build import _caption_labelled, _Encoders
    from retrofit.ingest import build_kb
    from retrofit.knowledge_base import KnowledgeBase

    enc = real_encoders()
    pool = tmp_path / "pool"
    build_kb(make_shards(tmp_path / "wds", mini_samples, cifar_classes), pool, **enc, batch_size=50, num_workers=1,
             progress=False)
    encs = _Encoders("darknet-tiny@64", "minilm")
    encs._txt = enc["text_encoder"]  # the loaded MiniLM (the demo loads it on a cache miss)
    out = tmp_path / "pool_captions"
    out.mkdir()
    (out / "leftover").write_text("an unfinished earlier attempt")
    _caption_labelled(pool, out, data_dir, encs, cifar_classes, "digest-1")
    info = json.loads((out / "done.json").read_text())
    assert info["labeller"] == "digest-1" and info["records"] == 100
    assert not (out / "leftover").exists()
    with KnowledgeBase.open(pool) as src, KnowledgeBase.open(out) as dst:
        ids = torch.arange(100)
        truth, got = src.labels(), dst.labels()
        for part in ("key", "image", "text"):
            assert torch.equal(src.vectors(ids, part), dst.vectors(ids, part))
        assert [r["caption"] for r in src.get(ids)] == [r["caption"] for r in dst.get(ids)]
        assert info["agree_with_dataset"] == pytest.approx(float((got == truth).float().mean()))
        assert info["unknown"] == pytest.approx(float((got < 0).float().mean()))
    assert 0.6 <= info["agree_with_dataset"] <= 0.95 and info["unknown"] <= 0.25, info
    # a pool whose texts another encoder wrote is refused, not relabelled with the wrong vectors
    other = _Encoders("darknet-tiny@64", "minilm")
    other._txt = enc["image_encoder"]  # a different fingerprint than the pool's MiniLM
    with pytest.raises(RuntimeError, match="not encoded by minilm"):
        _caption_labelled(pool, tmp_path / "refused", data_dir, other, cifar_classes, "digest-2")


def test_logits_by_vote_scale_equals_one_pass_per_scale(tmp_path, seed):
    """The demo's two-pass scale scoring on a small real DemoData (real KB, real head): each scale's logits equal
    a pass at that scale, the head's scale is left as it was, and training images never retrieve themselves."""
    import torch

    from retrofit.demo_data import DemoData
    from retrofit.demo_heads import adjustment_on_training_images, head_logits, logits_by_vote_scale
    from retrofit.demo_rules import balanced_top1
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.knowledge_base import KnowledgeBase

    g = torch.Generator().manual_seed(seed)
    y = np.repeat(np.arange(3), 20)  # 60 training images, 3 classes
    split = long_tail_split(y, imbalance_factor=4.0, val_per_class=2, seed=0, num_classes=3)
    n_lt = len(split.lt)
    centres = torch.randn(3, 8, generator=g) * 2
    z = {"lt": centres[torch.from_numpy(y[split.lt])] + torch.randn(n_lt, 8, generator=g),
         "val": centres[torch.from_numpy(y[split.val])] + torch.randn(len(split.val), 8, generator=g),
         "test": centres[torch.arange(3).repeat(5)] + torch.randn(15, 8, generator=g)}
    with KnowledgeBase.create(tmp_path / "kb_in", 8, 8, 6, class_names=["a", "b", "c"]) as kb:
        kb.add(z["lt"], z["lt"], torch.randn(n_lt, 6, generator=g), labels=torch.from_numpy(y[split.lt]))
    tensors = {f"z_{s}": v for s, v in z.items()} | {f"host_{s}": torch.randn(len(v), 3, generator=g)
                                                    for s, v in z.items()}
    noisy = y[split.lt].copy()
    noisy[::3] = (noisy[::3] + 1) % 3  # a third of the labels moved to the next class
    tensors |= {f"host_noisy_{k[5:]}": v for k, v in tensors.items() if k.startswith("host_")}  # the same logits
    data = DemoData(split=split, class_names=["a", "b", "c"], train_labels=y, test_labels=np.arange(3).repeat(5),
                    noisy_lt_labels=noisy, tensors=tensors, root=tmp_path, k=4)
    try:
        cfg = HeadConfig(query_dim=8, image_dim=8, text_dim=6, num_classes=3, dim=8, depth=1, heads=2, k=4,
                         label_vote=True)
        head = RetrievalHead(cfg, data.kb("in"))
        with torch.no_grad():
            head.readout.fc.weight.normal_(0, 0.3, generator=g)
        head.vote.set_weight(0.7)
        head.vote.set_scale(1.3)
        for split_name in ("lt", "val"):
            got = logits_by_vote_scale(head, data, "in", split_name, False, None, (0.0, 0.5, 2.0))
            assert float(head.vote.scale) == pytest.approx(1.3)  # left as it was
            for s, logits in got.items():
                head.vote.set_scale(s)
                torch.testing.assert_close(logits, head_logits(head, data, "in", split_name), rtol=1e-5, atol=1e-5)
            head.vote.set_scale(1.3)
            assert not torch.allclose(got[0.5], got[2.0])  # the vote is live
        own = data.train_features("in").neighbor_ids
        assert (own != torch.arange(n_lt)[:, None]).all()  # the "lt" split excludes each image's own entry
        with pytest.raises(ValueError, match="split must be"):
            head_logits(head, data, "in", "train")
        # the post-hoc adjustment on the training images: the best balanced top-1 over the grid, brute force, with
        # the labels the row trains on (noisy ones for a noisy row)
        head.vote.set_scale(1.3)
        lp = torch.tensor([-0.3, -1.2, -2.0])
        grid = (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
        lt = head_logits(head, data, "in", "lt")
        for noisy, labels in ((False, torch.from_numpy(y[split.lt])), (True, torch.from_numpy(data.noisy_lt_labels))):
            scores = [balanced_top1(lt - a * lp, labels) for a in grid]
            want = max(zip(scores, [-abs(a) for a in grid], grid))[2]  # ties: smallest |a|, then the positive
            assert adjustment_on_training_images(head, data, "in", noisy, None, lp, grid) == want
        assert float(head.vote.scale) == pytest.approx(1.3)
        plain = RetrievalHead(HeadConfig(query_dim=8, image_dim=8, text_dim=6, num_classes=3, dim=8, depth=1,
                                         heads=2, k=4), data.kb("in"))
        with pytest.raises(ValueError, match="no label vote"):
            logits_by_vote_scale(plain, data, "in", "val", False, None, (1.0,))
    finally:
        data.close()


@pytest.mark.parametrize("field, bad, says", [
    ("knn_temperature", 0.0, "knn_temperature must be a finite number > 0"),  # made the kNN rows chance, silently
    ("dim", 66, "dim=66 must be divisible by heads=4"),  # was found after building the KBs
    ("posthoc", (), "posthoc must be a non-empty tuple"),  # was "max() arg is an empty sequence"
    ("tau_la", float("nan"), "tau_la must be a finite number"),
    ("imbalance_factor", 0.0, "imbalance_factor must be a finite number >= 1"),
    ("rows", (), "rows must name at least one row"),
    ("val_per_class", 0, "val_per_class must be a positive int"),
    ("seeds", True, "seeds must be an int >= 1"),
    ("results_dir", "", "results_dir must be a directory path"),
    ("dropout", 1.5, "dropout must be in \\[0, 1\\)"),
    ("whiten_ext", -0.1, "whiten must be 0 \\(off\\) or the whitening shrinkage"),
    ("whiten_in", float("nan"), "whiten must be 0 \\(off\\) or the whitening shrinkage"),
    ("vote_temperatures", (0.05, 1e-9), "vote_temperatures must be a tuple of finite numbers >= 1e-6"),
    ("posthoc_on", "test", "posthoc_on must be 'val' or 'train'"),
    ("vote_scale_on", "val", "posthoc_on='train' needs vote_scale_on='train'"),
])
def test_demo_config_refuses_bad_settings_before_any_work(field, bad, says):
    from retrofit.demo import DemoConfig

    with pytest.raises(ValueError, match=says):
        DemoConfig(**{field: bad}).validate()
