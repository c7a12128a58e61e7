"""Running a head over a :class:`FeatureSet`: its inputs batch by batch, and ``predict_logits``.

The :class:`_Batcher` builds a head's inputs for rows of a feature set: the query vectors, the host logits and
the neighbours, read from cached neighbour ids (vectors gathered from the knowledge base by id) or retrieved
live from the store. ``predict_logits`` runs a trained head over a whole feature set; head training
(:mod:`retrofit.training`) feeds its steps through the same batcher.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any

import torch
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.feature_cache import FeatureSet, NeighborVectors, neighbors_from_ids
from retrofit.neighbors import Neighbors

__all__ = ["predict_logits"]

log = logging.getLogger(__name__)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise RetrofitError(f"device {spec!r} is not a device; allowed: 'auto', 'cpu', 'cuda', 'cuda:N' (command "
                            "line: --device)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RetrofitError(f"device={spec!r} but CUDA is not available here; use device='cpu' or 'auto' "
                            "(command line: --device cpu or auto)")
    return dev


class _Batcher:
    """Builds the head's inputs for rows of a FeatureSet (cached or live neighbours)."""

    def __init__(self, fs: FeatureSet, k: int, device: torch.device, store: Any, table: NeighborVectors | None,
                 dims: tuple[int, int] | None = None, trim: bool = False):
        self.fs, self.k, self.device, self.store, self.table = fs, k, device, store, table
        # trim: drop the trailing slots no row of a batch fills (k above the KB's size, or exclusions emptying the
        # tail): the head treats a masked slot as absent, so the result is the same, at the cost of the slots
        # filled (training: 1000 slots on a 400-record KB ran 2.3x slower). Batches then differ in width.
        self.trim = trim
        self.keys = fs.retrieval_keys if not fs.has_neighbors else None
        self.dims = dims  # (image_dim, text_dim): the empty neighbour sets of k = 0
        if fs.has_neighbors and k > fs.neighbor_ids.shape[1]:
            log.warning("the features carry %d cached neighbours per sample, fewer than k=%d: the head runs with %d "
                        "(compute the features with k >= %d, or drop their neighbour ids for a live search)",
                        fs.neighbor_ids.shape[1], k, fs.neighbor_ids.shape[1], k)

    def __call__(self, idx: torch.Tensor):
        fs, dev = self.fs, self.device
        z = fs.z[idx].to(dev, torch.float32)  # (B, Dq)
        host = fs.host_logits[idx].to(dev, torch.float32) if fs.host_logits is not None else None  # (B, C)
        if self.k == 0:  # a head configured without neighbours (a head without a config: no vectors either)
            return z, host, Neighbors.empty(len(idx), 0, *(self.dims or (0, 0)), device=dev)
        if fs.has_neighbors:
            k = min(self.k, fs.neighbor_ids.shape[1])
            ids = fs.neighbor_ids[idx, :k]  # (B, k)
            k = _filled_width(ids >= 0) if self.trim else k
            nb = neighbors_from_ids(ids[:, :k], fs.neighbor_scores[idx, :k], fs.neighbor_labels[idx, :k], self.table)
        else:
            ex = fs.exclude[idx] if fs.exclude is not None else None
            nb = self.store.search(self.keys[idx], self.k, exclude=ex)
            if self.trim:
                nb = nb.truncate(_filled_width(nb.mask.cpu()))
        return z, host, nb.to(dev, torch.float32)


def _filled_width(valid: torch.Tensor) -> int:
    """The slots up to the last one that some row of ``valid`` (B, k) fills; at least one (an all-masked batch keeps
    one masked slot: the head's input keeps its shape)."""
    cols = valid.any(0).nonzero()  # (n, 1)
    return max(int(cols[-1, 0]) + 1 if len(cols) else 0, min(1, valid.shape[1]))


def _head_dims(head: nn.Module) -> tuple[int, int] | None:
    c = getattr(head, "config", None)
    return (c.image_dim, c.text_dim) if c is not None and hasattr(c, "image_dim") else None


def _resolve_store(head: nn.Module, store: Any) -> Any:
    return store if store is not None else getattr(head, "store", None)


def serving_view(head: nn.Module, store: Any) -> nn.Module:
    """``head`` itself when ``store`` is None, already attached, or ``head`` is not a :class:`RetrievalHead`; else
    ``head.attached_to(store)``: the same weights attached to ``store`` (its checks run, a balanced vote reads its
    class prior) without changing ``head``, which other threads may be serving. Scoring a head with another KB's
    neighbours used the attached KB's vote prior (or none): logits it was never trained or served with."""
    if store is None or not hasattr(head, "attached_to") or head.store is store:
        return head
    return head.attached_to(store)


def _vector_table(store: Any, sets: list[FeatureSet], k: int, device: torch.device) -> NeighborVectors | None:
    cached = [fs.neighbor_ids[:, :k] for fs in sets if fs is not None and fs.has_neighbors]
    if not cached:
        return None
    if store is None:
        raise RetrofitError("the features carry cached neighbour ids but no knowledge base was given to read their "
                            "vectors from: pass store=KnowledgeBase.open(...) or attach one to the head")
    return NeighborVectors(store, torch.cat([c.reshape(-1) for c in cached])).to(device)


@torch.no_grad()
def predict_logits(
    head: nn.Module,
    fs: FeatureSet,
    store: Any = None,
    *,
    host_classifier: nn.Module | None = None,
    k: int | None = None,
    batch_size: int = 1024,
    device: str = "auto",
    return_attention: bool = False,
    table: NeighborVectors | None = None,
) -> dict[str, torch.Tensor]:
    """Run a trained head over a FeatureSet: ``logits``, ``retrieval_logits``, ``host_logits`` (N, C) on CPU,
    plus ``neighbor_ids`` (N, k), with ``return_attention`` ``attention`` (N, k), and for a ``vote_form="mix"`` head
    ``vote_log_probs`` (N, C). ``store`` defaults to the
    head's attached KB; another one is used through a view of the head attached to it (:func:`serving_view`: checked,
    and a balanced vote reads its class prior); the head itself is left as it was."""
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch_size = int(batch_size)
    dev = _device(device)
    store = _resolve_store(head, store)
    k = k if k is not None else getattr(getattr(head, "config", None), "k", 32)  # (any nn.Module head: k=32)
    if table is None and fs.has_neighbors and k:
        table = _vector_table(store, [fs], k, dev)
    elif table is not None and fs.has_neighbors and k:  # a table built for other features: ids it lacks read zeros
        ids = fs.neighbor_ids[:, :k].to(table.row_of.device)
        missing = ids[(ids >= 0) & (table.rows(ids) == table.ids.numel())]
        if missing.numel():
            raise RetrofitError(f"table= lacks the vectors of {missing.unique().numel()} neighbour ids of these "
                                f"features (e.g. {missing.unique()[:5].tolist()}): it was built for other features; "
                                "leave table=None to read them from the store")
    if not fs.has_neighbors and store is None and k:
        raise RetrofitError("predict_logits needs a knowledge base (store=...) for features without cached neighbours")
    batcher = _Batcher(fs, k, dev, store, table, _head_dims(head))
    was_training = head.training
    head.eval()
    out: dict[str, list[torch.Tensor]] = {}
    model = serving_view(head, store)
    host_state = _borrow(host_classifier, dev)  # in eval mode on dev for the run; given back as it came
    try:
        for s in range(0, len(fs), batch_size) if len(fs) else [0]:  # no rows: one empty batch, (0, C) outputs
            idx = torch.arange(s, min(s + batch_size, len(fs)))
            z, host, nb = batcher(idx)
            if host_classifier is not None:
                host = host_classifier(z)
            kw = {"return_attention": True} if return_attention else {}
            o = model(z, host_logits=host, neighbors=nb, **kw)
            parts = {"logits": o.logits, "retrieval_logits": o.retrieval_logits, "neighbor_ids": nb.ids}
            if host is not None:
                parts["host_logits"] = host
            if return_attention and getattr(o, "attention", None) is not None:
                parts["attention"] = o.attention
            if getattr(o, "vote_log_probs", None) is not None:  # a vote_form="mix" head's vote, for calibration
                parts["vote_log_probs"] = o.vote_log_probs
            for name, t in parts.items():
                out.setdefault(name, []).append(t.detach().float().cpu() if t.is_floating_point() else t.cpu())
    finally:
        head.train(was_training)
        _give_back(host_classifier, host_state)
    return {n: torch.cat(v) for n, v in out.items()}


def _borrow(module: nn.Module | None, dev: torch.device) -> tuple[bool, torch.device | None] | None:
    """Put a caller's module (the host classifier) in eval mode on ``dev`` for a prediction run; returns how to
    give it back (its mode and device: a host with dropout or batch norm scored in training mode, and one on the
    CPU stayed on the GPU after predicting there)."""
    if module is None:
        return None
    first = next(iter(module.parameters()), None)
    state = (module.training, None if first is None else first.device)
    module.eval().to(dev)
    return state


def _give_back(module: nn.Module | None, state: tuple[bool, torch.device | None] | None) -> None:
    if module is None or state is None:
        return
    training, device = state
    module.train(training)
    if device is not None:
        module.to(device)
