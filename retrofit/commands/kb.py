"""``retrofit kb info|verify|query|classes|delete|compact PATH``, ``retrofit kb copy PATH -o OUT``: inspect and
maintain a knowledge base."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from retrofit.commands import at_least_one, guarded


def _open(path: str, readonly: bool = True):
    from retrofit.knowledge_base import KnowledgeBase

    return KnowledgeBase.open(path, readonly=readonly)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)



def _ef_construction(idx: dict[str, Any]) -> str:
    """The HNSW build beam of ``kb info``'s index entry, and the graph's when a stopped compact left them apart."""
    want, built = idx["config"]["ef_construction"], idx.get("ef_construction_built")
    if built is None or built == want:
        return str(want)
    return f"{want} (the graph was built with {built}: `retrofit kb compact` rebuilds it)"

@guarded(also=(KeyError,))
def cmd_info(args: argparse.Namespace) -> int:
    with _open(args.path) as kb:
        info = kb.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    idx, b = info["index"], info["bytes"]
    fps = {k: v for k, v in info["fingerprint"].items() if v}
    lines = [
        ("path", info["path"]),
        ("records", f"{info['records']} live, {info['deleted']} deleted (next id {info['next_id']})"),
        ("generation", info["generation"]),
        ("dims", f"key {info['key_dim']}, image {info['image_dim']}, text {info['text_dim']} ({info['dtype']})"),
        ("classes", ", ".join(info["class_names"]) if info["class_names"] else "-"),
        ("fingerprints", "; ".join(f"{k}: {v['family']}:{v['name']}@{v['weights']}" for k, v in fps.items()) or "-"),
        ("index", f"exact flat inner product ({idx['ntotal']} vectors)" if idx["kind"] == "flat" else
                  f"HNSW M={idx['config']['hnsw_m']}, efConstruction {_ef_construction(idx)}, "
                  f"{idx['storage']} storage ({idx['ntotal']} vectors, efSearch "
                  f"{idx['ef_search']}"
                  + (f", tuned recall@{idx['config']['tune_k']} {idx['tuned_recall']:.3f}" if idx["tuned_recall"]
                     else "") + ")"),
        ("index file", f"{idx['file']} (generation {idx['file_generation']}, covers ids < {idx['covers_ids_below']})"),
        ("key whitening", (f"shrinkage {idx['whiten_shrinkage']:g}" if idx["whiten_shrinkage"] is not None
                           else "shrinkage unknown") + f", fitted on {idx['whiten_fitted_on']} records"
         if idx["whitened"] else "off (cosine on the keys as stored)"),
        ("disk", f"records {_human(b['records'])} ({b['records_over_raw']}x the raw vectors), "
                 f"index {_human(b['index'])}"),
    ]
    if idx["unindexed_records"]:
        lines.append(("NOT INDEXED", f"{idx['unindexed_records']} live records are in no index (damaged record "
                                     "chunks left out, or an interrupted index update saved): searches never "
                                     f"return them; `retrofit kb verify {args.path}` names damaged chunks; if "
                                     f"none, `retrofit kb compact {args.path}` rebuilds the index"))
    if b["records_free"] >= max(1 << 16, b["records"] // 10):  # worth mentioning
        lines.append(("free space", f"{_human(b['records_free'])} of the record file is free (deleted records, "
                                    "rewritten chunks): "
                                    f"later adds reuse it; `retrofit kb copy {args.path} -o NEW` gives it back"))
    if info["user_meta"]:
        meta = json.dumps(info["user_meta"])
        lines.append(("user meta", meta if len(meta) <= 200 else meta[:199] + "…  (all of it: --json)"))
    w = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{w}}  {v}")
    return 0


@guarded(also=(KeyError,))
def cmd_verify(args: argparse.Namespace) -> int:
    from retrofit.knowledge_base import KnowledgeBase

    # a damaged index does not stop the check of the records
    report = KnowledgeBase.verify_path(args.path, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        status = "OK" if report["ok"] else "DAMAGED"
        print(f"{status}: {report['records_checked']} records checked, generation {report['generation']}")
        if report.get("chunks_without_checksum"):
            print(f"  note: {report['chunks_without_checksum']} chunks were written before chunk checksums "
                  "(schema 1): their sizes and values were checked, their bytes cannot be")
        for p in report["problems"]:
            print(f"  - {p}")
    return 0 if report["ok"] else 1


def _load_vectors(path: str):
    import numpy as np
    import torch

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--vectors {p} is a folder; give a .npy, .pt or .json file of query vectors")
    if not p.is_file():
        raise FileNotFoundError(f"vector file {p} does not exist")
    want = "one float array of query vectors, shape (B, D) or (D,)"
    if p.suffix not in (".npy", ".pt", ".pth", ".json"):
        raise ValueError(f"vector file must be .npy, .pt or .json, got {p.name!r}")
    try:
        if p.suffix == ".npy":
            a = np.load(p, allow_pickle=False)
            if a.dtype.kind not in "fiu":
                raise ValueError(f"it holds {a.dtype} values")
            x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        elif p.suffix in (".pt", ".pth"):
            x = torch.load(p, map_location="cpu", weights_only=True)
        else:
            x = torch.tensor(json.loads(p.read_text()), dtype=torch.float32)
    except Exception as e:  # unreadable, not numbers, ragged: the file is not what --vectors takes
        raise ValueError(f"--vectors {p}: cannot read {want} ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(x, torch.Tensor) or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"--vectors {p} must hold {want}, got {type(x).__name__}")
    if x.dim() not in (1, 2) or x.numel() == 0:
        raise ValueError(f"--vectors {p} must hold {want}, got shape {tuple(x.shape)}")
    return x.float().reshape(-1, x.shape[-1])


@guarded(also=(KeyError,))
def cmd_query(args: argparse.Namespace) -> int:
    import torch

    if (args.ids is None) == (args.vectors is None):
        return _fail("give exactly one of --ids or --vectors")
    with _open(args.path) as kb:
        if args.ids is not None:
            parsed = _parse_ids([args.ids], "--ids", kb.info()["next_id"])
            if not parsed:
                return _fail("--ids: no ids given")
            ids = torch.tensor(parsed)
            queries = kb.vectors(ids, "key")
            exclude = ids[:, None]  # a record is not its own neighbour
            names = [f"id {i}" for i in ids.tolist()]
        else:
            queries = _load_vectors(args.vectors)
            exclude, names = None, [f"query {i}" for i in range(queries.shape[0])]
        nb = kb.search(queries, args.k, exclude=exclude)
        classes = kb.class_names or []
        out: list[dict[str, Any]] = []
        for b, name in enumerate(names):
            valid = nb.ids[b][nb.mask[b]].tolist()
            recs = {r["id"]: r for r in kb.get(valid)} if valid else {}
            rows = []
            for j in range(nb.k):
                if not nb.mask[b, j]:
                    continue
                i = int(nb.ids[b, j])
                lab = int(nb.labels[b, j])
                rows.append({"rank": j + 1, "id": i, "score": round(float(nb.scores[b, j]), 4), "label": lab,
                             "class": classes[lab] if 0 <= lab < len(classes) else None,
                             "caption": recs[i]["caption"], "source": recs[i]["source"]})
            out.append({"query": name, "neighbours": rows})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for q in out:
        print(f"{q['query']}: {len(q['neighbours'])} neighbours")
        for r in q["neighbours"]:
            cls = r["class"] if r["class"] is not None else ("unknown" if r["label"] < 0 else r["label"])
            print(f"  {r['rank']:>3}  id {r['id']:<8} score {r['score']:+.4f}  class {cls!s:<12} "
                  f"{(r['caption'] or '')[:70]}")
    return 0


def _parse_ids(parts: list[str], what: str, upto: int | None = None) -> list[int]:
    """Record ids from arguments like ``3 4,5 10-20`` (ranges inclusive); a clear error for anything else.
    ``upto``: the KB's next id; a range reaching past it is refused before it is expanded (``0-30000000000``
    would take all memory)."""
    ids: list[int] = []
    for part in parts:
        for s in part.split(","):
            s = s.strip()
            if not s:
                continue
            lo, dash, hi = s.partition("-") if not s.startswith("-") else (s, "", "")
            try:
                if dash:
                    a, b = int(lo), int(hi)
                    if b < a:
                        raise ValueError(f"{what}: range {s} is reversed (an inclusive range goes low-high, e.g. "
                                         f"{b}-{a})")
                    if upto is not None and b >= upto:
                        raise ValueError(f"{what}: range {s} reaches id {b}, but the knowledge base's ids end at "
                                         f"{upto - 1}") from None
                    ids.extend(range(a, b + 1))
                else:
                    ids.append(int(s))
            except ValueError as e:
                if str(e).startswith(what):
                    raise
                raise ValueError(f"{what}: {s!r} is not a record id or range; give integers or ranges, e.g. "
                                 "3,4,5 or 1488-1859") from None
    return ids


@guarded(also=(KeyError,))
def cmd_delete(args: argparse.Namespace) -> int:
    with _open(args.path, readonly=False) as kb:
        ids = _parse_ids(args.ids, "ids", kb.info()["next_id"])
        if not ids:
            return _fail("no ids given")
        kb.delete(ids)
        print(f"deleted {len(set(ids))} records; {len(kb)} live. Run `retrofit kb compact {args.path}` to "
              "rebuild the index without them.")
    return 0


@guarded(also=(KeyError,))
def cmd_compact(args: argparse.Namespace) -> int:
    from retrofit.knowledge_base import KnowledgeBase

    with KnowledgeBase.open(args.path, readonly=False) as kb:
        before = kb.info()
        kb.compact(hnsw_storage=args.hnsw_storage, whiten=args.whiten, ef_construction=args.ef_construction)
        after = kb.info()
    print(f"compacted {args.path}: {after['records']} live records, index {after['index']['kind']} with "
          f"{after['index']['ntotal']} vectors (was {before['index']['ntotal']})")
    for flag, value in (("--hnsw-storage", args.hnsw_storage), ("--ef-construction", args.ef_construction)):
        if value is not None and after["index"]["kind"] != "hnsw":
            print(f"note: {flag} {value} is kept in the settings but has no effect on this "
                  f"{after['index']['kind']} (exact) index; it applies once the index is HNSW", file=sys.stderr)
    if missing := after["index"]["unindexed_records"]:
        print(f"error: {missing} live records were left out of the index (damaged record chunks, named above): "
              f"searches will not return them; restore {args.path} from a copy, or delete them and add them again",
              file=sys.stderr)
        return 1
    return 0


@guarded(also=(KeyError, NotADirectoryError, PermissionError, FileExistsError))
def cmd_copy(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from retrofit.kb_copy import copy_kb

    s = copy_kb(args.path, args.out)
    if args.json:
        print(json.dumps(asdict(s)))
        return 0
    index = "index copied" if s.index_reused else "index rebuilt / caught up from the records"
    print(f"copied {args.path} -> {s.path}: {s.records} live records, record file {_human(s.source_bytes)} -> "
          f"{_human(s.copy_bytes)}, {index}, {s.seconds:.1f} s")
    return 0


@guarded
def cmd_classes(args: argparse.Namespace) -> int:
    from retrofit.commands.kb_build import _classes

    names = _classes(args.set) if args.set is not None else None  # (a bad --set before the KB is opened)
    with _open(args.path, readonly=names is None) as kb:
        if names is not None:
            kb.set_class_names(names)
        current = kb.class_names
    if args.json:
        print(json.dumps({"class_names": current}))
    elif current is None:
        print(f"{args.path} keeps no class list (its labels are numbers only); record one with "
              f"`retrofit kb classes {args.path} --set FILE|A,B,...` in the order of its label numbers")
    else:
        print(f"{len(current)} classes" + (" (recorded now)" if names is not None else "") + ": "
              + ", ".join(f"{i}={n}" for i, n in enumerate(current)))
    return 0


def register_kb(kb_sub: argparse._SubParsersAction) -> None:
    p = kb_sub.add_parser("info", help="counts, dims, fingerprints, index and disk use of a knowledge base",
                          description="Describe a knowledge base. Example: retrofit kb info kb/cifar10")
    p.add_argument("path", help="knowledge-base directory")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)

    p = kb_sub.add_parser("verify", help="check every record, the metadata and the index file (exit 1 if damaged)",
                          description="Check a knowledge base end to end. Example: retrofit kb verify kb/cifar10")
    p.add_argument("path", help="knowledge-base directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = kb_sub.add_parser("query", help="print the nearest neighbours (with captions) of stored ids or vectors",
                          description="Search a knowledge base. Examples: retrofit kb query kb/cifar10 --ids 0,17 "
                                      "-k 5; retrofit kb query kb/cifar10 --vectors q.npy")
    p.add_argument("path", help="knowledge-base directory")
    p.add_argument("--ids", help="comma-separated record ids whose keys are the queries (each excludes itself)")
    p.add_argument("--vectors", help="query vectors: .npy, .pt (a tensor) or .json, shape (B, key_dim) or (key_dim,)")
    p.add_argument("-k", type=at_least_one, default=5, help="neighbours per query (default 5)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_query)

    p = kb_sub.add_parser("delete", help="delete records by id (tombstones; compact rebuilds the index)",
                          description="Delete records. Example: retrofit kb delete kb/cifar10 3 17 42")
    p.add_argument("path", help="knowledge-base directory")
    p.add_argument("ids", nargs="+", help="record ids (space or comma separated; ranges like 10-20 inclusive)")
    p.set_defaults(func=cmd_delete)

    p = kb_sub.add_parser("compact", help="rebuild the index from the records (drops deleted records; repairs a "
                                          "damaged or missing index)",
                          description="Rebuild the index. Example: retrofit kb compact kb/cifar10")
    p.add_argument("path", help="knowledge-base directory")
    p.add_argument("--hnsw-storage", default=None, choices=["fp16", "float32"],
                   help="rebuild an HNSW index with this key storage (default: keep the KB's setting)")
    p.add_argument("--whiten", type=float, default=None, metavar="SHRINKAGE",
                   help="rebuild the index with key whitening of this shrinkage (0 turns it off; default: keep the "
                        "KB's setting; a whitened index fits it again on the live records)")
    p.add_argument("--ef-construction", type=at_least_one, default=None, metavar="EF",
                   help="rebuild an HNSW index with this build beam width, kept for later adds (default: keep the "
                        "KB's setting)")
    p.set_defaults(func=cmd_compact)

    p = kb_sub.add_parser("classes", help="show the class list of a knowledge base, or record one it lacks",
                          description="The class names its labels index. A knowledge base built from numbered labels "
                                      "without a list keeps none; --set records one (label i is the i-th name), "
                                      "once: a list it has is kept. Example: retrofit kb classes kb/cifar10 --set "
                                      "classes.json")
    p.add_argument("path", help="knowledge-base directory")
    p.add_argument("--set", default=None, metavar="FILE|A,B,...",
                   help="record this class list: a .json list, a file with one name per line, or a comma list")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_classes)

    p = kb_sub.add_parser("copy", help="copy a knowledge base to a new directory, compacted (gives the space of "
                                       "deleted records back to the disk; ids and index kept)",
                          description="Copy a knowledge base with a compacted record file: LMDB never shrinks its "
                                      "file, so after `kb delete` + `kb compact` the space stays in use until "
                                      "copied. Example: retrofit kb copy kb/cifar10 -o kb/cifar10-small")
    p.add_argument("path", help="knowledge-base directory (only read)")
    p.add_argument("-o", "--out", required=True, help="new knowledge-base directory (must not exist)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.set_defaults(func=cmd_copy)
