"""CIFAR-10-LT end to end: the same run as `make demo` / `retrofit demo`, from Python.

    python examples/cifar10_lt.py            # one seed
    python examples/cifar10_lt.py --seeds 3  # mean ± std, as in the README table

Needs the offline data (RETROFIT_DATA_DIR, default ../shared/data). Writes results/cifar10_lt.{md,json,png}.
"""

from __future__ import annotations

import argparse
import logging

from retrofit.demo import DemoConfig, run_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1, help="head-training seeds (>= 1; > 1 gives mean ± std)")
    ap.add_argument("--cache-dir", default=".retrofit_cache/cifar10_lt")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    cfg = DemoConfig(seeds=args.seeds, cache_dir=args.cache_dir, results_dir=args.results_dir)
    try:
        cfg.validate()
    except (TypeError, ValueError) as e:
        ap.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    doc = run_demo(cfg)
    print(doc["table"])
    row4, row2 = doc["rows"]["4"], doc["rows"]["2"]
    print(f"retrofit head on KB_in: {100 * row4['top1']:.1f}% overall, {100 * row4['few']:.1f}% Few "
          f"(logit-adjusted host: {100 * row2['top1']:.1f}% / {100 * row2['few']:.1f}%)")


if __name__ == "__main__":
    main()
