"""Cross-validated training length of the CIFAR-10-LT demo's heads (:mod:`retrofit.demo`).

The long-tail training images are split into class-stratified folds; for each fold a head is trained on the others
(the demo's head and trainer, :mod:`retrofit.demo_train`) and scores the held-out fold with neighbours from the
evaluation KB (own entries excluded, cross-fitted host logits, as the demo's choices see them). Every image then has
an out-of-fold score for each vote temperature and scale of the demo's grids; a training length is rated by the
best balanced top-1 these reach after the post-hoc adjustment (the choices the demo makes, made on images the
head never trained on). Validation (200 images) cannot rate epochs: a 20-epoch head over KB_ext that lost 1.5
points on test moved validation by one image.

    from retrofit.demo_cv import cross_validate_epochs
    cross_validate_epochs(cfg, prepare(cfg), "ext", epochs=(1, 3, 10), seeds=(0, 1, 2))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from retrofit.demo_data import DemoData
from retrofit.demo_train import new_head, shifted, train_config

if TYPE_CHECKING:
    from retrofit.demo import DemoConfig

__all__ = ["cross_validate_epochs", "fold_of_each", "out_of_fold_logits"]

log = logging.getLogger(__name__)


def fold_of_each(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """(N,) fold index of each sample: every class dealt round-robin over the folds in a shuffled order (``seed``),
    so each fold holds a fold's share of every class (a class of n samples: n // folds or one more); the folds of
    :func:`retrofit.linear_probe.stratified_folds`, which the host's cross-fitted logits use."""
    from retrofit.linear_probe import stratified_folds

    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    return stratified_folds(torch.as_tensor(labels), folds, seed).to(torch.int64)


def out_of_fold_logits(cfg: DemoConfig, data: DemoData, kb: str, eval_kb: str, epochs: int, seed: int, *,
                       folds: int = 5, shift: torch.Tensor | None = None, noisy: bool = False,
                       modalities: str = "image+text",
                       vote: bool | None = None) -> dict[tuple[Any, float], torch.Tensor]:
    """Out-of-fold logits of the long-tail images: ``{(temperature, vote scale): (N, C)}`` with temperature
    ``"trained"`` or one of ``cfg.vote_temperatures`` and the scales ``cfg.vote_scales`` (a head without the vote:
    the one key ``("trained", 1.0)``). Heads trained for ``epochs`` on the other folds with neighbours from ``kb``,
    scored with neighbours from ``eval_kb``; ``shift``: subtracted from the host logits (row 2's adjustment)."""
    from retrofit.calibration import logits_by_vote_scale
    from retrofit.training import predict_logits, train

    use_vote = cfg.label_vote if vote is None else vote
    fs = shifted(data.train_features(kb, noisy=noisy), shift)
    fe = fs if eval_kb == kb else shifted(data.train_features(eval_kb, noisy=noisy), shift)
    fold = fold_of_each(fs.labels, folds)
    out: dict[tuple[Any, float], torch.Tensor] = {}
    for f in range(folds):
        t0 = time.perf_counter()
        fit, held = (fold != f).nonzero().flatten(), (fold == f).nonzero().flatten()
        head = new_head(cfg, data, kb, seed, modalities, use_vote)
        head = train(head, fs.subset(fit), train_config(cfg, kb, seed, epochs), store=data.kb(kb)).head
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
        log.info("out-of-fold %s -> %s, %d epochs, seed %d: fold %d/%d in %.1f s", kb, eval_kb, epochs, seed, f + 1,
                 folds, time.perf_counter() - t0)
    return out


def cross_validate_epochs(cfg: DemoConfig, data: DemoData, kb: str, eval_kb: str | None = None,
                          epochs: Sequence[int] = (1, 3, 10), seeds: Sequence[int] = (0,), folds: int = 5,
                          noisy: bool = False) -> dict[int, dict[str, Any]]:
    """For each training length in ``epochs``: the best out-of-fold balanced top-1 (over the vote grids and the
    post-hoc adjustments ``cfg.posthoc``) of heads trained with ``kb`` and scored with ``eval_kb`` (default ``kb``),
    per seed and averaged, with the settings that reached it. Heads see row 2's logit-adjusted host logits when
    ``cfg.adjust_host`` (the strength chosen on validation, as in the demo)."""
    from retrofit.demo_rules import balanced_top1, choose_adjustment

    bad = [e for e in epochs if not isinstance(e, int) or isinstance(e, bool) or e < 1]
    if not epochs or bad:
        raise ValueError(f"epochs must be positive ints, got {list(epochs)!r}")
    eval_kb = eval_kb or kb
    lp = data.log_prior(noisy=noisy)
    shift = None
    if cfg.adjust_host:
        a = choose_adjustment(data.host_logits("val", noisy), data.labels("val"), lp,
                              tuple(x for x in cfg.posthoc if x >= 0))
        shift = a * lp
    labels = data.train_features(kb, noisy=noisy).labels
    result: dict[int, dict[str, Any]] = {}
    for ep in epochs:
        per_seed = []
        for seed in seeds:
            oof = out_of_fold_logits(cfg, data, kb, eval_kb, ep, seed, folds=folds, shift=shift, noisy=noisy)
            best = max(((balanced_top1(logits - a * lp, labels), t, s, a)
                        for (t, s), logits in oof.items() for a in cfg.posthoc), key=lambda r: r[0])  # ties: first
            per_seed.append({"seed": seed, "balanced_top1": best[0], "temperature": best[1], "vote_scale": best[2],
                             "adjustment": best[3]})
        result[ep] = {"balanced_top1": sum(r["balanced_top1"] for r in per_seed) / len(per_seed), "seeds": per_seed}
    return result
