"""Building and caching the CIFAR-10-LT demo's artefacts (:mod:`retrofit.demo_data` prepares them): the cache files'
done-markers and atomic writes, the encoders loaded on a cache miss, the KB builds, the image embeddings, and the
knowledge bases derived from KB_in and the pool (noisy labels, caption labels, whitened indexes)."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["set_whitening"]

log = logging.getLogger(__name__)

_DONE = "done.json"  # marker written after a cached artefact is complete


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
    from retrofit._files import save_tensors

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_tensors(tensors, tmp)
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


# The HNSW build beam of the demo's knowledge bases: faiss's 40, with which every recorded figure of the demo (and of
# the examples on its cache) was made. The library's default became 80 on 24 Nov 2026 (faster searches, slower
# builds); KB_ext (merged from KB_in) would then find slightly other approximate neighbours than the recorded runs.
EF_CONSTRUCTION = 40


def _build(src: Any, path: Path, enc: _Encoders, names: list[str], progress: bool, index: str = "auto") -> None:
    from retrofit.ingest import build_kb

    if _done(path):
        return
    t = time.perf_counter()
    summary = build_kb(src, path, image_encoder=enc.image, text_encoder=enc.text, class_names=names, dedup=False,
                       progress=progress, num_workers=1, index=index, ef_construction=EF_CONSTRUCTION)
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
                    ims.append((enc.pixels or enc.preprocess)(im.convert("RGB")))
            with torch.inference_mode():
                out.append(enc.encode(torch.stack(ims)).float())
    finally:
        for f in files.values():
            f.close()
    return torch.cat(out)


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
    sources (else ``src``'s), with search index ``index`` and ``src``'s HNSW build beam; an unfinished earlier
    attempt at ``path`` is removed first."""
    import shutil

    from retrofit.knowledge_base import KnowledgeBase

    if path.exists():
        shutil.rmtree(path)
    ids = torch.arange(len(src))
    recs = src.get(ids) if captions is None or sources is None else None
    with KnowledgeBase.create(path, src.key_dim, src.image_dim, src.text_dim, src.fingerprint,
                              class_names=src.class_names, index=index,
                              ef_construction=src.info()["index"]["config"]["ef_construction"]) as kb, kb.bulk():
        kb.add(src.vectors(ids, "key"), src.vectors(ids, "image"), src.vectors(ids, "text") if text is None else text,
               labels=labels, captions=captions if captions is not None else [r["caption"] for r in recs],
               sources=sources if sources is not None else [r["source"] for r in recs])
