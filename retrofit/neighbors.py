"""``Neighbors``: what a store returns for a batch of queries, and what the head consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["Neighbors"]


@dataclass(frozen=True)
class Neighbors:
    """The k nearest knowledge-base entries of each of B queries.

    Fewer than k hits (small KB, exclusions, deletions) is normal: those slots have ``mask`` False,
    ``ids`` -1, ``labels`` -1, score ``-inf`` and zero vectors; they are never garbage.
    """

    ids: torch.Tensor  # (B, k) int64 entry ids, -1 in masked slots
    scores: torch.Tensor  # (B, k) float32 similarity (inner product of L2-normalised keys), -inf masked
    mask: torch.Tensor  # (B, k) bool, True where the slot holds a real neighbour
    image: torch.Tensor  # (B, k, Di) neighbour image vectors
    text: torch.Tensor  # (B, k, Dt) neighbour text vectors
    labels: torch.Tensor  # (B, k) int64 class of each neighbour, -1 when unknown or masked

    def __post_init__(self) -> None:
        B, k = self.ids.shape if self.ids.dim() == 2 else (None, None)
        if B is None:
            raise ValueError(f"Neighbors.ids must be (B, k), got shape {tuple(self.ids.shape)}")
        for name in ("scores", "mask", "labels"):
            t = getattr(self, name)
            if tuple(t.shape) != (B, k):
                raise ValueError(f"Neighbors.{name} must be ({B}, {k}) like ids, got {tuple(t.shape)}")
        for name in ("image", "text"):
            t = getattr(self, name)
            if t.dim() != 3 or tuple(t.shape[:2]) != (B, k):
                raise ValueError(f"Neighbors.{name} must be ({B}, {k}, D), got {tuple(t.shape)}")
        if self.ids.dtype != torch.int64 or self.labels.dtype != torch.int64:
            raise ValueError(f"Neighbors.ids/labels must be int64, got {self.ids.dtype}/{self.labels.dtype}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"Neighbors.mask must be bool, got {self.mask.dtype}")

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Neighbors:
        """Move every tensor to ``device``; ``dtype`` applies to the image / text vectors only."""
        image = self.image.to(device=device, dtype=dtype or self.image.dtype)
        text = self.text.to(device=device, dtype=dtype or self.text.dtype)
        rest = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name not in ("image", "text")}
        return Neighbors(image=image, text=text, **rest)

    def select(self, rows: torch.Tensor | slice) -> Neighbors:
        """The neighbours of a subset of the queries (``rows`` indexes the batch dimension)."""
        return Neighbors(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def truncate(self, k: int) -> Neighbors:
        """The first ``k`` slots of each row (rows are sorted by score, best first)."""
        if not 0 <= k <= self.k:
            raise ValueError(f"truncate(k={k}) needs 0 <= k <= {self.k}")
        return Neighbors(**{f.name: getattr(self, f.name)[:, :k] for f in fields(self)})

    @staticmethod
    def cat(parts: list[Neighbors]) -> Neighbors:
        """Concatenate along the batch dimension (all parts must have the same k)."""
        if not parts:
            raise ValueError("Neighbors.cat needs at least one part")
        return Neighbors(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Neighbors)})

    @staticmethod
    def empty(batch: int, k: int, image_dim: int, text_dim: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> Neighbors:
        """A batch where every slot is masked (no neighbours at all)."""
        return Neighbors(
            ids=torch.full((batch, k), -1, dtype=torch.int64, device=device),
            scores=torch.full((batch, k), float("-inf"), dtype=torch.float32, device=device),
            mask=torch.zeros((batch, k), dtype=torch.bool, device=device),
            image=torch.zeros((batch, k, image_dim), dtype=dtype, device=device),
            text=torch.zeros((batch, k, text_dim), dtype=dtype, device=device),
            labels=torch.full((batch, k), -1, dtype=torch.int64, device=device),
        )
