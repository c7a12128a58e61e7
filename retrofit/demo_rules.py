"""Metrics, choices on held-out data and the fixed baselines of the CIFAR-10-LT demo (:mod:`retrofit.demo`).

Group metrics with the CIFAR-10-LT cut-offs, the post-hoc adjustment and vote-scale choices (best validation
top-1, deterministic tie-breaks), balanced top-1, the similarity-weighted kNN vote, the fixed 50/50 fusion a
learned head must beat, and the mean ± std over seeds.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from retrofit.calibration import nearness_to_one, paired_standard_error, score_logits

log = logging.getLogger("retrofit.demo")  # (the demo's warnings under the demo's name)

# the floors: each retrofitted row against row 2 and the fixed rule on the KB it reads (8r: 8h)
FLOORS = {"4": ("2", "g_in"), "5": ("2", "g_ext"), "6": ("2", "g_ext"), "7i": ("2", "g_in"), "7t": ("2", "g_in"),
          "8r": ("8h",)}

__all__ = ["balanced_adjustment", "balanced_top1", "choose_adjustment", "choose_scale_and_adjustment", "fixed_fusion",
           "floor_gaps", "floors_markdown", "group_metrics", "knn_probs", "mean_std", "nearness_to_one", "paired_gap",
           "top1"]


def group_metrics(logits: torch.Tensor, labels: torch.Tensor, counts: list[int], names: list[str]) -> dict[str, Any]:
    """Metrics with the CIFAR-10-LT groups: Many > 1000, Medium 200-1000, Few < 200 training images (clean)."""
    from retrofit.evaluation import evaluate

    return evaluate(logits, labels, train_counts=counts, cutoffs=(1000, 200), class_names=names)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return score_logits(logits, labels, "top1")


def choose_adjustment(val_logits: torch.Tensor, val_labels: torch.Tensor, log_prior: torch.Tensor,
                       grid: tuple[float, ...]) -> float:
    """The post-hoc strength a in ``logits - a * log prior`` with the best validation top-1 (ties: smallest |a|)."""
    scores = [(top1(val_logits - a * log_prior, val_labels), -abs(a), a) for a in grid]
    return max(scores)[2]


def choose_scale_and_adjustment(val_logits: dict[float, torch.Tensor], val_labels: torch.Tensor,
                                 log_prior: torch.Tensor, grid: tuple[float, ...]) -> tuple[float, float]:
    """The (vote scale, post-hoc strength) pair with the best validation top-1; ties: scale nearest 1, then the
    smallest |a| (``val_logits`` maps each vote scale to the head's validation logits with that scale)."""
    best = None
    for scale, logits in val_logits.items():
        a = choose_adjustment(logits, val_labels, log_prior, grid)
        key = (top1(logits - a * log_prior, val_labels), nearness_to_one(scale), -abs(a))
        if best is None or key > best[0]:
            best = (key, scale, a)
    return best[1], best[2]


def choose_temperature_scale_and_adjustment(head: Any, val_logits: Any, temperatures: tuple[float, ...],
                                            val_labels: torch.Tensor, log_prior: torch.Tensor,
                                            grid: tuple[float, ...]) -> tuple[float, float, float]:
    """The (vote temperature, vote scale, post-hoc strength) triple with the best validation top-1:
    :func:`choose_scale_and_adjustment` at the head's trained temperature and at each of ``temperatures``
    (``val_logits()`` gives the validation logits by scale at the temperature set); the trained temperature is
    scored first and keeps ties. The head is left at its trained temperature."""
    trained = head.vote.temperature
    best = None
    try:
        for t in (trained, *[t for t in temperatures if abs(t - trained) > 1e-6 * trained]):
            head.vote.set_temperature(t)
            vals = val_logits()
            s, a = choose_scale_and_adjustment(vals, val_labels, log_prior, grid)
            score = top1(vals[s] - a * log_prior, val_labels)
            if best is None or score > best[0]:
                best = (score, t, s, a)
    finally:
        head.vote.set_temperature(trained)
    return best[1], best[2], best[3]


def knn_probs(ids: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, num_classes: int,
              temperature: float) -> torch.Tensor:
    """Similarity-weighted vote of cached neighbours: (N, C) class probabilities (empty slots and neighbours of
    unknown label, -1, ignored; all zeros when none is left)."""
    valid = (ids >= 0) & (labels >= 0)  # (N, k)
    w = torch.softmax(scores.masked_fill(~valid, float("-inf")) / temperature, dim=1).nan_to_num(0.0)  # (N, k)
    p = torch.zeros(ids.shape[0], num_classes)  # (N, C)
    return p.scatter_add_(1, labels.clamp_min(0), w * valid)


def fixed_fusion(host_la: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
    """The fixed rule a learned head must beat: 0.5 * softmax(row 2) + 0.5 * kNN vote, as log-probabilities."""
    return (0.5 * torch.softmax(host_la, 1) + 0.5 * knn).clamp_min(1e-12).log()


def balanced_top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present of the per-class top-1 (what a balanced test set measures)."""
    return score_logits(logits, labels, "balanced")


def balanced_adjustment(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor,
                        grid: tuple[float, ...]) -> float:
    """The post-hoc strength a in ``logits - a * log_prior`` with the best balanced top-1 (ties: smallest |a|)."""
    return max((balanced_top1(logits - a * log_prior, labels), -abs(a), a) for a in grid)[2]


def mean_std(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of the metrics over seeds, with ``<metric>_std`` and the per-seed figures."""
    first = dict(runs[0])
    for key in ("top1", "many", "medium", "few", "mean_per_class", "nll", "ece", "val_top1"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            first[key] = float(np.mean(vals))
            first[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    first["per_class_acc"] = np.mean([r["per_class_acc"] for r in runs], axis=0).tolist()
    first["seeds"] = [{k: r.get(k) for k in ("seed", "top1", "many", "medium", "few", "posthoc_adjustment",
                                             "vote_scale", "vote_weight_trained", "vote_temperature",
                                             "vote_temperature_trained")}
                      for r in runs]
    return first


def paired_gap(row_hits: list[torch.Tensor], ref_hits: torch.Tensor) -> dict[str, Any]:
    """How far a row's top-1 is above a reference's on the same test images: ``row_hits`` holds one (N,) 0/1 tensor
    per seed, ``ref_hits`` the reference's. ``gap``: the seed-mean top-1 minus the reference's; ``se``: its paired
    standard error over the test images (of the per-image difference between the seed-mean hit and the
    reference's: what another draw of test images would move; seeds do not average it away); ``per_seed``: each
    seed's gap."""
    ref = ref_hits.double()
    rows = torch.stack([h.double() for h in row_hits])  # (S, N)
    diff = rows.mean(0) - ref
    return {"gap": float(diff.mean()), "se": paired_standard_error(diff, torch.zeros_like(ref, dtype=torch.long)),
            "per_seed": [float((r - ref).mean()) for r in rows]}


def _floor_name(ref: str) -> str:
    return f"the {ref.replace('g_', 'KB_')} rule" if ref.startswith("g_") else f"row {ref}"


def floor_gaps(fixed: dict[str, dict[str, Any]], per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Each retrofitted row's top-1 gap to its floors (:data:`FLOORS`) with its paired standard error over the
    test images (:func:`paired_gap`), from the rows' ``"_hits"`` ((N,) right / wrong per test image; ``fixed``:
    the rows without a seed, ``per_seed``: the trained rows of each seed); a gap under 0 is logged."""
    out: dict[str, Any] = {}
    for name, refs in FLOORS.items():
        runs = [r[name]["_hits"] for r in per_seed if name in r]
        for ref in refs:
            if not runs or ref not in fixed:
                continue
            g = out.setdefault(name, {})[ref] = paired_gap(runs, fixed[ref]["_hits"])
            if g["gap"] < 0:
                log.warning("row %s is %.2f points UNDER %s (paired s.e. %.2f over the test images): a learned head "
                            "should not lose to it", name, -100 * g["gap"], _floor_name(ref), 100 * g["se"])
    return out


def floors_markdown(floors: dict[str, Any]) -> str:
    """:func:`floor_gaps` as a markdown paragraph: each gap in points ± its paired standard error."""
    if not floors:
        return ""
    parts = [f"row {name}: " + ", ".join(f"{_floor_name(ref)} {100 * g['gap']:+.2f} ± {100 * g['se']:.2f}"
                                         for ref, g in refs.items()) for name, refs in floors.items()]
    return ("\nGaps to the floors (top-1 points of the seed mean minus the floor's, ± paired standard error over "
            "the test images): " + "; ".join(parts) + ".\n")
