"""Post-hoc calibration of a trained head's label vote on labelled validation data, no training.

A head with the learned label vote (``HeadConfig(label_vote=True)``) adds ``scale * beta * log(eps + vote)`` to
its retrieval logits. LACE training tends to settle on a vote weight below the accuracy-optimal one, and a head
moved to another knowledge base (``head.attach``: a denser, bigger or cleaner KB) deserves another weight than
the one its training KB taught. :func:`choose_vote_scale` picks the multiplier on labelled validation data.

The fused logits ``tau/2 * (L_I + L_R + scale * V)`` are affine in the scale, so :func:`logits_by_vote_scale`
gets every candidate from two passes over the data (scale 0 and scale 1) instead of one pass per candidate.
A ``vote_form="mix"`` head's scale multiplies the odds of its mixing weight ``a``; its logits
``log((1 - a) softmax(F) + a p)`` come from one pass at scale 0 (``F`` and ``log p``) for every candidate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DEFAULT_SCALES", "VoteScaleChoice", "choose_vote_scale", "logits_by_vote_scale", "nearness_to_one",
           "one_se_choice", "paired_standard_error", "per_sample_scores", "score_logits"]

log = logging.getLogger(__name__)

DEFAULT_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # multiples of the trained vote weight
METRICS = ("top1", "balanced", "balanced_nll")
LOG_LIK_FLOOR = -100.0  # a sample's log-likelihood is clipped here (a label its logits mask with -inf counts as this)
RULES = ("best", "one_se", "trained")


@dataclass
class VoteScaleChoice:
    """What :func:`choose_vote_scale` found."""

    scale: float  # the chosen multiplier (apply with head.vote.set_scale)
    metric: str  # "top1", "balanced" (mean per-class top-1) or "balanced_nll" (mean per-class log-likelihood)
    scores: dict[float, float] = field(default_factory=dict)  # metric of every candidate scale
    trained_weight: float = 0.0  # the head's learned vote weight beta (what the scale multiplies; "mix": a)
    n: int = 0  # labelled samples it was chosen on
    temperature: float = 0.0  # the vote temperature chosen with it (the trained one unless temperatures were given)
    trained_temperature: float = 0.0  # the head's vote temperature before the choice
    # with temperatures: every candidate temperature's scores by scale (``scores`` is the chosen temperature's)
    scores_by_temperature: dict[float, dict[float, float]] = field(default_factory=dict)
    form: str = "log"  # the vote's form (HeadConfig.vote_form): "mix" scales the odds of the mixing weight
    trained_logit: float = 0.0  # "mix": the logit of trained_weight (what weight_at adds log(scale) to)
    rule: str = "best"  # "best": the best score; "one_se": the nearest to the trained vote within a standard error;
    # "trained": the vote as trained (scale 1 at the head's temperature), the others scored for comparison
    best_by_score: tuple[float, float] = (0.0, 0.0)  # (temperature, scale) with the best score (= the choice: "best")
    standard_error: float = 0.0  # "one_se": the paired standard error of the choice's score minus the best one's

    @property
    def at_largest(self) -> bool:
        """The chosen scale is the largest candidate (and above 1): a larger one may score better still."""
        return len(self.scores) > 1 and self.scale > 1 and self.scale == max(self.scores)

    @property
    def weight(self) -> float:
        """The vote weight in use after ``head.vote.set_scale(self.scale)`` (``form="mix"``: the mixing weight)."""
        return self.weight_at(self.scale)

    def weight_at(self, scale: float) -> float:
        """The vote weight ``head.vote.set_scale(scale)`` gives: ``scale * trained_weight``, or for
        ``form="mix"`` the mixing weight whose odds are ``scale`` times the trained one's."""
        if self.form == "mix":
            return 0.0 if scale <= 0 else _sigmoid(self.trained_logit + math.log(scale))
        return scale * self.trained_weight


def _sigmoid(x: float) -> float:
    """The logistic function of a float, without overflow (float64)."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _vote(head: nn.Module) -> Any:
    vote = getattr(head, "vote", None)
    if vote is None:
        raise ValueError("the head has no label vote (HeadConfig(label_vote=True), `retrofit train --label-vote`): "
                         "there is no vote weight to calibrate")
    return vote


def logits_by_vote_scale(head: nn.Module, features: Any, scales: Sequence[float], store: Any = None, *,
                         absolute: bool = False, **predict_kw: Any) -> dict[float, torch.Tensor]:
    """The head's (N, C) logits on ``features`` (a :class:`retrofit.feature_cache.FeatureSet`) for every vote
    scale in ``scales``, from two passes (:func:`retrofit.training.predict_logits` at scale 0 and 1).

    ``scales`` are what ``LabelVote.set_scale`` takes, multiples of the learned vote weight; with ``absolute``,
    vote weights (``LabelVote.set_weight``) instead. ``predict_kw`` go to ``predict_logits``
    (``host_classifier``, ``k``, ``device``, ...). The head is left exactly as it was. A ``vote_form="mix"``
    vote takes one pass (at scale 0: the unmixed log-probabilities and the vote's), its scales multiply the
    odds of the mixing weight and its absolute weights are mixing weights in [0, 1].
    """
    from retrofit.training import predict_logits

    vote = _vote(head)
    if getattr(vote, "form", "log") == "mix":
        return _mixture_by_scale(head, vote, features, scales, store, absolute, predict_kw)
    setter = vote.set_weight if absolute else vote.set_scale
    kept = vote.weight.detach().clone(), vote.scale.clone()
    try:
        setter(0.0)
        base = predict_logits(head, features, store, **predict_kw)["logits"]  # (N, C)
        setter(1.0)
        unit = predict_logits(head, features, store, **predict_kw)["logits"] - base  # (N, C): scale 1's vote
    finally:
        with torch.no_grad():
            vote.weight.copy_(kept[0])
        vote.scale.copy_(kept[1])
    return {float(s): base + float(s) * unit for s in scales}


def _mixture_by_scale(head: nn.Module, vote: Any, features: Any, scales: Sequence[float], store: Any,
                      absolute: bool, predict_kw: dict[str, Any]) -> dict[float, torch.Tensor]:
    """:func:`logits_by_vote_scale` for a ``vote_form="mix"`` vote: one pass at scale 0 gives the unmixed
    log-probabilities and the vote's; each candidate mixing logit ``u`` (the trained one plus ``log(scale)``, or
    ``logit(scale)`` with ``absolute``: then the scales are mixing weights in [0, 1]) is combined from them."""
    if absolute and any(not 0.0 <= float(s) <= 1.0 for s in scales):
        raise ValueError(f"a vote_form='mix' vote's absolute weights are mixing weights in [0, 1], got "
                         f"{list(scales)!r}")
    base, v = _unmixed(head, vote, features, store, predict_kw)
    return _mixed(vote, base, v, scales, absolute)


def _unmixed(head: nn.Module, vote: Any, features: Any, store: Any,
             predict_kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A mix vote's head at scale 0: (N, C) float64 log-probabilities without the vote, and the vote's."""
    from retrofit.training import predict_logits

    kept = vote.scale.clone()
    try:
        vote.set_scale(0.0)
        out = predict_logits(head, features, store, **predict_kw)
    finally:
        vote.scale.copy_(kept)
    return out["logits"].double(), out["vote_log_probs"].double()  # base = log_softmax(F)


def _mixed(vote: Any, base: torch.Tensor, v: torch.Tensor, scales: Sequence[float],
           absolute: bool = False) -> dict[float, torch.Tensor]:
    """Each scale's logits from the unmixed log-probabilities ``base`` and the vote's ``v``, as the forward mixes."""
    from retrofit.fusion import mix_log_probs, mixing_logit

    trained = float(vote.weight.detach()) * vote.gain
    res = {}
    for s in scales:
        s = float(s)
        u = mixing_logit(s) if absolute else trained + float(np.log(s)) if s > 0 else -np.inf
        res[s] = mix_log_probs(base, v, torch.tensor(u, dtype=torch.float64)).float()  # what the forward does
    return res


def _cached_vote_log_probs(model: nn.Module, features: Any, k: int) -> torch.Tensor:
    """(N, C) float64: a mix vote's log-probabilities from the features' cached neighbour labels and scores alone,
    as the forward computes them (``model``: the head as served with the KB, for a balanced vote's class prior),
    without the fusion pass the vote does not depend on."""
    ids = features.neighbor_ids[:, :k]
    mask = ids >= 0  # (N, k): as neighbors_from_ids masks cached slots
    dt = model.readout.fc.weight.dtype
    dev = model.vote.log_temperature.device
    scores = features.neighbor_scores[:, :k].masked_fill(~mask, float("-inf"))
    labels = features.neighbor_labels[:, :k].masked_fill(~mask, -1)
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), 4096):
            sl = slice(s, s + 4096)
            out.append(model.vote(labels[sl].to(dev), scores[sl].to(dev, torch.float32).to(dt), mask[sl].to(dev))
                       .double().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.num_classes, dtype=torch.float64)


def _cached_width(head: nn.Module, features: Any, predict_kw: dict[str, Any]) -> int:
    """How many cached neighbours per sample the head reads from ``features`` (0: none cached, or a live search)."""
    if not getattr(features, "has_neighbors", False):
        return 0
    k = predict_kw.get("k")
    k = k if k is not None else getattr(getattr(head, "config", None), "k", 32)
    return min(int(k), int(features.neighbor_ids.shape[1]))


def score_logits(logits: torch.Tensor, labels: torch.Tensor, metric: str = "top1") -> float:
    """Top-1 of (N, C) ``logits`` (``metric="top1"``), its mean over the classes present (``"balanced"``), or the
    mean over the classes present of the mean log-likelihood of the label under ``softmax(logits)``
    (``"balanced_nll"``: minus the class-balanced NLL, so that higher is better, as for the other two)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return _score_hits(per_sample_scores(logits, labels, metric), labels, metric)


def per_sample_scores(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> torch.Tensor:
    """(N,) float64 per-sample values that ``metric`` averages: 1.0 / 0.0 for a right / wrong top-1 ("top1",
    "balanced"), the label's log-probability under ``softmax(logits)`` ("balanced_nll"; clipped at
    ``LOG_LIK_FLOOR``, which a label whose logit is -inf, or a row of NaN / all -inf, gets; a +inf logit counts as
    a very large finite one)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric != "balanced_nll":
        return (logits.argmax(1) == labels).double()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must be class indices 0..{logits.shape[1] - 1} of the logits, got "
                         f"{int(labels.min())}..{int(labels.max())}")
    lg = logits.double().clamp_max(1e300)  # (+inf - logsumexp would be NaN)
    ll = torch.log_softmax(lg, 1).gather(1, labels.view(-1, 1).long()).squeeze(1)
    return ll.nan_to_num(nan=LOG_LIK_FLOOR).clamp_min(LOG_LIK_FLOOR)


def _score_hits(hit: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """The mean of (N,) per-sample values ``hit`` (``"top1"``), or the mean of its per-class means (``"balanced"``,
    ``"balanced_nll"``)."""
    if metric == "top1":
        return float(hit.mean())
    return float(torch.stack([hit[labels == c].mean() for c in labels.unique()]).mean())


def paired_standard_error(diff: torch.Tensor, labels: torch.Tensor, metric: str = "top1") -> float:
    """The standard error of ``metric``'s difference between two predictors scored on the same samples, from
    their (N,) per-sample differences ``diff`` (of hits, in {-1, 0, 1}, or of log-likelihoods): pairing removes
    what the two share (for hits: the samples both get right or both get wrong). ``"balanced"`` /
    ``"balanced_nll"`` add each class's variance of the mean over its samples, weighted ``1 / classes**2``; a class
    with one sample adds none."""
    diff = diff.double()
    if metric == "top1":
        return float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    classes = labels.unique()
    var = sum(float(diff[labels == c].var()) / int((labels == c).sum()) for c in classes
              if int((labels == c).sum()) > 1)
    return math.sqrt(var) / len(classes)


def nearness_to_one(scale: float) -> float:
    """Tie-break between vote scales: larger for scales nearer 1 (the trained vote), on a log scale."""
    return -abs(float(np.log(scale))) if scale > 0 else -np.inf


def one_se_choice(hits: dict[tuple[float, float], torch.Tensor], labels: torch.Tensor, metric: str,
                  top: tuple[float, float], trained_t: float) -> tuple[float, float, float]:
    """The one-standard-error rule over (temperature, scale) candidates: ``hits`` maps each to its (N,) per-sample
    values (:func:`per_sample_scores`: hits, or log-likelihoods), ``top`` is the one with the best score. Among
    the candidates whose score is within one paired standard error of the best (the error of the difference to
    ``top``), the nearest to the trained vote: the smallest
    ``|log scale| + |log(temperature / trained_t)|``, then the better score, the scale nearest 1, the trained
    temperature. Returns (temperature, scale, that standard error)."""
    score = {ts: _score_hits(h, labels, metric) for ts, h in hits.items()}
    errors = {ts: paired_standard_error(h - hits[top], labels, metric) for ts, h in hits.items()}
    near = [ts for ts in score if score[ts] >= score[top] - errors[ts] - 1e-12]

    def distance(ts: tuple[float, float]) -> tuple[float, float, float, bool]:
        t, s = ts
        return (-nearness_to_one(s) + abs(float(np.log(t / trained_t))), -score[ts], -nearness_to_one(s),
                t != trained_t)

    t, s = min(near, key=distance)
    return t, s, errors[(t, s)]


def _numbers(values: Any, what: str, example: str, positive: bool = False) -> list[float]:
    """``values`` as a non-empty list of finite numbers >= 0 (> 0 with ``positive``), else ValueError."""
    try:
        if isinstance(values, (str, bytes)):  # "12" would be read as 1 and 2
            raise TypeError
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of numbers {'> 0' if positive else '>= 0'}, e.g. {example}, got "
                         f"{values!r}") from None
    if not out or any(not np.isfinite(v) or v < 0 or (positive and v == 0) for v in out):
        raise ValueError(f"{what} must be a non-empty list of finite numbers {'> 0' if positive else '>= 0'}, got "
                         f"{list(values)!r}")
    return out


def choose_vote_scale(head: nn.Module, features: Any, store: Any = None, *,
                      scales: Sequence[float] = DEFAULT_SCALES, temperatures: Sequence[float] | None = None,
                      metric: str = "top1", rule: str = "best", apply: bool = True,
                      **predict_kw: Any) -> VoteScaleChoice:
    """The multiplier of the head's learned vote weight (``LabelVote.set_scale``; a ``vote_form="mix"`` vote: of
    the odds of its mixing weight) with the best ``metric`` on
    labelled ``features`` (a FeatureSet with labels >= 0: validation data, never the test set), ties broken
    towards 1 (the trained vote). ``metric``: ``"top1"``, ``"balanced"`` (top-1 averaged over the classes) or
    ``"balanced_nll"`` (the label's log-likelihood averaged over the classes: a proper score, smoother than top-1
    over a grid of close candidates; :func:`score_logits`).

    ``temperatures``: also choose the vote's softmax temperature (``LabelVote.set_temperature``) among these and
    the trained one, jointly with the scale (ties: the scale nearest 1, then the trained temperature, then the
    temperature nearest it). A head moved
    to a denser knowledge base often does better with a softer vote than its training KB taught.

    ``rule``: ``"best"`` takes the best score; ``"one_se"`` takes, among the candidates whose score is within one
    paired standard error (:func:`paired_standard_error`) of the best one, the nearest to the trained vote (the
    smallest ``|log scale| + |log(temperature / trained)|``; then the better score): the trained vote is kept
    unless another is clearly better, where the best of many candidates on one labelled set tends to be chosen
    for that set's noise (Breiman's one-standard-error rule). ``"trained"`` keeps the trained vote (scale 1 at the
    head's current temperature, the trained one unless ``set_temperature`` changed it, e.g. a head saved by
    ``retrofit calibrate --temperatures --save``; 1 is scored even if not among ``scales``) and only scores the
    candidates: the baseline a choice has to beat.

    ``store``: the knowledge base to score with (default: the head's attached one; for a swap, attach the new KB
    first so that a balanced vote is rebalanced for it). ``apply``: set the chosen scale on the head (else the
    head is left as it was). ``predict_kw`` go to :func:`retrofit.training.predict_logits`.
    """
    vote = _vote(head)
    labels = torch.as_tensor(features.labels)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"choose_vote_scale needs integer class labels, got {labels.dtype}")
    if labels.numel() == 0 or bool((labels < 0).any()):
        raise ValueError(f"choose_vote_scale needs labelled samples (labels >= 0); got {labels.numel()} samples, "
                         f"{int((labels < 0).sum())} without a label")
    C = head.config.num_classes
    if int(labels.max()) >= C:
        raise ValueError(f"choose_vote_scale: label {int(labels.max())} is not a class of the head (0..{C - 1})")
    host = getattr(features, "host_logits", None)
    if host is not None and not bool(torch.isfinite(torch.as_tensor(host)).all()):
        raise ValueError("choose_vote_scale: the features' host logits hold NaN or inf; no scale can be scored")
    cand = _numbers(scales, "scales", "(0.5, 1, 2, 4)")
    temps = [] if temperatures is None else _numbers(temperatures, "temperatures", "(0.03, 0.05, 0.1)", True)
    if any(t < 1e-6 for t in temps):
        raise ValueError(f"temperatures must be >= 1e-6, got {list(temperatures)!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "trained" and 1.0 not in cand:
        cand = sorted({*cand, 1.0})
    form = getattr(vote, "form", "log")
    logit = float(vote.weight.detach()) * vote.gain  # "mix": of the mixing weight at scale 1
    trained = logit if form == "log" else _sigmoid(logit)
    trained_t = vote.temperature
    kept_t = vote.log_temperature.detach().clone()
    hits: dict[tuple[float, float], torch.Tensor] = {}  # (temperature, scale) -> (N,) per_sample_scores
    # a candidate equal to the trained temperature up to its float32 storage (0.05 reads back as 0.0499999970) is it
    temps = [t for t in temps if abs(t - trained_t) > 1e-6 * trained_t]
    # a mix vote over cached neighbours: one pass of the head, then each temperature's vote from the neighbours'
    # labels and scores alone (the fused logits do not depend on the vote; a pass per temperature cost the demo
    # 40 of its 70 s with cached heads)
    cached_k = _cached_width(head, features, predict_kw) if form == "mix" else 0
    served = base = None
    if cached_k:
        from retrofit.prediction import serving_view

        served = serving_view(head, store if store is not None else getattr(head, "store", None))
        base = _unmixed(head, vote, features, store, predict_kw)[0]  # (N, C): the same at every temperature
    try:
        for t in temps + [trained_t]:  # (the trained one last: ties go to it by the key below, not by order)
            if t != trained_t:
                vote.set_temperature(t)
            if served is not None:
                logits = _mixed(vote, base, _cached_vote_log_probs(served, features, cached_k), cand)
            else:
                logits = logits_by_vote_scale(head, features, cand, store, **predict_kw)
            hits.update({(t, s): per_sample_scores(lg, labels, metric) for s, lg in logits.items()})
            with torch.no_grad():
                vote.log_temperature.copy_(kept_t)
    finally:
        with torch.no_grad():
            vote.log_temperature.copy_(kept_t)

    score = {ts: _score_hits(h, labels, metric) for ts, h in hits.items()}
    by_t: dict[float, dict[float, float]] = {}
    for (t, s), v in score.items():
        by_t.setdefault(t, {})[s] = v

    def key(ts: tuple[float, float]) -> tuple[float, float, bool, float]:
        t, s = ts
        return score[ts], nearness_to_one(s), t == trained_t, -abs(float(np.log(t / trained_t)))

    top = max(score, key=key)
    best_t, best, se = *top, 0.0
    if rule == "one_se":
        best_t, best, se = one_se_choice(hits, labels, metric, top, trained_t)
    elif rule == "trained":
        best_t, best = trained_t, 1.0
    if apply:
        vote.set_scale(best)
        if best_t != trained_t:
            vote.set_temperature(best_t)
    choice = VoteScaleChoice(scale=best, metric=metric, scores=by_t[best_t], trained_weight=trained,
                             n=int(labels.numel()), temperature=best_t, trained_temperature=trained_t,
                             scores_by_temperature=by_t if temperatures is not None else {}, form=form,
                             trained_logit=logit if form == "mix" else 0.0, rule=rule, best_by_score=top,
                             standard_error=se)
    if choice.at_largest:
        log.warning("the best vote scale is the largest candidate (%g): larger ones may score better; try scales "
                    "beyond it (`retrofit calibrate --scales`)", best)
    if form == "log" and trained <= 0:
        log.warning("the trained vote weight is %.3g: the head learned to vote against (or ignore) its neighbours' "
                    "labels, and scales only multiply that; set a weight with head.vote.set_weight(w) (w > 0, chosen "
                    "on validation data) or retrain the head (e.g. without mixup / label smoothing)", trained)
    return choice
