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

The host logits the fold heads train against and make their choices on are nested (``host="nested"``, the
default since 24 Nov): in the world of fold ``f`` held out, every image's host logits come from a probe fitted
without fold ``f`` (:func:`nested_host_logits`). The demo's own cross-fitted logits (``host="shared"``, the runs
before) gave the fold-``f`` head training logits from probes that had seen fold ``f``'s labels.
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

__all__ = ["HOSTS", "checked_cv_arguments", "cross_validate_epochs", "cross_validate_rules", "cv_arguments",
           "example_main", "figure_cells", "fold_hosts", "fold_of_each", "merge_results", "nested_host_logits",
           "out_of_fold_logits", "run_cv"]

log = logging.getLogger(__name__)

# host logits of the fold heads: "nested" (:func:`nested_host_logits`), "shared" (the data's cross-fitted ones)
HOSTS = ("nested", "shared")


def fold_of_each(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """(N,) fold index of each sample: every class dealt round-robin over the folds in a shuffled order (``seed``),
    so each fold holds a fold's share of every class (a class of n samples: n // folds or one more); the folds of
    :func:`retrofit.linear_probe.stratified_folds`, which the host's cross-fitted logits use."""
    from retrofit.linear_probe import stratified_folds

    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    return stratified_folds(torch.as_tensor(labels), folds, seed).to(torch.int64)


def nested_host_logits(cfg: DemoConfig, data: DemoData, noisy: bool = False, folds: int = 5) -> torch.Tensor:
    """(folds, N, C) host logits of the long-tail images for the fold heads: entry ``f`` is what the world without
    fold ``f`` holds (:func:`retrofit.linear_probe.nested_cross_fit_logits` with the demo's probe, on
    :func:`fold_of_each`'s folds; on fold ``f`` itself the demo's own cross-fitted logits when ``folds`` is 5).
    Fitted once (``folds * (folds + 1) / 2`` probes, ~2.5 min for 5 folds here) and cached next to the demo's host
    logits; refitted when the labels, the features or the probe's code differ from those they were fitted on."""
    from retrofit.demo_build import _load_or_empty, _save_atomic
    from retrofit.demo_data import _probe_code_digest, _tensor_digest
    from retrofit.linear_probe import _same_fold_for_twins, nested_cross_fit_logits

    z = data.tensors["z_lt"]
    y = torch.from_numpy(data.noisy_lt_labels) if noisy else data.labels("lt")
    fold = fold_of_each(y, folds)
    if not torch.equal(_same_fold_for_twins(z, fold), fold):  # (no identical images in CIFAR-10-LT)
        raise ValueError("identical feature rows sit in different folds: the nested host logits would not match "
                         "fold_of_each's folds; use host='shared'")
    path = Path(data.root) / (f"host-nested{'-noisy' if noisy else ''}-wd{cfg.host_weight_decay:g}-k{folds}"
                              f"-c{_probe_code_digest()}.safetensors")
    saved, digest = _load_or_empty(path), _tensor_digest(z)
    if ("logits" in saved and torch.equal(saved.get("fit_labels", torch.empty(0)), y)
            and torch.equal(saved.get("fit_z", torch.empty(0)), digest)):
        return saved["logits"]
    t = time.perf_counter()
    logits = nested_cross_fit_logits(z, y, data.num_classes, folds=folds, weight_decay=cfg.host_weight_decay)
    _save_atomic({"logits": logits.contiguous(), "fit_labels": y.clone(), "fit_z": digest.clone()}, path)
    log.info("nested host logits (%d folds%s) fitted in %.0f s", folds, ", noisy" if noisy else "",
             time.perf_counter() - t)
    return logits


def fold_hosts(cfg: DemoConfig, data: DemoData, folds: int, noisy: bool = False,
               host: str = "nested") -> list[torch.Tensor | None]:
    """Each fold's host logits for the world without it ((N, C), :func:`nested_host_logits`), or ``None`` for each
    (``host="shared"``: the data's cross-fitted logits)."""
    if host not in HOSTS:
        raise ValueError(f"host must be one of {', '.join(HOSTS)}, got {host!r}")
    if host == "shared":
        return [None] * folds
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 3:
        raise ValueError("host='nested' needs folds >= 3 (with 2 folds no images are left to fit a probe without "
                         f"either fold); got folds={folds!r}: use more folds or host='shared'")
    return list(nested_host_logits(cfg, data, noisy, folds).unbind(0))


def _features_for(data: DemoData, kb: str, noisy: bool, host: torch.Tensor | None,
                  shift: torch.Tensor | None) -> Any:
    """The long-tail images' features with neighbours from ``kb``, host logits ``host`` (None: the data's) minus
    ``shift``."""
    from dataclasses import replace

    fs = data.train_features(kb, noisy=noisy)
    return shifted(fs if host is None else replace(fs, host_logits=host), shift)


def fold_heads(cfg: DemoConfig, data: DemoData, kb: str, runs: Sequence[tuple[int, int]], *, folds: int = 5,
               shift: torch.Tensor | None = None, noisy: bool = False, modalities: str = "image+text",
               vote: bool | None = None, host: str = "nested") -> dict[tuple[int, int], list[Any]]:
    """``{(epochs, seed): [head of fold 0, ...]}`` for every ``(epochs, seed)`` in ``runs``: each fold's head trained
    on the other folds of the long-tail images with neighbours from ``kb`` (host logits of :func:`fold_hosts`
    minus ``shift``), all of them several at a time (:func:`retrofit.demo_pool.train_fold_heads`, one intra-op
    thread each as the demo's)."""
    fold = fold_of_each(data.train_features(kb, noisy=noisy).labels, folds)
    hosts = fold_hosts(cfg, data, folds, noisy, host)
    spec = HeadSpec(kb, modalities, noisy, vote)
    jobs = [FoldJob(spec, seed, ep, (fold != f).nonzero().flatten(), shift, hosts[f])
            for ep, seed in runs for f in range(folds)]
    heads = train_fold_heads(cfg, data, jobs)
    return {run: heads[i * folds:(i + 1) * folds] for i, run in enumerate(runs)}


def out_of_fold_logits(cfg: DemoConfig, data: DemoData, kb: str, eval_kb: str, epochs: int, seed: int, *,
                       folds: int = 5, shift: torch.Tensor | None = None, noisy: bool = False,
                       modalities: str = "image+text", vote: bool | None = None,
                       heads: list[Any] | None = None, host: str = "nested") -> dict[tuple[Any, float], torch.Tensor]:
    """Out-of-fold logits of the long-tail images: ``{(temperature, vote scale): (N, C)}`` with temperature
    ``"trained"`` or one of ``cfg.vote_temperatures`` and the scales ``cfg.vote_scales`` (a head without the vote:
    the one key ``("trained", 1.0)``). Heads trained for ``epochs`` on the other folds with neighbours from ``kb``
    (``heads``: those of :func:`fold_heads`, else trained here), scored with neighbours from ``eval_kb``;
    ``shift``: subtracted from the host logits (row 2's adjustment); ``host``: :func:`fold_hosts`' (the held-out
    fold's own rows: the same for both with 5 folds)."""
    from retrofit.calibration import logits_by_vote_scale
    from retrofit.training import predict_logits

    if heads is None:
        heads = fold_heads(cfg, data, kb, [(epochs, seed)], folds=folds, shift=shift, noisy=noisy,
                           modalities=modalities, vote=vote, host=host)[(epochs, seed)]
    n = len(data.train_features(kb, noisy=noisy))
    fold = fold_of_each(data.train_features(kb, noisy=noisy).labels, folds)
    hosts = fold_hosts(cfg, data, folds, noisy, host)
    out: dict[tuple[Any, float], torch.Tensor] = {}
    for f, head in enumerate(heads):
        held = (fold == f).nonzero().flatten()
        if head.store is not data.kb(eval_kb):
            head.attach(data.kb(eval_kb))  # (a balanced vote is rebalanced for the evaluation KB)
        part = _features_for(data, eval_kb, noisy, hosts[f], shift).subset(held)
        if head.vote is None:
            out.setdefault(("trained", 1.0), torch.zeros(n, data.num_classes))[held] = predict_logits(
                head, part, data.kb(eval_kb), device="cpu")["logits"]
        else:
            trained = head.vote.temperature
            for t in ("trained", *cfg.vote_temperatures):
                head.vote.set_temperature(trained if t == "trained" else t)
                by_scale = logits_by_vote_scale(head, part, cfg.vote_scales, data.kb(eval_kb), device="cpu")
                for s, logits in by_scale.items():
                    out.setdefault((t, s), torch.zeros(n, data.num_classes))[held] = logits
            head.vote.set_temperature(trained)
    return out


def cross_validate_epochs(cfg: DemoConfig, data: DemoData, kb: str, eval_kb: str | None = None,
                          epochs: Sequence[int] = (1, 3, 10), seeds: Sequence[int] = (0,), folds: int = 5,
                          noisy: bool = False, host: str = "nested") -> dict[int, dict[str, Any]]:
    """For each training length in ``epochs``: the best out-of-fold balanced top-1 (over the vote grids and the
    post-hoc adjustments ``cfg.posthoc``) of heads trained with ``kb`` and scored with ``eval_kb`` (default ``kb``),
    per seed and averaged, with the settings that reached it. Heads see row 2's logit-adjusted host logits when
    ``cfg.adjust_host`` (the strength chosen on validation, as in the demo); ``host``: :func:`fold_hosts`'."""
    from retrofit.demo_rules import balanced_top1

    bad = [e for e in epochs if not isinstance(e, int) or isinstance(e, bool) or e < 1]
    if not epochs or bad:
        raise ValueError(f"epochs must be positive ints, got {list(epochs)!r}")
    eval_kb = eval_kb or kb
    lp = data.log_prior(noisy=noisy)
    shift = host_shifts(cfg, data)[noisy]  # row 2's (8h's) adjustment, as the demo's heads see it
    labels = data.train_features(kb, noisy=noisy).labels
    heads = fold_heads(cfg, data, kb, [(ep, seed) for ep in epochs for seed in seeds], folds=folds, shift=shift,
                       noisy=noisy, host=host)
    result: dict[int, dict[str, Any]] = {}
    for ep in epochs:
        per_seed = []
        for seed in seeds:
            oof = out_of_fold_logits(cfg, data, kb, eval_kb, ep, seed, folds=folds, shift=shift, noisy=noisy,
                                     heads=heads[(ep, seed)], host=host)
            best = max(((balanced_top1(logits - a * lp, labels), t, s, a)
                        for (t, s), logits in oof.items() for a in cfg.posthoc), key=lambda r: r[0])  # ties: first
            per_seed.append({"seed": seed, "balanced_top1": best[0], "temperature": best[1], "vote_scale": best[2],
                             "adjustment": best[3]})
        result[ep] = {"balanced_top1": sum(r["balanced_top1"] for r in per_seed) / len(per_seed), "seeds": per_seed}
    return result


def cross_validate_rules(cfg: DemoConfig, data: DemoData, kb: str, eval_kbs: Sequence[str] | None = None,
                         rules: Sequence[str] = ("best", "one_se"), seeds: Sequence[int] = (0,),
                         folds: int = 5, metrics: Sequence[str] = ("balanced",),
                         host: str = "nested") -> dict[str, dict[str, Any]]:
    """Nested cross-validation of the demo's vote choice (:func:`retrofit.calibration.choose_vote_scale`'s
    ``rule``): for each fold a head trained on the other folds (``cfg``'s epochs for ``kb``) makes the demo's
    choices on the images it trained on (vote temperature and scale by ``rule`` on each of ``metrics``, then the
    post-hoc adjustment), as the demo does on the whole long-tail set, and is scored on the held-out fold: the
    out-of-fold balanced top-1 each rule leads to, per evaluation KB in ``eval_kbs`` (default ``kb``; the head is
    attached to each, as row 5 moves row 4's head). ``metrics``: what the choice scores (``choose_vote_scale``'s
    ``metric``; each with each rule); the figure is balanced top-1 whatever the metric. Returns ``{eval_kb: {name:
    {"balanced_top1", "seeds"}}}``, ``name`` the rule for ``"balanced"``, else ``"<rule>/<metric>"``. ``host``:
    the host logits of each fold's world, for its training, its choices and its scores (:func:`fold_hosts`)."""
    from retrofit.calibration import choose_vote_scale
    from retrofit.demo_rules import balanced_adjustment, balanced_top1
    from retrofit.training import predict_logits

    eval_kbs = list(eval_kbs or [kb])
    lp = data.log_prior()
    shift = host_shifts(cfg, data)[False]  # row 2's adjustment, as the demo's heads see it
    labels = data.train_features(kb).labels
    fold = fold_of_each(labels, folds)
    hosts = fold_hosts(cfg, data, folds, False, host)
    # eval_kb -> rule -> seed -> (N, C) out-of-fold logits at each fold's choices
    rules, metrics = list(dict.fromkeys(rules)), list(dict.fromkeys(metrics))  # (each once)
    # (rule, metric, name); "trained" chooses nothing, so once whatever the metrics
    ways = [(r, m, r if m == "balanced" else f"{r}/{m}") for m in metrics for r in rules
            if r != "trained" or m == metrics[0]]
    oof = {e: {n: {s: torch.zeros(len(labels), data.num_classes) for s in seeds} for _, _, n in ways} for e in eval_kbs}
    picks: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
    heads = fold_heads(cfg, data, kb, [(head_epochs(cfg, kb), seed) for seed in seeds], folds=folds, shift=shift,
                       host=host)
    for seed in seeds:
        for f, head in enumerate(heads[(head_epochs(cfg, kb), seed)]):
            t0 = time.perf_counter()
            fit, held = (fold != f).nonzero().flatten(), (fold == f).nonzero().flatten()
            trained_t = head.vote.temperature
            for e in eval_kbs:
                store = data.kb(e)
                if head.store is not store:
                    head.attach(store)
                fe = _features_for(data, e, False, hosts[f], shift)
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
    """The arguments the cross-validation examples share: --kbs, --seeds, --folds, --host, --cache-dir,
    --results-dir (checked by :func:`checked_cv_arguments`)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--kbs", default="in,ext", help="knowledge bases the heads train with (in, ext; default in,ext)")
    ap.add_argument("--seeds", type=int, default=3, help="head-training seeds (default 3)")
    ap.add_argument("--folds", type=int, default=5, help="folds (default 5; >= 3 with --host nested)")
    ap.add_argument("--host", choices=HOSTS, default="nested",
                    help="host logits of the fold heads: nested (each fold's world has its own, fitted without the "
                         "fold held out) or shared (the demo's cross-fitted ones, as the runs before 24 Nov) "
                         "(default nested)")
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
    if args.host == "nested" and args.folds < 3:
        ap.error(f"--host nested needs --folds >= 3, got {args.folds} (or use --host shared)")
    return args


def run_cv(args: argparse.Namespace, name: str, per_kb: Callable[[DemoConfig, DemoData, str], Any],
           **settings: Any) -> dict[str, Any]:
    """``{"folds", "seeds", "host", "kbs": {kb: per_kb(cfg, data, kb) for each of args.kbs}}`` on the demo's
    prepared data (``settings``: DemoConfig fields besides the directories), also written to
    ``args.results_dir/<name>.json`` (``<name>_shared.json`` with ``--host shared``): merged into the file there
    when it holds a run with the same folds, seeds and host logits (:func:`merge_results`: a later run with other
    rules or KBs adds its rows and replaces only those it ran again), else replacing it."""
    from retrofit.demo import DemoConfig
    from retrofit.demo_data import prepare

    cfg = DemoConfig(**{"cache_dir": args.cache_dir, "results_dir": args.results_dir, **settings})
    cfg.validate()
    data = prepare(cfg)
    try:
        doc = {"folds": args.folds, "seeds": args.seeds, "host": args.host,
               "kbs": {kb: per_kb(cfg, data, kb) for kb in args.kbs}}
    finally:
        data.close()
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{'' if args.host == 'nested' else '_shared'}.json"
    merged = merge_results(json.loads(path.read_text()) if path.is_file() else None, doc)
    path.write_text(json.dumps(merged, indent=1))
    return doc


def merge_results(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus what of ``old`` it does not redo, when both have the same folds, seeds and host logits (else
    ``new`` alone: figures over other folds, seeds or hosts do not mix; a file without ``"host"`` is from the runs
    before it, ``"shared"``). Both are ``{"folds", "seeds", "host", "kbs": {kb: {key: entry}}}``; an
    ``old`` KB or key that ``new`` lacks is kept, and an entry that maps names to results (``{rule: {"seeds", ...}}``,
    the rule CV's) is merged name by name; any other entry (a result itself) is ``new``'s."""
    if not old or ((old.get("folds"), old.get("seeds"), old.get("host", "shared"))
                   != (new["folds"], new["seeds"], new.get("host", "shared"))):
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
