"""How the demo picks its vote scale on the training images: nested cross-validation of the choice rule.

    python examples/cifar10_lt_rule_cv.py                # KB_in heads (rows 4, 5), KB_ext heads (row 6), 3 seeds
    python examples/cifar10_lt_rule_cv.py --kbs in --seeds 1

For each fold, a head trained on the other four folds makes the demo's choices on the images it trained on (vote
temperature and scale by ``rule``, then the post-hoc adjustment) and scores the held-out fold; the figure is the
out-of-fold balanced top-1 each rule leads to (retrofit.demo_cv.cross_validate_rules). ``best`` takes the best score,
``one_se`` the candidate nearest the trained vote within one paired standard error of it
(retrofit.calibration.choose_vote_scale). This chose `DemoConfig.vote_rule`. Uses the demo's cache (run
`make demo` first, or it prepares the data). Writes results/cifar10_lt_rule_cv.json; ~20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from retrofit.demo import DemoConfig
from retrofit.demo_cv import cross_validate_rules
from retrofit.demo_data import prepare

# the KB a head trains with -> the KBs it is scored with (row 4's head is also row 5's, moved to KB_ext)
SETTINGS = {"in": ["in", "ext"], "ext": ["ext"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kbs", default="in,ext", help="knowledge bases the heads train with (in, ext; default in,ext)")
    ap.add_argument("--seeds", type=int, default=3, help="head-training seeds (default 3)")
    ap.add_argument("--folds", type=int, default=5, help="folds (default 5)")
    ap.add_argument("--cache-dir", default=".retrofit_cache/cifar10_lt")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args(argv)
    args.kbs = [k.strip() for k in args.kbs.split(",") if k.strip()]
    if not args.kbs or set(args.kbs) - set(SETTINGS):
        ap.error(f"--kbs: expected in and/or ext, got {args.kbs}")
    if args.seeds < 1 or args.folds < 2:
        ap.error(f"--seeds must be >= 1 and --folds >= 2, got {args.seeds} / {args.folds}")
    return args


def run(args: argparse.Namespace, **settings: Any) -> dict[str, Any]:
    """The nested cross-validation for every KB in ``args.kbs`` (``settings``: other DemoConfig fields)."""
    cfg = DemoConfig(**{"cache_dir": args.cache_dir, "results_dir": args.results_dir, "progress": False, **settings})
    cfg.validate()
    data = prepare(cfg)
    try:
        doc = {"folds": args.folds, "seeds": args.seeds,
               "kbs": {kb: cross_validate_rules(cfg, data, kb, SETTINGS[kb], seeds=range(args.seeds),
                                                folds=args.folds) for kb in args.kbs}}
    finally:
        data.close()
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cifar10_lt_rule_cv.json").write_text(json.dumps(doc, indent=1))
    return doc


def table(doc: dict[str, Any]) -> str:
    lines = ["| head trained with | scored with | rule | out-of-fold balanced top-1 (%) | per seed |",
             "|---|---|---|---:|---|"]
    for kb, by_eval in doc["kbs"].items():
        for e, by_rule in by_eval.items():
            for rule, r in by_rule.items():
                seeds = " / ".join(f"{100 * s['balanced_top1']:.2f}" for s in r["seeds"])
                lines.append(f"| KB_{kb} | KB_{e} | {rule} | {100 * r['balanced_top1']:.2f} | {seeds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(table(run(args)))


if __name__ == "__main__":
    main()
