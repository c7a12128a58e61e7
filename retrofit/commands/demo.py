"""``retrofit demo``: CIFAR-10-LT end to end with the real Tiny Darknet host (see :mod:`retrofit.demo`)."""

from __future__ import annotations

import argparse
import sys
import time

from retrofit.commands import at_least_one, guarded, nonnegative


@guarded
def run(args: argparse.Namespace) -> int:
    from retrofit.demo import ROWS, DemoConfig, run_demo

    cfg = DemoConfig()
    over = {"data_dir": args.data_dir, "cache_dir": args.cache_dir, "results_dir": args.results_dir,
            "seeds": args.seeds, "epochs": args.epochs, "epochs_ext": args.epochs_ext, "k": args.k, "dim": args.dim,
            "depth": args.depth,
            "whiten_in": args.whiten_in, "whiten_ext": args.whiten_ext, "vote_form": args.vote_form,
            "imbalance_factor": args.imbalance_factor, "noise_rate": args.noise_rate, "workers": args.workers}
    for name, value in over.items():
        if value is not None:
            setattr(cfg, name, value)
    if args.rows:
        cfg.rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
        unknown = [r for r in cfg.rows if r not in ROWS]
        if unknown:
            print(f"error: --rows: unknown rows {unknown}; allowed: {', '.join(ROWS)}", file=sys.stderr)
            return 1
    cfg.plot = not args.no_plot
    cfg.reuse_heads = not args.retrain
    cfg.vote_scale_on = args.vote_scale_on
    if args.vote_rule is not None:
        cfg.vote_rule = args.vote_rule
    # (default: where the vote scale is chosen; with --vote-scale-on val the adjustment goes with the scale)
    cfg.posthoc_on = args.posthoc_on or ("val" if args.vote_scale_on == "val" else "train")
    cfg.ext_labels = args.ext_labels
    cfg.progress = not args.quiet
    t = time.perf_counter()
    doc = run_demo(cfg)
    print(doc["table"])
    print(f"results: {cfg.results_dir}/{cfg.results_stem}.md, .json" + (", .png" if cfg.plot else "")
          + f"  ({time.perf_counter() - t:.0f} s; cache: {doc['protocol']['cache']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="CIFAR-10-LT end to end: host, logit adjustment, kNN, retrofit head, KB swap, ablations, label noise",
        description="Run the CIFAR-10-LT (IF=100 by default) report on the real offline data with the frozen Tiny "
                    "Darknet host: prints the table and writes results/cifar10_lt[_SETTINGS].{md,json,png}. "
                    "Embeddings and knowledge bases are cached (first run encodes ~60,000 images). "
                    "Example: retrofit demo --seeds 3",
    )
    p.add_argument("--seeds", type=at_least_one, default=None,
                   help="head-training seeds; > 1 gives mean ± std (default 1)")
    p.add_argument("--rows", default=None,
                   help="comma-separated rows to run, e.g. 4,5 (default: all; rows 1-3 and the fixed-fusion "
                   "references are always computed and shown: the trained rows build on them)")
    p.add_argument("--data-dir", default=None, help="directory holding cifar10/ (default: RETROFIT_DATA_DIR)")
    p.add_argument("--cache-dir", default=None, help="cache of embeddings and KBs (default .retrofit_cache/cifar10_lt)")
    p.add_argument("--results-dir", default=None, help="where the md / json / png go (default results/)")
    p.add_argument("--imbalance-factor", type=float, default=None, metavar="IF",
                   help="CIFAR-10-LT imbalance factor, largest / smallest class (default 100; 10 and 50 are the other "
                        "usual settings); results go to cifar10_lt_if<IF>.*")
    p.add_argument("--noise-rate", type=float, default=None, metavar="RATE",
                   help="symmetric label noise of row 8 (default 0.4); results go to cifar10_lt_noise<RATE>.*")
    p.add_argument("--epochs", type=at_least_one, default=None, help="head-training epochs (default 10)")
    p.add_argument("--epochs-ext", type=at_least_one, default=None, metavar="N",
                   help="epochs of the head trained with KB_ext, row 6 (default 1: chosen by cross-validation on the "
                        "long-tail images; retrofit.demo_cv)")
    p.add_argument("--k", type=at_least_one, default=None, help="neighbours per query")
    p.add_argument("--dim", type=at_least_one, default=None, help="head width d")
    p.add_argument("--depth", type=at_least_one, default=None, help="cross-fusion layers L")
    p.add_argument("--whiten-ext", type=float, default=None, metavar="SHRINKAGE",
                   help="key whitening of KB_ext's index (default 0.1; 0 = cosine on the raw keys, as before 23 Nov)")
    p.add_argument("--whiten-in", type=float, default=None, metavar="SHRINKAGE",
                   help="key whitening of KB_in's index and its noisy twin's (default 0 = cosine on the raw keys)")
    p.add_argument("--vote-form", choices=("log", "mix"), default=None,
                   help="how the label vote joins the host: a probability mixture (default) or an added log-vote")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--vote-scale-on", choices=("val", "train"), default="train",
                   help="choose the vote scale on the long-tail training images (default; own entries excluded, "
                        "cross-fitted host logits) or on the 200 validation images (noisier)")
    p.add_argument("--vote-rule", choices=("best", "one_se", "trained"), default=None,
                   help="how the vote scale and temperature are picked on the training images: the best score "
                        "(default; chosen by nested cross-validation, examples/cifar10_lt_rule_cv.py), one_se, the "
                        "candidate nearest the trained vote within one paired standard error of the best, or "
                        "trained, the trained vote kept; results then go to cifar10_lt_<RULE>.*")
    p.add_argument("--posthoc-on", choices=("val", "train"), default=None,
                   help="choose the post-hoc logit adjustment of rows 4-7 on the long-tail training images (default "
                        "with --vote-scale-on train; after the vote scale) or on the 200 validation images (the "
                        "baselines 2 and 8h, and 8r whose training labels are noisy: always validation)")
    p.add_argument("--ext-labels", choices=("dataset", "captions"), default="dataset",
                   help="labels of KB_ext's web-captioned records: CIFAR-10's own (default) or read from the captions "
                        "(zero-shot, as for a web corpus without labels); results go to cifar10_lt_ext_captions.*")
    p.add_argument("--retrain", action="store_true",
                   help="train every head again instead of reusing heads cached by an identical earlier run")
    p.add_argument("--workers", type=nonnegative, default=None, metavar="N",
                   help="heads trained at once, in worker processes with one thread each (default: one per usable "
                        "core, as many as the available memory holds; 1 = one at a time in this process; the same "
                        "heads either way)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
