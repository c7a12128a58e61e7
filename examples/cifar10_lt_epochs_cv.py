"""How long to train the demo's heads: 5-fold cross-validation on the long-tail training images.

    python examples/cifar10_lt_epochs_cv.py                       # KB_in and KB_ext heads, 1 / 3 / 10 epochs, 3 seeds
    python examples/cifar10_lt_epochs_cv.py --kbs ext --epochs 1,2,3 --seeds 1

For each KB and training length, heads trained on four folds score the fifth; the figure is the best out-of-fold
balanced top-1 over the demo's vote and adjustment grids (retrofit.demo_cv). This chose `DemoConfig.epochs_ext`.
Uses the demo's cache (run `make demo` first, or it prepares the data). Writes results/cifar10_lt_epochs_cv.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from retrofit.demo import DemoConfig
from retrofit.demo_cv import cross_validate_epochs
from retrofit.demo_data import prepare


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kbs", default="in,ext", help="knowledge bases the heads train with (in, ext; default in,ext)")
    ap.add_argument("--epochs", type=_ints, default=[1, 3, 10], help="training lengths (default 1,3,10)")
    ap.add_argument("--seeds", type=int, default=3, help="head-training seeds (default 3)")
    ap.add_argument("--folds", type=int, default=5, help="folds (default 5)")
    ap.add_argument("--cache-dir", default=".retrofit_cache/cifar10_lt")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args(argv)
    args.kbs = [k.strip() for k in args.kbs.split(",") if k.strip()]
    if not args.kbs or set(args.kbs) - {"in", "ext"}:
        ap.error(f"--kbs: expected in and/or ext, got {args.kbs}")
    if args.seeds < 1 or args.folds < 2:
        ap.error(f"--seeds must be >= 1 and --folds >= 2, got {args.seeds} / {args.folds}")
    return args


def run(args: argparse.Namespace, **settings: Any) -> dict[str, Any]:
    """The cross-validation for every KB in ``args.kbs`` (``settings``: other DemoConfig fields); writes the JSON."""
    cfg = DemoConfig(cache_dir=args.cache_dir, results_dir=args.results_dir, **settings)
    cfg.validate()
    data = prepare(cfg)
    try:
        doc = {"folds": args.folds, "seeds": args.seeds,
               "kbs": {kb: {str(ep): r for ep, r in cross_validate_epochs(
                   cfg, data, kb, epochs=args.epochs, seeds=range(args.seeds), folds=args.folds).items()}
                   for kb in args.kbs}}
    finally:
        data.close()
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cifar10_lt_epochs_cv.json").write_text(json.dumps(doc, indent=1))
    return doc


def table(doc: dict[str, Any]) -> str:
    lines = ["| KB | epochs | out-of-fold balanced top-1 (%) | per seed |", "|---|---:|---:|---|"]
    for kb, by_ep in doc["kbs"].items():
        for ep, r in by_ep.items():
            seeds = " / ".join(f"{100 * s['balanced_top1']:.2f}" for s in r["seeds"])
            lines.append(f"| {kb} | {ep} | {100 * r['balanced_top1']:.2f} | {seeds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(table(run(args)))


if __name__ == "__main__":
    main()
