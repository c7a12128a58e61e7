"""``retrofit train``, ``retrofit eval``, ``retrofit predict``: fit a retrieval head, measure it, use it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # what `retrofit train` records in its output directory for eval / predict

_EPILOG_TRAIN = """examples:
  retrofit train --model darknet-tiny --data 'cifar10/train-{000000..000004}.tar' --kb kb/cifar --out runs/c10
  retrofit train --model timm:resnet50@ckpt.pth --data train/ --val val/ --kb kb/web --out runs/r50 --loss lace
  retrofit train ... --resume          # continue from runs/c10/checkpoints/last (also after Ctrl-C)

The host's embeddings, logits and neighbour ids are computed once and cached (--cache-dir); a changed
model, data set or knowledge base invalidates the cache. --host probe fits a linear host classifier on the
embeddings (cross-fitted logits for the training set) when the model's own classes are not the data's.
"""
_EPILOG_EVAL = """examples:
  retrofit eval --run runs/c10 --data cifar10/test-000000.tar
  retrofit eval --run runs/c10 --data test/ --cutoffs 1000,200 --out runs/c10/eval-test --json

Writes eval.json, eval.md (host and retrofitted, each also with post-hoc logit adjustment) and
per_class.png (host vs retrofitted).
"""
_EPILOG_PREDICT = """examples:
  retrofit predict cat.jpg dog.png --run runs/c10
  retrofit predict photo.jpg --model darknet-tiny --head runs/c10/head --kb kb/cifar --explain --json
"""


def _guarded(fn):
    def run(args: argparse.Namespace) -> int:
        from retrofit.errors import RetrofitError

        try:
            return fn(args)
        except (RetrofitError, ValueError, FileNotFoundError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run


def _open_kb(path: str) -> Any:
    from retrofit.knowledge_base import KnowledgeBase

    if not Path(path).is_dir():
        raise FileNotFoundError(f"knowledge base {path!r} not found; build one with `retrofit kb build SOURCE {path}`")
    return KnowledgeBase.open(path)


def _source(spec: str) -> Any:
    from retrofit.sources import open_source

    s = str(spec)
    if not any(c in s for c in "{*") and not Path(s).exists():
        raise FileNotFoundError(f"data {s!r} not found; give webdataset shards (.tar, brace patterns allowed), an "
                                "ImageFolder directory or a .csv/.jsonl/.parquet manifest")
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


def _host_mode(mode: str, host: Any, num_classes: int) -> str:
    if mode == "auto":
        return "model" if host.num_classes == num_classes else "probe"
    if mode == "model" and host.num_classes != num_classes:
        from retrofit.errors import RetrofitError

        raise RetrofitError(f"class-count mismatch: model {host.spec!r} predicts {host.num_classes} classes but the "
                            f"data has {num_classes}; use --host probe (a linear host classifier fitted on the "
                            "embeddings) or a model trained on these classes")
    return mode


def _model_linear(host: Any, dim: int) -> Any:
    import copy

    from torch import nn

    from retrofit.errors import RetrofitError

    mods = host.adapter.classifier_modules()
    if len(mods) == 1 and isinstance(mods[0], nn.Linear) and mods[0].in_features == dim:
        return copy.deepcopy(mods[0]).float().cpu()
    raise RetrofitError(f"--train-host needs a linear classifier on the {dim}-d embedding, but {host.spec!r} has "
                        f"{[type(m).__name__ for m in mods]}; use --host probe")


@_guarded
def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from retrofit.commands.kb_build import _classes
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.linear_probe import cross_fit_logits, fit_linear_probe
    from retrofit.noise import add_label_noise
    from retrofit.pipeline import load_host_model, source_features
    from retrofit.train_checkpoint import save_linear
    from retrofit.training import TrainConfig, train

    out = Path(args.out)
    kb = _open_kb(args.kb)
    src = _source(args.data)
    host = load_host_model(args.model)
    _check_kb(host, kb, args.allow_fingerprint_mismatch)
    classes = _classes(args.classes) or kb.class_names or src.class_names
    labels, classes = _labels(src, classes, "training data", required=True)
    C = len(classes)
    mode = _host_mode(args.host, host, C)
    cache = None if args.no_cache else (args.cache_dir or str(out / "cache"))
    common = dict(kb=kb, k=args.k, cache_dir=cache, batch_size=args.feature_batch, workers=args.workers,
                  progress=not args.quiet)
    fs = source_features(host, src, labels, name="train", live=args.no_cache, **common)
    val = None
    if args.val:
        vsrc = _source(args.val)
        vlabels, _ = _labels(vsrc, classes, "validation data", required=True)
        val = source_features(host, vsrc, vlabels, name="val", **{**common, "cache_dir": cache})
    if args.noise:
        fs.labels, flipped = add_label_noise(fs.labels, args.noise, args.noise_rate, C, seed=args.seed)
        print(f"label noise: {args.noise} at {args.noise_rate:.0%}: {int(flipped.sum())} labels flipped")
    host_clf = None
    out.mkdir(parents=True, exist_ok=True)
    if mode == "probe":
        probe = fit_linear_probe(fs.z, fs.labels, C, seed=args.seed, weight_decay=args.probe_wd)
        save_linear(out / "host_probe.safetensors", probe)
        fs.host_logits = (cross_fit_logits(fs.z, fs.labels, C, folds=args.cross_fit, seed=args.seed,
                                           weight_decay=args.probe_wd)
                          if args.cross_fit >= 2 else probe(fs.z).detach())
        if val is not None:
            val.host_logits = probe(val.z).detach()
        host_clf = probe
    elif mode == "none":
        fs.host_logits = None
        if val is not None:
            val.host_logits = None
    elif args.train_host:
        host_clf = _model_linear(host, fs.z.shape[1])
    fp = kb.fingerprint
    cfg = HeadConfig(query_dim=fs.z.shape[1], image_dim=kb.image_dim, text_dim=kb.text_dim, num_classes=C,
                     dim=args.dim, depth=args.depth, heads=args.heads, k=args.k, dropout=args.dropout,
                     modalities=args.modalities, class_names=classes, query_fingerprint=fp.key,
                     image_fingerprint=fp.image, text_fingerprint=fp.text)
    torch.manual_seed(args.seed)
    head = RetrievalHead(cfg)
    tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                       weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, mixup_alpha=args.mixup,
                       loss=args.loss, tau_la=args.tau_la, train_host=args.train_host and host_clf is not None,
                       k=args.k, seed=args.seed, device=args.device, amp=not args.no_amp, progress=not args.quiet)
    run = {"model": args.model, "kb": str(Path(args.kb).resolve()), "data": args.data, "val": args.val,
           "classes": classes, "host": mode, "train_host": tcfg.train_host, "k": args.k,
           "train_counts": torch.bincount(fs.labels, minlength=C).tolist(), "config": tcfg.to_dict()}
    (out / RUN_FILE).write_text(json.dumps(run, indent=1))
    res = train(head, fs, tcfg, store=kb, val_features=val, host_classifier=host_clf if tcfg.train_host else None,
                out_dir=out, resume=args.resume)
    last = res.history[-1] if res.history else {}
    summary = {"epochs": len(res.history), "train_loss": last.get("train_loss"), "val_top1": last.get("val_top1"),
               "head": str(out / "head"), "samples": len(fs), "host": mode}
    print(json.dumps(summary) if args.json else "\n".join(f"{k:<11} {v}" for k, v in summary.items()))
    return 0


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    """--run DIR supplies model / head / kb / classes / host classifier unless given explicitly."""
    run: dict[str, Any] = {}
    if args.run:
        f = Path(args.run) / RUN_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: --run must be an output directory of `retrofit train`")
        run = json.loads(f.read_text())
        run["head_path"] = str(Path(args.run) / "head")
        for name in ("host_classifier.safetensors", "host_probe.safetensors"):
            if run.get("host") != "none" and (Path(args.run) / name).is_file():
                run["host_file"] = str(Path(args.run) / name)
                break
    for key, val in (("model", args.model), ("head_path", args.head), ("kb", args.kb)):
        if val:
            run[key] = val
        if not run.get(key):
            raise ValueError(f"--{key.split('_')[0]} is required (or --run DIR of a `retrofit train` output)")
    if getattr(args, "host_classifier", None):
        run["host_file"] = args.host_classifier
    return run


def _load_head(path: str, kb: Any) -> Any:
    from retrofit.head import RetrievalHead

    if not Path(path).is_dir():
        raise FileNotFoundError(f"head {path!r} not found; train one with `retrofit train ... --out DIR` "
                                "(the head is DIR/head)")
    return RetrievalHead.load(path, store=kb)


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


@_guarded
def cmd_eval(args: argparse.Namespace) -> int:
    from retrofit.evaluation import evaluate, logit_adjust, markdown_table, save_results
    from retrofit.pipeline import load_host_model, source_features
    from retrofit.plots import plot_per_class_accuracy
    from retrofit.training import predict_logits

    run = _resolve(args)
    kb = _open_kb(run["kb"])
    head = _load_head(run["head_path"], kb)
    host = load_host_model(run["model"])
    classes = head.config.class_names or run.get("classes")
    src = _source(args.data)
    labels, _ = _labels(src, classes, "evaluation data", required=True)
    cache = None if args.no_cache else (args.cache_dir or (str(Path(args.run) / "cache") if args.run else None))
    fs = source_features(host, src, labels, kb=kb, k=head.config.k, cache_dir=cache, name="eval",
                         exclude_self=not args.keep_self, batch_size=args.feature_batch, workers=args.workers,
                         progress=not args.quiet)
    host_clf = _head_inputs(run, head, fs)
    pred = predict_logits(head, fs, kb, host_classifier=host_clf, device=args.device)
    counts = run.get("train_counts")
    if counts is None:
        raise ValueError("training class counts unknown (no run.json): give --run DIR of the training run")
    hi, lo = (int(x) for x in args.cutoffs.split(","))
    kw = dict(train_counts=counts, cutoffs=(hi, lo), class_names=classes)
    results = {}
    if "host_logits" in pred:
        results["host"] = evaluate(pred["host_logits"], fs.labels, **kw)
        results["host + logit adj."] = evaluate(logit_adjust(pred["host_logits"], counts), fs.labels, **kw)
    results["retrofitted"] = evaluate(pred["logits"], fs.labels, **kw)
    results["retrofitted + logit adj."] = evaluate(logit_adjust(pred["logits"], counts), fs.labels, **kw)
    out = Path(args.out or (Path(args.run) / "eval" if args.run else "eval"))
    save_results(results, out / "eval.json", out / "eval.md")
    plot_per_class_accuracy({n: r for n, r in results.items() if "logit adj." not in n}, out / "per_class.png")
    print(json.dumps({n: {k: r[k] for k in ("top1", "top5", "many", "medium", "few", "nll", "ece")}
                      for n, r in results.items()}) if args.json else markdown_table(results))
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'per_class.png'}", file=sys.stderr)
    return 0


@_guarded
def cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from retrofit.feature_cache import FeatureSet
    from retrofit.pipeline import load_host_model
    from retrofit.training import predict_logits

    run = _resolve(args)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {missing}")
    kb = _open_kb(run["kb"])
    head = _load_head(run["head_path"], kb)
    host = load_host_model(run["model"])
    images = []
    for p in args.images:
        try:
            with Image.open(p) as im:
                images.append(host.preprocess(im.convert("RGB")))
        except Exception as e:
            raise ValueError(f"cannot read image {p!r}: {e}") from e
    z, logits = host.featurize(torch.stack(images))
    fs = FeatureSet(z=z.float().cpu(), labels=torch.full((len(images),), -1),
                    host_logits=logits.float().cpu() if logits is not None else None)
    host_clf = _head_inputs(run, head, fs)
    pred = predict_logits(head, fs, kb, host_classifier=host_clf, return_attention=args.explain, device=args.device)
    names = head.config.class_names or [str(c) for c in range(head.config.num_classes)]
    probs = pred["logits"].softmax(-1)
    top = probs.topk(min(args.top, probs.shape[1]), dim=1)
    out = []
    for i, path in enumerate(args.images):
        rec: dict[str, Any] = {"image": path, "top": [{"class": names[c], "index": int(c), "prob": float(p)}
                                                     for p, c in zip(top.values[i].tolist(), top.indices[i].tolist())]}
        if args.explain:
            ids = pred["neighbor_ids"][i]
            att = pred.get("attention", torch.zeros(len(ids)))[i]
            ok = ids >= 0
            recs = kb.get(ids[ok]) if ok.any() else []
            sims = (torch.nn.functional.normalize(fs.z[i:i + 1], dim=1) @ kb.vectors(ids[ok], which="key").T)[0] \
                if ok.any() else torch.zeros(0)
            nb = [{"id": r["id"], "label": names[r["label"]] if 0 <= r["label"] < len(names) else None,
                   "caption": r["caption"], "similarity": round(float(s), 4), "attention": round(float(a), 4)}
                  for r, s, a in zip(recs, sims.tolist(), att[ok].tolist())]
            rec["neighbors"] = sorted(nb, key=lambda d: -d["attention"])
        out.append(rec)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for rec in out:
        print(rec["image"])
        for t in rec["top"]:
            print(f"  {t['prob']:7.2%}  {t['class']}")
        if args.explain:
            print(f"  {'id':>8} {'attention':>9} {'sim':>6}  {'label':<14} caption")
            for n in rec["neighbors"][:args.explain_top]:
                print(f"  {n['id']:>8} {n['attention']:>9.4f} {n['similarity']:>6.3f}  {str(n['label']):<14} "
                      f"{(n['caption'] or '')[:70]}")
    return 0


def _runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 (default auto)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images (default 0)")
    p.add_argument("--feature-batch", type=int, default=256, help="images per backbone batch (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None, metavar="DIR", help="output directory of `retrofit train` (sets the rest)")
    p.add_argument("--model", default=None, metavar="SPEC", help="host model (default: the run's)")
    p.add_argument("--head", default=None, metavar="DIR", help="saved head (default: RUN/head)")
    p.add_argument("--kb", default=None, metavar="DIR", help="knowledge base (default: the run's)")
    p.add_argument("--host-classifier", default=None, metavar="FILE",
                   help="linear host classifier (.safetensors) for models whose classes differ from the head's")


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="train a retrieval head on a frozen classifier (head only)",
                       description="Train a RetrievalHead on a frozen host classifier and a knowledge base.",
                       epilog=_EPILOG_TRAIN, formatter_class=fmt)
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="timm:NAME[@CKPT], torchvision:NAME[@CKPT], darknet-tiny[@SIZE] or module:function")
    p.add_argument("--data", required=True, metavar="SOURCE", help="training data: shards, ImageFolder or manifest")
    p.add_argument("--val", default=None, metavar="SOURCE", help="validation data, evaluated after every epoch")
    p.add_argument("--kb", required=True, metavar="DIR", help="knowledge base (retrofit kb build)")
    p.add_argument("--out", required=True, metavar="DIR", help="output: head/, checkpoints/, train_log.jsonl")
    p.add_argument("--classes", default=None, metavar="FILE|A,B,...", help="class names (default: KB's / data's)")
    p.add_argument("--host", default="auto", choices=["auto", "model", "probe", "none"],
                   help="host logits: the model's own classifier, a linear probe on the embeddings, or none "
                        "(auto: the model's when its classes match)")
    p.add_argument("--cross-fit", type=int, default=5, metavar="K",
                   help="probe logits of training samples from K-fold cross-fitting (default 5; 0 = in-sample)")
    p.add_argument("--probe-wd", type=float, default=1e-3,
                   help="L2 weight decay of the linear host probe (default 1e-3; larger for small data sets)")
    p.add_argument("--train-host", action="store_true", help="also train the host classifier layer jointly")
    g = p.add_argument_group("hyper-parameters (RetFormer defaults)")
    g.add_argument("--epochs", type=int, default=25)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--mixup", type=float, default=0.2, metavar="ALPHA", help="mixup Beta(alpha, alpha); 0 = off")
    g.add_argument("--loss", default="ce", choices=["ce", "lace"], help="CE or logit-adjusted CE")
    g.add_argument("--tau-la", type=float, default=1.0, help="logit-adjustment strength for --loss lace")
    g.add_argument("--k", type=int, default=32, help="neighbours per image")
    g.add_argument("--dim", type=int, default=512)
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--modalities", default="image+text", choices=["image+text", "image", "text"])
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default=None, choices=["symmetric", "asymmetric"], help="add label noise (experiments)")
    p.add_argument("--noise-rate", type=float, default=0.2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last")
    p.add_argument("--no-cache", action="store_true", help="no feature cache; neighbours retrieved live each step")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="feature cache (default OUT/cache)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="accept a KB whose keys come from another encoder than the model")
    _runtime(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="long-tail metrics (many/medium/few, NLL, ECE), table and per-class plot",
                       description="Evaluate a trained head against its host on labelled data.",
                       epilog=_EPILOG_EVAL, formatter_class=fmt)
    p.add_argument("--data", required=True, metavar="SOURCE", help="labelled evaluation data")
    _load_args(p)
    p.add_argument("--cutoffs", default="100,20", metavar="MANY,FEW",
                   help="many > MANY, few < FEW training images per class (default 100,20: ImageNet-LT)")
    p.add_argument("--out", default=None, metavar="DIR", help="where eval.json / eval.md / per_class.png go")
    p.add_argument("--keep-self", action="store_true", help="let an image retrieve its own KB entry")
    p.add_argument("--no-cache", action="store_true", help="do not cache the evaluation features")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="feature cache (default RUN/cache)")
    _runtime(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of images, with --explain: the neighbours behind them",
                       description="Classify image files with a retrofitted model.",
                       epilog=_EPILOG_PREDICT, formatter_class=fmt)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _load_args(p)
    p.add_argument("--top", type=int, default=5, help="classes to show (default 5)")
    p.add_argument("--explain", action="store_true",
                   help="show the neighbours (id, caption, label, similarity, attention weight)")
    p.add_argument("--explain-top", type=int, default=8, help="neighbours shown per image in the table (default 8)")
    _runtime(p)
    p.set_defaults(func=cmd_predict)
