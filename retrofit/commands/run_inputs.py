"""What ``retrofit train``, ``eval``, ``calibrate`` and ``predict`` share: the run file ``retrofit train`` writes,
opening the knowledge base and the data, mapping labels onto the classes, the model-vs-KB encoder check and the
runtime options (device, workers, batch, quiet, json)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from retrofit.commands import at_least_one, manifest_columns, nonnegative

__all__ = ["RUN_FILE", "data_path"]

RUN_FILE = "run.json"  # what `retrofit train` records in its output directory for eval / predict


def _open_kb(path: str) -> Any:
    from retrofit.knowledge_base import KnowledgeBase

    if not Path(path).is_dir():
        raise FileNotFoundError(f"knowledge base {path!r} not found; build one with `retrofit kb build SOURCE {path}`")
    return KnowledgeBase.open(path)


def _source(spec: str, args: argparse.Namespace | None = None) -> Any:
    from retrofit.sources import MANIFEST_SUFFIXES, manifest_source, open_source

    s = str(spec)
    if not any(c in s for c in "{*") and not Path(s).exists():
        raise FileNotFoundError(f"data {s!r} not found; give webdataset shards (.tar, brace patterns allowed), an "
                                "ImageFolder directory or a .csv/.jsonl/.parquet manifest")
    if Path(s).is_file() and Path(s).suffix.lower() in MANIFEST_SUFFIXES:
        return manifest_source(s, captions=False, **(manifest_columns(args) if args is not None else {}))
    return open_source(s)


def _labels(source: Any, class_names: list[str] | None, what: str, required: bool) -> tuple[list[int], list[str]]:
    from retrofit.sources import map_labels

    labels, names = map_labels(source, class_names)
    if names is None:
        raise ValueError(f"{what}: class names unknown; pass --classes FILE|A,B,... (the classifier's classes)")
    if required and any(y < 0 for y in labels):
        raise ValueError(f"{what}: {sum(y < 0 for y in labels)} samples of {source.location} have no label")
    return labels, names


def _check_kb(host: Any, kb: Any, allow: bool) -> None:
    from retrofit.fingerprint import check_fingerprints

    check_fingerprints(host.fingerprint, kb.fingerprint.key, f"model {host.spec!r} vs the keys of knowledge base "
                       f"{getattr(kb, 'path', '')}", allow_mismatch=allow)


def data_path(spec: str) -> str:
    """A data spec as an absolute path when it names an existing file or folder (patterns stay as written): the
    identity of a data set across working directories (run.json, feature-cache names, same-data checks)."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def _runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 (default auto)")
    p.add_argument("--workers", type=nonnegative, default=0, help="DataLoader workers decoding images (default 0)")
    p.add_argument("--feature-batch", type=at_least_one, default=256, help="images per backbone batch (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
