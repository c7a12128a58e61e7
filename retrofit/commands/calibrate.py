"""``retrofit calibrate``: choose a trained vote head's label-vote weight (and, with ``--temperatures``, its
temperature) on labelled validation data, e.g. after swapping in another knowledge base; ``--save`` writes the
calibrated head. It loads what ``retrofit train`` wrote, as ``eval`` and ``predict`` do."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retrofit.commands import guarded, manifest_column_args
from retrofit.commands.predict import _head_inputs, _labelled_features, _load_args, _load_head, _resolve
from retrofit.commands.run_inputs import _open_kb, _runtime, data_path

_EPILOG_CALIBRATE = """examples:
  retrofit calibrate --run runs/c10 --kb kb/web --data val/                 # prints the best --vote-scale
  retrofit calibrate --run runs/c10 --kb kb/web --data val/ --save runs/c10/head-web
  retrofit eval --run runs/c10 --head runs/c10/head-web --kb kb/web --data test/

For heads trained with --label-vote. Scores each multiple of the learned vote weight on labelled validation
data (never the test set) from two passes over it (the logits are affine in the scale); ties go to the scale
nearest 1. --save writes the head with the chosen scale (no weight is trained). For a --vote-form mix head
the scale multiplies the odds a / (1 - a) of its mixing weight a (one pass scores every scale).
"""


def _scales(value: str, flag: str = "--scales", example: str = "0.5,1,2,4") -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {value!r}: expected comma-separated numbers >= 0, e.g. {example}") from None
    if not out or any(not x >= 0 or x == float("inf") for x in out):
        raise ValueError(f"{flag} {value!r}: expected comma-separated finite numbers >= 0, e.g. {example}")
    return out


def _check_save(save: Path, head_path: Path) -> None:
    """--save writes a whole head (weights + config): never over the head it calibrates or into a folder of other
    files (e.g. the run folder), refused before any work."""
    if save.exists() and save.resolve() == head_path.resolve():
        raise ValueError(f"--save {save} is the head being calibrated: give a new directory (the trained head stays "
                         "as it was, and the calibrated one goes next to it)")
    if save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise ValueError(f"--save {save} exists and is not an empty directory: give a new directory for the "
                         "calibrated head")


@guarded(also=(TypeError,))
def cmd_calibrate(args: argparse.Namespace) -> int:
    from retrofit.calibration import DEFAULT_SCALES, choose_vote_scale

    scales = _scales(args.scales) if args.scales is not None else list(DEFAULT_SCALES)
    temps = None
    if args.temperatures is not None:
        temps = _scales(args.temperatures, "--temperatures", "0.03,0.05,0.1")
        if any(t < 1e-6 for t in temps):
            raise ValueError(f"--temperatures {args.temperatures!r}: temperatures must be >= 1e-6 (e.g. 0.03,0.05,0.1)")
    run = _resolve(args)
    if args.save:
        _check_save(Path(args.save), Path(run["head_path"]))
    kb = _open_kb(run["kb"])
    head = _load_head(run["head_path"], kb, args.allow_fingerprint_mismatch)
    if head.vote is None:
        raise ValueError(f"the head {run['head_path']} has no label vote: nothing to calibrate (train it with "
                         "`retrofit train ... --label-vote`)")
    trained_on = run.get("data_path") or (data_path(run["data"]) if run.get("data") else None)
    if trained_on is not None and trained_on == data_path(args.data):
        print(f"warning: {args.data} is the head's training data: every scale scores too well there and the choice "
              "says little; give held-out validation data", file=sys.stderr)
    fs = _labelled_features(args, run, kb, head, "validation", "calibrate")
    host_clf = _head_inputs(run, head, fs)
    choice = choose_vote_scale(head, fs, kb, scales=scales, temperatures=temps, metric=args.metric,
                               rule=args.rule, host_classifier=host_clf, device=args.device)
    new_t = temps is not None and choice.temperature != choice.trained_temperature
    if args.save:
        head.save(args.save)
    if args.json:
        print(json.dumps({"scale": choice.scale, "metric": choice.metric, "n": choice.n,
                          "vote_form": choice.form, "trained_weight": choice.trained_weight, "weight": choice.weight,
                          "at_largest": choice.at_largest, "temperature": choice.temperature,
                          "rule": choice.rule, "best_by_score": list(choice.best_by_score),
                          "standard_error": choice.standard_error,
                          "trained_temperature": choice.trained_temperature,
                          "scores": {str(k): v for k, v in choice.scores.items()},
                          "scores_by_temperature": {str(t): {str(k): v for k, v in sc.items()}
                                                    for t, sc in choice.scores_by_temperature.items()},
                          "saved": args.save}))
        return 0
    if temps is not None:
        print(f"vote temperature: {choice.temperature:.4g} (trained {choice.trained_temperature:.4g}); the table is "
              "at that temperature")
    what = "mixing weight" if choice.form == "mix" else "vote weight"
    ll = choice.metric == "balanced_nll"  # (a mean log-likelihood, not a percentage)
    print(f"| vote scale | {what} | {choice.metric if not ll else 'balanced log-likelihood'} on {choice.n} images |")
    print("|---:|---:|---:|")
    for s, v in choice.scores.items():
        mark = " **chosen**" if s == choice.scale else ""
        score = f"{v:.4f}" if ll else f"{100 * v:.2f}%"
        print(f"| {s:g} | {choice.weight_at(s) + 0.0:.4g} | {score}{mark} |")  # (+0.0: no "-0")
    if (choice.temperature, choice.scale) != choice.best_by_score:
        t, s = choice.best_by_score
        se = f"{choice.standard_error:.4f} nats" if ll else f"{100 * choice.standard_error:.2f} points"
        print(f"(trained: the trained vote is kept; the best score is at scale {s:g}, temperature {t:.4g})"
              if choice.rule == "trained" else
              f"(one_se: the best score is at scale {s:g}, temperature {t:.4g}; the choice is within one paired "
              f"standard error, {se}, and nearer the trained vote)")
    # (a best scale at the largest candidate, a trained weight <= 0: choose_vote_scale has warned, once)
    if args.save:
        print(f"wrote the head with vote scale {choice.scale:g} to {args.save}; use it with --head {args.save}",
              file=sys.stderr)
    elif new_t:
        print(f"the chosen vote temperature {choice.temperature:.4g} is not the trained one: write the calibrated "
              "head with --save DIR and use it with --head DIR (eval / predict can set the scale only)",
              file=sys.stderr)
    else:
        print(f"use it with: retrofit eval|predict ... --kb {run['kb']} --vote-scale {choice.scale:g} "
              "(or --save DIR to write the calibrated head)", file=sys.stderr)
    return 0


def register_calibrate(sub: argparse._SubParsersAction) -> None:
    """Called by :func:`retrofit.commands.predict.register` (the command sits between eval and predict)."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("calibrate", help="choose a vote head's label-vote weight on validation data (after --kb swap)",
                       description="Choose the multiple of a trained head's label-vote weight on labelled "
                                   "validation data, e.g. after swapping in another knowledge base.",
                       epilog=_EPILOG_CALIBRATE, formatter_class=fmt)
    p.add_argument("--data", required=True, metavar="SOURCE", help="labelled validation data (not the test set)")
    manifest_column_args(p)
    _load_args(p, vote_scale=False)
    p.add_argument("--scales", default=None, metavar="S,S,...",
                   help="candidate multiples of the learned vote weight (--vote-form mix: of its odds) (default: "
                        "0,0.5,1,1.5,2,3,4,6,8,12,16)")
    p.add_argument("--temperatures", default=None, metavar="T,T,...",
                   help="also choose the vote's softmax temperature among these and the trained one, jointly with "
                        "the scale (e.g. 0.03,0.05,0.07,0.1; a head moved to a denser KB often wants a softer "
                        "vote); kept with --save")
    p.add_argument("--metric", choices=("top1", "balanced", "balanced_nll"), default="top1",
                   help="top1; balanced: mean per-class top-1; balanced_nll: mean per-class log-likelihood of the "
                        "label (smoother; on CIFAR-10-LT it chose smaller vote scales, which scored lower) "
                        "(default top1)")
    p.add_argument("--rule", choices=("best", "one_se", "trained"), default="best",
                   help="best: the best score; one_se: the candidate nearest the trained vote whose score is within "
                        "one paired standard error of the best (steadier on a few hundred images); trained: keep "
                        "the trained vote and only show the scores (default best)")
    p.add_argument("--save", default=None, metavar="DIR", help="write the head with the chosen scale here")
    p.add_argument("--no-cache", action="store_true", help="do not cache the validation features")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="feature cache (default RUN/cache)")
    _runtime(p)
    p.set_defaults(func=cmd_calibrate)
