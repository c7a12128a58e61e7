"""CIFAR-10-LT end to end: the same run as `make demo` / `retrofit demo`, from Python.

    python examples/cifar10_lt.py            # one seed
    python examples/cifar10_lt.py --seeds 3  # mean ± std, as in the README table

Needs the offline data (RETROFIT_DATA_DIR, default ../shared/data). Writes results/cifar10_lt.{md,json,png}.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from retrofit.demo import DemoConfig, run_demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1, help="head-training seeds (>= 1; > 1 gives mean ± std)")
    ap.add_argument("--cache-dir", default=".retrofit_cache/cifar10_lt")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args(argv)
    try:
        DemoConfig(seeds=args.seeds, cache_dir=args.cache_dir, results_dir=args.results_dir).validate()
    except (TypeError, ValueError) as e:
        ap.error(str(e))
    return args


def run(args: argparse.Namespace, **settings: Any) -> dict[str, Any]:
    """The demo with ``args``' seeds and directories (``settings``: other :class:`DemoConfig` fields); its report."""
    return run_demo(DemoConfig(**{"seeds": args.seeds, "cache_dir": args.cache_dir, "results_dir": args.results_dir,
                                  **settings}))


def summary(doc: dict[str, Any]) -> str:
    """The headline: row 4 against the logit-adjusted host (row 2), overall and on the Few classes."""
    row4, row2 = doc["rows"]["4"], doc["rows"]["2"]
    return (f"retrofit head on KB_in: {100 * row4['top1']:.1f}% overall, {100 * row4['few']:.1f}% Few "
            f"(logit-adjusted host: {100 * row2['top1']:.1f}% / {100 * row2['few']:.1f}%)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    doc = run(args)
    print(doc["table"])
    print(summary(doc))


if __name__ == "__main__":
    main()
