"""Data, knowledge bases and cached features of the CIFAR-10-LT demo (:mod:`retrofit.demo`).

Everything expensive is computed once and kept under ``<cache_dir>/<key>/`` (the key hashes the protocol and
encoder settings):

- ``kb_in/``: KB_in, the long-tail training images with their class name in a prompt as text, built with
  :func:`retrofit.ingest.build_kb` (keys and image vectors from the host backbone, text from MiniLM);
- ``kb_pool/`` and ``kb_ext/``: the other training images (minus validation) with their web-like captions,
  and KB_ext = KB_in + pool (:func:`retrofit.ingest.merge_kbs`);
- ``kb_pool_captions/`` and ``kb_ext_captions/`` (``ext_labels="captions"`` only): the pool with each record's
  label read from its caption by :class:`retrofit.caption_labels.CaptionLabeller` (MiniLM, WordNet synonyms and
  glosses; -1 when no class is recognisable) instead of the dataset's label, and KB_in + that pool;
- ``kb_in_noisy/``: KB_in with 40% symmetric label noise; its text follows the noisy labels;
- ``features.safetensors``: validation / test embeddings; ``host-wd<WD>-f2-p2.safetensors``: host classifier
  logits (clean and noisy labels) on them and cross-fitted host logits of the training images.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrofit.cifar10_lt import LongTailSplit, long_tail_split, prompt, shard_paths

__all__ = ["DemoData", "prepare"]

log = logging.getLogger(__name__)

_DONE = "done.json"  # marker written after a cached artefact is complete
_EXT_FOLDER = {"dataset": "kb_ext", "captions": "kb_ext_captions"}  # KB_ext by where its pool's labels come from


@dataclass
class DemoData:
    """The protocol, the opened knowledge bases and the cached tensors; features are built on demand."""

    split: LongTailSplit  # long-tail / validation / pool indices into the training images
    class_names: list[str]  # CIFAR-10 class names
    train_labels: np.ndarray  # (50000,) clean labels of every training image
    test_labels: np.ndarray  # (10000,)
    noisy_lt_labels: np.ndarray  # (N_lt,) long-tail labels with symmetric noise (row 8)
    tensors: dict[str, torch.Tensor]  # cached z / host logits (see module docstring)
    root: Path  # cache directory of this setting
    k: int  # neighbours per query
    ext_labels: str = "dataset"  # labels of KB_ext's pool records: "dataset" (CIFAR's) or "captions" (read from them)
    seconds: dict[str, float] = field(default_factory=dict)  # time spent per preparation step
    _kbs: dict[str, Any] = field(default_factory=dict)
    _feats: dict[tuple, Any] = field(default_factory=dict)
    _digests: dict[str, str] = field(default_factory=dict)

    num_classes = property(lambda self: len(self.class_names))

    @property
    def noisy_counts(self) -> list[int]:
        return np.bincount(self.noisy_lt_labels, minlength=self.num_classes).tolist()

    def kb(self, name: str) -> Any:
        """The opened (read-only) knowledge base ``in``, ``ext`` or ``in_noisy`` (``ext``: the one whose pool
        labels are ``ext_labels``)."""
        if name not in self._kbs:
            from retrofit.knowledge_base import KnowledgeBase

            folder = _EXT_FOLDER[self.ext_labels] if name == "ext" else f"kb_{name}"
            self._kbs[name] = KnowledgeBase.open(self.root / folder)
        return self._kbs[name]

    def kb_digest(self, name: str) -> str:
        """sha1 of the labels of knowledge base ``name`` (what the label vote and the training targets read)."""
        if name not in self._digests:
            import hashlib

            self._digests[name] = hashlib.sha1(self.kb(name).labels().numpy().tobytes()).hexdigest()[:16]
        return self._digests[name]

    def portable(self) -> DemoData:
        """A copy for another process (pickled): the tensors and the features retrieved so far, without the opened
        knowledge bases (the copy opens its own, read-only, when asked)."""
        return replace(self, _kbs={}, _feats=dict(self._feats), _digests=dict(self._digests))

    def close(self) -> None:
        for kb in self._kbs.values():
            kb.close()
        self._kbs.clear()

    def labels(self, split: str) -> torch.Tensor:
        """Clean labels of ``lt``, ``val`` or ``test``."""
        if split == "test":
            return torch.from_numpy(self.test_labels)
        return torch.from_numpy(self.train_labels[getattr(self.split, split)])

    def log_prior(self, noisy: bool = False) -> torch.Tensor:
        c = torch.tensor(self.noisy_counts if noisy else self.split.counts, dtype=torch.float32).clamp_min(1)
        return (c / c.sum()).log()  # (C,)

    def host_logits(self, split: str, noisy: bool = False) -> torch.Tensor:
        """Host classifier logits on ``val`` / ``test``, or cross-fitted ones on ``lt`` (never fitted on the row)."""
        return self.tensors[f"host{'_noisy' if noisy else ''}_{split}"]

    def train_features(self, kb: str, noisy: bool = False) -> Any:
        """FeatureSet of the long-tail images (cross-fitted host logits, own KB entry excluded) + neighbours."""
        from retrofit.feature_cache import FeatureSet

        key = ("lt", kb, noisy)
        if key not in self._feats:
            y = torch.from_numpy(self.noisy_lt_labels) if noisy else self.labels("lt")
            n = len(y)
            fs = FeatureSet(z=self.tensors["z_lt"], labels=y, host_logits=self.host_logits("lt", noisy),
                            exclude=torch.arange(n)[:, None])  # KB ids 0..n-1 are these images in every KB
            self._feats[key] = self._retrieve(fs, kb, "lt")
        return self._feats[key]

    def eval_features(self, split: str, kb: str, noisy: bool = False) -> Any:
        """FeatureSet of ``val`` / ``test`` (clean labels, host logits) with neighbours from ``kb``."""
        from retrofit.feature_cache import FeatureSet

        key = (split, kb, noisy)
        if key not in self._feats:
            fs = FeatureSet(z=self.tensors[f"z_{split}"], labels=self.labels(split),
                            host_logits=self.host_logits(split, noisy))
            self._feats[key] = self._retrieve(fs, kb, split)
        return self._feats[key]

    def _retrieve(self, fs: Any, kb: str, split: str) -> Any:
        from retrofit.feature_cache import retrieve

        if kb == "in_noisy" and _same_index(self.kb("in"), self.kb(kb)):
            # KB_in relabelled (_noisy_kb): the same keys under the same ids and index, so the same neighbours as
            # KB_in's (searched once); only the labels they carry differ
            twin = self.train_features("in") if split == "lt" else self.eval_features(split, "in")
            ids, labels = twin.neighbor_ids, self.kb(kb).labels()
            return fs.with_neighbors(ids, twin.neighbor_scores, torch.where(ids >= 0, labels[ids.clamp_min(0)], -1))
        return retrieve(fs, self.kb(kb), self.k)

    def describe(self) -> dict[str, Any]:
        s = self.split
        return {"lt": len(s.lt), "val": len(s.val), "pool": len(s.pool), "kb_in": len(s.lt),
                "kb_ext": len(s.lt) + len(s.pool), "counts": s.counts, "noisy_counts": self.noisy_counts,
                "groups": {"many": [int(c) for c in np.flatnonzero(s.groups == 0)],
                           "medium": [int(c) for c in np.flatnonzero(s.groups == 1)],
                           "few": [int(c) for c in np.flatnonzero(s.groups == 2)]},
                "cache": str(self.root), "prepare_seconds": self.seconds, "ext_labels": self.ext_labels,
                **({"pool_caption_labels": _info(self.root / "kb_pool_captions")}
                   if self.ext_labels == "captions" else {})}


def _same_index(a: Any, b: Any) -> bool:
    """Whether the knowledge bases ``a`` and ``b`` search alike: as many records, ids 0..n-1 (none deleted), the
    same key encoder and index settings (the keys themselves are the same by construction in :func:`_noisy_kb`)."""
    ia, ib = a.info(), b.info()
    return (len(a) == len(b) == ia["next_id"] == ib["next_id"] and a.fingerprint.key == b.fingerprint.key
            and all(ia["index"][f] == ib["index"][f] for f in ("kind", "storage", "config", "ef_search")))


# ------------------------------------------------------------------------------------------------ building


def _done(path: Path) -> bool:
    return (path / _DONE).is_file()


def _mark(path: Path, info: dict[str, Any]) -> None:
    (path / _DONE).write_text(json.dumps(info, default=str))


def _info(path: Path) -> dict[str, Any]:
    """What :func:`_mark` recorded for a finished artefact ({} when unfinished)."""
    return json.loads((path / _DONE).read_text()) if _done(path) else {}


def _load_or_empty(path: Path) -> dict[str, torch.Tensor]:
    """A cache file's tensors; {} (recomputed) when it is missing or damaged (a run killed while writing it, before
    writes were atomic: every later run failed on it)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as e:
        log.warning("%s is unreadable (%s): recomputing it", path, e)
        return {}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a temporary name and rename: a kill mid-write leaves the old file (or none), never a cut one."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _labeller_digest(data_root: Path, text_encoder: str) -> str:
    """The pool's caption labels depend on the labeller's code, the class texts and the text encoder."""
    import hashlib

    from retrofit import caption_labels

    h = hashlib.sha1(Path(caption_labels.__file__).read_bytes())
    h.update((data_root / "cifar10" / "classes.json").read_bytes())
    h.update(text_encoder.encode())
    return h.hexdigest()[:16]


class _Encoders:
    """Loads the image / text encoders only when a cache miss needs them."""

    def __init__(self, image: str, text: str) -> None:
        self.specs = (image, text)
        self._img = self._txt = None

    @property
    def image(self) -> Any:
        if self._img is None:
            from retrofit.encoders import load_image_encoder

            self._img = load_image_encoder(self.specs[0])
        return self._img

    @property
    def text(self) -> Any:
        if self._txt is None:
            from retrofit.encoders import load_text_encoder

            self._txt = load_text_encoder(self.specs[1])
        return self._txt


def _build(src: Any, path: Path, enc: _Encoders, names: list[str], progress: bool, index: str = "auto") -> None:
    from retrofit.ingest import build_kb

    if _done(path):
        return
    t = time.perf_counter()
    summary = build_kb(src, path, image_encoder=enc.image, text_encoder=enc.text, class_names=names, dedup=False,
                       progress=progress, num_workers=1, index=index)
    if summary.written != len(src):
        raise RuntimeError(f"{path}: {summary.written} of {len(src)} samples written (see {summary.report})")
    _mark(path, {"records": summary.written, "seconds": time.perf_counter() - t})


def _encode(refs: list[Any], enc: Any, batch: int = 256, progress: bool = True) -> torch.Tensor:
    """Image embeddings (N, D) of webdataset refs, in order."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = []
    files: dict[str, Any] = {}
    try:
        for s in tqdm(range(0, len(refs), batch), desc="encoding", disable=not progress, leave=False):
            ims = []
            for r in refs[s:s + batch]:
                path, off, size = r.image
                f = files.get(path) or files.setdefault(path, open(path, "rb"))
                f.seek(off)
                with Image.open(io.BytesIO(f.read(size))) as im:
                    ims.append(enc.preprocess(im.convert("RGB")))
            with torch.inference_mode():
                out.append(enc.encode(torch.stack(ims)).float())
    finally:
        for f in files.values():
            f.close()
    return torch.cat(out)


def data_key(cfg: Any, n_train: int, n_test: int) -> str:
    """The cache entry of the data setting of ``cfg`` (split, encoders, prompt, label noise) over ``n_train`` /
    ``n_test`` images. Numbers as floats: ``imbalance_factor=10`` and ``10.0`` are one setting, one entry."""
    from retrofit.feature_cache import cache_key

    return cache_key({"if": float(cfg.imbalance_factor), "val": cfg.val_per_class, "seed": cfg.split_seed,
                      "image": cfg.image_encoder, "text": cfg.text_encoder, "template": cfg.template,
                      "noise": [float(cfg.noise_rate), cfg.noise_seed], "n": [n_train, n_test], "v": 1})


def prepare(cfg: Any) -> DemoData:
    """Split, knowledge bases and cached tensors for ``cfg`` (a :class:`retrofit.demo.DemoConfig`)."""
    from retrofit._env import data_dir
    from retrofit.ingest import merge_kbs
    from retrofit.linear_probe import cross_fit_logits, fit_linear_probe
    from retrofit.noise import symmetric_noise
    from retrofit.sources import Source, webdataset_source

    times: dict[str, float] = {}
    t = time.perf_counter()
    root_data = Path(cfg.data_dir) if cfg.data_dir else data_dir(required=True)
    train_src = webdataset_source([str(p) for p in shard_paths(root_data, "train")])
    test_src = webdataset_source([str(p) for p in shard_paths(root_data, "test")])
    names = list(train_src.class_names)
    for src in (train_src, test_src):
        idx = [int(r.key.rpartition("_")[2]) for r in src.refs]
        if idx != list(range(len(idx))):
            raise ValueError(f"{src.location}: samples are not in the original order 0..{len(idx) - 1}")
    y_train = np.array([int(r.label) for r in train_src.refs], dtype=np.int64)
    y_test = np.array([int(r.label) for r in test_src.refs], dtype=np.int64)
    split = long_tail_split(y_train, cfg.imbalance_factor, cfg.val_per_class, cfg.split_seed, len(names))
    noisy, _ = symmetric_noise(torch.from_numpy(y_train[split.lt]), cfg.noise_rate, len(names), seed=cfg.noise_seed)
    noisy = noisy.numpy()
    key = data_key(cfg, len(y_train), len(y_test))
    root = Path(cfg.cache_dir) / key
    root.mkdir(parents=True, exist_ok=True)
    times["read"] = time.perf_counter() - t
    enc = _Encoders(cfg.image_encoder, cfg.text_encoder)

    # ---- knowledge bases (library builder; KB_ext = KB_in + pool by merge)
    t = time.perf_counter()
    lt_refs = [replace(train_src.refs[i], caption=prompt(names[y_train[i]], cfg.template)) for i in split.lt]
    _build(Source("webdataset", train_src.location + "#lt", lt_refs, names, {"subset": "lt", "key": key}),
           root / "kb_in", enc, names, cfg.progress)
    if {"5", "6"} & set(cfg.rows):
        pool_refs = [train_src.refs[i] for i in split.pool]
        _build(Source("webdataset", train_src.location + "#pool", pool_refs, names, {"subset": "pool", "key": key}),
               root / "kb_pool", enc, names, cfg.progress, index="flat")  # never searched: only merged into KB_ext
        pool = root / "kb_pool"
        if cfg.ext_labels == "captions":
            pool = root / "kb_pool_captions"
            digest = _labeller_digest(root_data, cfg.text_encoder)
            if _info(pool).get("labeller") != digest:  # missing, unfinished, or labelled by other code / texts
                _caption_labelled(root / "kb_pool", pool, root_data, enc, names, digest)
                if (root / _EXT_FOLDER["captions"] / _DONE).exists():
                    (root / _EXT_FOLDER["captions"] / _DONE).unlink()  # merged from the old pool: redo
        ext = root / _EXT_FOLDER[cfg.ext_labels]
        if not _done(ext):
            if ext.exists():
                import shutil

                shutil.rmtree(ext)  # merged but not marked done: redo
            merge_kbs([root / "kb_in", pool], ext, dedup=False, progress=cfg.progress, whiten=cfg.whiten_ext)
            _mark(ext, {"records": len(split.lt) + len(split.pool)})
    set_whitening(root / "kb_in", cfg.whiten_in)
    if {"5", "6"} & set(cfg.rows):
        set_whitening(root / _EXT_FOLDER[cfg.ext_labels], cfg.whiten_ext)
    times["kbs"] = time.perf_counter() - t

    # ---- embeddings and host logits
    t = time.perf_counter()
    feat_path = root / "features.safetensors"
    tensors = _load_or_empty(feat_path)
    from retrofit.knowledge_base import KnowledgeBase

    with KnowledgeBase.open(root / "kb_in") as kb_in:
        if len(kb_in) != len(split.lt) or not np.array_equal(kb_in.labels().numpy(), y_train[split.lt]):
            raise RuntimeError(f"{root / 'kb_in'} does not match the long-tail split; delete {root} and re-run")
        tensors["z_lt"] = kb_in.vectors(torch.arange(len(split.lt)), "image")  # (N_lt, D) as stored
        if not _done(root / "kb_in_noisy"):
            _noisy_kb(kb_in, root / "kb_in_noisy", noisy, y_train[split.lt])
    set_whitening(root / "kb_in_noisy", cfg.whiten_in)
    for part, refs in (("val", [train_src.refs[i] for i in split.val]), ("test", test_src.refs)):
        if f"z_{part}" not in tensors:
            z = _encode(refs, enc.image, progress=cfg.progress)
            tensors[f"z_{part}"] = z.half().float()  # rounded as the KB stores vectors (float16)
            _save_atomic({k: tensors[k].contiguous() for k in ("z_val", "z_test") if k in tensors}, feat_path)
    times["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    # host logits depend on the probe's wd and, for the training images, on the folds of cross_fit_logits
    # ("-f2": classes spread over the folds from where the previous class stopped; the earlier files started at 0;
    # "-p2": probes fitted to convergence in standardised coordinates, the earlier ones stopped at 100 iterations)
    host_path = root / f"host-wd{cfg.host_weight_decay:g}-f2-p2.safetensors"
    host = _load_or_empty(host_path)
    for tag, y in (("", y_train[split.lt]), ("_noisy", noisy)):
        if f"host{tag}_lt" in host:
            continue
        yl = torch.from_numpy(y)
        probe = fit_linear_probe(tensors["z_lt"], yl, len(names), weight_decay=cfg.host_weight_decay)
        with torch.no_grad():
            for part in ("val", "test"):
                host[f"host{tag}_{part}"] = probe(tensors[f"z_{part}"]).float()
        host[f"host{tag}_lt"] = cross_fit_logits(tensors["z_lt"], yl, len(names), folds=5,
                                                 weight_decay=cfg.host_weight_decay)
        _save_atomic({k: v.contiguous() for k, v in host.items()}, host_path)
    tensors.update(host)
    times["host"] = time.perf_counter() - t
    log.info("prepared in %s", {k: round(v, 1) for k, v in times.items()})
    return DemoData(split=split, class_names=names, train_labels=y_train, test_labels=y_test, noisy_lt_labels=noisy,
                    tensors=tensors, root=root, k=cfg.k, ext_labels=cfg.ext_labels, seconds=times)


def set_whitening(path: Path, shrinkage: float) -> None:
    """Give the (built, cached) knowledge base at ``path`` the key whitening ``shrinkage`` (0 = none) if its index
    has another: ``compact`` rebuilds the index from the records (they do not change), fitted on its own keys."""
    from retrofit.knowledge_base import KnowledgeBase

    with KnowledgeBase.open(path) as kb:  # read-only: another run may read it meanwhile (one writer at a time)
        if kb.info()["index"]["config"]["whiten"] == shrinkage:
            return
    with KnowledgeBase.open(path, readonly=False) as kb:
        if kb.info()["index"]["config"]["whiten"] != shrinkage:  # (another writer may have set it since)
            log.info("%s: index rebuilt with key whitening %g", path, shrinkage)
            kb.compact(whiten=shrinkage)


def _noisy_kb(kb_in: Any, path: Path, noisy: np.ndarray, clean: np.ndarray) -> None:
    """KB_in with noisy labels: the same images; each text is the prompt of the (noisy) label."""
    ids = torch.arange(len(noisy))
    text = kb_in.vectors(ids, "text")  # (N, Dt): one prompt vector per clean class
    first = {int(c): int(np.flatnonzero(clean == c)[0]) for c in np.unique(clean)}  # class -> a record of it
    caption = {c: r["caption"] for c, r in zip(first, kb_in.get(torch.tensor(list(first.values()))))}
    _relabelled_copy(kb_in, path, torch.from_numpy(noisy), text=torch.stack([text[first[int(c)]] for c in noisy]),
                     captions=[caption[int(c)] for c in noisy], sources=[f"kb_in:{i}" for i in range(len(noisy))])
    _mark(path, {"records": len(noisy)})


def _caption_labelled(src_path: Path, path: Path, data_root: Path, enc: Any, names: list[str], digest: str) -> None:
    """A copy of the pool KB whose labels are read from its captions (from their stored MiniLM vectors)."""
    from retrofit.caption_labels import CaptionLabeller
    from retrofit.cifar10_lt import load_wordnet
    from retrofit.knowledge_base import KnowledgeBase

    lemmas, glosses = load_wordnet(data_root)
    with KnowledgeBase.open(src_path) as pool:
        if not enc.text.fingerprint.matches(pool.fingerprint.text):
            raise RuntimeError(f"{src_path}: its texts were not encoded by {enc.specs[1]}; delete it and re-run")
        labeller = CaptionLabeller(enc.text, names, synonyms=lemmas, descriptions=glosses)
        labels = labeller.label_vectors(pool.vectors(torch.arange(len(pool)), "text"))
        truth = pool.labels()
        _relabelled_copy(pool, path, labels, index="flat")  # never searched: only merged into KB_ext
    info = {"records": len(labels), "unknown": float((labels < 0).float().mean()),
            "agree_with_dataset": float((labels == truth).float().mean()), "labeller": digest}
    log.info("pool labels read from captions: %s", info)
    _mark(path, info)


def _relabelled_copy(src: Any, path: Path, labels: torch.Tensor, text: torch.Tensor | None = None,
                     captions: list[str] | None = None, sources: list[str] | None = None, index: str = "auto") -> None:
    """Write ``src`` (an open KB) to ``path`` with new ``labels`` and, when given, new text vectors, captions and
    sources (else ``src``'s), with search index ``index``; an unfinished earlier attempt at ``path`` is removed
    first."""
    import shutil

    from retrofit.knowledge_base import KnowledgeBase

    if path.exists():
        shutil.rmtree(path)
    ids = torch.arange(len(src))
    recs = src.get(ids) if captions is None or sources is None else None
    with KnowledgeBase.create(path, src.key_dim, src.image_dim, src.text_dim, src.fingerprint,
                              class_names=src.class_names, index=index) as kb, kb.bulk():
        kb.add(src.vectors(ids, "key"), src.vectors(ids, "image"), src.vectors(ids, "text") if text is None else text,
               labels=labels, captions=captions if captions is not None else [r["caption"] for r in recs],
               sources=sources if sources is not None else [r["source"] for r in recs])
