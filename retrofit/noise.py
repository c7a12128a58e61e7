"""Label noise for experiments: symmetric and asymmetric (class-flip) noise at a given rate, seeded."""

from __future__ import annotations

import numbers

import torch

from retrofit.linear_probe import class_indices

__all__ = ["symmetric_noise", "asymmetric_noise", "CIFAR10_FLIPS", "add_label_noise"]

# the usual CIFAR-10 asymmetric flips (Patrini et al. 2017): truck -> automobile, bird -> airplane,
# deer -> horse, cat <-> dog; other classes keep their label
CIFAR10_FLIPS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def _whole(value: object, what: str) -> int:
    """``value`` as an int when it is one (numpy / 0-d tensor integers too), else ValueError naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an int, got {value!r}")
    return int(value)


def _check(labels: torch.Tensor, rate: float, num_classes: int) -> tuple[torch.Tensor, float, int]:
    """Validated ``(labels (N,) int64, rate, num_classes)``."""
    if isinstance(rate, torch.Tensor) and rate.numel() == 1:
        rate = rate.item()
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"noise rate must be a number in [0, 1], got {rate!r}")
    num_classes = _whole(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    labels = class_indices(labels)  # (1.7 was truncated to class 1, silently)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    return labels, float(rate), num_classes


def symmetric_noise(labels: torch.Tensor, rate: float, num_classes: int, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(rate * N)`` labels (chosen at random) to a different class drawn uniformly.

    Returns ``(noisy_labels (N,), flipped (N,) bool)``. The same seed gives the same noise.
    """
    labels, rate, num_classes = _check(labels, rate, num_classes)
    g = torch.Generator().manual_seed(_whole(seed, "seed"))
    n_flip = int(round(rate * labels.numel()))
    rows = torch.randperm(labels.numel(), generator=g)[:n_flip]
    offset = torch.randint(1, num_classes, (n_flip,), generator=g)  # never the true class
    noisy = labels.clone()
    noisy[rows] = (labels[rows] + offset) % num_classes
    flipped = torch.zeros_like(labels, dtype=torch.bool)
    flipped[rows] = True
    return noisy, flipped


def asymmetric_noise(labels: torch.Tensor, rate: float, num_classes: int, seed: int = 0,
                     flips: dict[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent flips: a ``rate`` fraction of each source class ``c`` in ``flips`` becomes ``flips[c]``.

    ``flips`` defaults to the next class (c -> c + 1 mod C); pass :data:`CIFAR10_FLIPS` for the usual
    CIFAR-10 protocol. Returns ``(noisy_labels (N,), flipped (N,) bool)``.
    """
    labels, rate, num_classes = _check(labels, rate, num_classes)
    flips = {c: (c + 1) % num_classes for c in range(num_classes)} if flips is None else dict(flips)
    checked = {}
    for src, dst in flips.items():
        ok = all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in (src, dst))
        if not ok or not (0 <= src < num_classes and 0 <= dst < num_classes) or src == dst:  # (1.5 flipped nothing)
            raise ValueError(f"flip {src!r} -> {dst!r} is invalid for {num_classes} classes (need two different "
                             "class indices)")
        checked[int(src)] = int(dst)
    flips = checked
    g = torch.Generator().manual_seed(_whole(seed, "seed"))
    noisy = labels.clone()
    flipped = torch.zeros_like(labels, dtype=torch.bool)
    for src in sorted(flips):
        rows = (labels == src).nonzero().flatten()
        take = rows[torch.randperm(rows.numel(), generator=g)[:int(round(rate * rows.numel()))]]
        noisy[take] = flips[src]
        flipped[take] = True
    return noisy, flipped


def add_label_noise(labels: torch.Tensor, kind: str, rate: float, num_classes: int, seed: int = 0,
                    flips: dict[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``kind`` "symmetric" or "asymmetric" (see the two functions)."""
    if kind == "symmetric":
        return symmetric_noise(labels, rate, num_classes, seed)
    if kind == "asymmetric":
        return asymmetric_noise(labels, rate, num_classes, seed, flips)
    raise ValueError(f"noise kind {kind!r}; allowed: 'symmetric', 'asymmetric'")
