"""Python API misuse a new user makes: each gets a clear error (or works) instead of a crash deep inside."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrofit.errors import KnowledgeBaseError
from retrofit.fingerprint import EncoderFingerprint
from retrofit.knowledge_base import KnowledgeBase


@pytest.fixture
def kb(tmp_path):
    g = torch.Generator().manual_seed(0)
    k = KnowledgeBase.create(tmp_path / "kb", 4, 2, 2, index="flat")
    keys = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    k.add(keys, torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g), captions=[f"c{i}" for i in range(6)])
    yield k, keys
    k.close()


def test_search_takes_arrays_and_lists(kb):
    k, keys = kb
    ref = k.search(keys[:2], 3, exclude=torch.tensor([[0], [1]]))
    for q, ex in ((keys[:2].numpy(), [[0], [1]]), (keys[:2].tolist(), np.array([0, 1]))):
        got = k.search(q, 3, exclude=ex)
        assert torch.equal(got.ids, ref.ids) and torch.allclose(got.scores, ref.scores)
    with pytest.raises(ValueError, match="exclude must hold integer ids"):
        k.search(keys[:2], 3, exclude=[[0.5], [1.0]])
    with pytest.raises(ValueError, match="queries must be a"):
        k.search("abc", 3)


def test_get_ids(kb):
    k, _ = kb
    assert k.get([]) == [] and k.vectors([]).shape == (0, 2)
    assert [r["id"] for r in k.get(np.array([1, 2]))] == [1, 2] and k.get(3)[0]["caption"] == "c3"
    for bad, msg in ((["3"], "ids must be integers"), ([0.5], "float32"), ([True], "bool")):
        with pytest.raises(ValueError, match=msg):
            k.get(bad)


def test_a_closed_kb_says_so(kb, tmp_path):
    k, keys = kb
    k.close()
    calls = {"search": lambda: k.search(keys[:1], 2), "get": lambda: k.get([0]), "info": k.info,
             "labels": k.labels, "vectors": lambda: k.vectors([0]), "verify": k.verify, "refresh": k.refresh}
    for call in calls.values():
        with pytest.raises(KnowledgeBaseError, match="is closed"):
            call()
    with KnowledgeBase.open(tmp_path / "kb") as r:  # the KB itself is fine
        assert len(r) == 6


def test_create_and_add_arguments(kb, tmp_path):
    k, keys = kb
    with pytest.raises(ValueError, match="class_names must be a list of strings"):
        KnowledgeBase.create(tmp_path / "a", 4, 2, 2, class_names="abc")
    with pytest.raises(TypeError, match="KBFingerprint"):
        KnowledgeBase.create(tmp_path / "b", 4, 2, 2, fingerprint=EncoderFingerprint("x", "y", "z", 4))
    with pytest.raises(ValueError, match=r"hnsw_storage must be one of \('fp16', 'float32'\), got 'bf16'"):
        KnowledgeBase.create(tmp_path / "c", 4, 2, 2, hnsw_storage="bf16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    n = len(k)
    cases = (("ab", "got one str"), ([1, 2], r"must hold strings \(or None\), got a int"), (["a"], "got 1 items"))
    for caps, msg in cases:
        with pytest.raises(ValueError, match=msg):
            k.add(keys[:2], torch.zeros(2, 2), torch.zeros(2, 2), captions=caps)
    assert len(k) == n  # nothing written


def test_arrays_and_wrong_types_in_training_and_evaluation(kb):
    from retrofit.evaluation import evaluate
    from retrofit.feature_cache import FeatureSet
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.training import TrainConfig, train

    k, keys = kb
    rng = np.random.default_rng(0)
    fs = FeatureSet(z=rng.standard_normal((8, 4)).astype(np.float32), labels=[0, 1, 2, 0, 1, 2, 0, 1])
    assert isinstance(fs.z, torch.Tensor) and fs.labels.dtype == torch.int64  # arrays and lists are taken
    assert k.search(keys[:1], np.int64(2)).ids.shape == (1, 2)  # numpy integers are ints
    head = RetrievalHead(HeadConfig(query_dim=4, image_dim=2, text_dim=2, num_classes=3, dim=8, depth=1, heads=2,
                                    k=2), k)
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, device="cpu")
    with pytest.raises(ValueError, match="labels must be integer class ids"):
        train(head, FeatureSet(z=fs.z, labels=fs.labels.float()), cfg, store=k)
    with pytest.raises(ValueError, match="query_dim=5"):
        train(head, FeatureSet(z=torch.randn(8, 5), labels=fs.labels), cfg, store=k)
    assert train(head, fs, cfg, store=k).history  # the same call with good inputs trains

    logits = rng.standard_normal((6, 3))
    y = np.array([0, 1, 2, 0, 1, 2])
    tc = [10, 5, 1]
    assert evaluate(logits, y, train_counts=tc)["top1"] == evaluate(torch.from_numpy(logits), torch.from_numpy(y),
                                                                     train_counts=tc)["top1"]
    with pytest.raises(ValueError, match="integer class ids"):
        evaluate(logits, y + 0.5, train_counts=tc)
    logits[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or \\+inf, or -inf on the true class, in 1 of 6 rows"):
        evaluate(logits, y, train_counts=tc)


def test_wrapped_model_wants_float_images():
    from torch import nn

    import retrofit

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    store = retrofit.InMemoryStore(48, 2, 2)
    store.add(torch.randn(4, 48), torch.randn(4, 2), torch.randn(4, 2))
    head = retrofit.RetrievalHead(retrofit.HeadConfig(query_dim=48, image_dim=2, text_dim=2, num_classes=5, dim=8,
                                                      depth=1, heads=2, k=2), store)
    clf = retrofit.wrap(model, head)
    x = torch.rand(2, 3, 4, 4)
    assert clf(x).shape == (2, 5)
    with pytest.raises(ValueError, match="preprocessed float images"):
        clf((x * 255).to(torch.uint8))


def test_a_vote_head_refuses_a_kb_whose_labels_mean_other_classes(tmp_path):
    """The label vote reads the KB's label ids as the head's classes: the same classes in another order (a KB built
    with another --classes file), other classes, or labels past the head's classes are refused at attach."""
    from retrofit.errors import RetrofitError
    from retrofit.head import HeadConfig, RetrievalHead

    names = ["cat", "dog", "ship"]
    g = torch.Generator().manual_seed(0)

    def kb_with(path, class_names, labels):
        k = KnowledgeBase.create(tmp_path / path, 4, 2, 2, index="flat", class_names=class_names)
        k.add(torch.randn(len(labels), 4, generator=g), torch.randn(len(labels), 2), torch.randn(len(labels), 2),
              labels=torch.tensor(labels))
        return k

    def head(num_classes=3, vote=True):
        return RetrievalHead(HeadConfig(query_dim=4, image_dim=2, text_dim=2, num_classes=num_classes, dim=8, depth=1,
                                        heads=2, k=2, label_vote=vote, class_names=names[:num_classes]))

    good = kb_with("good", names, [0, 1, 2, 1])
    head().attach(good)  # same classes, same order
    with pytest.raises(RetrofitError, match=r"same 3 classes in another order \(label 0 is 'ship' in the knowledge"):
        head().attach(kb_with("rev", names[::-1], [0, 1, 2]))
    # the message names the classes that differ (it listed the first six of each list: the same six, often)
    theirs = [n for n in names if n != names[1]] + ["car"]
    with pytest.raises(RetrofitError, match=rf"other classes \(3 in the knowledge base, 3 for the head; only in the "
                                            rf"knowledge base: \['car'\], only for the head: \['{names[1]}'\]\)"):
        head().attach(kb_with("other", theirs, [0, 1]))
    with pytest.raises(RetrofitError, match="label 2 but the head's label vote knows 2 classes"):
        RetrievalHead(HeadConfig(query_dim=4, image_dim=2, text_dim=2, num_classes=2, dim=8, depth=1, heads=2, k=2,
                                 label_vote=True)).attach(kb_with("unnamed", None, [0, 1, 2]))
    head(vote=False).attach(kb_with("rev2", names[::-1], [0, 1, 2]))  # without the vote the ids are not read


def test_a_vote_head_warns_that_a_kb_without_class_names_cannot_be_checked(tmp_path, caplog):
    """A KB built from integer labels without a class list was read by a named vote head as its own numbering,
    without a word (a user's 0=airplane, 1=car, 2=bird met a head whose class 1 was bird)."""
    from retrofit.head import HeadConfig, RetrievalHead

    kb = KnowledgeBase.create(tmp_path / "unnamed", 4, 2, 2, index="flat")
    kb.add(torch.randn(3, 4), torch.randn(3, 2), torch.randn(3, 2), labels=torch.tensor([0, 1, 2]))
    cfg = dict(query_dim=4, image_dim=2, text_dim=2, num_classes=3, dim=8, depth=1, heads=2, k=2, label_vote=True)
    with caplog.at_level("WARNING", logger="retrofit"):
        RetrievalHead(HeadConfig(**cfg, class_names=["airplane", "bird", "car"])).attach(kb)
    assert "labels carry no class names: the label vote reads its label i as the head's class i (0=airplane, " \
           "1=bird, 2=car, ...)" in caplog.text and "--classes" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="retrofit"):
        RetrievalHead(HeadConfig(**cfg)).attach(kb)  # a head without names: nothing to compare
        RetrievalHead(HeadConfig(**{**cfg, "label_vote": False}, class_names=["a", "b", "c"])).attach(kb)
    assert "no class names" not in caplog.text
    with caplog.at_level("WARNING", logger="retrofit"):  # the same KB and names again (a CLI run attached it twice,
        RetrievalHead(HeadConfig(**cfg, class_names=["airplane", "bird", "car"])).attach(kb)  # and said it twice)
    assert "no class names" not in caplog.text
    with caplog.at_level("WARNING", logger="retrofit"):  # another class list: said again
        RetrievalHead(HeadConfig(**cfg, class_names=["bird", "car", "airplane"])).attach(kb)
    assert caplog.text.count("labels carry no class names") == 1
