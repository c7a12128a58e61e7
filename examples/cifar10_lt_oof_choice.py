"""Rows 4-6 with their post-hoc choices made out of fold: how much the demo's in-sample choice moves them.

    python examples/cifar10_lt_oof_choice.py              # KB_in heads (rows 4, 5), KB_ext heads (row 6), 3 seeds
    python examples/cifar10_lt_oof_choice.py --kbs ext --seeds 1

The demo chooses a trained head's vote temperature, vote scale and post-hoc adjustment on the long-tail training
images, which the head was trained on (their host logits are cross-fitted; the head's own fit is in-sample). Here
the same grids are scored on out-of-fold logits instead (heads trained on four folds score the fifth:
retrofit.demo_cv.out_of_fold_logits); the best out-of-fold choice is then applied to the demo's own head (its cached
head, or trained as the demo trains it) and scored once on test. Compare with the rows of results/cifar10_lt.md.
Uses the demo's cache (run `make demo` first, or it prepares the data). Writes results/cifar10_lt_oof_choice.json
(with `--host shared`, the fold heads on the demo's own cross-fitted host logits as before 24 Nov:
results/cifar10_lt_oof_choice_shared.json).
"""

from __future__ import annotations

import argparse
from typing import Any

from retrofit.demo_cv import checked_cv_arguments, cv_arguments, example_main, fold_heads, out_of_fold_logits, run_cv

# the KB a head trains with -> (row, the KB it is scored with): row 4's head is also row 5's, moved to KB_ext
ROWS = {"in": [("4", "in"), ("5", "ext")], "ext": [("6", "ext")]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return checked_cv_arguments(cv_arguments(__doc__.splitlines()[0]), argv)


def out_of_fold_rows(cfg: Any, data: Any, kb: str, seeds: range, folds: int, host: str = "nested") -> dict[str, Any]:
    """``{row: {"test_top1": mean, "seeds": [{seed, temperature, vote_scale, adjustment, oof_balanced_top1,
    test_top1}]}}`` for the rows whose heads train with ``kb``."""
    from retrofit.demo_heads import head_logits
    from retrofit.demo_pool import host_shifts
    from retrofit.demo_rules import balanced_top1, top1
    from retrofit.demo_train import head_epochs, train_head

    shift = host_shifts(cfg, data)[False]  # row 2's adjustment, as the demo's heads see it
    lp, y_test = data.log_prior(), data.labels("test")
    labels = data.train_features(kb).labels
    epochs = head_epochs(cfg, kb)
    heads = fold_heads(cfg, data, kb, [(epochs, s) for s in seeds], folds=folds, shift=shift, host=host)
    out: dict[str, Any] = {}
    for row, eval_kb in ROWS[kb]:
        per_seed = []
        for seed in seeds:
            oof = out_of_fold_logits(cfg, data, kb, eval_kb, epochs, seed, folds=folds, shift=shift,
                                     heads=heads[(epochs, seed)], host=host)
            score, _, t, scale, adj = max((balanced_top1(logits - a * lp, labels), -abs(a), t, s, a)
                                          for (t, s), logits in oof.items() for a in cfg.posthoc)
            head, _ = train_head(cfg, data, kb, seed, shift=shift)  # the demo's head (cached when it ran)
            if t != "trained":
                head.vote.set_temperature(t)
            head.vote.set_scale(scale)
            test = head_logits(head, data, eval_kb, "test", False, shift)
            per_seed.append({"seed": seed, "temperature": t, "vote_scale": scale, "adjustment": adj,
                             "oof_balanced_top1": score, "test_top1": top1(test - adj * lp, y_test)})
        out[row] = {"test_top1": sum(r["test_top1"] for r in per_seed) / len(per_seed), "seeds": per_seed}
    return out


def run(args: argparse.Namespace, **settings: Any) -> dict[str, Any]:
    return run_cv(args, "cifar10_lt_oof_choice",
                  lambda cfg, data, kb: out_of_fold_rows(cfg, data, kb, range(args.seeds), args.folds, args.host),
                  **{"progress": False, **settings})


def table(doc: dict[str, Any]) -> str:
    lines = ["| row | test top-1 (%), choices out of fold | per seed | choices (temperature, scale, adjustment) |",
             "|---|---:|---|---|"]
    for rows in doc["kbs"].values():
        for row, r in rows.items():
            seeds = " / ".join(f"{100 * s['test_top1']:.2f}" for s in r["seeds"])
            picks = "; ".join(f"{s['temperature']}, {s['vote_scale']:g}, {s['adjustment']:g}" for s in r["seeds"])
            lines.append(f"| {row} | {100 * r['test_top1']:.2f} | {seeds} | {picks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    example_main(parse_args, run, table, argv)


if __name__ == "__main__":
    main()
