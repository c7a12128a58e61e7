"""Cross-validated training length and vote-choice rule of the CIFAR-10-LT demo's heads (:mod:`retrofit.demo`).

The long-tail training images are split into class-stratified folds; for each fold a head is trained on the others
(the demo's head and trainer, :mod:`retrofit.demo_train`) and scores the held-out fold with neighbours from the
evaluation KB (own entries excluded, cross-fitted host logits, as the demo's choices see them). Every image then has
an out-of-fold score for each vote temperature and scale of the demo's grids; a training length is rated by the
best balanced top-1 these reach after the post-hoc adjustment (the choices the demo makes, made on images the
head never trained on). Validation (200 images) cannot rate epochs: a 20-epoch head over KB_ext that lost 1.5
points on test moved validation by one image.

    from retrofit.demo_cv import cross_validate_epochs
    cross_validate_epochs(cfg, prepare(cfg), "ext", epochs=(1, 3, 10), seeds=(0, 1, 2))

:func:`cross_validate_rules` nests the demo's choices instead: each fold's head chooses its vote scale and
temperature (by ``choose_vote_scale``'s ``rule``) and adjustment on the folds it trained on, as the demo does on the
whole long-tail set, and scores the held-out fold (``examples/cifar10_lt_rule_cv.py``; it chose
``DemoConfig.vote_rule``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retrofit.demo_data import DemoData
from retrofit.demo_pool import FoldJob, HeadSpec, host_shifts, train_fold_heads
from retrofit.demo_train import head_epochs, shifted

if TYPE_CHECKING:
    from retrofit.demo import DemoConfig

__all__ = ["checked_cv_arguments", "cross_validate_epochs", "cross_validate_rules", "cv_arguments", "example_main",
           "figure_cells", "fold_of_each", "merge_results", "out_of_fold_logits", "run_cv"]

log = logging.getLogger(__name__)


def fold_of_each(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """(N,) fold index of each sample: every class dealt round-robin over the folds in a shuffled order (``seed``),
    so each fold holds a fold's share of every class (a class of n samples: n // folds or one more); the folds of
    :func:`retrofit.linear_probe.stratified_folds`, which the host's cross-fitted logits use."""
    from retrofit.linear_probe import stratified_folds

    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    return stratified_folds(torch.as_tensor(labels), folds, seed).to(torch.int64)


def fold_heads(cfg: DemoConfig, data: DemoData, kb: str, runs: Sequence[tuple[int, int]], *, folds: int = 5,
               shift: torch.Tensor | None = None, noisy: bool = False, modalities: str = "image+text",
               vote: bool | None = None) -> dict[tuple[int, int], list[Any]]:
    """``{(epochs, seed): [head of fold 0, ...]}`` for every ``(epochs, seed)`` in ``runs``: each fold's head trained
    on the other folds of the long-tail images with neighbours from ``kb`` (host logits minus ``shift``), all of
    them several at a time (:func:`retrofit.demo_pool.train_fold_heads`, one intra-op thread each as the demo's)."""
    fold = fold_of_each(data.train_features(kb, noisy=noisy).labels, folds)
    spec = HeadSpec(kb, modalities, noisy, vote)
    jobs = [FoldJob(spec, seed, ep, (fold != f).nonzero().flatten(), shift) for ep, seed in runs for f in range(folds)]
    heads = train_fold_heads(cfg, data, jobs)
    return {run: heads[i * folds:(i + 1) * folds] for i, run in enumerate(runs)}


def out_of_fold_logits(cfg: DemoConfig, data: DemoData, kb: str, eval_kb: str, epochs: int, seed: int, *,
                       folds: int = 5, shift: torch.Tensor | None = None, noisy: bool = False,
                       modalities: str = "image+text", vote: bool | None = None,
                       heads: list[Any] | None = None) -> dict[tuple[Any, float], torch.Tensor]:
    """Out-of-fold logits of the long-tail images: ``{(temperature, vote scale): (N, C)}`` with temperature
    ``"trained"`` or one of ``cfg.vote_temperatures`` and the scales ``cfg.vote_scales`` (a head without the vote:
    the one key ``("trained", 1.0)``). Heads trained for ``epochs`` on the other folds with neighbours from ``kb``
    (``heads``: those of :func:`fold_heads`, else trained here), scored with neighbours from ``eval_kb``;
    ``shift``: subtracted from the host logits (row 2's adjustment)."""
    from retrofit.calibration import logits_by_vote_scale
    from retrofit.training import predict_logits

    if heads is None:
        heads = fold_heads(cfg, data, kb, [(epochs, seed)], folds=folds, shift=shift, noisy=noisy,
                           modalities=modalities, vote=vote)[(epochs, seed)]
    fs = shifted(data.train_features(kb, noisy=noisy), shift)
    fe = fs if eval_kb == kb else shifted(data.train_features(eval_kb, noisy=noisy), shift)
    fold = fold_of_each(fs.labels, folds)
    out: dict[tuple[Any, float], torch.Tensor] = {}
    for f, head in enumerate(heads):
        held = (fold == f).nonzero().flatten()
        if head.store is not data.kb(eval_kb):
            head.attach(data.kb(eval_kb))  # (a balanced vote is rebalanced for the evaluation KB)
        part = fe.subset(held)
        if head.vote is None:
            out.setdefault(("trained", 1.0), torch.zeros(len(fs), data.num_classes))[held] = predict_logits(
                head, part, data.kb(eval_kb), device="cpu")["logits"]
        else:
            trained = head.vote.temperature
            for t in ("trained", *cfg.vote_temperatures):
                head.vote.set_temperature(trained if t == "trained" else t)
                by_scale = logits_by_vote_scale(head, part, cfg.vote_scales, data.kb(eval_kb), device="cpu")
                for s, logits in by_scale.items():
                    out.setdefault((t, s), torch.zeros(len(fs), data.num_classes))[held] = logits
            head.vote.set_temperature(trained)
    return out


def cross_validate_epochs(cfg: DemoConfig, data: DemoData, kb: str, eval_kb: str | None = None,
                          epochs: Sequence[int] = (1, 3, 10), seeds: Sequence[int] = (0,), folds: int = 5,
                          noisy: bool = False) -> dict[int, dict[str, Any]]:
    """For each training length in ``epochs``: the best out-of-fold balanced top-1 (over the vote grids and the
    post-hoc adjustments ``cfg.posthoc``) of heads trained with ``kb`` and scored with ``eval_kb`` (default ``kb``),
    per seed and averaged, with the settings that reached it. Heads see row 2's logit-adjusted host logits when
    ``cfg.adjust_host`` (the strength chosen on validation, as in the demo)."""
    from retrofit.demo_rules import balanced_top1

    bad = [e for e in epochs if not isinstance(e, int) or isinstance(e, bool) or e < 1]
    if not epochs or bad:
        raise ValueError(f"epochs must be positive ints, got {list(epochs)!r}")
    eval_kb = eval_kb or kb
    lp = data.log_prior(noisy=noisy)
    shift = host_shifts(cfg, data)[noisy]  # row 2's (8h's) adjustment, as the demo's heads see it
    labels = data.train_features(kb, noisy=noisy).labels
    heads = fold_heads(cfg, data, kb, [(ep, seed) for ep in epochs for seed in seeds], folds=folds, shift=shift,
                       noisy=noisy)
    result: dict[int, dict[str, Any]] = {}
    for ep in epochs:
        per_seed = []
        for seed in seeds:
            oof = out_of_fold_logits(cfg, data, kb, eval_kb, ep, seed, folds=folds, shift=shift, noisy=noisy,
                                     heads=heads[(ep, seed)])
            best = max(((balanced_top1(logits - a * lp, labels), t, s, a)
                        for (t, s), logits in oof.items() for a in cfg.posthoc), key=lambda r: r[0])  # ties: first
            per_seed.append({"seed": seed, "balanced_top1": best[0], "temperature": best[1], "vote_scale": best[2],
                             "adjustment": best[3]})
        result[ep] = {"balanced_top1": sum(r["balanced_top1"] for r in per_seed) / len(per_seed), "seeds": per_seed}
    return result


def cross_validate_rules(cfg: DemoConfig, data: DemoData, kb: str, eval_kbs: Sequence[str] | None = None,
                         rules: Sequence[str] = ("best", "one_se"), seeds: Sequence[int] = (0,),
                         folds: int = 5, metrics: Sequence[str] = ("balanced",)) -> dict[str, dict[str, Any]]:
    """Nested cross-validation of the demo's vote choice (:func:`retrofit.calibration.choose_vote_scale`'s
    ``rule``): for each fold a head trained on the other folds (``cfg``'s epochs for ``kb``) makes the demo's
    choices on the images it trained on (vote temperature and scale by ``rule`` on each of ``metrics``, then the
    post-hoc adjustment), as the demo does on the whole long-tail set, and is scored on the held-out fold: the
    out-of-fold balanced top-1 each rule leads to, per evaluation KB in ``eval_kbs`` (default ``kb``; the head is
    attached to each, as row 5 moves row 4's head). ``metrics``: what the choice scores (``choose_vote_scale``'s
    ``metric``; each with each rule); the figure is balanced top-1 whatever the metric. Returns ``{eval_kb: {name:
    {"balanced_top1", "seeds"}}}``, ``name`` the rule for ``"balanced"``, else ``"<rule>/<metric>"``."""
    from retrofit.calibration import choose_vote_scale
    from retrofit.demo_rules import balanced_adjustment, balanced_top1
    from retrofit.training import predict_logits

    eval_kbs = list(eval_kbs or [kb])
    lp = data.log_prior()
    shift = host_shifts(cfg, data)[False]  # row 2's adjustment, as the demo's heads see it
    fs = shifted(data.train_features(kb), shift)
    labels = fs.labels
    fold = fold_of_each(labels, folds)
    # eval_kb -> rule -> seed -> (N, C) out-of-fold logits at each fold's choices
    rules, metrics = list(dict.fromkeys(rules)), list(dict.fromkeys(metrics))  # (each once)
    # (rule, metric, name); "trained" chooses nothing, so once whatever the metrics
    ways = [(r, m, r if m == "balanced" else f"{r}/{m}") for m in metrics for r in rules
            if r != "trained" or m == metrics[0]]
    oof = {e: {n: {s: torch.zeros(len(fs), data.num_classes) for s in seeds} for _, _, n in ways} for e in eval_kbs}
    picks: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
    heads = fold_heads(cfg, data, kb, [(head_epochs(cfg, kb), seed) for seed in seeds], folds=folds, shift=shift)
    for seed in seeds:
        for f, head in enumerate(heads[(head_epochs(cfg, kb), seed)]):
            t0 = time.perf_counter()
            fit, held = (fold != f).nonzero().flatten(), (fold == f).nonzero().flatten()
            trained_t = head.vote.temperature
            for e in eval_kbs:
                store = data.kb(e)
                if head.store is not store:
                    head.attach(store)
                fe = fs if e == kb else shifted(data.train_features(e), shift)
                for rule, metric, name in ways:
                    c = choose_vote_scale(head, fe.subset(fit), store, scales=cfg.vote_scales,
                                          temperatures=cfg.vote_temperatures or None, metric=metric, rule=rule,
                                          apply=True, device="cpu")
                    on_fit = predict_logits(head, fe.subset(fit), store, device="cpu")["logits"]
                    adj = balanced_adjustment(on_fit, labels[fit], lp, cfg.posthoc)
                    on_held = predict_logits(head, fe.subset(held), store, device="cpu")["logits"]
                    oof[e][name][seed][held] = on_held - adj * lp
                    picks.setdefault((e, name, seed), []).append((c.temperature, c.scale, adj))
                    head.vote.set_scale(1.0)
                    head.vote.set_temperature(trained_t)
            log.info("rule CV %s, seed %d: fold %d/%d scored in %.1f s", kb, seed, f + 1, folds,
                     time.perf_counter() - t0)
    out: dict[str, dict[str, Any]] = {}
    for e in eval_kbs:
        out[e] = {}
        for _, _, name in ways:
            per_seed = [{"seed": s, "balanced_top1": balanced_top1(oof[e][name][s], labels),
                         "choices": [list(p) for p in picks[(e, name, s)]]} for s in seeds]
            out[e][name] = {"balanced_top1": sum(r["balanced_top1"] for r in per_seed) / len(per_seed),
                            "seeds": per_seed}
    return out


# ----------------------------------------------------------------------------------- the two example scripts


def cv_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments the cross-validation examples share: --kbs, --seeds, --folds, --cache-dir, --results-dir
    (checked by :func:`checked_cv_arguments`)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--kbs", default="in,ext", help="knowledge bases the heads train with (in, ext; default in,ext)")
    ap.add_argument("--seeds", type=int, default=3, help="head-training seeds (default 3)")
    ap.add_argument("--folds", type=int, default=5, help="folds (default 5)")
    ap.add_argument("--cache-dir", default=".retrofit_cache/cifar10_lt")
    ap.add_argument("--results-dir", default="results")
    return ap


def checked_cv_arguments(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``ap``'s arguments parsed from ``argv``, --kbs as a list; bad values end the script with a usage error."""
    args = ap.parse_args(argv)
    args.kbs = [k.strip() for k in args.kbs.split(",") if k.strip()]
    if not args.kbs or set(args.kbs) - {"in", "ext"}:
        ap.error(f"--kbs: expected in and/or ext, got {args.kbs}")
    if args.seeds < 1 or args.folds < 2:
        ap.error(f"--seeds must be >= 1 and --folds >= 2, got {args.seeds} / {args.folds}")
    return args


def run_cv(args: argparse.Namespace, name: str, per_kb: Callable[[DemoConfig, DemoData, str], Any],
           **settings: Any) -> dict[str, Any]:
    """``{"folds", "seeds", "kbs": {kb: per_kb(cfg, data, kb) for each of args.kbs}}`` on the demo's prepared data
    (``settings``: DemoConfig fields besides the directories), also written to ``args.results_dir/<name>.json``:
    merged into the file there when it holds a run with the same folds and seeds (:func:`merge_results`: a later
    run with other rules or KBs adds its rows and replaces only those it ran again), else replacing it."""
    from retrofit.demo import DemoConfig
    from retrofit.demo_data import prepare

    cfg = DemoConfig(**{"cache_dir": args.cache_dir, "results_dir": args.results_dir, **settings})
    cfg.validate()
    data = prepare(cfg)
    try:
        doc = {"folds": args.folds, "seeds": args.seeds, "kbs": {kb: per_kb(cfg, data, kb) for kb in args.kbs}}
    finally:
        data.close()
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    merged = merge_results(json.loads(path.read_text()) if path.is_file() else None, doc)
    path.write_text(json.dumps(merged, indent=1))
    return doc


def merge_results(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus what of ``old`` it does not redo, when both have the same folds and seeds (else ``new`` alone:
    figures over other folds or seeds do not mix). Both are ``{"folds", "seeds", "kbs": {kb: {key: entry}}}``; an
    ``old`` KB or key that ``new`` lacks is kept, and an entry that maps names to results (``{rule: {"seeds", ...}}``,
    the rule CV's) is merged name by name; any other entry (a result itself) is ``new``'s."""
    if not old or (old.get("folds"), old.get("seeds")) != (new["folds"], new["seeds"]):
        return new

    def by_name(entry: Any) -> bool:
        return isinstance(entry, dict) and bool(entry) and all(isinstance(v, dict) and "seeds" in v
                                                               for v in entry.values())

    kbs: dict[str, Any] = {kb: dict(v) for kb, v in old.get("kbs", {}).items()}
    for kb, entries in new["kbs"].items():
        mine = kbs.setdefault(kb, {})
        for key, entry in entries.items():
            mine[key] = {**mine[key], **entry} if by_name(entry) and by_name(mine.get(key)) else entry
    return {**old, **new, "kbs": kbs}


def figure_cells(r: dict[str, Any]) -> str:
    """A result's table cells: the out-of-fold balanced top-1 (%) over the seeds, then each seed's."""
    return f"{100 * r['balanced_top1']:.2f} | " + " / ".join(f"{100 * s['balanced_top1']:.2f}" for s in r["seeds"])


def example_main(parse_args: Callable[[list[str] | None], argparse.Namespace],
                 run: Callable[[argparse.Namespace], dict[str, Any]], table: Callable[[dict[str, Any]], str],
                 argv: list[str] | None = None) -> None:
    """An example script's main: parse ``argv``, log at INFO, run, print the markdown table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(table(run(args)))
