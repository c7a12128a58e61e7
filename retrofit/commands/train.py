"""``retrofit train``: fit a retrieval head on a frozen host classifier and a knowledge base.

The inputs it shares with the commands that use a trained head (opening the KB and the data, label mapping,
the runtime options) are in :mod:`retrofit.commands.run_inputs`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from retrofit.commands import at_least_one, guarded, manifest_column_args
from retrofit.commands.run_inputs import RUN_FILE, _check_kb, _labels, _open_kb, _runtime, _source, data_path
from retrofit.train_checkpoint import RESUME_FREE

_EPILOG_TRAIN = """examples:
  retrofit train --model darknet-tiny --data 'cifar10/train-{000000..000004}.tar' --kb kb/cifar --out runs/c10
  retrofit train --model timm:resnet50@ckpt.pth --data train/ --val val/ --kb kb/web --out runs/r50 --loss lace
  retrofit train ... --resume          # continue from runs/c10/checkpoints/last (also after Ctrl-C)
  retrofit train ... --loss lace --label-vote --vote-form mix   # the CIFAR-10-LT demo's kind of head

The host's embeddings, logits and neighbour ids are computed once and cached (--cache-dir); a changed
model, data set or knowledge base invalidates the cache. --host probe fits a linear host classifier on the
embeddings (cross-fitted logits for the training set) when the model's own classes are not the data's.
"""


def _host_mode(mode: str, host: Any, classes: list[str]) -> str:
    """``--host auto`` -> "model" when the model's own classifier predicts the data's classes, else "probe";
    an explicit ``--host model`` whose classifier predicts other classes is refused."""
    from retrofit.errors import RetrofitError
    from retrofit.sources import _norm  # names compare as labels are matched: case, underscores, spaces folded

    C, theirs = len(classes), getattr(host, "class_names", None)
    named = theirs is not None and len(theirs) == C
    other = named and [_norm(str(n)) for n in theirs] != [_norm(n) for n in classes]
    if named and other:
        i = next(j for j, (a, b) in enumerate(zip(theirs, classes)) if _norm(str(a)) != _norm(b))
        same = sorted(_norm(str(n)) for n in theirs) == sorted(_norm(n) for n in classes)
        what = (f"model {host.spec!r} names its output {i} {theirs[i]!r}, the data's class {i} is {classes[i]!r}"
                + (" (the same classes in another order)" if same else ""))
    if mode == "auto":
        if host.num_classes != C:
            return "probe"
        if other:
            print(f"--host auto: {what}: fitting a linear host classifier on the embeddings instead of the model's "
                  "own (--host probe); --classes in the model's order keeps its classifier", file=sys.stderr)
            return "probe"
        if not named:
            print(f"--host auto: model {host.spec!r} has a {C}-class classifier without class names; its outputs are "
                  f"taken as the data's classes in order ({', '.join(classes[:4])}{', ...' if C > 4 else ''}); "
                  "--host probe fits a new one instead", file=sys.stderr)
        return "model"
    if mode == "model" and host.num_classes != C:
        raise RetrofitError(f"class-count mismatch: model {host.spec!r} predicts {host.num_classes} classes but the "
                            f"data has {C}; use --host probe (a linear host classifier fitted on the "
                            "embeddings) or a model trained on these classes")
    if mode == "model" and other:
        raise RetrofitError(f"class mismatch: {what}; give --classes in the model's order, or use --host probe "
                            "(a linear host classifier fitted on the embeddings)")
    return mode


def _model_linear(host: Any, dim: int) -> Any:
    import copy

    from torch import nn

    from retrofit.errors import RetrofitError

    mods = host.adapter.classifier_modules()
    if len(mods) == 1 and isinstance(mods[0], nn.Linear) and mods[0].in_features == dim:
        return copy.deepcopy(mods[0]).float().cpu()
    def described(m: Any) -> str:
        n_in, n_out = getattr(m, "in_features", None), getattr(m, "out_features", None)
        return f"{type(m).__name__} {n_in}->{n_out}" if n_in is not None else type(m).__name__

    found = ", ".join(described(m) for m in mods) or "no classifier layer"
    raise RetrofitError(f"--train-host trains one nn.Linear from the {dim}-d embedding to the classes, but the "
                        f"classifier of {host.spec!r} is: {found}; use --host probe")


@guarded(also=(TypeError,))
def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from retrofit.commands.kb_build import _classes
    from retrofit.head import RetrievalHead
    from retrofit.ingest import absolute_spec
    from retrofit.linear_probe import cross_fit_logits, fit_linear_probe
    from retrofit.noise import add_label_noise
    from retrofit.pipeline import load_host_model, source_features
    from retrofit.prediction import _device
    from retrofit.train_checkpoint import save_linear
    from retrofit.training import TrainConfig, train

    if args.no_vote_balance and not args.label_vote:
        raise ValueError("--no-vote-balance only applies with --label-vote")
    if args.vote_form != "log" and not args.label_vote:
        raise ValueError(f"--vote-form {args.vote_form} is the label vote's form: add --label-vote")
    if args.cross_fit == 1 or args.cross_fit < 0:
        raise ValueError(f"--cross-fit must be 0 (in-sample probe logits) or a fold count >= 2, got {args.cross_fit}")
    out = Path(args.out)
    has_run = _check_out(out, args)  # refusals before any work; nothing is deleted yet
    kb = _open_kb(args.kb)
    src = _source(args.data, args)
    host = load_host_model(args.model, _device(args.device))  # the backbone on the run's device, too
    _check_kb(host, kb, args.allow_fingerprint_mismatch)
    classes = _classes(args.classes) or kb.class_names or src.class_names
    labels, classes = _labels(src, classes, "training data", required=True)
    if not args.classes and kb.class_names and src.class_names is None and any(
            isinstance(r.label, int) and r.label >= 0 for r in src.refs):
        print("note: the training data's labels are class numbers without names: they are read as positions in the "
              f"knowledge base's class list ({', '.join(f'{i}={n}' for i, n in enumerate(classes[:4]))}, ...); "
              "pass --classes in your numbering's order if it is another", file=sys.stderr)
    C = len(classes)
    mode = _host_mode(args.host, host, classes)
    tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                       weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, mixup_alpha=args.mixup,
                       loss=args.loss, tau_la=args.tau_la, train_host=args.train_host and mode != "none",
                       k=args.k, seed=args.seed, device=args.device, amp=not args.no_amp, progress=not args.quiet)
    # every setting checked before any work or write (a bad one used to fail after --overwrite had cleared the run)
    try:
        tcfg.validate()
        cfg0 = _head_config(args, 1, kb, C, classes)
    except ValueError as e:  # the config classes name their fields: say the options the user typed
        raise ValueError(_as_options(str(e))) from None
    if args.label_vote:  # a KB whose label ids mean other classes, refused before the features are extracted
        from retrofit.head_checks import _check_vote_classes, _store_labels

        _check_vote_classes(cfg0, kb, _store_labels(kb))
    _device(args.device)
    from retrofit.linear_probe import check_weight_decay

    try:
        check_weight_decay(args.probe_wd)
    except ValueError:
        raise ValueError(f"--probe-wd must be a finite number >= 0 (the host probe's L2 strength), got "
                         f"{args.probe_wd}") from None
    if mode == "model" and args.train_host and host.adapter.embed_dim is not None:
        _model_linear(host, host.adapter.embed_dim)  # refuses a host layer it cannot train, before --overwrite
    if args.noise_rate is not None and not args.noise:
        raise ValueError("--noise-rate is the fraction of labels --noise flips: give --noise symmetric|asymmetric "
                         "too, or leave --noise-rate out")
    args.noise_rate = 0.2 if args.noise_rate is None else args.noise_rate  # (run.json records 0.2 without --noise)
    if args.noise and not 0.0 <= args.noise_rate <= 1.0:
        raise ValueError(f"--noise-rate must be in [0, 1] (the fraction of labels flipped), got {args.noise_rate}")
    if args.train_host and mode == "none":
        raise ValueError("--train-host trains the host classifier, but --host none gives the head none: drop one")
    if args.val:  # opened and labelled now: a bad --val used to be found after the training set's features
        vsrc = _source(args.val, args)
        vlabels, _ = _labels(vsrc, classes, "validation data", required=True)
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out, said before the features (the cache goes there)
    cache = None if args.no_cache else (args.cache_dir or str(out / "cache"))
    common = dict(kb=kb, k=args.k, cache_dir=cache, batch_size=args.feature_batch, workers=args.workers,
                  progress=not args.quiet)
    fs = source_features(host, src, labels, name="train", live=args.no_cache, **common)
    val = None
    if args.val:
        val = source_features(host, vsrc, vlabels, name="val", **{**common, "cache_dir": cache})
    if args.noise:
        fs.labels, flipped = add_label_noise(fs.labels, args.noise, args.noise_rate, C, seed=args.seed)
        print(f"label noise: {args.noise} at {args.noise_rate:.0%}: {int(flipped.sum())} labels flipped",
              file=sys.stderr)  # stdout is the summary (--json: one JSON line)
    run = {"model": absolute_spec(args.model), "kb": str(Path(args.kb).resolve()), "data": args.data, "val": args.val,
           "data_path": data_path(args.data),
           "classes": classes, "host": mode, "train_host": tcfg.train_host, "k": args.k,
           "train_counts": torch.bincount(fs.labels, minlength=C).tolist(), "config": tcfg.to_dict(),
           "head": _head_settings(args)}
    if args.resume:
        _check_same_run(out, run)  # before anything in --out is written
    cfg = _head_config(args, fs.z.shape[1], kb, C, classes)
    torch.manual_seed(args.seed)
    head = RetrievalHead(cfg)
    head.attach(kb, allow_fingerprint_mismatch=args.allow_fingerprint_mismatch)  # dims, encoders, vote classes
    from retrofit.train_checks import check_finite_features

    check_finite_features(fs, "training")  # (train() checks too: after --overwrite had cleared the old run)
    if val is not None:
        check_finite_features(val, "validation")
    if has_run and args.overwrite:
        _clear_run(out)  # all checked, the head attached, the features computed: only now is the old run removed
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
    assert tcfg.train_host == (args.train_host and host_clf is not None)  # decided above from the host mode
    (out / RUN_FILE).write_text(json.dumps(run, indent=1))
    res = train(head, fs, tcfg, store=kb, val_features=val, host_classifier=host_clf if tcfg.train_host else None,
                out_dir=out, resume=args.resume)
    last = res.history[-1] if res.history else {}
    summary = {"epochs": len(res.history), "train_loss": last.get("train_loss"), "val_top1": last.get("val_top1"),
               "head": str(out / "head"), "samples": len(fs), "host": mode}
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            if v is not None:  # no validation data: no val_top1 line
                print(f"{k:<11} {round(v, 4) if isinstance(v, float) else v}")
    return 0


def _head_config(args: argparse.Namespace, query_dim: int, kb: Any, C: int, classes: list[str]) -> Any:
    from retrofit.head import HeadConfig

    fp = kb.fingerprint
    return HeadConfig(query_dim=query_dim, image_dim=kb.image_dim, text_dim=kb.text_dim, num_classes=C,
                      dim=args.dim, depth=args.depth, heads=args.heads, k=args.k, dropout=args.dropout,
                      modalities=args.modalities, label_vote=args.label_vote,
                      vote_balance=args.label_vote and not args.no_vote_balance, vote_form=args.vote_form,
                      class_names=classes, query_fingerprint=fp.key, image_fingerprint=fp.image,
                      text_fingerprint=fp.text)


# config fields whose option has another name
_OPTION_OF = {"mixup_alpha": "mixup", "amp": "no-amp"}
# config fields the command line sets under the option of the same name (snake_case -> --kebab-case)
_OPTION_FIELDS = {"warmup_epochs", "weight_decay", "mixup_alpha", "label_smoothing", "batch_size", "tau_la"}


def _as_options(msg: str) -> str:
    """``HeadConfig.dim=64 must be divisible by heads=5`` -> ``--dim 64 must be divisible by --heads 5``; other
    field names in the message that are options too (``warmup_epochs``) become theirs (``--warmup-epochs``)."""
    def option(field: str) -> str:
        return "--" + _OPTION_OF.get(field, field).replace("_", "-")

    msg = re.sub(r"\b(?:HeadConfig|TrainConfig)\.(\w+)(=?)", lambda m: option(m.group(1)) + (" " if m.group(2)
                                                                                               else ""), msg)
    msg = re.sub(r"(?<![-\w.])(\w+_\w+)\b", lambda m: option(m.group(1)) if m.group(1) in _OPTION_FIELDS
                 else m.group(1), msg)  # (snake_case names only: 'dim' or 'k' could be plain words)
    msg = msg.replace("a positive int or None", "a positive int")  # (None is the Python API's default)
    return re.sub(r"\bby (heads|depth|dim)=", r"by --\1 ", msg)



_HEAD_ARGS = ("dim", "depth", "heads", "dropout", "modalities", "label_vote", "no_vote_balance", "vote_form",
              "probe_wd", "cross_fit", "noise", "noise_rate")  # what else shapes the head's inputs and targets


def _head_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {n: getattr(args, n) for n in _HEAD_ARGS}


def _check_out(out: Path, args: argparse.Namespace) -> bool:
    """An output directory holding a training run is continued (--resume) or replaced (--overwrite), never
    silently overwritten; --resume without a checkpoint says it starts from scratch. Returns whether ``out`` holds
    a run; deletes nothing (:func:`_clear_run` does, once everything else is checked)."""
    import sys

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory for the run (created if missing)")
    ckpt = out / "checkpoints" / "last"
    has_run = ckpt.exists() or ckpt.with_name("last.old").exists()
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if has_run and not args.resume and not args.overwrite:
        raise ValueError(f"{out} already holds a training run ({ckpt}); --resume continues it, --overwrite starts "
                         "over in it (its head and checkpoints are replaced), or give another --out")
    if args.resume and not has_run:
        print(f"--resume: no checkpoint in {out}; training from scratch", file=sys.stderr)
    return has_run


def _clear_run(out: Path) -> None:
    """Remove what a training run wrote in ``out`` (the feature cache stays: it is keyed by its inputs)."""
    import shutil

    for name in ("checkpoints", "head"):
        shutil.rmtree(out / name, ignore_errors=True)
    gone = []
    for d in [out / "eval", *out.glob("eval-*")]:  # `retrofit eval`'s results of the old head would look current
        if (d / "eval.json").is_file():
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    if gone:
        print(f"--overwrite: removed the old head's evaluation results in {out}: {', '.join(sorted(gone))}",
              file=sys.stderr)
    for name in ("train_log.jsonl", RUN_FILE, "host_probe.safetensors", "host_classifier.safetensors"):
        (out / name).unlink(missing_ok=True)
    # heads saved into the run folder (`retrofit calibrate --save RUN/head-web`) are the old head's weights: kept (they
    # may be the only copy of it now), but said, since `--head RUN/head-web` would pair them with the new run's probe
    kept = sorted(d.name for d in out.iterdir() if d.is_dir() and (d / "config.json").is_file()
                  and (d / "model.safetensors").is_file())
    if kept:
        print(f"--overwrite: kept heads saved from the old run in {out}: {', '.join(kept)}; they hold the old head's "
              "weights and do not go with the new run (its host probe, its classes): remove them, or calibrate the "
              "new head again", file=sys.stderr)


def _check_same_run(out: Path, run: dict[str, Any]) -> None:
    """--resume must continue the same run: the settings recorded in OUT/run.json must equal this command's."""
    f = out / RUN_FILE
    if not f.is_file():
        return
    old = json.loads(f.read_text())
    run = json.loads(json.dumps(run))  # as it would be written: tuples become lists
    keys = ("model", "kb", "data_path", "classes", "host", "train_host", "k", "head")
    if "model" in old and old["model"] != run["model"]:
        from retrofit.ingest import absolute_spec

        if absolute_spec(old["model"]) == run["model"]:  # recorded as typed (before 23 Nov), same checkpoint
            old["model"] = run["model"]
    for rec in (old, run):  # without --noise the rate is unused (runs before 23 Nov recorded whatever was typed)
        h = rec.get("head")
        if isinstance(h, dict) and h.get("noise") is None:
            h.pop("noise_rate", None)
        if isinstance(h, dict):  # runs before 23 Nov had only the log-form vote
            h.setdefault("vote_form", "log")
    diff = [k for k in keys if k in old and old[k] != run[k]]
    cfg_old, cfg_new = old.get("config", {}), run["config"]
    diff += [f"config.{k}" for k in cfg_new if k in cfg_old and cfg_old[k] != cfg_new[k]
             and k not in RESUME_FREE]  # more epochs or another device: a fine continuation
    if diff:
        detail = "; ".join(f"{k}: {_get(old, k)!r} -> {_get(run, k)!r}" for k in diff)
        raise ValueError(f"--resume: {out} was trained with other settings ({detail}); resume with the same "
                         "settings, or --overwrite to start over")


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="train a retrieval head on a frozen classifier (head only)",
                       description="Train a RetrievalHead on a frozen host classifier and a knowledge base.",
                       epilog=_EPILOG_TRAIN, formatter_class=fmt)
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="timm:NAME[@CKPT], torchvision:NAME[@CKPT], darknet-tiny[@SIZE] or MODULE:FUNCTION "
                        "(e.g. mymodel:make)")
    p.add_argument("--data", required=True, metavar="SOURCE", help="training data: shards, ImageFolder or manifest")
    p.add_argument("--val", default=None, metavar="SOURCE", help="validation data, evaluated after every epoch")
    manifest_column_args(p)  # (for --data and --val)
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
    g.add_argument("--epochs", type=at_least_one, default=25, help="training epochs (default %(default)s)")
    g.add_argument("--lr", type=float, default=5e-4, help="AdamW peak learning rate (default %(default)s)")
    g.add_argument("--batch-size", type=at_least_one, default=256, help="samples per step (default %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up, then cosine decay (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="of the targets (default %(default)s)")
    g.add_argument("--mixup", type=float, default=0.2, metavar="ALPHA",
                   help="mixup Beta(alpha, alpha); 0 = off (default %(default)s)")
    g.add_argument("--loss", default="ce", choices=["ce", "lace"],
                   help="CE or logit-adjusted CE, for long-tailed data (default %(default)s)")
    g.add_argument("--tau-la", type=float, default=1.0,
                   help="logit-adjustment strength for --loss lace (default %(default)s)")
    g.add_argument("--k", type=at_least_one, default=32, help="neighbours per image (default %(default)s)")
    g.add_argument("--dim", type=at_least_one, default=512,
                   help="model dimension d of the fusion layers (default %(default)s)")
    g.add_argument("--depth", type=at_least_one, default=4, help="cross-fusion layers L (default %(default)s)")
    g.add_argument("--heads", type=at_least_one, default=8,
                   help="attention heads; must divide --dim (default %(default)s)")
    g.add_argument("--dropout", type=float, default=0.0, help="on the head's tokens (default %(default)s)")
    g.add_argument("--modalities", default="image+text", choices=["image+text", "image", "text"],
                   help="what the head reads of the neighbours; image / text: the paper's ablations "
                        "(default %(default)s)")
    g.add_argument("--label-vote", action="store_true",
                   help="add the learned vote of the neighbours' labels to the head (not in the paper; the "
                        "CIFAR-10-LT demo's heads use it)")
    g.add_argument("--no-vote-balance", action="store_true",
                   help="with --label-vote: do not divide the vote by the KB's class frequencies")
    g.add_argument("--vote-form", default="log", choices=["log", "mix"],
                   help="with --label-vote: add beta * log(eps + vote) to the logits (log), or mix probabilities, "
                        "log((1 - a) softmax + a vote), starting at a = 0.5: the fixed 50/50 rule for an "
                        "unbalanced vote (mix) (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="head initialisation and data order (default %(default)s)")
    p.add_argument("--noise", default=None, choices=["symmetric", "asymmetric"], help="add label noise (experiments)")
    p.add_argument("--noise-rate", type=float, default=None,
                   help="fraction of labels --noise flips (default 0.2)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last (same settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a training run already in --out (its head/, checkpoints/ and the eval results in "
                        "eval*/ folders) instead of refusing")
    p.add_argument("--no-cache", action="store_true", help="no feature cache; neighbours retrieved live each step")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="feature cache (default OUT/cache)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="accept a KB whose keys come from another encoder than the model")
    _runtime(p)
    p.set_defaults(func=cmd_train)


def __getattr__(name: str) -> Any:
    # cmd_eval / cmd_predict moved to retrofit.commands.predict (which imports this module): lazy re-export
    if name in ("cmd_eval", "cmd_predict"):
        from retrofit.commands import predict

        return getattr(predict, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
