"""CIFAR-10-LT protocol on the real shards: counts, disjoint splits, groups, shard reading."""

from __future__ import annotations

import numpy as np
import pytest

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
        long_tail_split(np.repeat(np.arange(10), 5), 10, val_per_class=20)


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
