"""Trained heads of the CIFAR-10-LT demo (:mod:`retrofit.demo`): their logits on a split and the vote scale
chosen on the long-tail training images. Training and the cache of trained heads live in
:mod:`retrofit.demo_train` (re-exported here).
"""

from __future__ import annotations

from typing import Any

import torch

from retrofit.demo_data import DemoData
from retrofit.demo_train import head_cache_dir, shifted, train_head

__all__ = ["adjustment_on_training_images", "attach", "head_cache_dir", "head_logits", "logits_by_vote_scale",
           "scale_on_training_images", "shifted", "train_head"]


def head_logits(head: Any, data: DemoData, kb: str, split: str, noisy: bool = False,
                 shift: torch.Tensor | None = None) -> torch.Tensor:
    """The head's logits on ``split`` (``val``, ``test``, or ``lt``: the long-tail training images, their own KB
    entries excluded, cross-fitted host logits) with neighbours from ``kb``, attached first: a head moved to
    another KB (row 5) has its vote rebalanced for that KB's class counts."""
    from retrofit.training import predict_logits

    fs = _features(head, data, kb, split, noisy, shift)
    return predict_logits(head, fs, data.kb(kb), device="cpu")["logits"]


def _features(head: Any, data: DemoData, kb: str, split: str, noisy: bool, shift: torch.Tensor | None) -> Any:
    """The FeatureSet of ``split`` with neighbours from ``kb`` and shifted host logits; attaches ``kb`` first."""
    if split not in ("lt", "val", "test"):
        raise ValueError(f"split must be 'lt', 'val' or 'test', got {split!r}")
    attach(head, data, kb)
    fs = data.train_features(kb, noisy=noisy) if split == "lt" else data.eval_features(split, kb, noisy=noisy)
    return shifted(fs, shift)


def attach(head: Any, data: DemoData, kb: str) -> None:
    """Attach ``kb`` to ``head`` unless it is attached already (attaching rebalances a balanced vote)."""
    if head.store is not data.kb(kb):
        head.attach(data.kb(kb))


def logits_by_vote_scale(head: Any, data: DemoData, kb: str, split: str, noisy: bool, shift: torch.Tensor | None,
                          scales: tuple[float, ...], absolute: bool = False) -> dict[float, torch.Tensor]:
    """The head's logits on ``split`` (as :func:`head_logits` gives them) for every vote scale in ``scales``, from
    two passes over the data (:func:`retrofit.calibration.logits_by_vote_scale`: the logits are affine in the
    scale; a ``vote_form="mix"`` head: one pass), where one pass per scale cost 5 passes over the 12,386 training
    images per row. ``absolute``: ``scales`` are vote weights (:meth:`LabelVote.set_weight`; mixing weights in
    [0, 1] for a mix head) instead of multiples of the trained one. The head is left unchanged."""
    from retrofit.calibration import logits_by_vote_scale as by_scale

    fs = _features(head, data, kb, split, noisy, shift)
    return by_scale(head, fs, scales, data.kb(kb), absolute=absolute, device="cpu")


def scale_on_training_images(head: Any, data: DemoData, kb: str, noisy: bool, shift: torch.Tensor | None,
                              scales: tuple[float, ...], temperatures: tuple[float, ...] | None = None,
                              rule: str = "best") -> Any:
    """The vote scale (and, with ``temperatures``, the vote temperature) with the best balanced top-1 on the
    long-tail training images (neighbours from ``kb`` without their own entry, cross-fitted host logits); ties:
    the scale nearest 1, the trained temperature; ``rule="one_se"``: the nearest to the trained vote within a
    standard error of the best; ``rule="trained"``: the trained vote, scale 1 at the trained temperature
    (:func:`retrofit.calibration.choose_vote_scale`). A
    :class:`retrofit.calibration.VoteScaleChoice`; the head is left as it was."""
    from retrofit.calibration import choose_vote_scale

    fs = _features(head, data, kb, "lt", noisy, shift)
    if rule == "trained":  # (nothing to choose: only the trained vote is scored)
        scales, temperatures = (1.0,), None
    return choose_vote_scale(head, fs, data.kb(kb), scales=scales, temperatures=temperatures, metric="balanced",
                             rule=rule, apply=False, device="cpu")


def adjustment_on_training_images(head: Any, data: DemoData, kb: str, noisy: bool, shift: torch.Tensor | None,
                                  log_prior: torch.Tensor, grid: tuple[float, ...]) -> float:
    """The post-hoc strength a in ``logits - a * log_prior`` with the best balanced top-1 on the long-tail training
    images (the head as it is set; neighbours from ``kb`` without their own entry, cross-fitted host logits, the
    labels the head trains on: noisy with ``noisy``); ties: the smallest |a|."""
    from retrofit.demo_rules import balanced_adjustment

    logits = head_logits(head, data, kb, "lt", noisy, shift)
    labels = data.train_features(kb, noisy=noisy).labels  # (cached by DemoData)
    return balanced_adjustment(logits, labels, log_prior, grid)
