"""Neighbors, EncoderFingerprint and the exact in-memory store."""

from __future__ import annotations

import pytest
import torch

from retrofit import EncoderFingerprint, FingerprintMismatchError
from retrofit.fingerprint import check_fingerprints
from retrofit.neighbors import Neighbors
from retrofit.store import InMemoryStore, KBFingerprint, Store


def test_fingerprint_roundtrip_and_check():
    a = EncoderFingerprint("timm", "resnet50", "random", 2048)
    assert EncoderFingerprint.from_dict(a.to_dict()) == a
    b = EncoderFingerprint("timm", "resnet50", "random", 2048, note="224px")
    assert a.matches(b)  # note is not compared
    assert b.input_size is None and a.input_size is None  # "224px" is not the form our encoders write
    assert EncoderFingerprint("timm", "vit", "x", 8, note="input (3, 240, 320)").input_size == (240, 320)
    assert EncoderFingerprint("darknet-tiny", "d", "x", 8, note="input 96px").input_size == (96, 96)
    nulled = EncoderFingerprint.from_dict({**a.to_dict(), "note": None})  # it crashed input_size (every forward)
    assert nulled.note == "" and nulled.input_size is None
    with pytest.raises(ValueError, match="note must be a string"):
        EncoderFingerprint("timm", "resnet50", "random", 2048, note=3)
    c = EncoderFingerprint("darknet-tiny", "darknet-tiny", "sha256:abc", 512)
    with pytest.raises(FingerprintMismatchError) as e:
        check_fingerprints(a, c, "attaching KB")
    assert "resnet50" in str(e.value) and "darknet-tiny" in str(e.value)
    check_fingerprints(a, c, "attaching KB", allow_mismatch=True)
    check_fingerprints(None, c, "x")
    with pytest.raises(ValueError, match="dim"):
        EncoderFingerprint("timm", "x", "random", 0)
    kf = KBFingerprint(key=a, image=a, text=None)
    assert KBFingerprint.from_dict(kf.to_dict()) == kf


def test_neighbors_validation_and_ops():
    n = Neighbors.empty(3, 4, 5, 6)
    assert n.batch_size == 3 and n.k == 4 and not n.mask.any()
    assert n.truncate(2).k == 2 and n.select(slice(0, 1)).batch_size == 1
    assert Neighbors.cat([n, n]).batch_size == 6
    with pytest.raises(ValueError, match="mask"):
        Neighbors(ids=n.ids, scores=n.scores, mask=n.mask[:, :2], image=n.image, text=n.text, labels=n.labels)
    # the operations move every field together, with distinct values so a wrong slot shows
    B, k = 3, 4
    ids = torch.arange(B * k).view(B, k)
    full = Neighbors(ids=ids, scores=-ids.float(), mask=ids % 3 != 1, image=torch.randn(B, k, 5),
                     text=torch.randn(B, k, 6), labels=ids % 7)
    parts = {"ids": full.ids, "scores": full.scores, "mask": full.mask, "image": full.image, "text": full.text,
             "labels": full.labels}
    t, sel = full.truncate(2), full.select(torch.tensor([2, 0]))
    other = Neighbors(ids=ids + 100, scores=-ids.float() - 100, mask=~full.mask, image=torch.randn(B, k, 5),
                      text=torch.randn(B, k, 6), labels=(ids + 1) % 7)
    both = Neighbors.cat([full, other])
    for name, value in parts.items():
        assert torch.equal(getattr(t, name), value[:, :2]), name
        assert torch.equal(getattr(sel, name), value[[2, 0]]), name
        assert torch.equal(getattr(both, name), torch.cat([value, getattr(other, name)])), name
    with pytest.raises(ValueError, match="truncate"):
        full.truncate(5)


def test_in_memory_store_exact_topk_exclude_delete(seed):
    g = torch.Generator().manual_seed(0)
    store = InMemoryStore(8, 5, 3)
    assert isinstance(store, Store)
    keys = torch.randn(50, 8, generator=g)
    ids = store.add(keys, torch.randn(50, 5, generator=g), torch.randn(50, 3, generator=g), torch.arange(50) % 7)
    assert ids.tolist() == list(range(50)) and len(store) == 50
    q = keys[:4]
    nb = store.search(q, 5)
    assert nb.ids[:, 0].tolist() == [0, 1, 2, 3]  # each query finds itself first
    brute = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    assert torch.equal(nb.ids, brute.topk(5, dim=1).indices)
    nb = store.search(q, 5, exclude=torch.tensor([[0], [1], [2], [3]]))
    assert not (nb.ids == torch.arange(4)[:, None]).any()
    store.delete(torch.tensor([10, 11]))
    nb = store.search(keys, 50)
    assert not torch.isin(nb.ids, torch.tensor([10, 11])).any()
    assert nb.mask.sum(1).tolist() == [48] * 50  # fewer than k hits: masked slots
    assert (nb.ids[~nb.mask] == -1).all() and (nb.image[~nb.mask] == 0).all()
    with pytest.raises(ValueError, match="k must be"):
        store.search(q, 0)
    with pytest.raises(ValueError, match="queries 0 are zero vectors"):
        store.search(torch.zeros(1, 8), 3)
    with pytest.raises(ValueError, match="NaN"):
        store.add(torch.full((1, 8), float("nan")), torch.zeros(1, 5), torch.zeros(1, 3))
    assert len(store) == 48
