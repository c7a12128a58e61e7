"""Building knowledge bases: stream a source through the encoders into a :class:`KnowledgeBase`.

``build_kb`` creates a KB (or resumes one it started), ``add_to_kb`` appends to an existing one, and
``merge_kbs`` combines KBs built with the same encoders. Images are decoded and preprocessed in DataLoader
workers; the main process only encodes batches and writes them. Progress (the position in the source's
build order and the counters) is committed in the same LMDB transaction as the records, so a build that is
killed at any point continues, when re-run with the same arguments, exactly where its last commit ended.
Bad samples (missing or undecodable image, no caption) are skipped, counted and listed in a JSONL report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from retrofit.build_config import BuildConfig, BuildSummary
from retrofit.encoders import ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from retrofit.errors import KnowledgeBaseError
from retrofit.ingest_checks import check_encoder, check_specs
from retrofit.sources import Source, map_labels, open_source
from retrofit.store import KBFingerprint

__all__ = ["BuildConfig", "BuildSummary", "build_kb", "add_to_kb", "merge_kbs", "REPORT_NAME"]

log = logging.getLogger(__name__)
REPORT_NAME = "build_report.jsonl"  # bad samples of builds into this KB, one JSON object per line
SPECS_KEY = "encoder_specs"  # user_meta: the encoder specs a KB was built with ({"image", "text"[, "key"]: spec})
_META_PREFIX = "ingest:"  # user_meta key of a build's progress: "ingest:<build id>"


def _hash_of_source(source: str | None) -> str | None:
    """The image hash recorded in a record's ``source`` field (``key|sha1:XXXX``)."""
    if source and "|sha1:" in source:
        return source.rpartition("|sha1:")[2]
    return None


def _fresh_state() -> dict[str, Any]:
    return {"next": 0, "written": 0, "skipped": 0, "duplicates": 0, "near_duplicates": 0}


def _decoded_batches(src: Source, cfg: BuildConfig, img: ImageEncoder, key: ImageEncoder | None, start: int) -> Any:
    """An iterator of decoded batches from source position ``start``; its worker processes start NOW.

    Called before the KB is opened for writing, so that the workers inherit none of its file descriptors
    (an orphaned worker of a killed build would otherwise hold the KB's writer lock).
    """
    from retrofit.workers import decode_loader

    pre = [e.pixels or e.preprocess for e in (img, key) if e is not None]  # (uint8 where the encoder scales them)
    return iter(decode_loader(src.refs, pre[0] if len(pre) == 1 else _Multi(pre), batch_size=cfg.batch_size,
                              num_workers=cfg.num_workers, offset=start, prefetch_factor=4))


class _Multi:
    """Several preprocess transforms applied to one image (image encoder + key encoder); picklable."""

    def __init__(self, fns: list[Any]):
        self.fns = fns

    def __call__(self, im: Any) -> tuple[torch.Tensor, ...]:
        return tuple(f(im) for f in self.fns)


# ----------------------------------------------------------------------------------------------- entry points


def _config(config: BuildConfig | None, overrides: dict[str, Any]) -> BuildConfig:
    cfg = BuildConfig(**asdict(config)) if config is not None else BuildConfig()
    allowed = set(asdict(cfg))
    unknown = set(overrides) - allowed
    if unknown:
        raise ValueError(f"unknown build options {sorted(unknown)}; allowed: {sorted(allowed)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def _chosen(cfg: BuildConfig, image: Any, text: Any, key: Any) -> tuple[Any, Any, Any]:
    """The image, text and key encoders of this run: the ones given, else the configuration's (specs or objects)."""
    return (image if image is not None else cfg.image_encoder, text if text is not None else cfg.text_encoder,
            key if key is not None else cfg.key_encoder)


def _encoders(cfg: BuildConfig, image: ImageEncoder | str | None, text: TextEncoder | str | None,
              key: ImageEncoder | str | None) -> tuple[ImageEncoder, TextEncoder, ImageEncoder | None]:
    image, text, key = _chosen(cfg, image, text, key)
    img = load_image_encoder(image, cfg.device) if isinstance(image, str) else image
    txt = load_text_encoder(text, cfg.device) if isinstance(text, str) else text
    k = load_image_encoder(key, cfg.device) if isinstance(key, str) else key
    if k is not None and k.fingerprint.matches(img.fingerprint):
        k = None  # same encoder twice: the image vectors are the keys
    return img, txt, k


def _caption_labeller(cfg: BuildConfig, class_names: list[str] | None, txt: TextEncoder, guessed: bool = False) -> Any:
    """The CaptionLabeller of a ``caption_labels`` build (None otherwise); bad settings raise before any work."""
    if not cfg.caption_labels:
        if cfg.class_synonyms or cfg.class_descriptions:
            raise ValueError("class_synonyms / class_descriptions are only used with caption_labels=True "
                             "(--labels-from-captions)")
        return None
    if not class_names or guessed:  # given, the KB's or the source's own: not guessed from a few labelled rows
        raise ValueError("caption_labels needs the class names to recognise in captions: pass class_names "
                         "(--classes)")
    syn, desc = cfg.class_synonyms or {}, cfg.class_descriptions or {}
    for what, d in (("class_synonyms", syn), ("class_descriptions", desc)):
        unknown = sorted(set(d) - set(class_names))
        if unknown:
            raise ValueError(f"{what} names classes {unknown[:10]} that are not among the class names "
                             f"{class_names[:10]}{'...' if len(class_names) > 10 else ''}")
    from retrofit.caption_labels import CaptionLabeller

    bad = {c: v for c, v in syn.items() if isinstance(v, str)}
    if bad:  # a bare string would be read as a list of letters
        raise ValueError(f"class_synonyms values must be lists of names, got {bad}")
    return CaptionLabeller(txt, class_names, synonyms=[list(syn.get(c, [])) for c in class_names],
                           descriptions=[desc.get(c) for c in class_names] if desc else None,
                           min_similarity=cfg.caption_min_similarity)


def _build_id(mode: str, src: Source, cfg: BuildConfig, fp: KBFingerprint, class_names: list[str] | None,
              resolved: bool = True) -> str:
    """The identity of a build (resumed when it matches). ``resolved``: the source's paths made absolute, so
    ``./shard.tar`` and ``/abs/shard.tar`` resume the same build; ``False``: the id builds made before
    23 Nov 2026 recorded (the paths as given), still recognised."""
    where = src.describe()
    if resolved:
        where["location"] = ",".join(str(Path(p).resolve()) for p in src.location.split(","))
    ident = {"mode": mode, "source": where, "fingerprint": fp.to_dict(), "dedup": cfg.dedup,
             "near_dup": cfg.near_dup, "require_caption": cfg.require_caption, "class_names": class_names}
    if cfg.caption_labels:  # only then: ids of builds made before the option existed stay the same (resume)
        ident["caption_labels"] = [cfg.class_synonyms, cfg.class_descriptions, cfg.caption_min_similarity]
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def _ingest(mode: str, source: str | Path | Source, path: str | Path, config: BuildConfig | None,
            image_encoder: Any, text_encoder: Any, key_encoder: Any, overrides: dict[str, Any],
            again: bool = False) -> BuildSummary:
    from retrofit.knowledge_base import KnowledgeBase

    t0 = time.perf_counter()
    cfg = _config(config, overrides)
    path = Path(path)
    exists = path.is_dir() and any(path.iterdir())
    if mode == "add" and not exists:
        raise KnowledgeBaseError(f"{path} is not a knowledge base; create one with `retrofit kb build`")
    if mode == "build" and exists and not (path / "records" / "data.mdb").is_file():
        raise KnowledgeBaseError(f"{path} exists and holds other files, not a knowledge base; build into a new or "
                                 "empty directory")
    # everything that can be wrong with the configuration is found here, before any work
    src = source if isinstance(source, Source) else open_source(source)
    if len(src) == 0:
        raise ValueError(f"source {src.location} has no samples")
    if cfg.require_caption and not any(r.caption for r in src.refs):
        col = src.options.get("columns", [None, None])[1] if src.kind == "manifest" else None
        where = f" (no {col!r} column / values in the manifest)" if col else ""
        fix = {"manifest": "name the caption column (--caption-column; manifest_source(caption_col=...)) or ",
               "imagefolder": "give caption templates over the class names (--template 'a photo of a {}.') or ",
               "webdataset": "add .txt (or .json with a 'caption' key) members to the shards, or "}.get(src.kind, "")
        raise ValueError(f"no sample of {src.location} has a caption{where}, so every sample would be skipped; "
                         f"{fix}build without captions (--allow-missing-captions; require_caption=False: zero text "
                         "vectors)")
    recorded: dict[str, Any] = {}
    from_record: set[str] = set()  # parts whose encoder this call took from the KB's record
    kb_classes: list[str] | None = None
    if exists:  # the existing KB's class list and encoder specs: its metadata only (the index is not loaded)
        with KnowledgeBase(path, readonly=True, _records_only=True) as kb0:
            kb_classes, kb_specs, kb_fp = kb0.class_names, dict(kb0.user_meta.get(SPECS_KEY) or {}), kb0.fingerprint
    if mode == "add":
        if cfg.class_names is None:
            cfg.class_names = kb_classes
        if cfg.class_names is None and (src.classes_guessed or src.kind == "imagefolder"):
            # (numbered by the names' sorted order, which need not be the order of the KB's label numbers)
            what = "folder names" if src.kind == "imagefolder" else "class names"
            raise ValueError(f"the labels of {src.location} are {what}, but {path} has no class list to number "
                             "them by: pass the class names (--classes FILE|A,B,...; class_names=[...] in "
                             "Python; in the order of its records' label numbers, if they have any)")
        recorded = kb_specs
        # encoders not named for this call: the ones the KB was built with (recorded as specs since 22 Nov 2026).
        # A BuildConfig encoder field counts as named only when it differs from BuildConfig's default.
        default = BuildConfig()
        given = {"image": image_encoder, "text": text_encoder, "key": key_encoder}
        for part, value in given.items():
            field = f"{part}_encoder"
            named = value is not None or (config is not None and getattr(config, field) != getattr(default, field))
            if not named and recorded.get(part):
                setattr(cfg, field, recorded[part])
                from_record.add(part)
    labels, class_names = map_labels(src, cfg.class_names)
    if class_names is not None and kb_classes is not None and list(kb_classes) != class_names:
        # before the encoders load (seconds): a class list in another order
        raise ValueError(f"{path} has classes {kb_classes[:10]}..., this build maps labels onto "
                         f"{class_names[:10]}...; pass the KB's class names")
    if not cfg.caption_labels and labels and all(y < 0 for y in labels):
        log.warning("no sample of %s has a label: every record gets label -1 (unknown), which the label vote and the "
                    "kNN ignore; for web data with captions, caption_labels=True (CLI: --labels-from-captions) reads "
                    "labels from the captions", src.location)
    if class_names is None and not exists and any(y >= 0 for y in labels):
        log.warning("%s's labels are class numbers and no class list names them (no classes.json beside the first "
                    "shard, no --classes / class_names): the knowledge base keeps none, so `retrofit train` will ask "
                    "for --classes, `kb merge` refuses to combine it with a named KB, and a label-vote head cannot "
                    "check the class order; pass --classes FILE|A,B,... (class_names=[...] in Python) to record "
                    "one, or later `retrofit kb classes KB --set FILE`", src.location)
    if exists:
        image, text, keys = _chosen(cfg, image_encoder, text_encoder, key_encoder)
        check_specs(kb_fp, {"key": image if keys is None else keys, "image": image, "text": text}, path, kb_specs,
                    mode, from_record)
    t_load = time.perf_counter()
    img, txt, key = _encoders(cfg, image_encoder, text_encoder, key_encoder)
    labeller = _caption_labeller(cfg, class_names, txt, guessed=cfg.class_names is None and src.classes_guessed)
    load_s = time.perf_counter() - t_load  # loading encoders given by spec: not part of the rate
    fp = KBFingerprint(key=(key or img).fingerprint, image=img.fingerprint, text=txt.fingerprint)
    build_id = _build_id(mode, src, cfg, fp, class_names)
    meta_key = _META_PREFIX + build_id
    state, restart = _fresh_state(), False
    if exists:
        with KnowledgeBase.open(path) as kb:
            legacy = _build_id(mode, src, cfg, fp, class_names, resolved=False)
            if meta_key not in kb.user_meta and _META_PREFIX + legacy in kb.user_meta:  # recorded before 23 Nov
                build_id, meta_key = legacy, _META_PREFIX + legacy
            for part in ("key", "image", "text"):
                check_encoder(kb, fp, part, path, recorded or dict(kb.user_meta.get(SPECS_KEY) or {}), mode,
                               from_record)
            foreign = [k for k in kb.user_meta if k.startswith(_META_PREFIX) and k != meta_key]
            if mode == "build" and meta_key not in kb.user_meta and (len(kb) or foreign):
                raise KnowledgeBaseError(
                    f"{path} already holds a knowledge base built from other data or settings ({len(kb)} records); "
                    "re-run the original command to resume it, use `retrofit kb add` to append, or pick a new path")
            state = dict(kb.user_meta.get(meta_key) or state)
            restart = again and bool(state.get("done"))  # a completed add read anew (an unfinished one resumes)
            if restart:
                state = _fresh_state()
            size = len(kb)
            unindexed = kb._main_next < kb._meta["next_id"]  # the records' tail the saved index lacks
        report = path / REPORT_NAME
        if state.get("done") and unindexed:
            # killed while building the final index (after the last records' commit): finish that step now, or
            # every reader would search the unindexed records exactly, for good
            log.info("%s: all records are in; building the index the interrupted build did not finish", path)
            with KnowledgeBase.open(path, readonly=False) as kb:
                kb._finish_index(retune=True)  # as the build's own end: the index, and efSearch picked for it
        if state.get("done"):
            log.info("%s: this build is already complete (%d records); nothing to do", path, size)
            return BuildSummary(str(path), len(src), state["written"], state["skipped"], state["duplicates"],
                                state["near_duplicates"], time.perf_counter() - t0, 0.0, 0.0, state["next"],
                                str(report), kb_size=size,
                                extra={"mode": mode, **({"labels_from_captions": state.get("caption_labelled", 0)}
                                                        if labeller else {})})
    batches = _decoded_batches(src, cfg, img, key, state["next"])  # workers start before the KB is opened
    if exists:
        kb = KnowledgeBase.open(path, readonly=False)
        if restart:  # recorded first: a run killed from here on resumes this fresh add (duplicates are skipped)
            kb.update_meta({meta_key: state})
    else:
        specs = {"image": image_encoder if image_encoder is not None else cfg.image_encoder,
                 "text": text_encoder if text_encoder is not None else cfg.text_encoder,
                 "key": key_encoder if key_encoder is not None else cfg.key_encoder}
        specs = {part: absolute_spec(v) for part, v in specs.items() if isinstance(v, str)}  # objects have none
        kb = KnowledgeBase.create(path, fp.key.dim, img.dim, txt.dim, fp, class_names=class_names, dtype=cfg.dtype,
                                  index=cfg.index, hnsw_storage=cfg.hnsw_storage, whiten=cfg.whiten,
                                  ef_construction=cfg.ef_construction, user_meta={SPECS_KEY: specs})
    try:
        summary = _run_build(kb, mode, path, src, labels, cfg, img, txt, key, build_id, labeller, state, batches)
    except Exception:
        if not exists:
            _drop_if_empty(path)  # a first build that failed before its first commit leaves nothing behind
        raise
    summary.seconds = time.perf_counter() - t0
    summary.extra["load_s"] = load_s
    summary.images_per_s = (summary.total - summary.resumed_from) / max(summary.seconds - load_s, 1e-9)
    log.info("%s", summary)
    return summary


def absolute_spec(spec: str) -> str:
    """An encoder spec with a local path in it made absolute (``torchvision:resnet50@ckpt.pth`` ->
    ``...@/abs/ckpt.pth``, ``sentence-transformers:./model`` -> absolute): recorded specs must work from any
    working directory. Other specs are returned as they are."""
    from retrofit.encoder_families import _is_path

    family, sep, rest = spec.partition(":")
    if sep and family == "sentence-transformers":
        return f"{family}:{Path(rest).expanduser().resolve()}" if Path(rest).expanduser().exists() else spec
    head, at, weights = spec.rpartition("@")
    if sep and family in ("timm", "torchvision", "open_clip") and at and _is_path(weights) and \
            Path(weights).expanduser().exists():
        return f"{head}@{Path(weights).expanduser().resolve()}"
    return spec


def _drop_if_empty(path: Path) -> None:
    """Remove the KB at ``path`` if it holds no record (one this build created and never committed to)."""
    import shutil

    from retrofit.knowledge_base import KnowledgeBase

    try:
        with KnowledgeBase.open(path) as kb:
            empty = kb.info()["next_id"] == 0  # no record was ever written
    except Exception:  # not even a readable KB: leave it for the user to look at
        return
    if empty:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s: the build failed before writing any record", path)


def _run_build(kb: Any, mode: str, path: Path, src: Source, labels: list[int], cfg: BuildConfig, img: Any, txt: Any,
               key: Any, build_id: str, labeller: Any, state: dict[str, Any], batches: Any) -> BuildSummary:
    from retrofit.kb_builder import _Builder

    with kb:
        builder = _Builder(kb, src, labels, cfg, img, txt, key, build_id, path / REPORT_NAME, labeller)
        if builder.state["next"] != state["next"]:
            raise KnowledgeBaseError(f"{path} was changed by another process while this build started; re-run it")
        if state["next"]:
            log.info("%s: resuming at source position %d of %d", path, state["next"], len(src))
        builder.restore()
        if mode == "build":
            with kb.bulk():  # the ANN index is built once, at the end
                summary = builder.run(batches)
                t_index = time.perf_counter()
            summary.extra["index_s"] = time.perf_counter() - t_index
        else:
            summary = builder.run(batches)  # the index is extended batch by batch
    return summary


def build_kb(source: str | Path | Source, path: str | Path, config: BuildConfig | None = None, *,
             image_encoder: ImageEncoder | str | None = None, text_encoder: TextEncoder | str | None = None,
             key_encoder: ImageEncoder | str | None = None, **options: Any) -> BuildSummary:
    """Build the knowledge base at ``path`` from ``source`` (webdataset shards, ImageFolder, manifest).

    Re-running the same call after a crash or Ctrl-C resumes where the last commit ended. ``options``
    override fields of :class:`BuildConfig` (e.g. ``class_names=...``, ``batch_size=...``). Encoders may be
    given as specs or as loaded objects (e.g. ``retrofit.encoders.host_encoder(model, preprocess)``).
    """
    return _ingest("build", source, path, config, image_encoder, text_encoder, key_encoder, options)


def add_to_kb(path: str | Path, source: str | Path | Source, config: BuildConfig | None = None, *,
              image_encoder: ImageEncoder | str | None = None, text_encoder: TextEncoder | str | None = None,
              key_encoder: ImageEncoder | str | None = None, again: bool = False, **options: Any) -> BuildSummary:
    """Append ``source`` to the existing KB at ``path`` with the same encoders (checked by fingerprint);
    the index grows incrementally. Resumable like :func:`build_kb`; exact duplicates of records already in
    the KB are dropped. An add of the same source with the same settings that completed before does nothing,
    unless ``again``: then the source is read anew and what the KB lacks (records deleted since) is added, images
    still in it being skipped as duplicates (with ``dedup``, the default)."""
    if again and not _config(config, options).dedup:
        raise ValueError("again=True (--again) needs dedup: without it every image still in the knowledge base "
                         "would be added a second time")
    return _ingest("add", source, path, config, image_encoder, text_encoder, key_encoder, options, again=again)


from retrofit.kb_merge import merge_kbs  # noqa: E402  (re-exported: merge lives in its own module)
