"""Class labels read from captions: for knowledge bases built from web image–text data, which has no labels.

The label vote (``HeadConfig(label_vote=True)``) and kNN baselines read each neighbour's class label. A web
corpus has captions instead. :class:`CaptionLabeller` labels a caption zero-shot, by its text embedding's
cosine similarity to prototype texts of every class: the class name and its synonyms in a prompt template,
and optional one-line descriptions (e.g. WordNet glosses). A caption's label is the class of its most
similar prototype, or ``-1`` (unknown; ignored by the vote, not counted in the KB's class frequencies) when
no prototype reaches ``min_similarity``. It labels captions as text (``labeller(captions)``) or, without
re-encoding, the text vectors a knowledge base already stores (``labeller.label_vectors(kb.vectors(ids,
"text"))``, when the KB's text encoder is the labeller's).

A misleading caption ("a photo of a dog." on a cat) gets the wrong label: no text-only rule can catch it.
On the CIFAR-10 web-like captions (60% a template with a synonym, 15% a gloss, 10% uninformative, 15%
misleading) MiniLM with WordNet synonyms and glosses labels 75% correctly, leaves 10% unknown and gets
15% wrong at ``min_similarity=0.5``.

    labeller = CaptionLabeller(load_text_encoder("minilm"), class_names, synonyms=syn, descriptions=gloss)
    labels = labeller(["a blurry photo of the motorcar.", "IMG_0412.jpg"])   # tensor([1, -1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CaptionLabeller", "class_prototypes"]


def _fold(word: str) -> str:
    """A class name or synonym as the labeller compares them: underscores as spaces, stripped, lower case."""
    return str(word).replace("_", " ").strip().lower()


def class_prototypes(class_names: Sequence[str], synonyms: Sequence[Sequence[str]] | None = None,
                     descriptions: Sequence[str | None] | None = None,
                     template: str = "a photo of a {}.") -> tuple[list[str], list[int]]:
    """Prototype texts and the class each belongs to: ``template`` over every class's name and synonyms
    (underscores read as spaces, duplicates dropped), plus its description when given."""
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty; give the classifier's class names")
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"class_names must be non-empty strings, got {names[:20]}")
    folded = [_fold(n) for n in names]  # "sports_car" / "Sports car " are one prototype: two classes would share it
    if len(set(folded)) != len(names):
        dup = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
        raise ValueError(f"class_names must be distinct (case, spaces and underscores aside), got {dup[:20]}")
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the class name goes, got {template!r}")
    for what, seq in (("synonyms", synonyms), ("descriptions", descriptions)):
        if seq is not None and len(seq) != len(names):
            raise ValueError(f"{what} must have one entry per class ({len(names)}), got {len(seq)}")
    for c, entry in enumerate(synonyms or ()):
        if isinstance(entry, str) or not all(isinstance(w, str) for w in entry):
            raise ValueError(f"synonyms of class {names[c]!r} must be a list of strings, got {entry!r}")
    for c, entry in enumerate(descriptions or ()):
        if entry is not None and not isinstance(entry, str):
            raise ValueError(f"the description of class {names[c]!r} must be a string or None, got {entry!r}")
    texts: list[str] = []
    owner: list[int] = []
    owner_of: dict[str, int] = {}  # folded word -> the class whose prototype it is
    for c, name in enumerate(names):
        words = [name, *(synonyms[c] if synonyms is not None else ())]
        for w in words:
            w, key = str(w).replace("_", " ").strip(), _fold(w)
            if not w or owner_of.get(key) == c:  # (a class's own duplicates are dropped)
                continue
            if key in owner_of:  # a caption saying it would be labelled the first class, never this one
                raise ValueError(f"{w!r} names two classes, {names[owner_of[key]]!r} and {name!r} (as a class name "
                                 "or synonym); remove it from one of them")
            owner_of[key] = c
            texts.append(template.format(w))
            owner.append(c)
        if descriptions is not None and descriptions[c]:
            texts.append(str(descriptions[c]))
            owner.append(c)
    return texts, owner


class CaptionLabeller:
    """Zero-shot class labels of captions by text similarity to class prototypes (see the module docstring).

    ``text_encoder``: a :class:`retrofit.encoders.TextEncoder` (anything with ``encode(list[str]) -> (N, D)``
    and ``dim``); ``min_similarity``: the cosine a caption must reach with some prototype to get a label
    (below it: ``-1``, unknown).
    """

    def __init__(self, text_encoder: Any, class_names: Sequence[str], *,
                 synonyms: Sequence[Sequence[str]] | None = None, descriptions: Sequence[str | None] | None = None,
                 template: str = "a photo of a {}.", min_similarity: float = 0.5) -> None:
        if not -1.0 <= float(min_similarity) <= 1.0:
            raise ValueError(f"min_similarity is a cosine, so it must be in [-1, 1]; got {min_similarity}")
        self.encoder = text_encoder
        self.class_names = list(class_names)
        self.min_similarity = float(min_similarity)
        self.texts, owner = class_prototypes(self.class_names, synonyms, descriptions, template)
        with torch.inference_mode():  # kept on the CPU whatever device the encoder runs on
            self.prototypes = F.normalize(text_encoder.encode(self.texts).float().cpu(), dim=-1)  # (P, D)
        self.owner = torch.tensor(owner, dtype=torch.int64)  # (P,)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_scores(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """(N, C) highest cosine similarity of each text vector with each class's prototypes (on the CPU)."""
        t = torch.as_tensor(text_vectors).detach().cpu()
        if t.dim() != 2 or t.shape[1] != self.prototypes.shape[1]:
            raise ValueError(f"text vectors must be (N, {self.prototypes.shape[1]}) from the labeller's text "
                             f"encoder, got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError("text vectors contain NaN or inf")
        sim = F.normalize(t.float(), dim=-1) @ self.prototypes.T  # (N, P)
        out = sim.new_full((t.shape[0], self.num_classes), -2.0)  # below any cosine
        return out.scatter_reduce(1, self.owner.expand(t.shape[0], -1), sim, reduce="amax")

    def label_vectors(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """(N,) int64 labels of already-encoded captions, on the CPU (``-1``: no prototype reaches
        ``min_similarity``, or an all-zero vector, the text vector of a record without a caption)."""
        best, label = self.class_scores(text_vectors).max(dim=1)
        blank = torch.as_tensor(text_vectors).detach().cpu().float().abs().sum(dim=1) == 0
        return torch.where((best >= self.min_similarity) & ~blank, label, torch.full_like(label, -1))

    def __call__(self, captions: Sequence[str | None], batch_size: int = 512) -> torch.Tensor:
        """(N,) int64 labels of ``captions`` (``None`` or blank: ``-1``)."""
        if isinstance(captions, str):
            raise ValueError("CaptionLabeller takes a list of captions, not one string")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        caps = list(captions)
        out = torch.full((len(caps),), -1, dtype=torch.int64)
        idx = [i for i, c in enumerate(caps) if c is not None and str(c).strip()]
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            with torch.inference_mode():
                vec = self.encoder.encode([str(caps[i]) for i in part])
            out[torch.tensor(part)] = self.label_vectors(vec)
        return out
