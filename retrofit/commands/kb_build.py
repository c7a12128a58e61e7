"""``retrofit kb build|add|merge``: make knowledge bases from image-text data, extend them, combine them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from retrofit.commands import at_least_one, guarded, manifest_column_args, manifest_columns, nonnegative

_EPILOG_BUILD = """examples:
  retrofit kb build 'data/train-{000000..000004}.tar' kb/cifar --image-encoder darknet-tiny --text-encoder minilm
  retrofit kb build photos/ kb/photos --template 'a photo of a {}.' --classes classes.txt
  retrofit kb build manifest.jsonl kb/web --classes classes.json --near-dup 0.98
  retrofit kb build web.jsonl kb/web --classes classes.txt --labels-from-captions --class-synonyms syn.json

Re-running the same command after a crash or Ctrl-C resumes where it stopped. Bad samples are skipped
and listed in KB/build_report.jsonl.
"""


def _classes(value: str | None) -> list[str] | None:
    """``--classes``: a .json list (or {"classes": [...]}), a text file with one name per line, or a comma list."""
    if value is None:
        return None
    p = Path(value)
    if p.is_file():
        from retrofit.sources import read_class_names

        names = read_class_names(p)
    elif "," not in value and (p.suffix.lower() in (".json", ".txt", ".csv", ".names") or "/" in value):
        raise FileNotFoundError(f"--classes {value!r}: no such file (give a .json list, a file with one name per "
                                "line, or a comma list A,B,C)")
    else:
        names = [x.strip() for x in value.split(",") if x.strip()]
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"--classes {value!r}: expected a JSON list, a file with one name per line, or a comma list")
    return list(names)


def _source(args: argparse.Namespace) -> Any:
    from retrofit.sources import MANIFEST_SUFFIXES, manifest_source, open_source

    s = str(args.source)
    if Path(s).is_dir():  # an ImageFolder (open_source refuses a knowledge base given here, saying so)
        return open_source(s, templates=args.template or ["a photo of a {}."])
    if getattr(args, "template", None):  # (it was ignored: the records got the source's own captions)
        raise ValueError(f"--template makes the captions of an ImageFolder source from its class names; {s} is not a "
                         "folder, its samples bring their own captions: drop --template")
    if Path(s).suffix.lower() in MANIFEST_SUFFIXES:
        return manifest_source(s, **manifest_columns(args))
    return open_source(s)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "image_encoder": args.image_encoder, "text_encoder": args.text_encoder, "key_encoder": args.key_encoder,
        "batch_size": args.batch_size, "num_workers": args.workers, "commit_every": args.commit_every,
        "dedup": not args.no_dedup, "near_dup": args.near_dup, "require_caption": not args.allow_missing_captions,
        "device": args.device, "progress": not args.quiet,
    }
    classes = _classes(args.classes)
    if classes is not None:
        opts["class_names"] = classes
    if args.labels_from_captions:
        opts["caption_labels"] = True
        if args.caption_min_similarity is not None:
            opts["caption_min_similarity"] = args.caption_min_similarity
    elif args.caption_min_similarity is not None:
        raise ValueError("--caption-min-similarity is only used with --labels-from-captions")
    if args.class_synonyms is not None:
        opts["class_synonyms"] = _synonyms(args.class_synonyms)
    return opts


def _synonyms(value: str) -> dict[str, list[str]]:
    """``--class-synonyms``: a JSON object mapping class names to lists of other names or descriptions."""
    try:
        data = json.loads(Path(value).read_text())
    except FileNotFoundError:
        raise ValueError(f"--class-synonyms {value!r}: no such file") from None
    except ValueError as e:
        raise ValueError(f"--class-synonyms {value!r} is not JSON: {e}") from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v) for k, v in data.items()):
        raise ValueError(f"--class-synonyms {value!r}: expected a JSON object {{class name: [names, ...]}}")
    return data


def _report(summary: Any, as_json: bool) -> int:
    if as_json:
        print(json.dumps(summary.to_dict()))
    else:
        print(summary)
    if summary.total and summary.written == 0 and summary.skipped >= summary.total:
        print(f"error: every one of the {summary.total} samples was skipped as bad data; see {summary.report}",
              file=sys.stderr)
        return 1
    return 0


@guarded
def cmd_build(args: argparse.Namespace) -> int:
    from retrofit.ingest import build_kb

    source = _source(args)
    return _report(build_kb(source, args.kb, index=args.index, hnsw_storage=args.hnsw_storage, whiten=args.whiten,
                            ef_construction=args.ef_construction, **_options(args)), args.json)


@guarded
def cmd_add(args: argparse.Namespace) -> int:
    from retrofit.ingest import add_to_kb

    source = _source(args)
    return _report(add_to_kb(args.kb, source, again=args.again, **_options(args)), args.json)


@guarded
def cmd_merge(args: argparse.Namespace) -> int:
    from retrofit.ingest import merge_kbs

    return _report(merge_kbs(args.inputs, args.out, dedup=not args.no_dedup, progress=not args.quiet,
                             whiten=args.whiten), args.json)


def _common(p: argparse.ArgumentParser, add: bool = False) -> None:
    own = "the encoders the knowledge base was built with"  # kb add: None -> the specs recorded in the KB
    p.add_argument("--image-encoder", default=None if add else "darknet-tiny", metavar="SPEC",
                   help="timm:NAME[@W], torchvision:NAME[@W], open_clip:ARCH@TAG|PATH, darknet-tiny[@SIZE] "
                        f"(default: {own if add else 'darknet-tiny'})")
    p.add_argument("--text-encoder", default=None if add else "minilm", metavar="SPEC",
                   help="sentence-transformers:NAME_OR_PATH, minilm, open_clip:ARCH@TAG|PATH "
                        f"(default: {own if add else 'minilm'})")
    key_default = own if add else "the image encoder's vectors"
    p.add_argument("--key-encoder", default=None, metavar="SPEC",
                   help=f"separate encoder for the search keys (default: {key_default})")
    p.add_argument("--classes", default=None, metavar="FILE|A,B,...",
                   help="the classifier's class names (JSON list, one per line, or comma list); labels are "
                        "mapped onto them by name")
    p.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help="ImageFolder caption template with {} for the class name (repeatable)")
    manifest_column_args(p, caption=True)
    p.add_argument("--batch-size", type=at_least_one, default=256, help="images per encoder batch (default 256)")
    p.add_argument("--workers", type=nonnegative, default=1, help="DataLoader workers decoding images (default 1)")
    p.add_argument("--commit-every", type=at_least_one, default=4096,
                   help="commit once this many records are pending, at the end of the batch that reaches it "
                        "(so up to --batch-size - 1 more): the resume granularity (default %(default)s)")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicate images")
    p.add_argument("--near-dup", type=float, default=None, metavar="COS",
                   help="also drop records whose key has cosine >= COS with an earlier one")
    p.add_argument("--allow-missing-captions", action="store_true",
                   help="keep samples without a caption (zero text vector) instead of skipping them")
    p.add_argument("--labels-from-captions", action="store_true",
                   help="samples without a label get the class their caption names (zero-shot text similarity to "
                        "the --classes names; -1 when none is recognisable): web data without labels")
    p.add_argument("--class-synonyms", default=None, metavar="FILE",
                   help="with --labels-from-captions: JSON {class name: [other names]}, each read as 'a photo of a "
                        "{name}.'")
    p.add_argument("--caption-min-similarity", type=float, default=None, metavar="COS",
                   help="with --labels-from-captions: cosine a caption needs with a class text (default 0.5)")
    p.add_argument("--device", default="cpu", help="device for the encoders (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")


def register_kb(kb_sub: argparse._SubParsersAction) -> None:
    p = kb_sub.add_parser("build", help="build a knowledge base from webdataset shards, an ImageFolder or a manifest",
                          description="Build a knowledge base (resumable).", epilog=_EPILOG_BUILD,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="shards (.tar, brace patterns allowed), an ImageFolder directory, or a "
                                  ".csv/.tsv/.jsonl/.parquet manifest")
    p.add_argument("kb", help="knowledge-base directory to create (or resume)")
    p.add_argument("--index", default="auto", choices=["auto", "hnsw", "flat"],
                   help="search index: hnsw, flat (exact), auto (exact below a size threshold; default %(default)s)")
    p.add_argument("--hnsw-storage", default="fp16", choices=["fp16", "float32"],
                   help="how an HNSW index stores the keys (default %(default)s: half the file, faster, same recall)")
    p.add_argument("--whiten", type=float, default=0.0, metavar="SHRINKAGE",
                   help="search in the whitened key space with this shrinkage (0.1 is a good start; default 0 = "
                        "off): usually better neighbours from a backbone's embeddings")
    p.add_argument("--ef-construction", type=at_least_one, default=80, metavar="EF",
                   help="HNSW build beam width (default %(default)s; faiss's is 40, which builds ~1.8x faster and "
                        "searches ~2x slower at the same recall target: 1M records, docs/benchmarks.md)")
    _common(p)
    p.set_defaults(func=cmd_build)

    p = kb_sub.add_parser("add", help="append a source to an existing knowledge base (with its own encoders)",
                          description="Append to a knowledge base; the index grows incrementally (resumable). "
                                      "Examples: retrofit kb add kb/cifar web.jsonl --classes classes.txt; "
                                      "retrofit kb add kb/cifar 'more-{000000..000003}.tar'")
    p.add_argument("kb", help="existing knowledge-base directory")
    p.add_argument("source", help="shards, an ImageFolder directory, or a manifest")
    p.add_argument("--again", action="store_true",
                   help="read a source added before anew and add what the KB lacks (records deleted since); "
                        "images still in it are skipped as duplicates")
    _common(p, add=True)
    p.set_defaults(func=cmd_add)

    p = kb_sub.add_parser("merge", help="combine knowledge bases built with the same encoders into a new one",
                          description="Merge knowledge bases; refuses different encoder fingerprints or class "
                                      "lists. Example: retrofit kb merge kb/cifar kb/web -o kb/both")
    p.add_argument("inputs", nargs="+", help="knowledge bases to merge, in order")
    p.add_argument("-o", "--out", required=True, help="new knowledge-base directory")
    p.add_argument("--no-dedup", action="store_true", help="keep records whose image is already merged")
    p.add_argument("--whiten", type=float, default=None, metavar="SHRINKAGE",
                   help="key whitening of the new index (0 = off, e.g. 0.1; fitted on the merged keys; default: the "
                        "first input's), instead of `retrofit kb compact --whiten` afterwards")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.set_defaults(func=cmd_merge)
