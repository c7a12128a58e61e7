"""How long to train the demo's heads: 5-fold cross-validation on the long-tail training images.

    python examples/cifar10_lt_epochs_cv.py                       # KB_in and KB_ext heads, 1 / 3 / 10 epochs, 3 seeds
    python examples/cifar10_lt_epochs_cv.py --kbs ext --epochs 1,2,3 --seeds 1

For each KB and training length, heads trained on four folds (on host logits fitted without the fifth:
retrofit.demo_cv.nested_host_logits) score the fifth; the figure is the best out-of-fold
balanced top-1 over the demo's vote and adjustment grids (retrofit.demo_cv). This chose `DemoConfig.epochs_ext`.
Uses the demo's cache (run `make demo` first, or it prepares the data). Writes results/cifar10_lt_epochs_cv.json
(with `--host shared`, the fold heads on the demo's own cross-fitted host logits as before 24 Nov:
results/cifar10_lt_epochs_cv_shared.json).
"""

from __future__ import annotations

import argparse
from typing import Any

from retrofit.demo_cv import (
    checked_cv_arguments,
    cross_validate_epochs,
    cv_arguments,
    example_main,
    figure_cells,
    run_cv,
)


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = cv_arguments(__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=_ints, default=[1, 3, 10], help="training lengths (default 1,3,10)")
    return checked_cv_arguments(ap, argv)


def run(args: argparse.Namespace, **settings: Any) -> dict[str, Any]:
    """The cross-validation for every KB in ``args.kbs`` (``settings``: other DemoConfig fields); writes the JSON."""
    return run_cv(args, "cifar10_lt_epochs_cv",
                  lambda cfg, data, kb: {str(ep): r for ep, r in cross_validate_epochs(
                      cfg, data, kb, epochs=args.epochs, seeds=range(args.seeds), folds=args.folds,
                      host=args.host).items()},
                  **settings)


def table(doc: dict[str, Any]) -> str:
    lines = ["| KB | epochs | out-of-fold balanced top-1 (%) | per seed |", "|---|---:|---:|---|"]
    for kb, by_ep in doc["kbs"].items():
        for ep, r in by_ep.items():
            lines.append(f"| {kb} | {ep} | {figure_cells(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    example_main(parse_args, run, table, argv)


if __name__ == "__main__":
    main()
