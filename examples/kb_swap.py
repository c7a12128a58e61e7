"""Swap in a bigger knowledge base without retraining: the head learns on a small KB, then reads a web-sized one.

The situation this library is for: a production classifier trained on a small, long-tailed labelled set, and
a pile of web image-caption pairs with no labels. This script, on real CIFAR-10 images and the real
ImageNet-pretrained Tiny Darknet (64 px), with library calls only:

1. the host: the frozen backbone + a linear classifier fitted on the labelled set (long-tailed, 10 classes);
2. KB_small: the labelled set itself (class prompt as text), ``retrofit.build_kb``;
3. a head trained head-only on KB_small (learned label vote, LACE), each image's own entry excluded;
4. KB_web: web images with their captions, labelled from the captions alone (``caption_labels=True``), and
   KB_big = KB_small + KB_web (``retrofit.merge_kbs``);
5. ``head.attach(KB_big)``: same weights (checked), the vote rebalanced for KB_big's class mix; then the vote
   weight recalibrated on a small labelled validation set (``head.vote.set_scale``), still no training: chosen
   jointly with the post-hoc logit adjustment here; ``retrofit.calibration.choose_vote_scale`` (CLI:
   ``retrofit calibrate``) chooses the scale alone; then the vote's temperature too
   (``head.vote.set_temperature``). ``--whiten 0.1`` searches KB_big in the whitened key space
   (``KnowledgeBase.compact(whiten=...)``, ``IndexConfig.whiten``).

It prints a table of test accuracy (many / medium / few / overall), with two references that learn nothing (the
kNN vote over KB_big, a fixed 50/50 mix of it with the adjusted host), and writes every figure to
``--out``/results.json. Defaults take ~1-2 minutes on 2 CPU cores from empty (most of it encoding ~15,600
images), ~25 s once the KBs are built; ``--web`` and friends scale it.

    python examples/kb_swap.py [--web 10000] [--out runs/kb_swap]
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import retrofit
from retrofit.calibration import logits_by_vote_scale
from retrofit.cifar10_lt import load_wordnet, prompt, shard_paths
from retrofit.demo_rules import (
    choose_adjustment,
    choose_scale_and_adjustment,
    choose_temperature_scale_and_adjustment,
    fixed_fusion,
    knn_probs,
)
from retrofit.feature_cache import retrieve
from retrofit.linear_probe import cross_fit_logits, fit_linear_probe
from retrofit.pipeline import load_host_model, source_features
from retrofit.sources import Source, webdataset_source
from retrofit.training import predict_logits

ENCODER = "darknet-tiny@64"
SCALES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # vote weights tried on val, x the trained one
TEMPERATURES = (0.03, 0.05, 0.07, 0.1, 0.15, 0.2)  # vote temperatures tried on val (with the trained one)
GRID = tuple(float(x) for x in np.arange(-1.0, 2.01, 0.125))  # post-hoc adjustment strengths tried on validation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="a small run (the setting of tests/test_kb_swap_example.py): --max-per-class 60 "
                                       "--imbalance 10 --val-per-class 5 --test-per-class 20 --epochs 2 --web 400")
    p.add_argument("--max-per-class", type=int, default=500, help="labelled images of the most frequent class")
    p.add_argument("--imbalance", type=float, default=20.0, help="most / least frequent class in the labelled set")
    p.add_argument("--web", type=int, default=10_000, help="web image-caption pairs added by the swap")
    p.add_argument("--val-per-class", type=int, default=20, help="labelled validation images per class")
    p.add_argument("--test-per-class", type=int, default=200, help="test images per class (seeded draw)")
    p.add_argument("--epochs", type=int, default=10,
                   help="head training epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and the head")
    p.add_argument("--vote-form", default="log", choices=["log", "mix"],
                   help="the head's label vote: added log-vote or a probability mixture with the host "
                        "(HeadConfig.vote_form; the scales then multiply the odds of its mixing weight)")
    p.add_argument("--whiten", type=float, default=0.0, metavar="SHRINKAGE",
                   help="search KB_big in the whitened key space with this shrinkage (0 = raw cosines)")
    p.add_argument("--out", default="runs/kb_swap",
                   help="where the KBs and results.json go (a KB of the same samples and options is reused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    # CIFAR-10's 5,000 training images per class hold the labelled, validation and web parts; 1,000 test per class
    for name, low in (("max_per_class", 1), ("web", 1), ("val_per_class", 1), ("test_per_class", 1), ("epochs", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    from retrofit.kb_whiten import check_shrinkage

    try:
        check_shrinkage(args.whiten)
    except ValueError as e:
        p.error(f"--{e}")
    if not args.imbalance >= 1:
        p.error(f"--imbalance must be >= 1 (most / least frequent class), got {args.imbalance}")
    if int(args.max_per_class * args.imbalance ** -1.0) < 1:  # the rarest class's count, as split() computes it
        p.error(f"--max-per-class {args.max_per_class} with --imbalance {args.imbalance:g} leaves the rarest class no "
                "labelled image: raise --max-per-class or lower --imbalance")
    if args.max_per_class + args.val_per_class > 5000:
        p.error(f"--max-per-class + --val-per-class must be <= 5000 (CIFAR-10's training images per class), got "
                f"{args.max_per_class + args.val_per_class}")
    if args.test_per_class > 1000:
        p.error(f"--test-per-class must be <= 1000 (CIFAR-10's test images per class), got {args.test_per_class}")
    return args


def split(labels: np.ndarray, args: argparse.Namespace) -> dict[str, list[int]]:
    """Indices into CIFAR-10's training set: a long-tailed labelled set, a balanced validation set, web pairs."""
    rng = np.random.default_rng(args.seed)
    C = int(labels.max()) + 1
    out: dict[str, list[int]] = {"labelled": [], "val": [], "web": []}
    rest = []
    for c in range(C):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = int(args.max_per_class * args.imbalance ** (-c / (C - 1)))  # class 0 most frequent, class C-1 least
        out["labelled"] += idx[:n].tolist()
        out["val"] += idx[n:n + args.val_per_class].tolist()
        rest += idx[n + args.val_per_class:].tolist()
    out["web"] = rng.permutation(rest)[:args.web].tolist()
    return out


def balanced(labels: np.ndarray, per_class: int, seed: int) -> list[int]:
    """``per_class`` indices of each class, drawn with ``seed`` (the test shard is stored class by class)."""
    rng = np.random.default_rng([seed, 1])
    return sorted(i for c in np.unique(labels) for i in rng.permutation(np.flatnonzero(labels == c))[:per_class])


def subset(src: Source, idx: list[int], name: str, **changes: Any) -> Source:
    """The samples ``idx`` of ``src`` (with ``changes`` applied to each, e.g. ``label=None``) as a new source."""
    refs = [replace(src.refs[i], **changes) for i in idx]
    return Source(src.kind, f"{src.location}#{name}", refs, src.class_names, {"subset": name, "n": len(idx)})


def build(src: Source, path: Path, progress: bool, **options: Any) -> Any:
    """Build the KB at ``path`` (reused when a finished build of the same samples and options is there);
    returns it opened read-only."""
    import hashlib
    import shutil

    what = json.dumps([[r.key for r in src.refs], [r.label for r in src.refs], [r.caption for r in src.refs],
                       options, ENCODER], sort_keys=True, default=str)
    digest = hashlib.sha256(what.encode()).hexdigest()
    marker = path / "complete"
    if not (marker.is_file() and marker.read_text() == digest):
        shutil.rmtree(path, ignore_errors=True)  # another build's, or unfinished
        retrofit.build_kb(src, path, image_encoder=ENCODER, text_encoder="minilm", class_names=src.class_names,
                          dedup=False, progress=progress, **options)
        marker.write_text(digest)
    return retrofit.KnowledgeBase.open(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    progress = not args.quiet
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = retrofit.data_dir(required=True)
    train_src = webdataset_source([str(p) for p in shard_paths(data, "train")])
    test_src = webdataset_source([str(p) for p in shard_paths(data, "test")])
    names = list(train_src.class_names)
    y_all = np.array([int(r.label) for r in train_src.refs])
    parts = split(y_all, args)
    lab = subset(train_src, parts["labelled"], "labelled")
    lab = replace(lab, refs=[replace(r, caption=prompt(names[int(r.label)])) for r in lab.refs])  # text = class

    # 1-2. KB_small, the host (frozen backbone + linear probe on the labelled set)
    kb_small = build(lab, out / "kb_small", progress, index="flat")
    host = load_host_model(ENCODER)
    y_lab = [int(r.label) for r in lab.refs]
    train_fs = source_features(host, lab, y_lab, kb=kb_small, k=16, progress=progress)  # own entry excluded
    probe = fit_linear_probe(train_fs.z, train_fs.labels, len(names))
    # training logits out of fold: the head must not learn from the host's in-sample over-confidence
    train_fs = replace(train_fs, host_logits=cross_fit_logits(train_fs.z, train_fs.labels, len(names)))
    y_test = np.array([int(r.label) for r in test_src.refs])
    evals = {}
    for part, src, idx in (("val", train_src, parts["val"]),
                           ("test", test_src, balanced(y_test, args.test_per_class, args.seed))):
        s = subset(src, idx, part)
        fs = source_features(host, s, [int(r.label) for r in s.refs], progress=progress)
        with torch.no_grad():
            evals[part] = replace(fs, host_logits=probe(fs.z))
    yv, yt = evals["val"].labels, evals["test"].labels
    log_prior = torch.log(torch.bincount(train_fs.labels, minlength=len(names)).float())  # (C,) log counts
    # post-hoc logit adjustment of the host: logits - a * log prior, a chosen on validation
    a = choose_adjustment(evals["val"].host_logits, yv, log_prior, tuple(x for x in GRID if x >= 0))
    shift = a * log_prior  # (C,)
    rows = {"host (linear probe)": evals["test"].host_logits,
            f"host + logit adjustment ({a:g}, chosen on val)": evals["test"].host_logits - shift}

    # 3. the head, trained on KB_small only. It gets the adjusted host logits as L_I, so an untrained head is the
    #    adjusted host, and is trained with the logit-adjusted loss (LACE)
    train_fs = replace(train_fs, host_logits=train_fs.host_logits - shift)
    evals = {part: replace(fs, host_logits=fs.host_logits - shift) for part, fs in evals.items()}
    cfg = retrofit.HeadConfig(query_dim=train_fs.z.shape[1], image_dim=kb_small.image_dim,
                              text_dim=kb_small.text_dim, num_classes=len(names), dim=64, depth=1, heads=4, k=16,
                              label_vote=True, vote_balance=True, vote_form=args.vote_form, class_names=names,
                              query_fingerprint=kb_small.fingerprint.key,
                              image_fingerprint=kb_small.fingerprint.image, text_fingerprint=kb_small.fingerprint.text)
    torch.manual_seed(args.seed)  # the head's initial weights
    head = retrofit.RetrievalHead(cfg, kb_small)
    epochs = args.epochs
    retrofit.train(head, train_fs, retrofit.TrainConfig(epochs=epochs, loss="lace", mixup_alpha=0.0,
                                                        label_smoothing=0.0, seed=args.seed, device="cpu",
                                                        progress=progress), store=kb_small)
    trained = {n: t.clone() for n, t in head.state_dict().items()}
    trained_vote_weight = head.vote.effective_weight  # (scale 1)

    def logits(kb: Any, part: str) -> torch.Tensor:
        fs = retrieve(evals[part], kb, cfg.k)
        return predict_logits(head, fs, kb, device="cpu")["logits"]

    def adjusted(kb: Any) -> tuple[torch.Tensor, float]:
        """The head's test logits with the post-hoc adjustment chosen on validation (and that adjustment)."""
        b = choose_adjustment(logits(kb, "val"), yv, log_prior, GRID)
        return logits(kb, "test") - b * log_prior, b

    lg, b = adjusted(kb_small)
    rows[f"head + KB_small (trained with it; adjustment {b:g})"] = lg

    # 4. KB_web from captions alone (class names, their WordNet synonyms and glosses), KB_big = KB_small + KB_web
    web = subset(train_src, parts["web"], "web", label=None)  # web pairs come without labels
    lemmas, glosses = load_wordnet(data)
    kb_web = build(web, out / "kb_web", progress, caption_labels=True, index="flat",
                   class_synonyms=dict(zip(names, lemmas)), class_descriptions=dict(zip(names, glosses)))
    marker = out / "kb_big" / "complete"
    inputs = (out / "kb_small" / "complete").read_text() + (out / "kb_web" / "complete").read_text()
    if not (marker.is_file() and marker.read_text() == inputs):
        import shutil

        shutil.rmtree(out / "kb_big", ignore_errors=True)
        retrofit.merge_kbs([out / "kb_small", out / "kb_web"], out / "kb_big", dedup=False, progress=progress)
        marker.write_text(inputs)
    with retrofit.KnowledgeBase.open(out / "kb_big", readonly=False) as w:  # the index's key whitening, if asked
        if w.info()["index"]["config"]["whiten"] != args.whiten:
            w.compact(whiten=args.whiten)
    kb_big = retrofit.KnowledgeBase.open(out / "kb_big")
    web_labels = kb_web.labels().numpy()
    true_web = y_all[parts["web"]]

    # 5. the swap: no training; then the vote's weight recalibrated on validation
    head.attach(kb_big)
    changed = [n for n, t in head.state_dict().items() if n not in ("vote.label_log_prior", "vote.scale")
               and not torch.equal(t, trained[n])]
    if changed:
        raise RuntimeError(f"attaching a KB changed trained weights {changed}: that is a bug")
    lg, b = adjusted(kb_big)
    rows[f"head + KB_big, as trained (adjustment {b:g})"] = lg
    val = logits_by_vote_scale(head, retrieve(evals["val"], kb_big, cfg.k), SCALES, kb_big, device="cpu")
    best, b = choose_scale_and_adjustment(val, yv, log_prior, GRID)  # ties: the scale nearest the trained one
    head.vote.set_scale(best)
    rows[f"head + KB_big, vote x{best:g} (adjustment {b:g}; both chosen on val)"] = (
        logits(kb_big, "test") - b * log_prior)
    # and the vote's temperature with them (the trained one keeps ties)
    trained_t = head.vote.temperature
    val_fs = retrieve(evals["val"], kb_big, cfg.k)
    t_best, s_best, b_t = choose_temperature_scale_and_adjustment(
        head, lambda: logits_by_vote_scale(head, val_fs, SCALES, kb_big, device="cpu"), TEMPERATURES, yv,
        log_prior, GRID)
    head.vote.set_temperature(t_best)
    head.vote.set_scale(s_best)
    rows[f"head + KB_big, vote x{s_best:g} at temperature {t_best:.3g} (adjustment {b_t:g}; all chosen on val)"] = (
        logits(kb_big, "test") - b_t * log_prior)
    big_test = retrieve(evals["test"], kb_big, cfg.k)
    knn = knn_probs(big_test.neighbor_ids, big_test.neighbor_scores, big_test.neighbor_labels, len(names), 0.05)
    # references: no learning at all, the neighbours' labels alone and a fixed mix of them with the adjusted host
    rows["reference: kNN vote over KB_big"] = knn.clamp_min(1e-12).log()
    rows["reference: fixed 50/50 fusion of the adjusted host and that kNN vote"] = fixed_fusion(
        evals["test"].host_logits, knn)  # evals' host logits are the adjusted ones by now

    counts = torch.bincount(train_fs.labels, minlength=len(names))
    cut = (int(counts.float().quantile(0.7)), int(counts.float().quantile(0.3)))  # ~3 many, ~4 medium, ~3 few
    results = {name: retrofit.evaluate(lg, yt, train_counts=counts, cutoffs=cut) for name, lg in rows.items()}
    summary = {
        "sizes": {"labelled": len(kb_small), "web": len(kb_web), "kb_big": len(kb_big), "val": len(yv),
                  "test": len(yt)},
        "train_counts": counts.tolist(), "cutoffs": {"many_above": cut[0], "few_below": cut[1]},
        "web_caption_labels": {"correct": float(np.mean(web_labels == true_web)),
                               "unknown": float(np.mean(web_labels < 0))},
        "vote": {"form": args.vote_form, "epochs": epochs,  # trained_weight: beta, or "mix": the mixing weight
                 "trained_weight": trained_vote_weight,
                 "chosen_scale": best, "chosen_adjustment": b, "trained_temperature": trained_t,
                 "with_temperature": {"temperature": t_best, "scale": s_best, "adjustment": b_t}},
        "kb_big_whiten": args.whiten,
        "rows": {name: {key: r[key] for key in ("many", "medium", "few", "top1", "mean_per_class")}
                 for name, r in results.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    for kb in (kb_small, kb_web, kb_big):
        kb.close()
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = ["| model | Many | Medium | Few | Overall |", "|---|---:|---:|---:|---:|"]
    for name, r in summary["rows"].items():
        cells = [f"{100 * r[g]:.1f}" if r[g] is not None else "-" for g in ("many", "medium", "few", "top1")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    s = run(args)
    z = s["sizes"]
    print(f"labelled {z['labelled']} images (per class {s['train_counts']}), web pairs {z['web']} "
          f"(caption labels: {100 * s['web_caption_labels']['correct']:.1f}% right, "
          f"{100 * s['web_caption_labels']['unknown']:.1f}% unknown), test {z['test']}")
    print(table(s))
    print(f"figures: {Path(args.out) / 'results.json'}")


if __name__ == "__main__":
    main()
