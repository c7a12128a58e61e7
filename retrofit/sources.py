"""Where knowledge-base samples come from: webdataset shards, ImageFolder trees, CSV / JSONL / Parquet manifests.

A source is enumerated once, cheaply, in the main process into a list of :class:`SampleRef` (where the
image bytes are, plus caption and raw label); images are read, decoded and preprocessed later in
DataLoader workers (:class:`retrofit.decode.DecodeDataset`). The order of the list is the build order, which makes ids
deterministic and lets a build resume from a position.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrofit._env import require
from retrofit.decode import DecodeDataset, _to_rgb, collate_decoded  # noqa: F401  (their home before decode.py)
from retrofit.tar_shards import open_shard, tar_members

__all__ = ["SampleRef", "Source", "webdataset_source", "imagefolder_source", "manifest_source", "open_source",
           "map_labels", "DecodeDataset", "collate_decoded", "IMAGE_EXTS"]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_FOLDER_EXTS = {"." + e for e in IMAGE_EXTS} | {".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class SampleRef:
    """One sample before decoding."""

    key: str  # unique name within the source ("shard.tar/key", a file path, "manifest.jsonl:17")
    image: tuple[str, int, int] | str | None  # (tar path, byte offset, size), a file path, or None (member missing)
    caption: str | None  # caption text; None when the sample has none
    label: int | str | None  # raw label: class index, class name, or None (unknown)


@dataclass
class Source:
    """An enumerated source: its samples in build order and the class names its labels refer to."""

    kind: str  # "webdataset", "imagefolder" or "manifest"
    location: str  # what the user gave (pattern, folder, manifest path)
    refs: list[SampleRef]  # samples in build order
    class_names: list[str] | None = None  # names of integer labels (index -> name), when known
    options: dict[str, Any] = field(default_factory=dict)  # settings that change the records (for resume checks)
    # class_names is the sorted set of the labels' names (a manifest of names without a class list), not a list
    # the data came with: a knowledge base that numbers its labels otherwise must not read them by it
    classes_guessed: bool = False

    def __len__(self) -> int:
        return len(self.refs)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location, "count": len(self.refs), **self.options}


# ----------------------------------------------------------------------------------------------- webdataset


def expand_pattern(pattern: str) -> list[str]:
    """``data/train-{000000..000004}.tar`` -> the list of paths (brace expansion as webdataset does)."""
    if "{" in pattern:
        braceexpand = require("braceexpand", "brace patterns in webdataset shard names")
        return list(braceexpand.braceexpand(pattern))
    return [pattern]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def webdataset_source(pattern: str | Sequence[str], class_names: list[str] | None = None) -> Source:
    """Samples of webdataset ``.tar`` shards: image ``.jpg/.jpeg/.png/.webp``, caption ``.txt`` or ``.json``
    (``caption`` key), label ``.cls``. ``class_names`` defaults to ``classes.json`` next to the shards."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    paths = [Path(p) for pat in patterns for p in expand_pattern(str(pat))]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"webdataset shards not found: {missing or patterns}")
    refs: list[SampleRef] = []
    for path in paths:
        spath = str(path)
        with open_shard(path) as reader:  # headers, captions and labels through one buffer: no call per member
            members: dict[str, dict[str, tuple[int, int]]] = {}
            for name, off, size in tar_members(path, reader):
                key, ext = _split_key(name)
                members.setdefault(key, {})[ext] = (off, size)

            def read(loc: tuple[int, int]) -> bytes:
                return reader.read(*loc)

            for key, m in members.items():
                img = None
                for e in IMAGE_EXTS:
                    if e in m:
                        img = (spath, *m[e])
                        break
                caption = None
                if "txt" in m:
                    caption = read(m["txt"]).decode("utf-8", errors="replace")
                elif "json" in m:
                    try:
                        caption = json.loads(read(m["json"])).get("caption")
                    except (ValueError, AttributeError):
                        caption = None
                label: int | str | None = None
                if "cls" in m:
                    raw = read(m["cls"]).decode("utf-8", errors="replace").strip()
                    label = int(raw) if re.fullmatch(r"-?\d+", raw) else (raw or None)
                refs.append(SampleRef(f"{path.name}/{key}", img, caption, label))
    if class_names is None:
        cj = paths[0].parent / "classes.json"
        if cj.is_file():
            class_names = read_class_names(cj)
    return Source("webdataset", ",".join(patterns), refs, class_names)


def read_class_names(path: Path) -> list[str]:
    """Class names from a JSON file: a list of names, ``{"classes": [...]}``, or an index map ``{"0": name}`` /
    ``{"0": [wnid, name]}`` (ImageNet's class index: the wnids); a text file: one name per line."""
    text = Path(path).read_text(encoding="utf-8-sig")
    if Path(path).suffix.lower() != ".json":
        return [x.strip() for x in text.splitlines() if x.strip()]
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"class names file {path} is not valid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("classes"), list):
        data = data["classes"]
    elif isinstance(data, dict) and data and all(re.fullmatch(r"\d+", str(k)) for k in data):
        idx = sorted(int(k) for k in data)
        if idx != list(range(len(idx))):
            raise ValueError(f"class names file {path}: its indices are not 0..{len(idx) - 1}")
        data = [data[str(i)] if str(i) in data else data[i] for i in idx]
        # ImageNet's class index {"0": [wnid, name]}: the wnids, which are unique and name ImageNet's folders
        data = [v[0] if isinstance(v, list) and v else v for v in data]
    if not isinstance(data, list) or not data or not all(isinstance(n, str) for n in data):
        raise ValueError(f"class names file {path} must hold a list of names, {{\"classes\": [...]}} or an index map "
                         "{\"0\": name}")
    return list(data)


# ----------------------------------------------------------------------------------------------- ImageFolder


def imagefolder_source(root: str | Path, templates: Sequence[str] = DEFAULT_TEMPLATES) -> Source:
    """``root/<class name>/<image>``: label from the folder (sorted folder names = class order); caption from
    the prompt ``templates`` over the class name (template ``i % len(templates)`` for the i-th image of a
    class; underscores in folder names read as spaces)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {str(root)!r} is not a directory")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"caption templates must each contain '{{}}' for the class name, got {list(templates)!r}")
    for t in templates:
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError):
            raise ValueError(f"caption template {t!r} must hold exactly one '{{}}' (the class name) and no other "
                             "braces") from None
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"ImageFolder root {str(root)!r} has no class sub-folders")
    refs = []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in _FOLDER_EXTS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root / name).parts))  # ._x.jpg
        for i, p in enumerate(files):
            caption = templates[i % len(templates)].format(name.replace("_", " "))
            refs.append(SampleRef(str(p.relative_to(root)), str(p), caption, c))
    return Source("imagefolder", str(root), refs, classes, {"templates": list(templates)})


# ----------------------------------------------------------------------------------------------- manifests


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv" or suffix == ".tsv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON ({e})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n} must be a JSON object with the columns as keys, got "
                                     f"{type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".parquet":
        pq = require("pyarrow.parquet", "Parquet manifests")
        return pq.read_table(path).to_pylist()
    raise ValueError(f"manifest {str(path)!r}: unknown format {suffix!r}; allowed: .csv, .tsv, .jsonl, .parquet")


MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")  # what open_source reads as a manifest

# column names a manifest commonly uses for each role, the default first; matched without case
_COLUMN_ALIASES = {
    "image": ("image", "path", "filepath", "file_path", "filename", "file_name", "file", "image_path", "img",
              "img_path", "image_file"),
    "caption": ("caption", "text", "title", "description"),
    "label": ("label", "class", "class_name", "category", "target", "labels", "y"),
}
_COLUMN_OPTION = {"image": "--image-column / manifest_source(image_col=...)",
                  "caption": "--caption-column / manifest_source(caption_col=...)",
                  "label": "--label-column / manifest_source(label_col=...)"}


def _column(rows: list[dict[str, Any]], given: str | None, role: str, path: Path) -> str | None:
    """The manifest column for ``role``: ``given`` (which must exist), else the role's name ("image", "caption",
    "label") or the one common alias present (``path``, ``filename``, ``class``, ...); None when the manifest has no
    such column (captions and labels are optional)."""
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    if not rows:
        return given or role
    if given is not None:
        if given not in cols:
            raise ValueError(f"manifest {str(path)!r} has no {given!r} column; columns: {sorted(cols)} (name the "
                             f"{role} column with {_COLUMN_OPTION[role]})")
        return given
    by_lower = {str(c).lower(): c for c in cols}
    found = [by_lower[a] for a in _COLUMN_ALIASES[role] if a in by_lower]
    if found and found[0] == role:
        return role
    if len(found) > 1:
        raise ValueError(f"manifest {str(path)!r}: columns {found} could each be the {role} column; name it with "
                         f"{_COLUMN_OPTION[role]}")
    if found:
        log.info("manifest %s: %r is the %s column", path.name, found[0], role)
        return found[0]
    if role == "image":
        raise ValueError(f"manifest {str(path)!r} has no image path column (looked for "
                         f"{list(_COLUMN_ALIASES['image'])}); columns: {sorted(cols)} (name it with "
                         f"{_COLUMN_OPTION['image']})")
    return None


def manifest_source(path: str | Path, image_col: str | None = None, caption_col: str | None = None,
                    label_col: str | None = None, root: str | Path | None = None, captions: bool = True) -> Source:
    """Rows of a CSV / TSV / JSONL / Parquet manifest with an image path (relative to ``root``, default the
    manifest's folder), a caption and a label (class index or name) column. A column not named is found by its
    usual names: ``image`` (or ``path``, ``filepath``, ``filename``, ``file`` ...), ``caption`` (or ``text``,
    ``title``, ``description``) and ``label`` (or ``class``, ``category``, ``target`` ...); captions and labels
    are optional. ``captions=False``: captions are not read (training and evaluation data), so no caption column
    is looked for."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} not found")
    rows = _read_rows(path)
    base = Path(root) if root is not None else path.parent
    image_col = _column(rows, image_col, "image", path)
    caption_col = _column(rows, caption_col, "caption", path) if captions else None
    label_col = _column(rows, label_col, "label", path)
    refs = []
    for n, row in enumerate(rows):
        img = row.get(image_col)
        img_path = str(base / str(img)) if img not in (None, "") else None
        cap = row.get(caption_col) if caption_col is not None else None
        raw = row.get(label_col) if label_col is not None else None
        label: int | str | None
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)  # JSON / Parquet integer columns with gaps come as floats
        if raw is None or raw == "" or (isinstance(raw, float) and math.isnan(raw)):
            label = None
        elif isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ValueError(f"manifest {str(path)!r} row {n + 1}: label {raw!r} must be a class index or a class "
                             "name")
        elif isinstance(raw, int) or re.fullmatch(r"-?\d+", raw.strip()):
            label = int(raw)
        else:
            label = str(raw)
        refs.append(SampleRef(f"{path.name}:{n}", img_path, None if cap is None else str(cap), label))
    # (a column not found is recorded under its default name, as before columns were looked for: build ids, which
    # hash these options, stay those of builds started before)
    opts = {"columns": [image_col, caption_col or "caption", label_col or "label"]}
    names = None
    if not any(isinstance(r.label, int) and r.label != -1 for r in refs):  # names (or -1, unknown) only: their
        # sorted set is the class list, as an ImageFolder's folders are
        spelled = {_norm(r.label): r.label for r in refs if isinstance(r.label, str)}
        if spelled:
            names = sorted(spelled.values())
            log.info("manifest %s: %d classes named in its labels, in sorted order (pass class_names / --classes to "
                     "give the classifier's own order)", path.name, len(names))
    return Source("manifest", str(path), refs, names, opts, classes_guessed=names is not None)


def open_source(spec: str | Path, **kwargs: Any) -> Source:
    """Pick the source kind from ``spec``: ``.tar`` / brace pattern -> webdataset, a folder -> ImageFolder,
    ``.csv/.tsv/.jsonl/.parquet`` -> manifest."""
    s = str(spec)
    if s.endswith(".tar") or ("{" in s and ".tar" in s):
        return webdataset_source(s, **kwargs)
    if Path(s).is_dir():
        if (Path(s) / "records" / "data.mdb").is_file():
            raise ValueError(f"{s!r} is a knowledge base, not a data source (the order is `retrofit kb build SOURCE "
                             "KB`; to combine knowledge bases: `retrofit kb merge`)")
        return imagefolder_source(s, **kwargs)
    if Path(s).suffix.lower() in MANIFEST_SUFFIXES:
        return manifest_source(s, **kwargs)
    if not Path(s).exists():
        raise FileNotFoundError(f"data source {s!r} not found; give webdataset shards (.tar, brace patterns allowed), "
                                "an ImageFolder directory or a .csv/.tsv/.jsonl/.parquet manifest")
    raise ValueError(f"cannot tell what kind of source {s!r} is; give webdataset shards (.tar, brace patterns "
                     "allowed), an ImageFolder directory, or a .csv/.tsv/.jsonl/.parquet manifest")


# ----------------------------------------------------------------------------------------------- labels


def _norm(name: str) -> str:
    """Case, underscores, spaces and Unicode composition folded (macOS writes 'café' decomposed)."""
    return " ".join(unicodedata.normalize("NFC", name).replace("_", " ").lower().split())


def map_labels(source: Source, class_names: list[str] | None) -> tuple[list[int], list[str] | None]:
    """Labels of ``source`` as indices into ``class_names`` (matched by name; -1 where unknown).

    Without ``class_names`` the source's own class order is kept. Raises ``ValueError`` naming every label
    that matches no class, before any work is done.
    """
    names = source.class_names
    if class_names is None:
        lookup = {_norm(n): i for i, n in enumerate(names or [])}
        out, bad = [], set()
        for r in source.refs:
            if r.label is None or r.label == -1:
                out.append(-1)
            elif isinstance(r.label, int):
                if r.label < 0 or (names is not None and r.label >= len(names)):
                    raise ValueError(f"sample {r.key} of {source.location} has label {r.label}; allowed: -1 (unknown) "
                                     f"or 0..{len(names) - 1 if names is not None else 'C-1'}"
                                     + (f" ({len(names)} classes in the data's class list)" if names else ""))
                out.append(r.label)
            elif _norm(r.label) in lookup:
                out.append(lookup[_norm(r.label)])
            else:
                bad.add(r.label)
        if bad:
            raise ValueError(f"labels {sorted(bad)[:10]} of {source.location} are class names, but no class list "
                             "was given: pass the classifier's classes (--classes FILE|A,B,...; class_names=[...] "
                             "in Python)")
        return out, names
    target = {_norm(n): i for i, n in enumerate(class_names)}
    if len(target) != len(class_names):
        raise ValueError(f"class_names has duplicates (after case/underscore folding): {class_names}")
    out, bad = [], set()
    for r in source.refs:
        lab = r.label
        if lab is None or lab == -1:  # -1: unknown, as without a class list
            out.append(-1)
            continue
        if isinstance(lab, int):
            if names is None:  # no names known: indices are taken as the classifier's own
                if not 0 <= lab < len(class_names):
                    bad.add(str(lab))
                    continue
                out.append(lab)
                continue
            if not 0 <= lab < len(names):
                bad.add(str(lab))
                continue
            lab = names[lab]
        j = target.get(_norm(lab))
        if j is None:
            bad.add(lab)
        else:
            out.append(j)
    if bad:
        raise ValueError(f"{len(bad)} label(s) of {source.location} match no class of the classifier: "
                         f"{sorted(bad)[:10]}; "
                         f"allowed class names: {class_names[:20]}{' ...' if len(class_names) > 20 else ''}. "
                         "Rename the data's labels (or its classes.json) to these names, or give the classifier's "
                         "class list in the data's own names.")
    return out, list(class_names)

