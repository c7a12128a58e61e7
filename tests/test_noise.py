"""Label noise: exact rates, seeded, never the true class for symmetric noise."""

from __future__ import annotations

import pytest
import torch

from retrofit.noise import CIFAR10_FLIPS, add_label_noise, asymmetric_noise, symmetric_noise


def test_symmetric_rate_seed_and_classes():
    labels = torch.arange(1000) % 10
    noisy, flipped = symmetric_noise(labels, 0.4, 10, seed=1)
    assert int(flipped.sum()) == 400 and torch.equal(noisy != labels, flipped)
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9
    again, _ = symmetric_noise(labels, 0.4, 10, seed=1)
    other, _ = symmetric_noise(labels, 0.4, 10, seed=2)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    # the new labels are spread over the other classes
    assert len(torch.unique(noisy[flipped & (labels == 0)])) >= 8
    assert torch.equal(symmetric_noise(labels, 0.0, 10)[0], labels)


def test_asymmetric_flips():
    labels = torch.arange(1000) % 10
    noisy, flipped = asymmetric_noise(labels, 0.3, 10, seed=0, flips=CIFAR10_FLIPS)
    for src, dst in CIFAR10_FLIPS.items():
        rows = labels == src
        assert int(flipped[rows].sum()) == 30
        assert (noisy[rows & flipped] == dst).all()
    untouched = ~torch.isin(labels, torch.tensor(list(CIFAR10_FLIPS)))
    assert not flipped[untouched].any()
    default, _ = asymmetric_noise(labels, 1.0, 10)
    assert torch.equal(default, (labels + 1) % 10)


def test_errors():
    with pytest.raises(ValueError, match="rate"):
        symmetric_noise(torch.tensor([0, 1]), 1.5, 2)
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        symmetric_noise(torch.tensor([0, 3]), 0.1, 2)
    with pytest.raises(ValueError, match="invalid"):
        asymmetric_noise(torch.tensor([0, 1]), 0.1, 2, flips={0: 0})
    with pytest.raises(ValueError, match="allowed"):
        add_label_noise(torch.tensor([0, 1]), "pairwise", 0.1, 2)


def test_numpy_numbers_are_taken_and_fractional_classes_refused():
    """numpy ints (labels.max() + 1) and 0-d tensor rates were refused; labels 1.7 were truncated to class 1 and a
    flip 1.5 -> 2 flipped nothing, silently."""
    import numpy as np

    y = np.arange(40) % 4
    noisy, flipped = symmetric_noise(y, torch.tensor(0.25), y.max() + 1, seed=np.int64(3))
    same, _ = symmetric_noise(torch.from_numpy(y), 0.25, 4, seed=3)
    assert torch.equal(noisy, same) and int(flipped.sum()) == 10
    with pytest.raises(ValueError, match=r"labels must be class indices \(whole numbers\), got \[1\.7"):
        symmetric_noise(torch.tensor([0.0, 1.7, 2.0]), 0.5, 4)
    with pytest.raises(ValueError, match=r"flip 1\.5 -> 2 is invalid"):
        asymmetric_noise(torch.from_numpy(y), 0.5, 4, flips={1.5: 2})
    with pytest.raises(ValueError, match="noise rate must be a number in"):
        symmetric_noise(torch.from_numpy(y), float("nan"), 4)
