"""The ``Store`` protocol every knowledge-base engine implements, and an exact in-memory store.

``KnowledgeBase`` (LMDB + faiss, ``retrofit.knowledge_base``) is the main implementation;
``InMemoryStore`` is exact brute-force search in RAM for small knowledge bases and tests.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from retrofit.errors import RetrofitError
from retrofit.fingerprint import EncoderFingerprint
from retrofit.neighbors import Neighbors

__all__ = ["Store", "KBFingerprint", "InMemoryStore", "search_store"]


@dataclass(frozen=True)
class KBFingerprint:
    """The encoders behind a knowledge base's three vector spaces (None = unknown)."""

    key: EncoderFingerprint | None = None  # encoder of the search keys (compared with the head's query encoder)
    image: EncoderFingerprint | None = None  # encoder of the stored image vectors
    text: EncoderFingerprint | None = None  # encoder of the stored text vectors

    def to_dict(self) -> dict[str, Any]:
        return {n: (fp.to_dict() if (fp := getattr(self, n)) is not None else None) for n in ("key", "image", "text")}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> KBFingerprint:
        d = d or {}
        return cls(**{n: (EncoderFingerprint.from_dict(d[n]) if d.get(n) else None) for n in ("key", "image", "text")})


@runtime_checkable
class Store(Protocol):
    """What the head needs from a knowledge base."""

    @property
    def key_dim(self) -> int: ...

    @property
    def image_dim(self) -> int: ...

    @property
    def text_dim(self) -> int: ...

    @property
    def fingerprint(self) -> KBFingerprint: ...

    @property
    def generation(self) -> int:
        """Increases with every committed change; caches keyed on it go stale when it moves."""
        ...

    def __len__(self) -> int: ...

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> Neighbors:
        """Top-``k`` entries by inner product with the L2-normalised ``queries`` (B, key_dim).

        ``exclude`` (B, m) int64 lists ids that must not be returned for each query (-1 = padding).
        Returns tensors on ``queries.device``.
        """
        ...


def search_store(store: Store, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> Neighbors:
    """``store.search(queries, k, exclude)``, kept out of any ``torch.compile`` graph: a store's search is faiss /
    numpy / LMDB work that dynamo cannot trace (it failed inside ``KnowledgeBase``'s gather of the neighbours'
    vectors). Under ``torch.compile`` the search is one graph break; the model around it still compiles."""
    if torch.compiler.is_exporting():
        raise RetrofitError("torch.export cannot hold a knowledge-base search (data-dependent work, for a "
                            "KnowledgeBase outside torch altogether): export the host part (clf.backbone, which gives "
                            "(z, host logits)) and run the search and the head eagerly: "
                            "head(z, host_logits, neighbors=store.search(z, k))")
    if torch.jit.is_tracing() and not isinstance(store, InMemoryStore):
        raise RetrofitError(f"torch.jit.trace would record the neighbours this {type(store).__name__} finds for the "
                            "example input as constants, and the traced model would reuse them for every input: "
                            "trace or export the host part (clf.backbone; a headless host's gives (z, None), which "
                            "only torch.export takes) and run the search and the head eagerly (an InMemoryStore, "
                            "whose search is torch code, can be traced)")
    if torch.compiler.is_compiling():
        return _search_outside_graphs(store, queries, k, exclude)
    return store.search(queries, k, exclude)


def _search(store: Store, queries: torch.Tensor, k: int, exclude: torch.Tensor | None) -> Neighbors:
    return store.search(queries, k, exclude)


class _OutsideGraphs:
    """Calls ``_search`` through ``torch.compiler.disable``, made on first use: making it imports torch._dynamo
    (and triton), which importing retrofit must not (and an eager search never needs)."""

    fn = None

    def __call__(self, *args):
        if _OutsideGraphs.fn is None:
            _OutsideGraphs.fn = torch.compiler.disable(_search)
        return _OutsideGraphs.fn(*args)


_search_outside_graphs = _OutsideGraphs()


def as_queries(queries: Any) -> torch.Tensor:
    """Search queries as a tensor: numpy arrays and nested lists are accepted too (as float32 on the CPU)."""
    if isinstance(queries, torch.Tensor):
        return queries
    try:
        return torch.as_tensor(np.asarray(queries, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise ValueError(f"queries must be a (B, key_dim) float tensor or array, got {type(queries).__name__} "
                         f"({e})") from None


def _check_exclude(exclude: Any, batch: int) -> torch.Tensor | None:
    if exclude is None:
        return None
    if not isinstance(exclude, torch.Tensor):
        try:
            exclude = torch.as_tensor(np.asarray(exclude))
        except (TypeError, ValueError) as e:
            raise ValueError(f"exclude must be (B={batch}, m) integer ids, got {type(exclude).__name__} ({e})") \
                from None
    if exclude.is_floating_point() or exclude.dtype == torch.bool:
        raise ValueError(f"exclude must hold integer ids (-1 = padding), got {exclude.dtype}")
    if exclude.dim() == 1:
        exclude = exclude[:, None]
    if exclude.dim() != 2 or exclude.shape[0] != batch:
        raise ValueError(f"exclude must be (B={batch}, m) ids, got shape {tuple(exclude.shape)}")
    return exclude.to(torch.int64)


def check_search_args(queries: torch.Tensor, k: int, key_dim: int, exclude: torch.Tensor | None,
                      values: bool = True) -> torch.Tensor | None:
    """Shared validation of ``search`` arguments; returns ``exclude`` as (B, m) int64 or None. ``values=False``
    checks k and the shape only (the caller checks the values itself)."""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if queries.dim() != 2 or queries.shape[1] != key_dim:
        raise ValueError(f"queries must be (B, {key_dim}), got shape {tuple(queries.shape)}")
    if not values:
        return None
    if not torch.isfinite(queries).all():
        raise ValueError("queries contain NaN or inf")
    check_query_norms(queries.detach().double().norm(dim=1).cpu().numpy())
    return _check_exclude(exclude, queries.shape[0])


def check_query_norms(norms: np.ndarray) -> None:
    """Refuse zero query vectors (norms (B,)): a zero key has no direction, and its "neighbours" would be arbitrary
    records at score 0."""
    zero = np.flatnonzero(norms < 1e-12)
    if zero.size:
        rows = ", ".join(map(str, zero[:10].tolist())) + (" ..." if zero.size > 10 else "")
        raise ValueError(f"queries {rows} are zero vectors ({zero.size} of {norms.size}): a zero key has no direction "
                         "to search in; check the encoder's output for these inputs")


class InMemoryStore:
    """Exact (brute-force) search over vectors held in RAM. For small knowledge bases and tests.

    Ids are the insertion order (0, 1, 2, ...). Vectors are kept in float32.
    """

    def __init__(self, key_dim: int, image_dim: int, text_dim: int, fingerprint: KBFingerprint | None = None) -> None:
        for n, v in (("key_dim", key_dim), ("image_dim", image_dim), ("text_dim", text_dim)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        self._dims = (key_dim, image_dim, text_dim)
        self._fingerprint = fingerprint or KBFingerprint()
        self.keys = torch.empty(0, key_dim)  # (N, Dk) L2-normalised
        self.image = torch.empty(0, image_dim)  # (N, Di)
        self.text = torch.empty(0, text_dim)  # (N, Dt)
        self.labels = torch.empty(0, dtype=torch.int64)  # (N,)
        self.captions: list[str] = []
        self.deleted = torch.empty(0, dtype=torch.bool)  # (N,)
        self._generation = 0

    key_dim = property(lambda self: self._dims[0])
    image_dim = property(lambda self: self._dims[1])
    text_dim = property(lambda self: self._dims[2])
    fingerprint = property(lambda self: self._fingerprint)
    generation = property(lambda self: self._generation)

    def __len__(self) -> int:
        return int((~self.deleted).sum())

    def add(self, keys: torch.Tensor, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor | None = None,
            captions: list[str] | None = None) -> torch.Tensor:
        """Append entries; returns their ids (N,)."""
        n = keys.shape[0]
        parts = (("keys", keys, self.key_dim), ("image", image, self.image_dim), ("text", text, self.text_dim))
        for name, t, d in parts:
            if t.dim() != 2 or t.shape != (n, d):
                raise ValueError(f"{name} must be ({n}, {d}), got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or inf; nothing was added")
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
        if captions is not None and len(captions) != n:
            raise ValueError(f"captions must have {n} entries, got {len(captions)}")
        start = self.keys.shape[0]
        self.keys = torch.cat([self.keys, torch.nn.functional.normalize(keys.detach().float().cpu(), dim=1)])
        self.image = torch.cat([self.image, image.detach().float().cpu()])
        self.text = torch.cat([self.text, text.detach().float().cpu()])
        self.labels = torch.cat([self.labels, labels.detach().cpu().to(torch.int64)])
        self.captions += list(captions) if captions is not None else [""] * n
        self.deleted = torch.cat([self.deleted, torch.zeros(n, dtype=torch.bool)])
        self._generation += 1
        return torch.arange(start, start + n, dtype=torch.int64)

    def delete(self, ids: torch.Tensor) -> None:
        """Tombstone entries (search skips them at once). Unknown or already deleted ids raise ``KeyError`` and
        delete nothing, as :meth:`KnowledgeBase.delete <retrofit.kb_write.KBWriteMixin.delete>` does."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.keys.shape[0])]
        if not bad.numel():
            bad = ids[self.deleted[ids]]
        if bad.numel():  # (as KnowledgeBase.delete: nothing is deleted)
            raise KeyError(f"unknown or deleted ids {bad.tolist()[:10]} (valid ids: live records in "
                           f"0..{self.keys.shape[0] - 1})")
        if not ids.numel():
            return
        self.deleted[ids] = True
        self._generation += 1

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> Neighbors:
        queries = as_queries(queries)
        exclude = check_search_args(queries, k, self.key_dim, exclude)
        k = int(k)
        device, B, N = queries.device, queries.shape[0], self.keys.shape[0]
        q = torch.nn.functional.normalize(queries.detach().double().cpu(), dim=1).float()  # (B, Dk)
        sims = q @ self.keys.T  # (B, N)
        invalid = self.deleted[None, :].expand(B, N).clone()  # (B, N)
        if exclude is not None and N:
            ex = exclude.cpu()
            valid_ex = (ex >= 0) & (ex < N)
            rows = torch.arange(B)[:, None].expand_as(ex)
            invalid[rows[valid_ex], ex[valid_ex]] = True
        sims = sims.masked_fill(invalid, float("-inf"))
        kk = min(k, N)
        out = Neighbors.empty(B, k, self.image_dim, self.text_dim)
        if kk:
            scores, idx = sims.topk(kk, dim=1)  # (B, kk)
            ok = torch.isfinite(scores)
            out.scores[:, :kk] = scores.masked_fill(~ok, float("-inf"))
            out.ids[:, :kk] = idx.masked_fill(~ok, -1)
            out.mask[:, :kk] = ok
            out.image[:, :kk] = self.image[idx] * ok[..., None]
            out.text[:, :kk] = self.text[idx] * ok[..., None]
            out.labels[:, :kk] = self.labels[idx].masked_fill(~ok, -1)
        return out.to(device)
