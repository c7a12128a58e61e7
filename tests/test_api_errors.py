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
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    n = len(k)
    cases = (("ab", "got one str"), ([1, 2], r"must hold strings \(or None\), got a int"), (["a"], "got 1 items"))
    for caps, msg in cases:
        with pytest.raises(ValueError, match=msg):
            k.add(keys[:2], torch.zeros(2, 2), torch.zeros(2, 2), captions=caps)
    assert len(k) == n  # nothing written
