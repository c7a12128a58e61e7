"""``retrofit eval``, ``retrofit predict``: measure a trained head against its host, classify images with it
(``retrofit calibrate``, which chooses its label-vote weight on validation data, is in
:mod:`retrofit.commands.calibrate`).

All three load what ``retrofit train`` wrote (``--run DIR``: model, head, knowledge base, classes, host
classifier), or take each piece explicitly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from retrofit.commands import at_least_one, guarded, manifest_column_args
from retrofit.commands.run_inputs import RUN_FILE, _check_kb, _labels, _open_kb, _runtime, _source, data_path

_EPILOG_EVAL = """examples:
  retrofit eval --run runs/c10 --data cifar10/test-000000.tar
  retrofit eval --run runs/c10 --data test/ --cutoffs 1000,200 --out runs/c10/eval-test --json

Writes eval.json, eval.md (host and retrofitted, each also with post-hoc logit adjustment) and
per_class.png (host vs retrofitted).
"""
_EPILOG_PREDICT = """examples:
  retrofit predict cat.jpg dog.png --run runs/c10
  retrofit predict photos/*.jpg --run runs/c10 --workers 2 --json   # a missing or unreadable file: an error record
  retrofit predict photo.jpg --model darknet-tiny --head runs/c10/head --kb kb/cifar \\
      --host-classifier runs/c10/host_probe.safetensors --explain --json   # each piece given (--host probe runs)
"""


def _warn_if_unfinished(run_dir: Path) -> None:
    """RUN/head holds the latest weights, also of a run stopped by Ctrl-C: say so when it did not finish."""
    try:
        st = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())
        done, planned, step = int(st["epoch"]), int(st["config"]["epochs"]), int(st.get("step") or 0)
    except (OSError, ValueError, KeyError, TypeError):  # no checkpoint (an older run) or unreadable: nothing to say
        return
    if done < planned:
        # (a checkpoint within an epoch: ``epoch`` epochs done, ``step`` steps into the next)
        where = f"in epoch {done + 1} (step {step})" if step else f"after {done}"
        print(f"warning: the training run {run_dir} stopped {where} of {planned} epochs (interrupted): its head "
              f"is partly trained; `retrofit train ... --out {run_dir} --resume` finishes it", file=sys.stderr)


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    """--run DIR supplies model / head / kb / classes / host classifier unless given explicitly."""
    run: dict[str, Any] = {}
    if args.run:
        f = Path(args.run) / RUN_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: --run must be an output directory of `retrofit train`")
        run = json.loads(f.read_text())
        run["head_path"] = str(Path(args.run) / "head")
        if not args.head:
            _warn_if_unfinished(Path(args.run))
        for name in ("host_classifier.safetensors", "host_probe.safetensors"):
            if run.get("host") != "none" and (Path(args.run) / name).is_file():
                run["host_file"] = str(Path(args.run) / name)
                break
    run["run_kb"] = run.get("kb")  # the training run's own KB, before --kb replaces it
    for key, val in (("model", args.model), ("head_path", args.head), ("kb", args.kb)):
        if val:
            run[key] = val
        if not run.get(key):
            raise ValueError(f"--{key.split('_')[0]} is required (or --run DIR of a `retrofit train` output)")
    if getattr(args, "host_classifier", None):
        run["host_file"] = args.host_classifier
    return run


def _load_head(path: str, kb: Any, allow_mismatch: bool, vote_scale: float | None = None) -> Any:
    from retrofit.head import RetrievalHead

    if not Path(path).is_dir():
        raise FileNotFoundError(f"head {path!r} not found; train one with `retrofit train ... --out DIR` "
                                "(the head is DIR/head)")
    head = RetrievalHead.load(path, store=kb, allow_fingerprint_mismatch=allow_mismatch)
    if vote_scale is not None:
        if head.vote is None:
            raise ValueError(f"--vote-scale {vote_scale:g}: the head {path} has no label vote "
                             "(train it with `retrofit train ... --label-vote`)")
        head.vote.set_scale(vote_scale)
    return head


def _head_inputs(run: dict[str, Any], head: Any, fs: Any) -> Any:
    """The host classifier to apply to z (a probe / jointly trained layer), or None to keep fs.host_logits."""
    from retrofit.errors import RetrofitError
    from retrofit.train_checkpoint import load_linear

    C = head.config.num_classes
    if run.get("host") == "none":
        fs.host_logits = None
        return None
    if run.get("host_file"):
        return load_linear(run["host_file"])
    if fs.host_logits is not None and fs.host_logits.shape[1] != C:
        raise RetrofitError(f"class-count mismatch: the model gives {fs.host_logits.shape[1]} logits but the head has "
                            f"{C} classes; pass --host-classifier FILE (host_probe.safetensors of the training run)")
    return None


@guarded(also=(TypeError,))
def cmd_eval(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from retrofit import __version__
    from retrofit.evaluation import evaluate, logit_adjust, markdown_table, save_results
    from retrofit.plots import plot_per_class_accuracy
    from retrofit.prediction import _device
    from retrofit.training import predict_logits

    hi, lo = _cutoffs(args.cutoffs)  # before any work
    run = _resolve(args)
    if run.get("train_counts") is None:  # the Many / Medium / Few groups need them: said before any work
        raise ValueError("eval needs the training class counts from the run (run.json): give --run DIR of the "
                         "training run (--model / --head / --kb override its parts)")
    _device(args.device)
    kb = _open_kb(run["kb"])
    head = _load_head(run["head_path"], kb, args.allow_fingerprint_mismatch, args.vote_scale)
    fs = _labelled_features(args, run, kb, head, "evaluation", "eval", exclude_self=not args.keep_self)
    host_clf = _head_inputs(run, head, fs)
    pred = predict_logits(head, fs, kb, host_classifier=host_clf, device=args.device)
    counts = run["train_counts"]
    kw = dict(train_counts=counts, cutoffs=(hi, lo), class_names=head.config.class_names or run.get("classes"))
    results = {}
    if "host_logits" in pred:
        results["host"] = evaluate(pred["host_logits"], fs.labels, **kw)
        results["host + logit adj."] = evaluate(logit_adjust(pred["host_logits"], counts), fs.labels, **kw)
    results["retrofitted"] = evaluate(pred["logits"], fs.labels, **kw)
    results["retrofitted + logit adj."] = evaluate(logit_adjust(pred["logits"], counts), fs.labels, **kw)
    other_kb = args.kb and Path(args.kb).resolve() != Path(run.get("run_kb") or "").resolve()
    default = f"eval-{Path(args.kb).resolve().name}" if other_kb else "eval"  # another KB swapped in: own folder
    out = Path(args.out or (Path(args.run) / default if args.run else default))
    if not args.out and (out / "eval.json").is_file():
        print(f"note: replacing the results of an earlier eval in {out} (--out DIR keeps both)", file=sys.stderr)
    meta = {"data": str(args.data), "model": run["model"], "head": str(run["head_path"]), "kb": str(run["kb"]),
            "vote_scale": float(head.vote.scale) if getattr(head, "vote", None) is not None else None,
            "keep_self": bool(args.keep_self), "cutoffs": [hi, lo], "samples": len(fs.labels),
            "retrofit": __version__, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    save_results(results, out / "eval.json", out / "eval.md", meta=meta)
    plot_per_class_accuracy({n: r for n, r in results.items() if "logit adj." not in n}, out / "per_class.png")
    print(json.dumps({n: {k: r[k] for k in ("top1", "top5", "many", "medium", "few", "nll", "ece")}
                      for n, r in results.items()}) if args.json else markdown_table(results))
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'per_class.png'}", file=sys.stderr)
    return 0


def _labelled_features(args: argparse.Namespace, run: dict[str, Any], kb: Any, head: Any, what: str, name: str,
                       exclude_self: bool = True) -> Any:
    """Features of ``--data`` (labels required) with the head's k neighbours from ``kb``; cached under RUN/cache
    (or --cache-dir) in an entry of their own per data set."""
    from retrofit.pipeline import load_host_model, source_features
    from retrofit.prediction import _device

    host = load_host_model(run["model"], _device(args.device))
    if args.model:  # another host than the run's (whose check, or allowance, was made by `retrofit train`)
        _check_kb(host, kb, args.allow_fingerprint_mismatch)
    classes = head.config.class_names or run.get("classes")
    src = _source(args.data, args)
    labels, _ = _labels(src, classes, f"{what} data", required=True)
    cache = None if args.no_cache else (args.cache_dir or (str(Path(args.run) / "cache") if args.run else None))
    return source_features(host, src, labels, kb=kb, k=head.config.k, cache_dir=cache,
                           name=_cache_name(name, args.data), exclude_self=exclude_self,
                           batch_size=args.feature_batch, workers=args.workers, progress=not args.quiet)


def _cutoffs(value: str) -> tuple[int, int]:
    """``--cutoffs MANY,FEW``: two integers, MANY >= FEW."""
    try:
        hi, lo = (int(x) for x in value.split(","))
    except ValueError:
        raise ValueError(f"--cutoffs {value!r}: expected two integers MANY,FEW (many > MANY, few < FEW training "
                         "images per class), e.g. 100,20") from None
    if hi < lo:
        raise ValueError(f"--cutoffs {value!r}: MANY ({hi}) must be >= FEW ({lo})")
    return hi, lo


def _cache_name(what: str, data: str) -> str:
    """Feature-cache entry name per data set: one entry per name is kept, so each data set gets its own."""
    import hashlib

    return f"{what}-{hashlib.sha1(data_path(data).encode()).hexdigest()[:10]}"


@guarded(also=(TypeError,))
def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from retrofit.feature_cache import FeatureSet
    from retrofit.pipeline import load_host_model
    from retrofit.prediction import _device
    from retrofit.training import predict_logits

    run = _resolve(args)
    folders = [p for p in args.images if Path(p).is_dir()]
    if folders:
        raise ValueError(f"{folders} are folders; give image files (e.g. {folders[0]}/*.jpg); to score a labelled "
                         "folder, `retrofit eval --data FOLDER`")
    missing = [p for p in args.images if not Path(p).is_file()]
    if len(missing) == len(args.images):  # nothing to predict: said before the model loads
        raise FileNotFoundError(f"image file(s) not found: {missing[:10]}")
    kb = _open_kb(run["kb"])
    head = _load_head(run["head_path"], kb, args.allow_fingerprint_mismatch, args.vote_scale)
    host = load_host_model(run["model"], _device(args.device))
    if args.model:
        _check_kb(host, kb, args.allow_fingerprint_mismatch)
    from tqdm.auto import tqdm

    from retrofit.pipeline import image_batches
    from retrofit.sources import SampleRef, Source

    # decoded as training and eval decode (in --workers processes); a file that is missing or unreadable is an
    # "error" record, and the others are still predicted
    src = Source("files", "command line", [SampleRef(key=p, image=p, caption=None, label=None) for p in args.images])
    zs, ls, read, failed = [], [], [], {}
    bar = tqdm(total=len(args.images), desc="predict", unit="img", disable=args.quiet or len(args.images) < 64,
               leave=False)
    for batch in image_batches(src, host.preprocess, batch_size=args.feature_batch, workers=args.workers):
        bar.update(len(batch["index"]))
        for i, err in zip(batch["index"], batch["error"]):
            if err is not None:
                path = args.images[i]
                failed[path] = f"cannot read image {path!r}: {err}" if Path(path).is_file() else \
                    f"image file not found: {path!r}"
                print(f"error: {failed[path]}", file=sys.stderr)
        if not batch["ok"]:
            continue
        read += [args.images[batch["index"][n]] for n in batch["ok"]]
        z, logits = host.featurize(batch["images"])
        zs.append(z.float().cpu())
        ls.append(logits.float().cpu() if logits is not None else None)
    bar.close()
    if not read:
        raise ValueError(f"no image could be read ({len(failed)} given); see the errors above")
    fs = FeatureSet(z=torch.cat(zs), labels=torch.full((len(read),), -1),
                    host_logits=torch.cat(ls) if ls[0] is not None else None)
    host_clf = _head_inputs(run, head, fs)
    pred = predict_logits(head, fs, kb, host_classifier=host_clf, return_attention=args.explain, device=args.device)
    names = head.config.class_names or [str(c) for c in range(head.config.num_classes)]
    kb_names = kb.class_names or names  # a KB's labels index its own class list (a vote-less head may differ)
    probs = pred["logits"].softmax(-1)
    top = probs.topk(min(args.top, probs.shape[1]), dim=1)
    out = []
    for i, path in enumerate(read):
        rec: dict[str, Any] = {"image": path, "top": [{"class": names[c], "index": int(c), "prob": float(p)}
                                                     for p, c in zip(top.values[i].tolist(), top.indices[i].tolist())]}
        if args.explain:
            ids = pred["neighbor_ids"][i]
            att = pred.get("attention", torch.zeros(len(ids)))[i]
            ok = ids >= 0
            recs = kb.get(ids[ok]) if ok.any() else []
            sims = (torch.nn.functional.normalize(fs.z[i:i + 1], dim=1) @ kb.vectors(ids[ok], which="key").T)[0] \
                if ok.any() else torch.zeros(0)
            nb = [{"id": r["id"], "label": kb_names[r["label"]] if 0 <= r["label"] < len(kb_names) else None,
                   "caption": r["caption"], "similarity": round(float(s), 4), "attention": round(float(a), 4)}
                  for r, s, a in zip(recs, sims.tolist(), att[ok].tolist())]
            rec["neighbors"] = sorted(nb, key=lambda d: -d["attention"])
        out.append(rec)
    if failed:  # in the order given, each unreadable image with its error
        done = {r["image"]: r for r in out}
        out = [done[p] if p in done else {"image": p, "error": failed[p]} for p in args.images]
    status = 1 if failed else 0  # partial results: printed, and the exit status says that some failed
    if args.json:
        print(json.dumps(out, indent=1))
        return status
    for rec in out:
        print(rec["image"])
        if "error" in rec:
            print(f"  error: {rec['error']}")
            continue
        for t in rec["top"]:
            print(f"  {t['prob']:7.2%}  {t['class']}")
        if args.explain:
            print(f"  {'id':>8} {'attention':>9} {'sim':>6}  {'label':<14} caption")
            for n in rec["neighbors"][:args.explain_top]:
                print(f"  {n['id']:>8} {n['attention']:>9.4f} {n['similarity']:>6.3f}  {str(n['label']):<14} "
                      f"{(n['caption'] or '')[:70]}")
    return status


def _load_args(p: argparse.ArgumentParser, vote_scale: bool = True, run_required: bool = False) -> None:
    if run_required:  # eval: the run's training class counts define Many / Medium / Few
        p.add_argument("--run", required=True, metavar="DIR",
                       help="output directory of `retrofit train` (sets the rest; required: its run.json holds the "
                            "training class counts that define Many / Medium / Few)")
    else:
        p.add_argument("--run", default=None, metavar="DIR",
                       help="output directory of `retrofit train` (sets the rest)")
    p.add_argument("--model", default=None, metavar="SPEC", help="host model (default: the run's)")
    p.add_argument("--head", default=None, metavar="DIR", help="saved head (default: RUN/head)")
    p.add_argument("--kb", default=None, metavar="DIR", help="knowledge base (default: the run's)")
    p.add_argument("--host-classifier", default=None, metavar="FILE",
                   help="linear host classifier (.safetensors) for models whose classes differ from the head's")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="accept a KB whose vectors come from other encoders than the head was trained with")
    if not vote_scale:
        return
    p.add_argument("--vote-scale", type=float, default=None, metavar="S",
                   help="multiply the head's learned label-vote weight by S (heads trained with --label-vote; "
                        "--vote-form mix: the odds of its mixing weight), e.g. after swapping in a denser KB with "
                        "--kb; `retrofit calibrate` picks S on validation data")


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("eval", help="long-tail metrics (many/medium/few, NLL, ECE), table and per-class plot",
                       description="Evaluate a trained head against its host on labelled data.",
                       epilog=_EPILOG_EVAL, formatter_class=fmt)
    p.add_argument("--data", required=True, metavar="SOURCE", help="labelled evaluation data")
    manifest_column_args(p)
    _load_args(p, run_required=True)
    p.add_argument("--cutoffs", default="100,20", metavar="MANY,FEW",
                   help="many > MANY, few < FEW training images per class (default 100,20: ImageNet-LT)")
    p.add_argument("--out", default=None, metavar="DIR", help="where eval.json / eval.md / per_class.png go")
    p.add_argument("--keep-self", action="store_true", help="let an image retrieve its own KB entry")
    p.add_argument("--no-cache", action="store_true", help="do not cache the evaluation features")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="feature cache (default RUN/cache)")
    _runtime(p)
    p.set_defaults(func=cmd_eval)

    from retrofit.commands.calibrate import register_calibrate  # (it imports this module's helpers)

    register_calibrate(sub)  # between eval and predict, as listed in `retrofit --help`

    p = sub.add_parser("predict", help="top-k classes of images, with --explain: the neighbours behind them",
                       description="Classify image files with a retrofitted model.",
                       epilog=_EPILOG_PREDICT, formatter_class=fmt)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    _load_args(p)
    p.add_argument("--top", type=at_least_one, default=5, help="classes to show (default 5)")
    p.add_argument("--explain", action="store_true",
                   help="show the neighbours (id, caption, label, similarity, attention weight)")
    p.add_argument("--explain-top", type=at_least_one, default=8,
                   help="neighbours shown per image in the table (default 8)")
    _runtime(p)
    p.set_defaults(func=cmd_predict)
