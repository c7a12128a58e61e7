"""``wrap(model, head)``: a host classifier plus a ``RetrievalHead``, as one drop-in ``nn.Module``."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrofit.adapters.base import BackboneAdapter
from retrofit.adapters.generic import HookAdapter, find_classifier
from retrofit.adapters.timm_adapter import TimmAdapter, is_timm_like
from retrofit.adapters.torchvision_adapter import (
    TORCHVISION_HEADS,
    HeadlessTorchvisionAdapter,
    TorchvisionAdapter,
    is_headless,
    is_torchvision,
)
from retrofit.errors import RetrofitError
from retrofit.fingerprint import EncoderFingerprint, check_fingerprints
from retrofit.neighbors import Neighbors
from retrofit.store import search_store

__all__ = ["RetrofittedModel", "wrap", "backbone", "adapter_for", "embedder", "Embedder"]

logger = logging.getLogger(__name__)


def adapter_for(model: nn.Module, classifier: str | nn.Module | None = None,
                num_classes: int | None = None) -> BackboneAdapter:
    """The adapter that turns ``model`` into ``x -> (z, host_logits)`` in one pass.

    timm-style models (``forward_features`` + ``forward_head`` + ``get_classifier``, which includes
    ``retrofit.models.darknet_tiny``) use :class:`TimmAdapter`; torchvision models use the family's
    classifier attribute; anything else (or any model when ``classifier`` is given) a hook on its
    final ``nn.Linear`` (the one with ``num_classes`` outputs when given).
    """
    if isinstance(model, BackboneAdapter):
        return model
    if isinstance(model, RetrofittedModel):
        raise RetrofitError("this model is already retrofitted (a RetrofittedModel): swap its knowledge base with "
                            "model.head.attach(kb), or wrap the original host (model.backbone.model) with another "
                            "head")
    if classifier is None and is_timm_like(model):
        return TimmAdapter(model)
    if classifier is None and is_torchvision(model) and type(model).__name__ in TORCHVISION_HEADS:
        return HeadlessTorchvisionAdapter(model) if is_headless(model) else TorchvisionAdapter(model, num_classes)
    if isinstance(model, torch.jit.ScriptModule):  # (a scripted timm model is read above, through its methods)
        raise RetrofitError(f"{type(model).__name__} is a TorchScript module: retrofit reads the eager model's "
                            "layers; wrap the model before torch.jit.script (or load the eager one)")
    name, mod = find_classifier(model, classifier, num_classes)
    return HookAdapter(model, mod, name)


class Embedder(nn.Module):
    """``x -> z``: the host's pre-logits embedding alone (e.g. to embed knowledge-base images)."""

    def __init__(self, adapter: BackboneAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(x)[0]  # (B, D)


def embedder(model: nn.Module, classifier: str | nn.Module | None = None,
             num_classes: int | None = None) -> Embedder:
    """The host's embedding function ``x -> z`` (B, D), found as in :func:`adapter_for`."""
    return Embedder(adapter_for(model, classifier, num_classes))


backbone = adapter_for  # the name other modules use: model -> BackboneAdapter (x -> (z, host logits))


def _retriever_module(retriever: Any) -> nn.Module | None:
    """The nn.Module behind a retriever: itself, or an encoder's ``.module`` (retrofit.encoders.ImageEncoder)."""
    if isinstance(retriever, nn.Module):
        return retriever
    mod = getattr(retriever, "module", None)
    return mod if isinstance(mod, nn.Module) else None


def _param_of(module: nn.Module) -> Tensor | None:
    return next(iter(module.parameters()), None)


# host model -> the live RetrofittedModels around it (a wrap with the other train_classifier setting warns)
_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[RetrofittedModel]] = weakref.WeakKeyDictionary()
_WRAPPERS_LOCK = threading.Lock()


class _LastStore:
    """The last knowledge base a once-per-store check ran on, held weakly: an ``id()`` would be reused by a new
    store allocated where a freed one was, and its check skipped. Copies and pickles empty (the check runs again)."""

    __slots__ = ("_ref",)

    def __init__(self) -> None:
        self._ref: Any = None

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_LastStore, ())

    def is_(self, store: Any) -> bool:
        held = self._ref() if isinstance(self._ref, weakref.ref) else self._ref
        return held is not None and held is store

    def set(self, store: Any) -> None:
        try:
            self._ref = weakref.ref(store)
        except TypeError:  # a store type without weak references (__slots__): hold it
            self._ref = store


class RetrofittedModel(nn.Module):
    """A frozen host classifier whose logits are fused with a trained :class:`RetrievalHead`.

    ``model(x)`` returns the fused logits ``tau/2 * (L_I + L_R)`` (B, C; a head with ``vote_form="mix"``:
    log-probabilities with its label vote mixed in): a drop-in replacement for the
    host's output. ``model(x, return_output=True)`` returns the head's ``HeadOutput`` (fused, host and
    retrieval logits, neighbours, per-neighbour attention). ``features(x)`` gives ``(z, host_logits)``.

    The backbone is frozen (no gradients) and stays in eval mode even under ``.train()``; only the
    head trains, plus the host classifier layer when ``train_classifier=True``.
    """

    def __init__(self, adapter: BackboneAdapter, head: nn.Module, retriever: Any = None,
                 train_classifier: bool = False, fingerprint: EncoderFingerprint | None = None,
                 allow_fingerprint_mismatch: bool = False) -> None:
        super().__init__()
        self.backbone = adapter
        self.head = head
        self.retriever = retriever
        self.train_classifier = train_classifier
        self.fingerprint = fingerprint  # encoder of z (the backbone): what the KB's keys must come from
        self.allow_fingerprint_mismatch = allow_fingerprint_mismatch
        self._checked_store = _LastStore()  # the last store whose fingerprint was checked
        self._range_checked = False  # the first batch warns about 0-255 pixel values
        self._size_checked = _LastStore()  # the last store whose input size was compared
        self._freeze()
        self.train(head.training)  # the head's mode: a loaded head (eval) serves as is, a fresh one trains

    # ------------------------------------------------------------------------------------ freezing
    def _freeze(self) -> None:
        mods = self.backbone.classifier_modules() if self.train_classifier else []
        if self.train_classifier:
            if not mods:
                raise RetrofitError(
                    f"train_classifier=True, but the {self.backbone.describe()} has no classifier layer")
            if not any(p.is_floating_point() for m in mods for p in m.parameters()):
                raise RetrofitError(f"train_classifier=True, but the classifier layer of the {self.backbone.describe()}"
                                    " has no trainable parameters (a quantized layer?): train the float model's "
                                    "classifier, then quantize")
        self._warn_shared_host()
        self.backbone.requires_grad_(False)
        if (r := _retriever_module(self.retriever)) is not None:
            r.requires_grad_(False)
        for m in mods:
            m.requires_grad_(True)

    def _warn_shared_host(self) -> None:
        """Register this model with its host; warn when a live model around the same host has the other
        ``train_classifier``: freezing is a flag of the shared parameters, so this wrap changes that model too."""
        host = self.backbone.model
        others = [w for w in self._register() if w.train_classifier != self.train_classifier]
        if others:
            logger.warning("this %s is also wrapped by another RetrofittedModel with train_classifier=%s: this wrap %s "
                           "its classifier layer for both (requires_grad is a flag of the shared parameters); wrap a "
                           "copy (copy.deepcopy(model)) to keep them apart", type(host).__name__,
                           others[0].train_classifier, "unfreezes" if self.train_classifier else "freezes")

    def _register(self) -> list[RetrofittedModel]:
        """Add this model to its host's live wrappers; the others already there."""
        try:
            with _WRAPPERS_LOCK:
                wrappers = _WRAPPERS.setdefault(self.backbone.model, weakref.WeakSet())
                others = [w for w in wrappers if w is not self]
                wrappers.add(self)
        except TypeError:  # a host that cannot be hashed (it defines __eq__ without __hash__): not tracked
            return []
        return others

    def __setstate__(self, state: dict[str, Any]) -> None:  # a copy (deepcopy, pickle, torch.load) counts too
        super().__setstate__(state)
        if isinstance(getattr(self, "backbone", None), nn.Module):
            self._register()

    def train(self, mode: bool = True) -> RetrofittedModel:
        """Set train mode on the head only: the backbone (and retriever) always stay in eval mode."""
        super().train(mode)
        self.backbone.eval()
        if (r := _retriever_module(self.retriever)) is not None:
            r.eval()
        return self

    # ------------------------------------------------------------------------------------- forward
    @property
    def store(self) -> Any:
        return getattr(self.head, "store", None)

    def _input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"expected images as a (B, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"expected preprocessed float images (as the model's transforms give them), got "
                             f"{x.dtype}; e.g. x.float() / 255 followed by the model's normalisation")
        if not self._range_checked and x.numel() and not torch.compiler.is_compiling():  # (a sync: eager only)
            self._range_checked = True  # once: a full pass over every batch would cost
            if float(x.detach().abs().amax()) > 20:
                logger.warning("the images reach %.0f: 0-255 pixel values? the model expects its preprocessing "
                               "(e.g. x / 255, then its normalisation)", float(x.detach().abs().amax()))
        p = _param_of(self.backbone)
        if p is not None and (x.device != p.device or (x.is_floating_point() and x.dtype != p.dtype)):
            x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else None)
        return x

    def features(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """One backbone pass: (z (B, D) pre-logits embedding, host logits (B, C) or None)."""
        x = self._input(x)
        if self.train_classifier or x.requires_grad:
            # frozen parameters record no graph; the classifier's do, and so do images that require grad (saliency
            # maps, adversarial examples: gradients reach the input as through the host alone)
            return self.backbone(x)
        with torch.no_grad():
            return self.backbone(x)

    def _check_store(self, store: Any) -> None:
        if store is None or self._checked_store.is_(store):
            return
        theirs = getattr(getattr(store, "fingerprint", None), "key", None)
        mine = getattr(self.retriever, "fingerprint", None) if self.retriever is not None else self.fingerprint
        what = "the retriever" if self.retriever is not None else "the host backbone"
        check_fingerprints(mine, theirs, f"{what} ({self.backbone.describe()}) vs the knowledge base keys",
                           allow_mismatch=self.allow_fingerprint_mismatch)
        if mine is None and theirs is not None and not self.allow_fingerprint_mismatch:
            logger.warning("cannot check that the knowledge base's keys (%s) come from %s: its encoder is unknown; "
                           "pass wrap(..., fingerprint=EncoderFingerprint(...)) (or retriever=, the encoder the KB "
                           "was built with) to have it checked", theirs, what)
        self._checked_store.set(store)

    def _check_size(self, store: Any, x: Tensor) -> None:
        """Warn once per knowledge base when the images are not the size its keys were made from (when its key
        fingerprint records one): the neighbours would come from another vector space, silently."""
        fp = getattr(getattr(store, "fingerprint", None), "key", None)
        size = getattr(fp, "input_size", None)
        if size is None or self._size_checked.is_(store) or self.allow_fingerprint_mismatch:
            return
        self._size_checked.set(store)
        if tuple(x.shape[-2:]) != size:
            logger.warning("the knowledge base's keys were made from %dx%d images (%s), but the model is fed %dx%d: "
                           "its embeddings are another vector space and the neighbours will be poor; feed images "
                           "preprocessed as the KB's were (e.g. the encoder's .preprocess) or rebuild the KB at this "
                           "size", size[0], size[1], fp, x.shape[-2], x.shape[-1])

    def retrieve(self, x: Tensor, z: Tensor, exclude: Tensor | None = None) -> Any:
        """Neighbours of each image: searched with the retriever's keys when there is one, else with z."""
        store = self.store
        if store is None:
            raise RetrofitError("the head has no knowledge base: call head.attach(kb) (or pass neighbors=)")
        self._check_store(store)
        self._check_size(store, x)
        k = self.head.config.k
        if k == 0:  # a head configured without neighbours: nothing to search
            cfg = self.head.config
            return Neighbors.empty(z.shape[0], 0, cfg.image_dim, cfg.text_dim, device=z.device)
        if self.retriever is None and z.shape[-1] != self.head.config.query_dim:  # (an adapter that cannot tell its
            # embedding's width before a forward: a torchvision model whose classifier was replaced by Identity)
            raise ValueError(f"the host gives {z.shape[-1]}-d embeddings but the head has query_dim="
                             f"{self.head.config.query_dim}: build the head with HeadConfig(query_dim={z.shape[-1]}, "
                             "...)")
        follow = getattr(self.head, "follow_store", None)
        if follow is not None:
            follow()  # a balanced vote's prior follows a KB that changed since it was attached
        with torch.no_grad():
            if self.retriever is None:
                keys = z
            else:
                rp = _param_of(r) if (r := _retriever_module(self.retriever)) is not None else None
                if rp is not None and rp.is_floating_point() and (x.device != rp.device or x.dtype != rp.dtype):
                    x = x.to(device=rp.device, dtype=rp.dtype)  # an encoder object is not a submodule: .half() /
                    # .to(device) of this model leave it where it was
                enc = getattr(self.retriever, "encode", None)
                keys = enc(x) if callable(enc) else self.retriever(x)  # (B, Dk)
            if keys.shape[-1] != store.key_dim:
                src = "retriever" if self.retriever is not None else "backbone embedding"
                hint = ("pass the encoder the KB was built with, not a classifier: e.g. "
                        "retriever=retrofit.load_image_encoder('darknet-tiny') (its .encode gives the KB's keys)"
                        if self.retriever is not None else
                        "pass the encoder the KB was built with as retriever=, e.g. retrofit.load_image_encoder(spec)")
                raise ValueError(f"the {src} gives {keys.shape[-1]}-d keys but the knowledge base's keys are "
                                 f"{store.key_dim}-d; {hint}")
            return search_store(store, F.normalize(keys.float(), dim=-1), k, exclude)  # outside torch.compile graphs

    def forward(self, x: Tensor, *, return_output: bool = False, exclude: Tensor | None = None,
                neighbors: Any = None) -> Any:
        """Fused logits (B, C), or the head's ``HeadOutput`` (with attention) when ``return_output``."""
        x = self._input(x)
        z, host_logits = self.features(x)
        if neighbors is None:
            neighbors = self.retrieve(x, z, exclude)
        out = self.head(z, host_logits, neighbors=neighbors, return_attention=return_output)
        return out if return_output else out.logits

    def extra_repr(self) -> str:
        return f"backbone={self.backbone.describe()}, train_classifier={self.train_classifier}"


def wrap(model: nn.Module, head: nn.Module, retriever: Any = None,
         classifier: str | nn.Module | None = None, train_classifier: bool = False, *,
         fingerprint: EncoderFingerprint | None = None, allow_fingerprint_mismatch: bool = False
         ) -> RetrofittedModel:
    """Bolt ``head`` (a :class:`retrofit.head.RetrievalHead`) onto the classifier ``model``.

    - ``retriever``: a frozen module (or an encoder with ``.encode``) computing retrieval keys from the
      raw images, for a KB built with another encoder; default: the normalised backbone embedding.
    - ``classifier``: name (or module) of the host's classifier layer, for models retrofit cannot read.
    - ``train_classifier``: also train the host classifier layer (the rest of the backbone stays frozen).
    - ``fingerprint``: the backbone's encoder identity (default ``model.fingerprint`` when it has one),
      checked against the KB's key fingerprint unless ``allow_fingerprint_mismatch=True``.

    The head is moved to the model's device and floating dtype. Raises ``ValueError`` when the head's
    dims do not fit the model, :class:`RetrofitError` when retrofit cannot find the model's classifier layer
    (e.g. no ``nn.Linear`` with the head's class count) and :class:`FingerprintMismatchError` for a KB from another
    encoder. Hosts whose features turn out unpooled or per-token are refused on the first forward call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cfg = getattr(head, "config", None)
    if not isinstance(head, nn.Module) or cfg is None or not hasattr(cfg, "query_dim"):
        raise TypeError(f"head must be a retrofit.RetrievalHead, got {type(head).__name__}")
    lazy = [n for n, t in model.named_parameters() if torch.nn.parameter.is_lazy(t)]
    if lazy:
        raise RetrofitError(f"{type(model).__name__} has parameters not yet initialised ({', '.join(lazy[:3])}: "
                            "nn.LazyLinear or another lazy module): run the model once on a batch of images, then "
                            "wrap it")
    adapter = adapter_for(model, classifier, num_classes=cfg.num_classes)
    if getattr(adapter, "headless", False):
        logger.warning("the host %s has no classifier (timm num_classes=0, or a torchvision classifier replaced by "
                       "nn.Identity): there are no host logits, the retrofitted logits are the head's alone (zero "
                       "until it is trained, but for a vote_form='mix' vote's share)", adapter.describe())
    if adapter.num_classes is not None and adapter.num_classes != cfg.num_classes:
        raise ValueError(f"the host {adapter.describe()} predicts {adapter.num_classes} classes but the head has "
                         f"num_classes={cfg.num_classes}: build the head with HeadConfig(num_classes="
                         f"{adapter.num_classes}, ...)")
    dim = adapter.embed_dim
    if dim is not None and dim != cfg.query_dim:
        raise ValueError(f"the host {adapter.describe()} gives {dim}-d embeddings but the head has "
                         f"query_dim={cfg.query_dim}: build the head with HeadConfig(query_dim={dim}, ...)")
    if retriever is None and cfg.search_key_dim != cfg.query_dim:
        raise ValueError(f"the head searches with {cfg.search_key_dim}-d keys (key_dim) but there is no retriever; "
                         "pass retriever=<the encoder the KB was built with> or leave key_dim unset")
    fp = fingerprint if fingerprint is not None else getattr(model, "fingerprint", None)
    if fp is not None and not isinstance(fp, EncoderFingerprint):
        raise TypeError(f"fingerprint must be an EncoderFingerprint, got {type(fp).__name__}")
    key_fp = getattr(retriever, "fingerprint", None) if retriever is not None else fp
    check_fingerprints(cfg.query_fingerprint, key_fp, "the head's query encoder vs the retrieval keys",
                       allow_mismatch=allow_fingerprint_mismatch)
    p = _param_of(model)
    if p is not None:
        head.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)
    wrapped = RetrofittedModel(adapter, head, retriever, train_classifier, fp, allow_fingerprint_mismatch)
    wrapped._check_store(getattr(head, "store", None))
    logger.info("wrapped %s", adapter.describe())
    return wrapped
