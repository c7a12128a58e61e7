"""The per-family encoder constructors behind ``load_image_encoder`` / ``load_text_encoder``.

timm, torchvision, open_clip (image and text towers share one cached load), Tiny Darknet and
sentence-transformers; each resolves its ``WEIGHTS`` (hub tag, local checkpoint or ``random``), builds the
frozen model and returns an :class:`~retrofit.encoders.ImageEncoder` / :class:`~retrofit.encoders.TextEncoder`
with its fingerprint. The spec forms are documented in :mod:`retrofit.encoders`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrofit._env import require
from retrofit.encoders import ImageEncoder, TextEncoder, hub_reachable
from retrofit.errors import RetrofitError
from retrofit.fingerprint import EncoderFingerprint, file_digest

log = logging.getLogger(__name__)

_RANDOM_SEED = 0  # seed of ``@random`` weights, so that two random encoders of one spec are the same encoder


# ----------------------------------------------------------------------------------------------- weights


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".npz", ".tar")


def _is_path(weights: str | None) -> bool:
    """A local checkpoint (a path, or a file name with a checkpoint's suffix, existing or not) rather than a hub tag."""
    return weights is not None and (os.sep in weights or weights.startswith(".") or Path(weights).exists()
                                    or weights.lower().endswith(_CHECKPOINT_SUFFIXES))


def _checked_path(weights: str, spec: str) -> Path:
    p = Path(weights).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} named in encoder spec {spec!r} does not exist")
    return p


def _offline_error(spec: str, e: Exception, hint: str) -> RetrofitError:
    return RetrofitError(
        f"cannot load encoder {spec!r}: its weights must come from the Hugging Face hub, which is not reachable "
        f"here (offline or HF_HUB_OFFLINE=1) and they are not in the local cache ({type(e).__name__}: {e}). {hint}"
    )


def _random_init(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        return build()


def _probe_dim(embed: Callable[[torch.Tensor], torch.Tensor], size: int) -> int:
    with torch.inference_mode():
        return int(embed(torch.zeros(1, 3, size, size)).shape[-1])


# ----------------------------------------------------------------------------------------------- image encoders


def _timm_encoder(spec: str, name: str, weights: str | None) -> ImageEncoder:
    timm = require("timm", f"the image encoder {spec!r}")
    # a misspelt name, before anything is said about weights or the hub (names with a source prefix, hf-hub:... or
    # local-dir:..., are timm's to resolve)
    if ":" not in name and not timm.is_model(name):
        import difflib

        near = difflib.get_close_matches(name.partition(".")[0], timm.list_models(), n=5, cutoff=0.75)
        raise ValueError(f"unknown timm model {name!r} in {spec!r}" + (f"; did you mean {near}?" if near else "") +
                         " (timm.list_models('*resnet*') lists the names)")
    if weights == "random":
        model, tag = _random_init(lambda: timm.create_model(name, pretrained=False)), f"random:seed{_RANDOM_SEED}"
    elif _is_path(weights):
        path = _checked_path(weights, spec)
        model = _timm_from_checkpoint(timm, name, path)
        tag = file_digest(path)
    else:
        full = f"{name}.{weights}" if weights else name
        if not hub_reachable():
            try:
                model = timm.create_model(full, pretrained=True)
            except Exception as e:  # any hub failure becomes one clear message
                raise _offline_error(spec, e, f"Pass a local checkpoint: timm:{name}@/path/to/weights.pth") from e
        else:
            model = timm.create_model(full, pretrained=True)
        tag = getattr(model, "pretrained_cfg", {}).get("tag") or weights or "default"
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    preprocess = timm.data.create_transform(**cfg, is_training=False)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)  # (B, num_features)

    fp = EncoderFingerprint("timm", name, tag, int(model.num_features), True, note=f"input {cfg['input_size']}")
    return ImageEncoder(embed, preprocess, fp, module=model)


def _torch_state(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``, its failures as one RetrofitError saying what the file is."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError, RecursionError):
        raise
    except pickle.UnpicklingError as e:
        if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e)):  # weights only: classes are refused
            raise RetrofitError(
                f"{path} holds Python objects besides tensors ({found.group(1)}), which retrofit does not unpickle "
                "(unpickling runs code): a pickled model (torch.save(model)) or a training checkpoint with extras "
                "(args, metrics). Save the weights alone: torch.save(model.state_dict(), path), or, for a file you "
                "trust, torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)") from None
        raise RetrofitError(f"{path} is not a PyTorch checkpoint (not a file torch.save wrote); save one with "
                            "torch.save(model.state_dict(), path)") from None
    except Exception as e:  # empty, truncated, damaged, text: torch's weights-only unpickler raises many kinds
        raise RetrofitError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else 'empty or truncated'}); copy it again or "
                            "save one with torch.save(model.state_dict(), path)") from None


def _state_dict(path: Path) -> dict[str, Any]:
    """The state dict in a checkpoint file (``{"state_dict": ...}`` unwrapped, DataParallel's ``module.`` dropped)."""
    if Path(path).suffix.lower() == ".safetensors":  # (timm loads these too)
        from safetensors.torch import load_file

        try:
            state: Any = dict(load_file(str(path)))
        except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
            raise
        except Exception as e:  # any failure of a damaged file: say what it is
            raise RetrofitError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:160]}); "
                                "copy it again or save one with safetensors.torch.save_file") from None
    else:
        state = _torch_state(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RetrofitError(f"{path} holds a {type(state).__name__}, not a state dict; save the model with "
                            "torch.save(model.state_dict(), path)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _timm_from_checkpoint(timm: Any, name: str, path: Path) -> nn.Module:
    """timm model ``name`` with the checkpoint in ``path``, built with the checkpoint's class count (a fine-tuned
    production classifier has its own classes, not the pretrained model's)."""
    model = timm.create_model(name, pretrained=False)
    head = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    state = _state_dict(path)
    heads = [head] if isinstance(head, str) else list(head or ())
    w = state.get(f"{heads[0]}.weight") if heads else None
    extra = {"num_classes": int(w.shape[0])} if w is not None and w.dim() == 2 else {}
    try:
        return timm.create_model(name, pretrained=False, checkpoint_path=str(path), **extra)
    except RuntimeError as e:
        raise RetrofitError(f"{path} is not a checkpoint of timm {name} ({str(e).splitlines()[0]} ...)") from e


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    last = None
    for qual, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (qual, mod)
    return last


def torchvision_from_checkpoint(name: str, path: Path) -> nn.Module:
    """torchvision model ``name`` with the state dict in ``path``; a classifier trained for other classes than
    ImageNet's 1000 (a fine-tuned production model) is rebuilt with the checkpoint's class count first."""
    tvm = require("torchvision", f"torchvision:{name}").models
    state = _state_dict(path)
    model = tvm.get_model(name, weights=None)
    last = _last_linear(model)
    w = state.get(f"{last[0]}.weight") if last else None
    if w is not None and w.dim() == 2 and w.shape[0] != last[1].out_features:
        model = tvm.get_model(name, weights=None, num_classes=int(w.shape[0]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RetrofitError(f"{path} is not a state dict of torchvision {name} ({str(e).splitlines()[0]} ...)") from e
    return model


def _drop_last_linear(model: nn.Module) -> int:
    """Replace the model's last ``nn.Linear`` (the classifier) by identity; returns its input width."""
    last = _last_linear(model)
    if last is None:
        raise RetrofitError(f"{type(model).__name__} has no nn.Linear classifier to remove")
    qual, lin = last
    parent = model.get_submodule(qual.rpartition(".")[0]) if "." in qual else model
    setattr(parent, qual.rpartition(".")[2], nn.Identity())
    return int(lin.in_features)


def _torchvision_encoder(spec: str, name: str, weights: str | None) -> ImageEncoder:
    tvm = require("torchvision", f"the image encoder {spec!r}").models
    from torchvision import transforms

    if name not in tvm.list_models():
        raise ValueError(f"unknown torchvision model {name!r} in {spec!r}; see torchvision.models.list_models()")
    if weights == "random":
        model, tag, tf = _random_init(lambda: tvm.get_model(name, weights=None)), f"random:seed{_RANDOM_SEED}", None
    elif _is_path(weights):
        path = _checked_path(weights, spec)
        model = torchvision_from_checkpoint(name, path)
        tag, tf = file_digest(path), None
    else:
        enum = tvm.get_model_weights(name)
        if weights and weights not in enum.__members__:
            raise ValueError(f"unknown torchvision weights {weights!r} in {spec!r}; allowed: "
                             f"{sorted(enum.__members__)}, 'random', or a local checkpoint path")
        w = enum.DEFAULT if not weights else enum[weights]
        try:
            model = tvm.get_model(name, weights=w)
        except Exception as e:
            raise RetrofitError(f"cannot download torchvision weights {w} for {spec!r} ({e}); pass a local "
                                f"checkpoint: torchvision:{name}@/path/to/state_dict.pth") from e
        tag, tf = str(w).rpartition(".")[2] if "." in str(w) else str(w), w.transforms()
    model.eval()
    dim = _drop_last_linear(model)
    if tf is None:
        tf = transforms.Compose([transforms.Resize(256, antialias=True), transforms.CenterCrop(224),
                                 transforms.ToTensor(),
                                 transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    fp = EncoderFingerprint("torchvision", name, tag, dim, True)
    return ImageEncoder(model, tf, fp, module=model)


@functools.lru_cache(maxsize=4)
def _open_clip_model(spec: str, arch: str, weights: str | None) -> tuple[nn.Module, Any, str]:
    """(model, image preprocess, weights tag); cached so that the image and text towers share one load."""
    oc = require("open_clip", f"the encoder {spec!r}")
    if arch not in oc.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} in {spec!r}; see open_clip.list_models()")
    if weights is None:  # as for timm / torchvision: untrained weights only when asked for by name
        tags = [t for a, t in oc.list_pretrained() if a == arch]
        raise ValueError(f"open_clip spec {spec!r} names no weights: give open_clip:{arch}@TAG (pretrained tags: "
                         f"{tags or 'none'}), open_clip:{arch}@/path/to/checkpoint, or open_clip:{arch}@random "
                         "(untrained, for tests)")
    if weights == "random":
        model, _, pre = _random_init(lambda: oc.create_model_and_transforms(arch, pretrained=None))
        tag = f"random:seed{_RANDOM_SEED}"
    elif _is_path(weights):
        path = _checked_path(weights, spec)
        model, _, pre = oc.create_model_and_transforms(arch, pretrained=str(path))
        tag = file_digest(path)
    else:
        tags = [t for a, t in oc.list_pretrained() if a == arch]
        if weights not in tags:
            raise ValueError(f"open_clip has no pretrained tag {weights!r} for {arch!r}; allowed: {tags} or a path")
        hub_reachable()
        try:
            model, _, pre = oc.create_model_and_transforms(arch, pretrained=weights)
        except Exception as e:
            hint = f"Pass a local checkpoint: open_clip:{arch}@/path/to/open_clip_model.bin"
            raise _offline_error(spec, e, hint) from e
        tag = weights
    model.eval()
    return model, pre, tag


def _open_clip_image(spec: str, arch: str, weights: str | None) -> ImageEncoder:
    model, pre, tag = _open_clip_model(spec, arch, weights)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    dim = _probe_dim(model.encode_image, size)
    return ImageEncoder(model.encode_image, pre, EncoderFingerprint("open_clip", arch, tag, dim, True, note="image"),
                        module=model)


def _darknet_encoder(spec: str, size: str | None) -> ImageEncoder:
    from retrofit.models import darknet as dk

    try:
        s = int(size) if size else 64
    except ValueError:
        raise ValueError(f"darknet-tiny takes an input size, e.g. darknet-tiny@64, got {spec!r}") from None
    if s < 32:  # five 2x poolings: smaller inputs leave nothing to pool (and 0 fell back to 64 px unnoticed)
        raise ValueError(f"darknet-tiny input size must be at least 32 px, got {s} in {spec!r}")
    model = dk.darknet_tiny(pretrained=True).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)  # (B, 512)

    base = model.fingerprint
    name = base.name if base else "darknet-tiny"
    if s != model.default_input_size:  # vectors of another input size are another space: part of the name
        name = f"{name}@{s}"
    fp = EncoderFingerprint("darknet-tiny", name, base.weights if base else "unknown", int(model.num_features), True,
                            note=f"input {s}px")
    return ImageEncoder(embed, model.preprocess(s), fp, module=model, pixels=model.pixels(s))


# ----------------------------------------------------------------------------------------------- text encoders


@contextlib.contextmanager
def _quiet_weight_loading() -> Iterator[None]:
    """Inside: no "Loading weights" bar from transformers (a model that loads in milliseconds draws one even under
    --quiet). The caller's setting is restored afterwards: a library must not change it for the whole process."""
    try:
        from transformers.utils import logging as hf_logging

        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):  # another transformers version: the bar is only noise
        yield
        return
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _sentence_transformers(spec: str, name_or_path: str) -> TextEncoder:
    st = require("sentence_transformers", f"the text encoder {spec!r}")
    p = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) and not p.is_dir():  # a local path, not a hub name ("org/model")
        raise FileNotFoundError(f"model directory {str(p)!r} named in text encoder spec {spec!r} "
                                f"{'is not a directory' if p.exists() else 'does not exist'}")
    if p.is_dir():
        weights = next((p / f for f in ("model.safetensors", "pytorch_model.bin") if (p / f).exists()), None)
        tag = file_digest(weights) if weights else "local"
        name = _st_name(p)
        with _quiet_weight_loading():
            model = st.SentenceTransformer(str(p), device="cpu", local_files_only=True)
    else:
        online = hub_reachable()
        try:
            with _quiet_weight_loading():
                model = st.SentenceTransformer(name_or_path, device="cpu", local_files_only=not online)
        except Exception as e:
            if online:
                raise
            raise _offline_error(spec, e, "Pass a local model directory (sentence-transformers:/path/to/model) or "
                                          "use 'minilm' (the offline all-MiniLM-L6-v2).") from e
        name, tag = name_or_path.rpartition("/")[2], "hub"
    model.eval()
    dim = int(getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)())

    def embed(texts: list[str]) -> torch.Tensor:
        return model.encode(texts, batch_size=256, convert_to_tensor=True, normalize_embeddings=False,
                            show_progress_bar=False)

    return TextEncoder(embed, EncoderFingerprint("sentence-transformers", name, tag, dim, True), module=model)


def _st_name(path: Path) -> str:
    """The model's name from its README/config when known, else the directory name."""
    readme = path / "README.md"
    if readme.exists():
        for line in readme.read_text(errors="ignore").splitlines():
            if line.startswith("# "):
                return line[2:].strip().rpartition("/")[2]
    return path.name


def _open_clip_text(spec: str, arch: str, weights: str | None) -> TextEncoder:
    oc = require("open_clip", f"the text encoder {spec!r}")
    model, _, tag = _open_clip_model(spec, arch, weights)
    tokenizer = oc.get_tokenizer(arch)

    def embed(texts: list[str]) -> torch.Tensor:
        dev = next(model.parameters()).device
        return model.encode_text(tokenizer(texts).to(dev))

    dim = int(embed(["a"]).shape[-1])
    return TextEncoder(embed, EncoderFingerprint("open_clip", arch, tag, dim, True, note="text"), module=model)
