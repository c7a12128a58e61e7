"""How the demo picks its vote scale on the training images: nested cross-validation of the choice rule.

    python examples/cifar10_lt_rule_cv.py                # KB_in heads (rows 4, 5), KB_ext heads (row 6), 3 seeds
    python examples/cifar10_lt_rule_cv.py --kbs in --seeds 1
    python examples/cifar10_lt_rule_cv.py --metrics balanced,balanced_nll   # also choices by log-likelihood

For each fold, a head trained on the other four folds makes the demo's choices on the images it trained on (vote
temperature and scale by ``rule``, then the post-hoc adjustment) and scores the held-out fold; the figure is the
out-of-fold balanced top-1 each rule leads to (retrofit.demo_cv.cross_validate_rules). ``best`` takes the best score,
``one_se`` the candidate nearest the trained vote within one paired standard error of it
(retrofit.calibration.choose_vote_scale); with ``--metrics``, the choice scores each candidate by balanced top-1
and / or by class-balanced log-likelihood (rows ``<rule>/balanced_nll``). This chose `DemoConfig.vote_rule`. Uses
the demo's cache (run `make demo` first, or it prepares the data). The fold heads' host logits are nested (fitted
without the fold held out; retrofit.demo_cv.nested_host_logits). Writes results/cifar10_lt_rule_cv.json (with
`--host shared`, the demo's own cross-fitted host logits as before 24 Nov: results/cifar10_lt_rule_cv_shared.json);
~10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
from typing import Any

from retrofit.calibration import RULES
from retrofit.demo_cv import (
    checked_cv_arguments,
    cross_validate_rules,
    cv_arguments,
    example_main,
    figure_cells,
    run_cv,
)

# the KB a head trains with -> the KBs it is scored with (row 4's head is also row 5's, moved to KB_ext)
SETTINGS = {"in": ["in", "ext"], "ext": ["ext"]}


METRICS = ("balanced", "balanced_nll")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = cv_arguments(__doc__.splitlines()[0])
    ap.add_argument("--rules", default="best,one_se",
                    help="choice rules, comma-separated: best, one_se, trained (the trained vote kept: the baseline) "
                         "(default best,one_se)")
    ap.add_argument("--metrics", default="balanced",
                    help="what the choice scores, comma-separated: balanced (balanced top-1, the demo's), "
                         "balanced_nll (class-balanced log-likelihood); each with each rule (default balanced)")
    args = checked_cv_arguments(ap, argv)
    args.rules = list(dict.fromkeys(r.strip() for r in args.rules.split(",") if r.strip()))
    if not args.rules or set(args.rules) - set(RULES):
        ap.error(f"--rules: expected some of {', '.join(RULES)}, got {args.rules}")
    args.metrics = list(dict.fromkeys(m.strip() for m in args.metrics.split(",") if m.strip()))
    if not args.metrics or set(args.metrics) - set(METRICS):
        ap.error(f"--metrics: expected some of {', '.join(METRICS)}, got {args.metrics}")
    return args


def run(args: argparse.Namespace, **settings: Any) -> dict[str, Any]:
    """The nested cross-validation for every KB in ``args.kbs`` (``settings``: other DemoConfig fields)."""
    return run_cv(args, "cifar10_lt_rule_cv",
                  lambda cfg, data, kb: cross_validate_rules(cfg, data, kb, SETTINGS[kb], seeds=range(args.seeds),
                                                             folds=args.folds, metrics=args.metrics,
                                                             rules=args.rules, host=args.host),
                  **{"progress": False, **settings})


def table(doc: dict[str, Any]) -> str:
    lines = ["| head trained with | scored with | rule (/ metric) | out-of-fold balanced top-1 (%) | per seed |",
             "|---|---|---|---:|---|"]
    for kb, by_eval in doc["kbs"].items():
        for e, by_rule in by_eval.items():
            for rule, r in by_rule.items():
                lines.append(f"| KB_{kb} | KB_{e} | {rule} | {figure_cells(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    example_main(parse_args, run, table, argv)


if __name__ == "__main__":
    main()
