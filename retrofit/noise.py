"""Label noise for experiments: symmetric and asymmetric (class-flip) noise at a given rate, seeded."""

from __future__ import annotations

import torch

__all__ = ["symmetric_noise", "asymmetric_noise", "CIFAR10_FLIPS", "add_label_noise"]

# the usual CIFAR-10 asymmetric flips (Patrini et al. 2017): truck -> automobile, bird -> airplane,
# deer -> horse, cat <-> dog; other classes keep their label
CIFAR10_FLIPS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def _check(labels: torch.Tensor, rate: float, num_classes: int) -> torch.Tensor:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    return labels


def symmetric_noise(labels: torch.Tensor, rate: float, num_classes: int, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(rate * N)`` labels (chosen at random) to a different class drawn uniformly.

    Returns ``(noisy_labels (N,), flipped (N,) bool)``. The same seed gives the same noise.
    """
    labels = _check(labels, rate, num_classes)
    g = torch.Generator().manual_seed(seed)
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
    labels = _check(labels, rate, num_classes)
    flips = {c: (c + 1) % num_classes for c in range(num_classes)} if flips is None else dict(flips)
    for src, dst in flips.items():
        if not (0 <= src < num_classes and 0 <= dst < num_classes) or src == dst:
            raise ValueError(f"flip {src} -> {dst} is invalid for {num_classes} classes (need two different classes)")
    g = torch.Generator().manual_seed(seed)
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
