"""From model specs and data sources to the ``FeatureSet`` that training, evaluation and prediction use.

- ``load_host_model(spec)``: the host classifier named by ``timm:NAME[@CKPT]``, ``torchvision:NAME[@CKPT]``,
  ``darknet-tiny[@SIZE]`` or ``module:function`` (a function returning the model), with its preprocessing,
  its one-pass ``(z, host_logits)`` adapter (``retrofit.adapters.backbone``) and its encoder fingerprint.
- ``source_features(host, source, labels, kb=...)``: backbone features of every sample of a
  ``retrofit.sources`` source, cached on disk, with neighbour ids from the KB; each sample's own KB
  entries (same image bytes, by the sha1 the KB builder records in ``source``) are excluded.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.feature_cache import FeatureCache, FeatureSet, retrieve
from retrofit.fingerprint import EncoderFingerprint, file_digest

__all__ = ["HostModel", "load_host_model", "kb_image_hashes", "source_features", "image_batches"]

log = logging.getLogger(__name__)

_FAMILIES = "timm:NAME[@CHECKPOINT], torchvision:NAME[@CHECKPOINT], darknet-tiny[@SIZE], or MODULE:FUNCTION"


@dataclass
class HostModel:
    """A frozen host classifier ready to featurize images."""

    spec: str  # what the user gave
    model: nn.Module  # the classifier (eval mode)
    adapter: Any  # retrofit.adapters BackboneAdapter: x -> (z, host logits)
    preprocess: Callable[[Any], torch.Tensor]  # picklable PIL -> (3, H, W)
    fingerprint: EncoderFingerprint  # identity of z's encoder (compared with the KB's key fingerprint)
    num_classes: int | None  # classes of the host's own classifier
    class_names: list[str] | None  # names of those classes, when known

    @torch.no_grad()
    def featurize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = next(self.model.parameters())
        return self.adapter(images.to(p.device, p.dtype))


def _default_preprocess(size: int = 224) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(int(size * 256 / 224), antialias=True), transforms.CenterCrop(size),
                               transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def _checkpoint(weights: str, spec: str) -> Path:
    p = Path(weights).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {weights!r} of model {spec!r} does not exist; give the path of a local "
                                "checkpoint file (nothing can be downloaded offline)")
    return p


def _import_hint(family: str, arch: str, e: BaseException) -> str:
    """What to do when ``MODULE:FUNCTION`` did not import: the literal word typed, a file given for a module, or a
    module not on the path."""
    if family == "module":
        return "; MODULE:FUNCTION means your module's name, e.g. mymodel:make for make() in mymodel.py"
    if family.endswith(".py") or "/" in family or family.startswith("."):
        file = Path(family if family.endswith(".py") else family + ".py")
        if file.is_absolute():
            return (f"; MODULE is a module name, not a file: PYTHONPATH={file.parent} retrofit ... --model "
                    f"{file.stem}:{arch}")
        parts = [q for q in file.with_suffix("").parts if q not in (".", "..")]
        return f"; MODULE is a module name, not a file: {'.'.join(parts)}:{arch} (with PYTHONPATH=.)"
    if isinstance(e, ModuleNotFoundError) and e.name == family.split(".")[0]:
        file = family.replace(".", "/") + ".py"
        if Path(file).is_file():
            return f"; {file} in the current directory is found with PYTHONPATH=. (e.g. `PYTHONPATH=. retrofit ...`)"
        return f"; put the module {family!r} on the Python path (PYTHONPATH, or pip install its package)"
    return ""


def load_host_model(spec: str, device: str | torch.device = "cpu") -> HostModel:
    """Load the host classifier named by ``spec`` (see the module docstring)."""
    from retrofit.adapters import backbone
    from retrofit.encoders import load_image_encoder

    name, _, weights = spec.partition("@")
    family, _, arch = name.partition(":")
    if name == "darknet-tiny" or family in ("timm",):
        enc = load_image_encoder(spec)  # the timm / darknet module keeps its classifier
        model, pre, fp = enc.module, enc.preprocess, enc.fingerprint
    elif family == "torchvision":
        from torchvision import models as tvm

        if arch not in tvm.list_models():
            raise ValueError(f"unknown torchvision model {arch!r} in {spec!r}; see torchvision.models.list_models()")
        if weights and weights != "random":
            from retrofit.encoder_families import torchvision_from_checkpoint

            path = _checkpoint(weights, spec)
            model = torchvision_from_checkpoint(arch, Path(path))
            tag = file_digest(path)
        elif weights == "random":  # seeded as the image encoder of the same spec: the same network in every process
            from retrofit.encoder_families import _RANDOM_SEED, _random_init

            model, tag = _random_init(lambda: tvm.get_model(arch, weights=None)), f"random:seed{_RANDOM_SEED}"
        else:
            raise RetrofitError(f"{spec!r}: give the classifier's weights as a local file, torchvision:{arch}@PATH "
                                "(pretrained downloads are not available offline)")
        pre, fp = _default_preprocess(), None
        model.eval()
        dim = backbone(model).embed_dim or 0
        fp = EncoderFingerprint("torchvision", arch, tag, int(dim) if dim else 1, True)
    elif family and arch:
        try:
            fn = getattr(importlib.import_module(family), arch)
        except (ImportError, AttributeError, TypeError) as e:  # (TypeError: a relative name, ./mymodel.py)
            hint = _import_hint(family, arch, e)
            raise ValueError(f"model {spec!r}: cannot import {arch!r} from module {family!r} ({e}){hint}; allowed: "
                             f"{_FAMILIES}") from e
        out = fn()
        model, pre = (out if isinstance(out, tuple) else (out, None))
        if not isinstance(model, nn.Module):
            raise TypeError(f"{spec!r} returned {type(model).__name__}, expected an nn.Module "
                            "(or a (module, preprocess) pair)")
        if pre is None:
            pre = getattr(model, "preprocess", None)
            pre = pre() if inspect.ismethod(pre) else pre  # e.g. DarknetTiny.preprocess() builds the transform
        pre = pre or _default_preprocess()
        fp = getattr(model, "fingerprint", None) or EncoderFingerprint("module", spec, "unknown", 1, True)
    else:
        raise ValueError(f"unknown model {spec!r}; allowed: {_FAMILIES}")
    model = model.to(device).eval()
    adapter = backbone(model)
    if adapter.embed_dim and fp.dim != adapter.embed_dim:
        fp = EncoderFingerprint(fp.family, fp.name, fp.weights, int(adapter.embed_dim), fp.normalized, fp.note)
    names = getattr(model, "class_names", None)
    return HostModel(spec, model, adapter, pre, fp, adapter.num_classes, list(names) if names else None)


def kb_image_hashes(kb: Any) -> dict[str, list[int]]:
    """sha1 prefix of the image bytes -> ids of the KB records built from that image (from ``source``)."""
    out: dict[str, list[int]] = {}
    for rec in kb:
        src = rec.get("source") or ""
        if "|sha1:" in src:
            out.setdefault(src.rpartition("|sha1:")[2], []).append(int(rec["id"]))
    return out


def image_batches(source: Any, preprocess: Callable, batch_size: int = 256, workers: int = 0) -> Any:
    """Decoded batches of a source in order: dicts with ``index``, ``ok``, ``images``, ``hash``, ``error``."""
    from retrofit.workers import decode_loader

    return decode_loader(source.refs, preprocess, batch_size=batch_size, num_workers=workers)


def _data_digest(source: Any) -> str:
    h = hashlib.sha256()
    for r in source.refs:
        h.update(f"{r.key}|{r.image}|{r.label}\n".encode())
    # sorted: a set's order follows Python's per-process string hashing; the cache key must not (it did)
    for f in sorted({r.image[0] if isinstance(r.image, tuple) else r.image for r in source.refs if r.image}):
        try:
            st = Path(f).stat()
            h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
        except OSError:
            pass
    return h.hexdigest()[:20]


def source_features(host: HostModel, source: Any, labels: list[int], *, kb: Any = None, k: int = 32,
                    cache_dir: str | Path | None = None, name: str = "train", exclude_self: bool = True,
                    batch_size: int = 256, workers: int = 0, progress: bool = True, live: bool = False) -> FeatureSet:
    """Features of every decodable sample of ``source`` (undecodable ones are skipped with a warning), with
    ``k`` neighbour ids from ``kb`` when given. ``cache_dir=None`` computes everything in memory. ``live=True``
    sets only the self-exclusion ids (no neighbour ids): training then searches the KB at every step."""
    if len(labels) != len(source):
        raise ValueError(f"{len(labels)} labels for {len(source)} samples")
    if hasattr(labels, "tolist"):  # a tensor / array of labels: Python numbers
        labels = labels.tolist()
    checked = []
    for i, y in enumerate(labels):  # before the backbone pass over every image, not after it
        whole = isinstance(y, numbers.Integral) or (isinstance(y, float) and y.is_integer())
        if isinstance(y, bool) or not whole or y < -1:
            raise ValueError(f"labels[{i}] is {y!r}; labels must be class indices >= 0 (-1 = unknown): a manifest's "
                             "class names become indices with retrofit.sources.map_labels(source, class_names)")
        checked.append(int(y))
    labels = checked
    calls = {"n": 0}

    def compute() -> FeatureSet:
        zs, hs, ys, hashes, rows, skipped = [], [], [], [], [], []
        from tqdm.auto import tqdm

        loader = image_batches(source, host.preprocess, batch_size, workers)
        for b in tqdm(loader, desc=f"features ({name})", disable=not progress, leave=False):
            for i, err in zip(b["index"], b["error"]):
                if err:
                    log.warning("skipping %s: %s", source.refs[i].key, err)
                    skipped.append(source.refs[i].key)
            if not b["ok"]:
                continue
            calls["n"] += 1
            z, h = host.featurize(b["images"])
            zs.append(z.float().cpu())
            if h is not None:
                hs.append(h.float().cpu())
            idx = [b["index"][j] for j in b["ok"]]
            rows += idx
            ys += [labels[i] for i in idx]
            hashes += [(b["hash"][j] or "")[:16] for j in b["ok"]]
        if not zs:
            raise RetrofitError(f"no decodable image in {source.location}")
        return FeatureSet(z=torch.cat(zs), labels=torch.tensor(ys, dtype=torch.int64),
                          host_logits=torch.cat(hs) if hs else None,
                          meta={"rows": rows, "image_hash": hashes, "source": source.describe(), "skipped": skipped})

    def exclusions(fs: FeatureSet) -> FeatureSet:
        if exclude_self:
            table = kb_image_hashes(kb)
            own = [table.get(hx, []) if hx else [] for hx in fs.meta.get("image_hash", [])]
            m = max((len(o) for o in own), default=0)
            if m:
                ex = torch.full((len(fs), m), -1, dtype=torch.int64)
                for r, o in enumerate(own):
                    ex[r, :len(o)] = torch.tensor(o, dtype=torch.int64)
                fs.exclude = ex
                log.info("%s: %d samples have their own image in the KB (excluded from their neighbours)", name,
                         sum(1 for o in own if o))
        return fs

    def neighbours(fs: FeatureSet) -> FeatureSet:
        return retrieve(exclusions(fs), kb, k, progress=progress)

    fparts = {"model": host.fingerprint, "spec": host.spec, "preprocess": repr(host.preprocess),
              "data": _data_digest(source), "n": len(source), "labels": hashlib.sha1(str(labels).encode()).hexdigest()}
    nparts = None
    if kb is not None:
        where = getattr(kb, "path", None)  # copies of a KB (cp -r, kb copy) share its uuid, then diverge
        nparts = {"kb": kb.fingerprint, "uuid": getattr(kb, "info", lambda: {})().get("uuid"), "len": len(kb),
                  "generation": kb.generation, "k": k, "exclude_self": exclude_self,
                  "path": str(Path(where).resolve()) if where is not None else None}
    if live:
        fs = compute() if cache_dir is None else FeatureCache(cache_dir).get_or_compute(name, fparts, compute)
        fs = exclusions(fs) if kb is not None else fs
    elif cache_dir is None:
        fs = compute()
        fs = neighbours(fs) if kb is not None else fs
    else:
        cache = FeatureCache(cache_dir)
        fs = cache.get_or_compute(name, fparts, compute, nparts, neighbours if kb is not None else None)
        log.info("feature cache %s: %d hits, %d misses", cache_dir, cache.hits, cache.misses)
    fs.meta["encoder_batches"] = calls["n"]
    if calls["n"] == 0 and (gone := fs.meta.get("skipped")):  # from the cache: its skips were warned when computed
        log.warning("%s: %d undecodable sample(s) of %s are left out (e.g. %s; found when these cached features "
                    "were computed)", name, len(gone), source.location, ", ".join(map(str, gone[:3])))
    return fs
