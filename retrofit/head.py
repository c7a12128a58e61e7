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

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.fingerprint import check_fingerprints
from retrofit.fusion import CrossFusionLayer, FusionStreams, LabelVote, QueryReadout
from retrofit.head_checks import _check_given, _check_real, _check_vote_classes, _store_labels, store_label_counts
from retrofit.head_config import HeadConfig
from retrofit.head_io import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_FILE, load_head, save_head
from retrofit.neighbors import Neighbors
from retrofit.store import Store, search_store

__all__ = ["HeadConfig", "HeadOutput", "RetrievalHead", "FORMAT_VERSION", "store_label_counts"]
__all__ += ["CONFIG_FILE", "FORMAT_NAME", "WEIGHTS_FILE"]  # (the saved folder's names, from retrofit.head_io)

logger = logging.getLogger(__name__)


@dataclass
class HeadOutput:
    """What :meth:`RetrievalHead.forward` returns."""

    logits: torch.Tensor  # (B, C) tau/2 * (L_I + L_R), or tau/2 * L_R without host logits ("mix": with the vote)
    retrieval_logits: torch.Tensor  # (B, C) L_R (with a log-form vote in it; a mix-form vote is not: the readout)
    host_logits: torch.Tensor | None  # (B, C) L_I as given, or None
    neighbors: Neighbors  # the neighbours used (on the head's device)
    attention: torch.Tensor | None = None  # (B, k) per-neighbour attention of the query tokens, when asked
    vote_log_probs: torch.Tensor | None = None  # (B, C) log of the label vote (vote_form="mix" heads only)


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
        self._store_generation: int | None = None  # the attached store's generation when its counts were read
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
        self._store_generation = getattr(store, "generation", None)  # the store as its prior was read
        return self

    def follow_store(self) -> None:
        """A balanced vote's prior follows the attached store when it changes while attached (``kb add`` and a
        reader's ``refresh()``, records deleted): the class counts are read again once per change. Called by
        every search of the attached store (:meth:`retrieve`, ``RetrofittedModel``); call it yourself when you
        search the store and pass ``neighbors=``."""
        if self.vote is None or not self.config.vote_balance or self._store is None:
            return
        gen = getattr(self._store, "generation", None)
        if gen is None or gen == self.__dict__.get("_store_generation"):
            return
        self._store_counts = store_label_counts(self._store, self.config.num_classes)
        self.vote.set_label_prior(self._store_counts)
        self._store_generation = gen

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
        self.follow_store()
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
            logits = logits + self.vote(nb.labels, nb.scores, nb.mask).to(logits.dtype)  # (computed in fp32 at least)
        return logits, attention

    # --------------------------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/`` = ``model.safetensors`` (weights) + ``config.json`` (dims, classes, fingerprints,
        retrofit version, format version). The JSON is written last, atomically: it marks a complete save."""
        return save_head(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device | None = None,
             store: Store | None = None, allow_fingerprint_mismatch: bool = False) -> RetrievalHead:
        """Load a head written by :meth:`save` (bit-exact; never unpickles), in eval mode. ``map_location``:
        device."""
        return load_head(cls, path, map_location, store, allow_fingerprint_mismatch)
