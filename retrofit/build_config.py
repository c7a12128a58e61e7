"""``BuildConfig`` (how :func:`~retrofit.ingest.build_kb` / ``add_to_kb`` turn a source into knowledge-base
records, each field checked by ``validate`` with a message naming the value) and ``BuildSummary`` (what a build
did, printed by ``retrofit kb build``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BuildConfig", "BuildSummary"]


@dataclass
class BuildConfig:
    """How to turn a source into knowledge-base records."""

    image_encoder: str = "darknet-tiny"  # image encoder spec (see retrofit.encoders)
    text_encoder: str = "minilm"  # text encoder spec for captions
    key_encoder: str | None = None  # separate encoder for the search keys; None = the image vectors are the keys
    class_names: list[str] | None = None  # the classifier's classes; labels are mapped onto them by name
    batch_size: int = 256  # images per encoder batch
    num_workers: int = 1  # DataLoader worker processes decoding images (0 = in the main process)
    commit_every: int = 4096  # commit once this many records are pending (checked per batch) = resume granularity
    dedup: bool = True  # drop exact duplicates (same image bytes, sha1)
    near_dup: float | None = None  # drop records whose key has cosine >= this with an earlier record (None = off)
    require_caption: bool = True  # a sample without a caption is bad data (else its text vector is zero)
    dtype: str = "float16"  # storage dtype of the vectors
    index: str = "auto"  # "auto", "hnsw" or "flat" (KnowledgeBase.create)
    hnsw_storage: str = "fp16"  # how an HNSW index stores the keys: "fp16" or "float32" (KnowledgeBase.create)
    whiten: float = 0.0  # key whitening of the index: 0 = off, > 0 = its shrinkage (retrofit.kb_whiten; 0.1 typical)
    # HNSW efConstruction, the build's beam width: wider builds a better graph, slower, and the efSearch tuned
    # after the build can drop (1M synthetic records: 40 -> 80 gave build 161 -> 293 s, efSearch 512 -> 256,
    # queries/s 765 -> 1,554 at recall@32 0.97; docs/benchmarks.md)
    ef_construction: int = 80
    # Web data has captions but no labels: give every record whose sample has no label the class its caption
    # names (retrofit.caption_labels.CaptionLabeller over class_names and class_synonyms, with the build's text
    # encoder), or -1 when no class reaches caption_min_similarity. Needs class_names.
    caption_labels: bool = False
    class_synonyms: dict[str, list[str]] | None = None  # other names per class name, each put in "a photo of a {}."
    class_descriptions: dict[str, str] | None = None  # a one-line description per class name, used as it is
    caption_min_similarity: float = 0.5  # cosine a caption needs with some class text to get its label
    device: str = "cpu"  # where the encoders run
    text_cache: int = 200_000  # captions whose text vector is remembered (web captions repeat a lot)
    progress: bool = True  # tqdm progress bar

    def validate(self) -> None:
        for n in ("batch_size", "commit_every"):
            if not isinstance(getattr(self, n), int) or getattr(self, n) <= 0:
                raise ValueError(f"BuildConfig.{n} must be a positive int, got {getattr(self, n)!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"BuildConfig.num_workers must be an int >= 0, got {self.num_workers!r}")
        if self.near_dup is not None and not 0.0 < self.near_dup <= 1.0:
            raise ValueError(f"BuildConfig.near_dup must be a cosine in (0, 1] or None, got {self.near_dup!r}")
        if self.class_names is not None and (isinstance(self.class_names, (str, bytes))
                                             or not all(isinstance(c, str) for c in self.class_names)):
            hint = f" (split it: {self.class_names.split(',')[:3]}...)" if isinstance(self.class_names, str) else ""
            raise ValueError(f"BuildConfig.class_names must be a list of class-name strings, got "
                             f"{self.class_names!r:.80}{hint}")
        if not -1.0 <= self.caption_min_similarity <= 1.0:
            raise ValueError("BuildConfig.caption_min_similarity is a cosine in [-1, 1], "
                             f"got {self.caption_min_similarity}")
        import torch

        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"BuildConfig.device {self.device!r} is not a device (CLI --device); e.g. 'cpu', "
                             "'cuda', 'cuda:1'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"BuildConfig.device={self.device!r} (CLI --device) but CUDA is not available here; use "
                             "'cpu'")
        if self.dtype not in ("float16", "float32"):  # what KnowledgeBase.create stores
            raise ValueError(f"BuildConfig.dtype must be float16 or float32, got {self.dtype!r}")
        from retrofit.kb_index import IndexConfig

        # checks all three (ValueError naming the value)
        IndexConfig(kind=self.index, hnsw_storage=self.hnsw_storage, whiten=self.whiten,
                    ef_construction=self.ef_construction)


@dataclass
class BuildSummary:
    """What a build did (counts over the whole build, including earlier resumed runs)."""

    path: str  # the knowledge base
    total: int  # samples in the source
    written: int  # records written
    skipped: int  # bad samples (see the report)
    duplicates: int  # exact duplicates dropped
    near_duplicates: int  # near duplicates dropped
    seconds: float  # wall time of this run
    encode_s: float  # time inside the encoders' forward in this run
    images_per_s: float  # samples processed per second in this run (not counting the encoders' loading)
    resumed_from: int  # source position this run started at (0 = fresh)
    report: str  # the bad-sample report file
    kb_size: int = 0  # records in the KB at the end
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        counts = (f"{self.written} written, {self.skipped} skipped, {self.duplicates} duplicates"
                  + (f", {self.near_duplicates} near duplicates" if self.near_duplicates else "")
                  + f" of {self.total} samples")
        report = f"; report: {self.report}" if self.report else ""
        labelled = ""
        if self.extra.get("labels_from_captions") is not None:
            labelled = f"; {self.extra['labels_from_captions']} labelled from their captions"
        if self.total and self.resumed_from >= self.total:  # nothing left to do in this run
            again = (" (records of it deleted since? `retrofit kb add --again` / add_to_kb(again=True) adds what "
                     "the knowledge base lacks)") if self.extra.get("mode") == "add" else ""
            return (f"{self.path}: already complete, nothing to do ({counts}; {self.kb_size} records){labelled}"
                    f"{report}{again}")
        resumed = (f"; resumed at sample {self.resumed_from} (the counts include the earlier runs')"
                   if self.resumed_from else "")
        rate = (f"{self.images_per_s:.0f} images/s; encoders {self.encode_s:.1f} s" if self.encode_s
                else f"{self.images_per_s:.0f} records/s")  # a merge encodes nothing
        if (load := self.extra.get("load_s") or 0.0) >= 0.5:
            rate += f"; plus {load:.1f} s loading the encoders, not in the rate"
        return f"{self.path}: {counts} in {self.seconds:.1f} s ({rate}){labelled}{resumed}{report}"
