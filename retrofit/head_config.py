"""``HeadConfig``: the shape and behaviour of a :class:`~retrofit.head.RetrievalHead`, checked when it is made
(every field names what it allows) and written to the head's ``config.json`` by ``to_dict``."""

from __future__ import annotations

import logging
import math
import numbers
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

from retrofit.fingerprint import EncoderFingerprint
from retrofit.fusion import MODALITIES, VOTE_FORMS

__all__ = ["HeadConfig"]

logger = logging.getLogger("retrofit.head")  # (the head's logger: its config's warnings are the head's)

_FINGERPRINTS = ("query_fingerprint", "image_fingerprint", "text_fingerprint")


@dataclass
class HeadConfig:
    """Shape and behaviour of a :class:`RetrievalHead`. Defaults are the paper's (k=32, L=4, d=512, 8 heads).

    ``modalities`` (the paper's ablations; the architecture is the same in all three):
    ``"image+text"`` image stream ``[z; neighbour images]``, text stream ``[0; neighbour texts]``;
    ``"image"`` removes the neighbour texts (the text stream is all zeros, so text-side queries are
    learned constants and the image side is attention-pooled); ``"text"`` removes the neighbour images
    (the image stream holds only the query ``z``, which attends over the neighbour texts). The query's
    own text slot is zero in every setting. A removed modality has no projection and no influence.
    """

    query_dim: int  # dimension of the host embedding z the head receives
    image_dim: int  # dimension of the knowledge base's image vectors
    text_dim: int  # dimension of the knowledge base's text vectors
    num_classes: int  # number of classes C of the logits
    dim: int = 512  # model dimension d of the fusion streams
    depth: int = 4  # number of cross-fusion layers L
    heads: int = 8  # attention heads per layer (dim must be divisible by heads)
    k: int = 32  # neighbours fetched per query when the head searches its store
    dropout: float = 0.0  # dropout on the input tokens, the readout features and the optional MLPs
    modalities: str = "image+text"  # "image+text"; "image" drops neighbour texts; "text" drops neighbour images
    tau: float = 2.0  # logits = tau/2 * (L_I + L_R); 2.0 makes a fresh (zero-readout) head return L_I unchanged
    learnable_tau: bool = False  # train tau as a parameter instead of keeping it fixed
    mlp_ratio: float = 0.0  # hidden size / dim of an optional per-stream MLP in each layer; 0 = none (paper)
    label_vote: bool = False  # a learned vote over the neighbours' labels (fusion.LabelVote; off = paper): added to
    # L_R (vote_form="log") or mixed into the output probabilities (vote_form="mix")
    # With label_vote: divide the vote by the attached store's label frequencies, set on every attach(), so that a
    # knowledge base swapped in with another class mix is rebalanced without retraining (LabelVote.set_label_prior).
    vote_balance: bool = False
    # With label_vote: "log" adds beta * log(eps + vote) to L_R; "mix" returns log((1 - a) softmax(logits) + a vote)
    # with a learned mixing weight a (0.5 at the start: the fixed 50/50 rule), see fusion.LabelVote
    vote_form: str = "log"
    key_dim: int | None = None  # dim of the store's search keys; None = query_dim (the head searches with z)
    class_names: list[str] | None = None  # optional names of the C classes
    query_fingerprint: EncoderFingerprint | None = None  # encoder of the search keys (store.fingerprint.key)
    image_fingerprint: EncoderFingerprint | None = None  # encoder of the KB image vectors
    text_fingerprint: EncoderFingerprint | None = None  # encoder of the KB text vectors

    def __post_init__(self) -> None:
        for n in ("query_dim", "image_dim", "text_dim", "num_classes", "dim", "depth", "heads", "k", "key_dim",
                  "dropout", "mlp_ratio", "tau"):  # numpy numbers as Python ones (config.json is JSON)
            v = getattr(self, n)
            if isinstance(v, numbers.Integral) and not isinstance(v, (bool, int)):
                setattr(self, n, int(v))
            elif isinstance(v, numbers.Real) and not isinstance(v, (bool, int, float)):
                setattr(self, n, float(v))
        for n in ("query_dim", "image_dim", "text_dim", "num_classes", "dim", "depth", "heads"):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"HeadConfig.{n} must be a positive int, got {v!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise ValueError(f"HeadConfig.k must be an int >= 0, got {self.k!r}")
        if self.key_dim is not None and (not isinstance(self.key_dim, int) or isinstance(self.key_dim, bool)
                                         or self.key_dim <= 0):
            raise ValueError(f"HeadConfig.key_dim must be a positive int or None, got {self.key_dim!r}")
        if self.vote_balance and not self.label_vote:
            raise ValueError("HeadConfig.vote_balance=True rebalances the label vote: it needs label_vote=True")
        if self.vote_form not in VOTE_FORMS:
            raise ValueError(f"HeadConfig.vote_form must be one of {VOTE_FORMS}, got {self.vote_form!r}")
        if self.vote_form != "log" and not self.label_vote:
            raise ValueError(f"HeadConfig.vote_form={self.vote_form!r} is the label vote's form: it needs "
                             "label_vote=True")
        if self.dim % self.heads:
            raise ValueError(f"HeadConfig.dim={self.dim} must be divisible by heads={self.heads}")
        if self.modalities not in MODALITIES:
            raise ValueError(f"HeadConfig.modalities={self.modalities!r} is not one of {MODALITIES}")
        if not _real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HeadConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not _real(self.mlp_ratio) or not 0.0 <= self.mlp_ratio < math.inf:
            raise ValueError(f"HeadConfig.mlp_ratio must be a finite number >= 0 (0 = no MLP), got {self.mlp_ratio!r}")
        if not _real(self.tau) or not 0.0 < self.tau < math.inf:
            raise ValueError(f"HeadConfig.tau must be a finite positive number, got {self.tau!r}")
        for n in ("learnable_tau", "label_vote", "vote_balance"):
            if not isinstance(getattr(self, n), bool):
                raise ValueError(f"HeadConfig.{n} must be True or False, got {getattr(self, n)!r}")
        if self.class_names is not None:
            if isinstance(self.class_names, (str, bytes)) or not isinstance(self.class_names, (list, tuple)):
                raise ValueError(f"HeadConfig.class_names must be a list of the {self.num_classes} class names, got "
                                 f"{self.class_names!r}")
            self.class_names = [str(c) for c in self.class_names]
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"HeadConfig.class_names has {len(self.class_names)} names "
                                 f"but num_classes={self.num_classes}")
            dup = sorted(n for n, c in Counter(self.class_names).items() if c > 1)
            if dup:  # a warning: heads saved before this check may hold such lists (ImageNet has two 'crane's)
                logger.warning("HeadConfig.class_names names %s more than once: the label vote cannot tell those "
                               "classes apart by name", dup[:10])
        for n in _FINGERPRINTS:
            v = getattr(self, n)
            if isinstance(v, dict):
                setattr(self, n, EncoderFingerprint.from_dict(v))
            elif v is not None and not isinstance(v, EncoderFingerprint):
                raise ValueError(f"HeadConfig.{n} must be an EncoderFingerprint or None, got {type(v).__name__}")

    @property
    def search_key_dim(self) -> int:
        return self.query_dim if self.key_dim is None else self.key_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for n in _FINGERPRINTS:
            d[n] = getattr(self, n).to_dict() if getattr(self, n) is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown HeadConfig fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)


def _real(v: Any) -> bool:
    """A real number (numpy's too), not a bool or a string."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)
