"""``RetrievalHead``: RetFormer's retrieval branch, bolted onto a host classifier's embedding.

    z (B, Dq) ──► store.search(normalize(z), k, exclude) ──► Neighbors
    FusionStreams ──► L x CrossFusionLayer ──► QueryReadout ──► L_R (B, C)
    logits = tau / 2 * (L_I + L_R)          (tau / 2 * L_R when no host logits are given)
    (vote_form="mix": log((1 - a) softmax(logits) + a vote), the neighbours' label vote mixed in)

A freshly initialised head has a zero readout, so ``L_R = 0`` exactly: with the default ``tau = 2`` a
fresh head returns the host's logits unchanged (it adds nothing harmful before it is trained).
With ``HeadConfig(label_vote=True, vote_form="mix")`` the neighbours' label vote is mixed in last,
``log((1 - a) softmax(logits) + a vote)``, and a fresh head is the fixed rule ``a = 0.5`` instead.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrofit._version import __version__
from retrofit.errors import RetrofitError
from retrofit.fingerprint import EncoderFingerprint, check_fingerprints, file_sha256, tensors_sha256
from retrofit.fusion import MODALITIES, VOTE_FORMS, CrossFusionLayer, FusionStreams, LabelVote, QueryReadout
from retrofit.neighbors import Neighbors
from retrofit.store import Store, search_store

__all__ = ["HeadConfig", "HeadOutput", "RetrievalHead", "FORMAT_VERSION", "store_label_counts"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "retrofit-head"
FORMAT_VERSION = 1  # on-disk format of save(); load() refuses newer ones
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
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


@dataclass
class HeadOutput:
    """What :meth:`RetrievalHead.forward` returns."""

    logits: torch.Tensor  # (B, C) tau/2 * (L_I + L_R), or tau/2 * L_R without host logits ("mix": with the vote)
    retrieval_logits: torch.Tensor  # (B, C) L_R (with a log-form vote in it; a mix-form vote is not: the readout)
    host_logits: torch.Tensor | None  # (B, C) L_I as given, or None
    neighbors: Neighbors  # the neighbours used (on the head's device)
    attention: torch.Tensor | None = None  # (B, k) per-neighbour attention of the query tokens, when asked
    vote_log_probs: torch.Tensor | None = None  # (B, C) log of the label vote (vote_form="mix" heads only)


def _store_labels(store: Store) -> torch.Tensor | None:
    """(N,) int64 labels of every record in ``store``, or None when it keeps no labels."""
    labels = getattr(store, "labels", None)
    labels = labels() if callable(labels) else labels
    return None if labels is None else torch.as_tensor(labels).reshape(-1).to(torch.int64)


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


def _check_vote_classes(c: HeadConfig, store: Store, labels: torch.Tensor | None) -> None:
    """The label vote reads the store's label ids as the head's classes: refuse a store whose ids mean others."""
    theirs = getattr(store, "class_names", None)
    if (theirs is None and hasattr(store, "class_names") and c.class_names is not None and labels is not None
            and bool((labels >= 0).any())):  # (a KB built without a class list; an InMemoryStore keeps none)
        names = ", ".join(f"{i}={n}" for i, n in enumerate(c.class_names[:3]))
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
            what = f"other classes (knowledge base: {list(theirs)[:6]}..., head: {list(c.class_names)[:6]}...)"
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


def _reapply_store_prior(head: RetrievalHead, incompatible: Any) -> None:
    """After ``load_state_dict``: a vote balanced by its KB's class counts keeps the attached KB's prior, not the
    one in the loaded state (the KB the weights were trained with)."""
    if head.vote is not None and head.config.vote_balance and head._store is not None:
        head.vote.set_label_prior(head._store_counts)  # None (a KB without usable labels): rebalancing off


class RetrievalHead(nn.Module):
    """Retrieval cross-fusion head (RetFormer) over the k nearest knowledge-base entries of a query.

    ``forward(z, host_logits=None, neighbors=None, exclude=None, return_attention=False)``:
    ``z`` (B, Dq) is the host's embedding. Pass ``neighbors`` (e.g. from a training cache) or attach a
    store; then the head calls ``store.search(normalize(z), k, exclude)`` itself (``exclude`` (B, m)
    ids keep e.g. a training image's own KB entry out; it is ignored when ``neighbors`` are given).
    Neighbour vectors are cast to the head's dtype and device.

    The readout is zero-initialised: an untrained head gives ``L_R = 0``, hence (default ``tau = 2``)
    exactly the host's logits (with a ``vote_form="mix"`` label vote: the fixed rule
    ``log(0.5 softmax(L_I) + 0.5 vote)``). ``return_attention=True`` adds per-neighbour weights (B, k): the
    attention the two query tokens pay to each neighbour slot, averaged over both directions, all
    heads and all layers (masked slots get 0).
    """

    def __init__(self, config: HeadConfig, store: Store | None = None, allow_fingerprint_mismatch: bool = False
                 ) -> None:
        super().__init__()
        if not isinstance(config, HeadConfig):
            raise TypeError(f"config must be a HeadConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.streams = FusionStreams(c.query_dim, c.image_dim, c.text_dim, c.dim, c.modalities, c.dropout)
        self.layers = nn.ModuleList(CrossFusionLayer(c.dim, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth))
        self.readout = QueryReadout(c.dim, c.num_classes, c.dropout)
        self.vote = LabelVote(c.num_classes, form=c.vote_form) if c.label_vote else None
        tau = torch.tensor(float(c.tau))
        if c.learnable_tau:
            self.tau = nn.Parameter(tau)
        else:
            self.register_buffer("tau", tau)
        self._store: Store | None = None
        self._store_counts: torch.Tensor | None = None  # the attached store's class counts (vote_balance)
        self._allow_mismatch = False  # attach(allow_fingerprint_mismatch=...) of the attached store
        # load_state_dict would restore the label prior of the KB the weights were trained with; the attached KB's
        # prior is the one the vote must use (RetrievalHead.load attaches after loading; this covers the rest)
        self.register_load_state_dict_post_hook(_reapply_store_prior)
        if store is not None:
            self.attach(store, allow_fingerprint_mismatch=allow_fingerprint_mismatch)

    # ----------------------------------------------------------------------------------------- store
    @property
    def store(self) -> Store | None:
        """The attached knowledge base (not part of the module's state)."""
        return self._store

    def attach(self, store: Store, allow_fingerprint_mismatch: bool = False) -> RetrievalHead:
        """Use ``store`` for retrieval. Checks dims always and encoder fingerprints unless overridden.

        Raises ``ValueError`` on a dimension mismatch and :class:`FingerprintMismatchError` (naming
        both encoders) when the store's vectors come from other encoders than the head was built for.
        Fingerprints and class names the head does not know yet are taken from the store (and saved with the head).
        """
        if isinstance(store, (str, os.PathLike)):
            raise TypeError(f"store must be a knowledge base handle, got the path {os.fspath(store)!r}: open it with "
                            "retrofit.KnowledgeBase.open(path) and pass that (keep it open while the head serves)")
        if type(store).__name__ != "MissingKnowledgeBase" and not all(  # (that one raises its own error, with why)
                hasattr(store, a) for a in ("search", "key_dim", "image_dim", "text_dim", "fingerprint")):
            raise TypeError(f"store must be a retrofit.KnowledgeBase or InMemoryStore (a retrofit Store: search, "
                            f"key_dim, image_dim, text_dim, fingerprint), got {type(store).__name__}")
        c = self.config
        for what, mine, theirs in (("key", c.search_key_dim, store.key_dim), ("image", c.image_dim, store.image_dim),
                                   ("text", c.text_dim, store.text_dim)):
            if mine != theirs:
                hint = (" (HeadConfig.key_dim; it defaults to query_dim because the head searches with z: set it "
                        "when a separate retriever makes the keys)") if what == "key" else ""
                raise ValueError(f"cannot attach store: its {what} vectors have dim {theirs}, "
                                 f"the head expects {what} dim {mine}{hint}")
        fp = store.fingerprint
        pairs = (("query_fingerprint", fp.key, "search keys"), ("image_fingerprint", fp.image, "image vectors"),
                 ("text_fingerprint", fp.text, "text vectors"))
        for field, theirs, what in pairs:
            check_fingerprints(getattr(c, field), theirs, f"attaching a knowledge base ({what})",
                               allow_mismatch=allow_fingerprint_mismatch)
        labels = _store_labels(store) if self.vote is not None else None  # read once: checked, then counted
        if self.vote is not None:
            _check_vote_classes(c, store, labels)
        learned = {f: theirs for f, theirs, _ in pairs if getattr(c, f) is None and theirs is not None}
        names = getattr(store, "class_names", None)
        if c.class_names is None and self.vote is not None and names is not None and len(names) == c.num_classes:
            # saved with the head: a later KB listing the classes in another order is then refused (_check_vote_classes)
            learned["class_names"] = [str(n) for n in names]
        if learned:
            self.config = replace(c, **learned)
            logger.info("head adopts the store's %s", sorted(learned))
        self._store = store
        self._allow_mismatch = allow_fingerprint_mismatch  # kept for the re-attach after unpickling
        size = len(store)
        if size < c.k:  # not an error: a KB may grow later; but the head was trained with k neighbours each
            logger.warning("the attached store holds %d entries, fewer than the head's k=%d: each query gets at most "
                           "%d neighbours (the rest are masked); a head trained against a store of %d or more "
                           "entries has never seen queries with fewer", size, c.k, size, c.k)
        if self.vote is not None and self.config.vote_balance:
            self._store_counts = store_label_counts(store, c.num_classes, labels)
            self.vote.set_label_prior(self._store_counts)
        return self

    def attached_to(self, store: Store, allow_fingerprint_mismatch: bool | None = None) -> RetrievalHead:
        """A view of this head attached to ``store``: it shares every weight (training one trains the other; the
        vote's scale too) but has its own KB and label prior, so one head can serve two KBs at once, from two threads
        too; ``self`` is left as it is. Train / eval mode is shared through the submodules: switch the original's.
        The checks of :meth:`attach` run (``allow_fingerprint_mismatch`` None = as this head was attached)."""
        def shallow(module: nn.Module) -> nn.Module:  # its own attribute and hook dicts, the same tensors / children
            twin = object.__new__(type(module))  # (not copy.copy: that runs __setstate__, which re-attaches self)
            twin.__dict__.update(module.__dict__)
            for name, value in module.__dict__.items():
                if "hook" in name and isinstance(value, dict):  # hooks registered on the view stay on the view
                    twin.__dict__[name] = type(value)(value)
            return twin

        view = shallow(self)  # shares the parameters, buffers and submodules; the ones attach changes are replaced
        view._modules = dict(self._modules)
        if self.vote is not None:
            vote = shallow(self.vote)
            vote._buffers = {**self.vote._buffers, "label_log_prior": self.vote.label_log_prior.clone()}
            view._modules["vote"] = vote
        allow = self.__dict__.get("_allow_mismatch", False) if allow_fingerprint_mismatch is None else \
            allow_fingerprint_mismatch
        return view.attach(store, allow_fingerprint_mismatch=allow)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (pickle, ``copy.deepcopy``, ``torch.load`` of a whole model) reopens a KnowledgeBase from its
        path, which may hold another KB by now: attach it again, so its checks run (encoders, class list) and a
        balanced vote reads its class prior. One that fails them is left out, as a
        :class:`~retrofit.kb_handles.MissingKnowledgeBase` saying why (the model still loads)."""
        super().__setstate__(state)
        store = self.__dict__.get("_store")
        if store is None or type(store).__name__ == "MissingKnowledgeBase":
            return
        self._store = None
        try:  # (a head pickled before the flag was kept may have been attached with the mismatch allowed: allowed)
            self.attach(store, allow_fingerprint_mismatch=self.__dict__.get("_allow_mismatch", True))
        except (RetrofitError, ValueError) as e:
            from retrofit.kb_handles import MissingKnowledgeBase

            path = str(getattr(store, "path", "(in memory)"))
            logger.warning("the knowledge base %s no longer fits this head (%s): it loads without it", path, e)
            self._store = MissingKnowledgeBase(path, reason=str(e).splitlines()[0])

    def detach_store(self) -> Store | None:
        """Forget the attached store; returns it (the vote keeps that store's label prior)."""
        store, self._store, self._store_counts = self._store, None, None
        return store

    def retrieve(self, z: torch.Tensor, exclude: torch.Tensor | None = None, k: int | None = None) -> Neighbors:
        """``store.search(normalize(z), k, exclude)`` with the attached store (no gradient)."""
        if self._store is None:
            raise RetrofitError("the head has no store: attach one with head.attach(store), or pass neighbors=")
        if z.shape[-1] != self.config.search_key_dim:
            raise ValueError(f"the head searches with z (dim {z.shape[-1]}) but the store's keys have dim "
                             f"{self.config.search_key_dim}; retrieve with your own retriever and pass neighbors=")
        k = self.config.k if k is None else k
        if k == 0:  # a head configured without neighbours: nothing to search
            return Neighbors.empty(z.shape[0], 0, self.config.image_dim, self.config.text_dim, device=z.device)
        with torch.no_grad():
            q = F.normalize(z.detach().float(), dim=-1)  # (B, Dq)
            return search_store(self._store, q, k, exclude)  # outside torch.compile graphs

    # --------------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor, host_logits: torch.Tensor | None = None, neighbors: Neighbors | None = None,
                exclude: torch.Tensor | None = None, return_attention: bool = False) -> HeadOutput:
        """Fused logits for queries ``z`` (B, query_dim): ``tau/2 * (host_logits + L_R)`` (with a
        ``vote_form="mix"`` label vote: ``log((1 - a) softmax(that) + a vote)``, see :class:`LabelVote`).

        - ``host_logits`` (B, C): the host's logits ``L_I``; None gives ``tau/2 * L_R`` (a headless host).
        - ``neighbors``: precomputed :class:`~retrofit.neighbors.Neighbors` (B, k); None searches the attached
          store with ``normalize(z)``, skipping the KB ids in ``exclude`` (B, m) (-1 pads), e.g. a sample's own entry.
        - ``return_attention``: also give each neighbour's attention from the query tokens (B, k), averaged over
          layers, heads and both directions (slower: the PyTorch reference path materialises the probabilities).

        Returns a :class:`HeadOutput` (logits, L_R, L_I, the neighbours used, attention). Inputs move to the head's
        device and dtype. Raises ``ValueError`` naming the shape that does not fit.
        """
        c = self.config
        _check_real(z, "z", f"(B, {c.query_dim}) embeddings")
        if host_logits is not None:
            _check_real(host_logits, "host_logits", f"(B, {c.num_classes}) logits")
        if neighbors is not None:
            if not isinstance(neighbors, Neighbors):
                raise TypeError(f"neighbors must be a retrofit Neighbors (a store's search result), got "
                                f"{type(neighbors).__name__}; None searches the attached store")
            _check_real(neighbors.image, "neighbors.image", "neighbour vectors")
            _check_real(neighbors.text, "neighbors.text", "neighbour vectors")
        if z.dim() != 2 or z.shape[1] != c.query_dim:
            raise ValueError(f"z must be (B, {c.query_dim}), got shape {tuple(z.shape)}")
        B = z.shape[0]
        if host_logits is not None and tuple(host_logits.shape) != (B, c.num_classes):
            raise ValueError(f"host_logits must be ({B}, {c.num_classes}), got {tuple(host_logits.shape)}")
        p = self.readout.fc.weight
        if neighbors is None:
            neighbors = self.retrieve(z, exclude)  # labels checked at attach()
        elif neighbors.labels.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_given(neighbors, self.vote is not None, c.num_classes)  # CPU only: on a GPU, a sync per forward
        if neighbors.batch_size != B:
            raise ValueError(f"neighbors are for {neighbors.batch_size} queries but z has {B}")
        if neighbors.image.shape[2] != c.image_dim or neighbors.text.shape[2] != c.text_dim:
            raise ValueError(f"neighbour vectors are image {neighbors.image.shape[2]} / text {neighbors.text.shape[2]}"
                             f"-dimensional, the head expects {c.image_dim} / {c.text_dim}")
        neighbors = neighbors.to(p.device, p.dtype)
        if host_logits is not None and host_logits.device != p.device:
            host_logits = host_logits.to(p.device)  # as z and the neighbours: on the head's device
        retrieval_logits, attention = self._fuse(z.to(p.device, p.dtype), neighbors, return_attention)
        half_tau = self.tau / 2
        logits = half_tau * (retrieval_logits if host_logits is None else host_logits + retrieval_logits)
        vote_lp = None
        if self.vote is not None and self.vote.form == "mix":  # the vote mixed in as probabilities
            vote_lp = self.vote(neighbors.labels, neighbors.scores, neighbors.mask)
            logits = self.vote.mix(logits, vote_lp)
        return HeadOutput(logits, retrieval_logits, host_logits, neighbors, attention, vote_lp)

    def _fuse(self, z: torch.Tensor, nb: Neighbors, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        xi, xt, key_mask = self.streams(z, nb.image, nb.text, nb.mask)  # (B, S, d) x2, (B, S)
        acc = None
        for layer in self.layers:
            xi, xt, w = layer(xi, xt, key_mask, need_weights=need_weights)
            if need_weights:
                p_i, p_t = w  # (B, H, S, S) each
                a = (p_i[:, :, 0, 1:].mean(1) + p_t[:, :, 0, 1:].mean(1)).detach()  # (B, k)
                acc = a if acc is None else acc + a
        attention = None if acc is None else acc / (2 * len(self.layers))  # (B, k)
        logits = self.readout(xi, xt)  # (B, C)
        if self.vote is not None and self.vote.form == "log":  # ("mix": mixed in by forward, after tau)
            logits = logits + self.vote(nb.labels, nb.scores, nb.mask)
        return logits, attention

    # --------------------------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/`` = ``model.safetensors`` (weights) + ``config.json`` (dims, classes, fingerprints,
        retrofit version, format version). The JSON is written last, atomically: it marks a complete save."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "retrofit_version": __version__,
                "dtype": str(self.readout.fc.weight.dtype).removeprefix("torch."), "config": self.config.to_dict()}
        text = json.dumps(meta, indent=2)  # before any file is written: a config JSON cannot hold fails here
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path / (WEIGHTS_FILE + ".tmp")
        # the tensors' checksum travels inside the weights file (one atomic rename: a kill before the config is
        # written cannot pair new weights with an old checksum); load checks it (a flipped byte loaded silently)
        save_file(state, str(tmp), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                                             "tensors_sha256": tensors_sha256(state)})
        os.replace(tmp, path / WEIGHTS_FILE)
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path / CONFIG_FILE)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device | None = None,
             store: Store | None = None, allow_fingerprint_mismatch: bool = False) -> RetrievalHead:
        """Load a head written by :meth:`save` (bit-exact; never unpickles), in eval mode. ``map_location``:
        device."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} does not exist: {path} is not a saved RetrievalHead "
                                        f"(expected {CONFIG_FILE} and {WEIGHTS_FILE}, written by head.save)")
        try:
            meta = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RetrofitError(f"{cfg_file} is corrupt (not valid JSON: {e}); re-save the head") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise RetrofitError(f"{cfg_file} is not a {FORMAT_NAME!r} config (format {got!r})")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RetrofitError(f"{path} has head format version {version!r} (written by retrofit "
                                f"{meta.get('retrofit_version')}); this retrofit {__version__} reads versions "
                                f"up to {FORMAT_VERSION}: upgrade retrofit")
        try:
            config = HeadConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise RetrofitError(f"{cfg_file} holds an invalid head config: {e}") from e
        device = "cpu" if map_location is None else str(torch.device(map_location))
        try:
            with safe_open(str(w_file), "pt") as f:
                want = (f.metadata() or {}).get("tensors_sha256")  # (heads saved before checksums have none)
            if want is None and meta.get("weights_sha256") is not None:  # (a short-lived format kept it in the config)
                if file_sha256(w_file) != meta["weights_sha256"]:
                    raise ValueError("the file does not match the checksum in config.json")
            state = load_file(str(w_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise RetrofitError(f"{w_file} is corrupt or truncated ({e}); re-save the head") from e
        if want is not None and tensors_sha256(state) != want:
            raise RetrofitError(f"{w_file} does not match its checksum: its tensors were damaged after the head was "
                                "saved; restore the file, or re-save the head")
        state = {n: t.to(device) for n, t in state.items()}
        head = cls(config)
        if config.label_vote and "vote.scale" not in state:  # heads saved before the vote scale existed
            state["vote.scale"] = torch.ones((), device=device)
        try:
            head.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise RetrofitError(f"{w_file} does not match the config in {cfg_file}: {e}") from e
        if store is not None:
            head.attach(store, allow_fingerprint_mismatch=allow_fingerprint_mismatch)
        return head.eval()  # ready to serve (dropout off); retrofit.train switches it to training itself
