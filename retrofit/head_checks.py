"""What :class:`~retrofit.head.RetrievalHead` checks of the stores it attaches and the inputs it is given: label
ids the label vote can read as the head's classes, real floating-point tensors, finite neighbours."""

from __future__ import annotations

import logging

import torch

from retrofit.errors import RetrofitError
from retrofit.head_config import HeadConfig
from retrofit.neighbors import Neighbors
from retrofit.store import Store

__all__ = ["store_label_counts"]

logger = logging.getLogger("retrofit.head")  # (the head's logger: these warnings are the head's)


def _store_labels(store: Store) -> torch.Tensor | None:
    """(N,) int64 labels of the live records of ``store`` (a deleted one votes for nothing, so it is not counted),
    or None when it keeps no labels."""
    labels = getattr(store, "labels", None)
    if callable(labels):  # KnowledgeBase.labels(): the live records' already
        labels = labels()
    if labels is None:
        return None
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
    deleted = getattr(store, "deleted", None)  # InMemoryStore: every record's label, and which are deleted
    if isinstance(deleted, torch.Tensor) and deleted.dtype == torch.bool and deleted.shape == labels.shape:
        labels = labels[~deleted]
    return labels


def store_label_counts(store: Store, num_classes: int, labels: torch.Tensor | None = None) -> torch.Tensor | None:
    """(C,) records per class in ``store`` (labels outside 0..C-1, e.g. -1 unknown, are not counted); None when
    the store knows no labels (then a balanced vote is left unbalanced). ``labels``: the store's, already read."""
    labels = _store_labels(store) if labels is None else labels
    if labels is None:
        return None
    labels = labels[(labels >= 0) & (labels < num_classes)]
    if labels.numel() == 0:
        logger.warning("the attached store has no labels in 0..%d (every record unlabelled): the label vote reads "
                       "nothing from its neighbours and gives every class the same vote (no effect); build the KB "
                       "with labels (or --labels-from-captions)", num_classes - 1)
        return None
    return torch.bincount(labels, minlength=num_classes)


_WARNED_UNNAMED: set[tuple[str, tuple[str, ...]]] = set()  # (KB, class list) pairs warned about unnamed labels


def _check_vote_classes(c: HeadConfig, store: Store, labels: torch.Tensor | None) -> None:
    """The label vote reads the store's label ids as the head's classes: refuse a store whose ids mean others."""
    theirs = getattr(store, "class_names", None)
    seen = None
    if (theirs is None and hasattr(store, "class_names") and c.class_names is not None and labels is not None
            and bool((labels >= 0).any())):  # (a KB built without a class list; an InMemoryStore keeps none)
        names = ", ".join(f"{i}={n}" for i, n in enumerate(c.class_names[:3]))
        seen = (str(getattr(store, "path", id(store))), tuple(c.class_names))
    if seen is not None and seen not in _WARNED_UNNAMED:  # once per KB and class list (a
        _WARNED_UNNAMED.add(seen)  # head is attached to its KB again, e.g. for training and then validation)
        logger.warning("the knowledge base's labels carry no class names: the label vote reads its label i as the "
                       "head's class i (%s, ...); if they were numbered in another order the vote is wrong. Build "
                       "the knowledge base with the class list (--classes / BuildConfig.class_names) to have this "
                       "checked", names)
    if theirs is not None and c.class_names is not None and list(theirs) != list(c.class_names):
        if sorted(theirs) == sorted(c.class_names):
            i = next(j for j, (a, b) in enumerate(zip(theirs, c.class_names)) if a != b)
            what = (f"the same {len(theirs)} classes in another order (label {i} is {theirs[i]!r} in the knowledge "
                    f"base, {c.class_names[i]!r} for the head)")
        else:
            only_kb = [n for n in theirs if n not in set(c.class_names)]
            only_head = [n for n in c.class_names if n not in set(theirs)]
            what = (f"other classes ({len(theirs)} in the knowledge base, {len(c.class_names)} for the head; only "
                    f"in the knowledge base: {only_kb[:6] or 'none'}{'...' if len(only_kb) > 6 else ''}, only for "
                    f"the head: {only_head[:6] or 'none'}{'...' if len(only_head) > 6 else ''})")
        raise RetrofitError(f"cannot attach store: its labels name {what}; the label vote would vote for the wrong "
                            "classes. Build the knowledge base with the head's class list (--classes / "
                            "BuildConfig.class_names) or give the head the knowledge base's class list (train "
                            "--classes in its order)")
    if labels is not None and labels.numel() and int(labels.max()) >= c.num_classes:
        raise RetrofitError(f"cannot attach store: it has label {int(labels.max())} but the head's "
                            f"label vote knows {c.num_classes} classes (0..{c.num_classes - 1}); build the head with "
                            "the knowledge base's classes")


def _check_real(t: object, name: str, what: str) -> None:
    """A head input must be a real floating-point tensor: numpy arrays, integer / bool tensors (labels, uint8
    images?) and complex ones (their imaginary part would be dropped with only a warning) are refused."""
    if not isinstance(t, torch.Tensor):
        hint = f" (torch.from_numpy({name.split('.')[0]}))" if type(t).__module__ == "numpy" else ""
        raise TypeError(f"{name} must be a torch.Tensor of {what}, got {type(t).__name__}{hint}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor of {what}, got {t.dtype}")


def _check_given(nb: Neighbors, vote: bool, num_classes: int) -> None:
    """Neighbours passed in (a cache, another store; a store's own are checked when written): labels the vote can
    index, finite vectors and scores in the valid slots (one NaN there made the row's logits NaN and, through
    backward, most of the head's gradients)."""
    if vote and nb.labels.numel():
        top = int(nb.labels.max())
        if top >= num_classes:
            raise ValueError(f"neighbour label {top} is not a class of this head (labels 0..{num_classes - 1}, "
                             "-1 = unknown): the neighbours come from a knowledge base with other classes")
    m = nb.mask
    for name, t in (("image", nb.image), ("text", nb.text), ("scores", nb.scores)):
        if bool(torch.isfinite(t.sum())):  # a finite sum means every value is finite: nothing to look for
            continue  # (one pass, no copy; a NaN / inf anywhere, or an overflowing sum, takes the exact check)
        v = t[m]
        bad = v.isnan() | (v == float("inf")) if name == "scores" else ~torch.isfinite(v)  # score -inf: least similar
        if bad.any():
            row, slot = (int(i) for i in m.nonzero()[int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0])])
            raise ValueError(f"neighbour {name} holds NaN or inf in a valid slot (row {row}, slot {slot}); mask "
                             "the slot (mask=False) or give finite vectors")
