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

The builders and cache-file helpers live in :mod:`retrofit.demo_build`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrofit.cifar10_lt import LongTailSplit, long_tail_split, prompt, shard_paths
from retrofit.demo_build import (
    _DONE,
    _build,
    _caption_labelled,
    _done,
    _encode,
    _Encoders,
    _info,
    _labeller_digest,
    _load_or_empty,
    _mark,
    _noisy_kb,
    _save_atomic,
    set_whitening,
)

__all__ = ["DemoData", "prepare", "set_whitening"]

log = logging.getLogger(__name__)

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
    _twin: bool | None = None  # KB_in's noisy twin searches as KB_in (see _retrieve); None = not checked yet

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

    def features_digest(self, kb: str, noisy: bool = False) -> str:
        """sha256 (16 hex digits) of what a head trained with ``kb`` reads: the long-tail images' features, labels,
        cross-fitted host logits, self-exclusions and retrieved neighbours (:meth:`train_features`), so that a head
        cached from other neighbours (retrieval or exclusion code changed) or other host logits is not reused."""
        name = f"features:{kb}:{noisy}"
        if name not in self._digests:
            import hashlib

            fs, h = self.train_features(kb, noisy=noisy), hashlib.sha256()
            for t in (fs.z, fs.labels, fs.host_logits, fs.exclude, fs.neighbor_ids, fs.neighbor_scores,
                      fs.neighbor_labels):
                h.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
            self._digests[name] = h.hexdigest()[:16]
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

        if kb == "in_noisy" and self._noisy_twin():
            # KB_in relabelled (_noisy_kb): the same keys under the same ids and index, so the same neighbours as
            # KB_in's (searched once); only the labels they carry differ
            twin = self.train_features("in") if split == "lt" else self.eval_features(split, "in")
            ids, labels = twin.neighbor_ids, self.kb(kb).labels()
            return fs.with_neighbors(ids, twin.neighbor_scores, torch.where(ids >= 0, labels[ids.clamp_min(0)], -1))
        return retrieve(fs, self.kb(kb), self.k)

    def _noisy_twin(self) -> bool:
        """Whether KB_in's noisy twin searches as KB_in does (:func:`_same_index`; checked once)."""
        if self._twin is None:
            self._twin = _same_index(self.kb("in"), self.kb("in_noisy"))
        return self._twin

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
    same key encoder and index settings, and the same keys (compared: ~0.1 s for KB_in)."""
    ia, ib = a.info(), b.info()
    if not (len(a) == len(b) == ia["next_id"] == ib["next_id"] and a.fingerprint.key == b.fingerprint.key
            and all(ia["index"][f] == ib["index"][f] for f in ("kind", "storage", "config", "ef_search"))):
        return False
    ids = torch.arange(len(a))
    return torch.equal(a.vectors(ids, "key"), b.vectors(ids, "key"))


def _record_indices(kb: Any) -> list[int]:
    """The CIFAR-10 training index of each record of ``kb`` (from its source, ``.../train_NNNNN|sha1:...``), in id
    order; -1 where a source names none."""
    import re

    out = []
    for r in kb.get(torch.arange(len(kb))):
        m = re.search(r"train_(\d+)", r["source"] or "")
        out.append(int(m.group(1)) if m else -1)
    return out


def _labels_are(path: Path, labels: np.ndarray) -> bool:
    """Whether the knowledge base at ``path`` holds exactly ``labels`` (in id order)."""
    from retrofit.knowledge_base import KnowledgeBase

    with KnowledgeBase.open(path) as kb:
        return len(kb) == len(labels) and np.array_equal(kb.labels().numpy(), labels)


def _tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """sha256 of a tensor's bytes as a (32,) uint8 tensor (storable next to it in a safetensors file)."""
    import hashlib

    return torch.frombuffer(bytearray(hashlib.sha256(t.contiguous().numpy().tobytes()).digest()), dtype=torch.uint8)


def _probe_code_digest() -> str:
    """The first 8 hex digits of the sha256 of :mod:`retrofit.linear_probe`'s source (what fits the host logits)."""
    import hashlib

    from retrofit import linear_probe

    return hashlib.sha256(Path(linear_probe.__file__).read_bytes()).hexdigest()[:8]


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
        if (len(kb_in) != len(split.lt) or not np.array_equal(kb_in.labels().numpy(), y_train[split.lt])
                or _record_indices(kb_in) != split.lt.tolist()):  # (labels alone: the shards are sorted by class,
            # so another choice of images within each class, e.g. by changed split code, matched them)
            raise RuntimeError(f"{root / 'kb_in'} does not match the long-tail split; delete {root} and re-run")
        tensors["z_lt"] = kb_in.vectors(torch.arange(len(split.lt)), "image")  # (N_lt, D) as stored
        if not _done(root / "kb_in_noisy") or not _labels_are(root / "kb_in_noisy", noisy):
            # (a cached twin made by other noise code under the same data key: its labels no longer the run's)
            _noisy_kb(kb_in, root / "kb_in_noisy", noisy, y_train[split.lt])
    set_whitening(root / "kb_in_noisy", cfg.whiten_in)
    idx_val = torch.from_numpy(split.val.astype(np.int64))
    if "idx_val" not in tensors or not torch.equal(tensors["idx_val"], idx_val):  # (embedded for other images)
        tensors.pop("z_val", None)
    for part, refs in (("val", [train_src.refs[i] for i in split.val]), ("test", test_src.refs)):
        if f"z_{part}" not in tensors:
            z = _encode(refs, enc.image, progress=cfg.progress)
            tensors[f"z_{part}"] = z.half().float()  # rounded as the KB stores vectors (float16)
            tensors["idx_val"] = idx_val
            _save_atomic({k: tensors[k].contiguous() for k in ("z_val", "z_test", "idx_val") if k in tensors},
                         feat_path)
    times["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    # host logits depend on the probe's wd and, for the training images, on the folds of cross_fit_logits
    # ("-f2": classes spread over the folds from where the previous class stopped; the earlier files started at 0;
    # "-p2": probes fitted to convergence in standardised coordinates, the earlier ones stopped at 100 iterations)
    # ("-c<digest>": the probe's code; the labels and the features each probe was fitted on are stored with its
    # logits and compared, so that other noise / split code under the same data key refits instead of reusing them)
    host_path = root / f"host-wd{cfg.host_weight_decay:g}-f2-p2-c{_probe_code_digest()}.safetensors"
    host = _load_or_empty(host_path)
    z_digest = _tensor_digest(tensors["z_lt"])
    for tag, y in (("", y_train[split.lt]), ("_noisy", noisy)):
        fitted = host.get(f"fit{tag}_labels"), host.get(f"fit{tag}_z")
        if (f"host{tag}_lt" in host and fitted[0] is not None and torch.equal(fitted[0], torch.from_numpy(y))
                and fitted[1] is not None and torch.equal(fitted[1], z_digest)):
            continue
        yl = torch.from_numpy(y)
        probe = fit_linear_probe(tensors["z_lt"], yl, len(names), weight_decay=cfg.host_weight_decay)
        with torch.no_grad():
            for part in ("val", "test"):
                host[f"host{tag}_{part}"] = probe(tensors[f"z_{part}"]).float()
        host[f"host{tag}_lt"] = cross_fit_logits(tensors["z_lt"], yl, len(names), folds=5,
                                                 weight_decay=cfg.host_weight_decay)
        host[f"fit{tag}_labels"], host[f"fit{tag}_z"] = yl.clone(), z_digest.clone()
        _save_atomic({k: v.contiguous() for k, v in host.items()}, host_path)
    tensors.update({k: v for k, v in host.items() if k.startswith("host")})
    times["host"] = time.perf_counter() - t
    log.info("prepared in %s", {k: round(v, 1) for k, v in times.items()})
    return DemoData(split=split, class_names=names, train_labels=y_train, test_labels=y_test, noisy_lt_labels=noisy,
                    tensors=tensors, root=root, k=cfg.k, ext_labels=cfg.ext_labels, seconds=times)
