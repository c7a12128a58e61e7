"""Trained heads of the CIFAR-10-LT demo (:mod:`retrofit.demo`): training with the library's trainer, the cache
of trained heads, their logits on a split, and the vote scale chosen on the long-tail training images.

A trained head is saved under ``<cache>/heads/<key>``: the key covers the data setting, the KB, every training
setting, the seed, the host-logit shift and a digest of the source of the modules training runs, so a cached
head is the head a retrain gives (CPU training is deterministic).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retrofit.demo_data import DemoData
from retrofit.demo_rules import balanced_top1, nearness_to_one

if TYPE_CHECKING:
    from retrofit.demo import DemoConfig

__all__ = ["attach", "head_cache_dir", "head_logits", "logits_by_vote_scale", "scale_on_training_images", "shifted",
           "train_head"]

log = logging.getLogger(__name__)


def shifted(fs: Any, shift: torch.Tensor | None) -> Any:
    """``fs`` with host logits ``host - shift`` (the post-hoc logit adjustment of row 2), or ``fs`` itself."""
    from dataclasses import replace

    return fs if shift is None else replace(fs, host_logits=fs.host_logits - shift)


def train_head(cfg: DemoConfig, data: DemoData, kb: str, seed: int, *, modalities: str = "image+text",
                noisy: bool = False, shift: torch.Tensor | None = None,
                vote: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """Train a RetrievalHead with the library's trainer on the long-tail features with neighbours from ``kb``
    (``vote``: give it the label vote; None = ``cfg.label_vote``)."""
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.training import TrainConfig, train

    store = data.kb(kb)
    fs = shifted(data.train_features(kb, noisy=noisy), shift)
    use_vote = cfg.label_vote if vote is None else vote
    cached = head_cache_dir(cfg, data, kb, seed, modalities, noisy, shift, use_vote)
    if cfg.reuse_heads and (cached / "info.json").is_file():
        head = RetrievalHead.load(cached, store=store)  # attaching rebalances the vote (HeadConfig.vote_balance)
        info = json.loads((cached / "info.json").read_text())
        log.info("head for kb %s (%s, seed %d) loaded from %s (trained in %.1f s)", kb, modalities, seed, cached,
                 info["train_s"])
        return head, {**info, "reused": True}
    hc = HeadConfig(query_dim=fs.z.shape[1], image_dim=store.image_dim, text_dim=store.text_dim,
                    num_classes=data.num_classes, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, k=cfg.k,
                    modalities=modalities, label_vote=use_vote, vote_balance=use_vote and cfg.balance_vote,
                    mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, class_names=data.class_names,
                    query_fingerprint=store.fingerprint.key,
                    image_fingerprint=store.fingerprint.image, text_fingerprint=store.fingerprint.text)
    torch.manual_seed(seed)
    head = RetrievalHead(hc, store)  # with vote_balance, attaching divides the vote by the KB's class counts
    tc = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, loss="lace", tau_la=cfg.tau_la,
                     class_balance=cfg.class_balance,
                     mixup_alpha=cfg.mixup_alpha, label_smoothing=cfg.label_smoothing,
                     seed=seed, device="cpu", progress=cfg.progress)
    t0 = time.perf_counter()
    result = train(head, fs, tc, store=store)
    info = {"train_s": time.perf_counter() - t0, "kb": kb, "modalities": modalities, "noisy": noisy,
            "final_loss": result.history[-1]["train_loss"] if result.history else None}
    result.head.save(cached)  # the trained vote (scale 1); the post-hoc scale is chosen per row afterwards
    (cached / "info.json").write_text(json.dumps(info))  # written last: marks a complete entry
    return result.head, {**info, "reused": False}


# modules whose source keys the cache of trained heads (demo: the DemoConfig defaults; demo_heads: this module)
_TRAINING_CODE = ("head", "fusion", "functional", "training", "prediction", "feature_cache", "neighbors", "demo",
                  "demo_heads")


def head_cache_dir(cfg: DemoConfig, data: DemoData, kb: str, seed: int, modalities: str, noisy: bool,
                    shift: torch.Tensor | None, vote: bool) -> Path:
    """Where the head trained from exactly these inputs lives: the key covers the data setting, the KB (its name
    and a digest of its labels, so a relabelled KB gets new heads), every training setting, the seed, the
    host-logit shift and the source of the modules that training runs."""
    import hashlib
    import importlib

    from retrofit import __version__
    from retrofit.feature_cache import cache_key

    code = hashlib.sha256()
    for name in _TRAINING_CODE:
        code.update(Path(importlib.import_module(f"retrofit.{name}").__file__).read_bytes())
    settings = {n: getattr(cfg, n) for n in ("k", "dim", "depth", "heads", "mlp_ratio", "dropout", "balance_vote",
                                             "epochs", "lr", "batch_size", "tau_la", "class_balance", "mixup_alpha",
                                             "label_smoothing", "host_weight_decay")}
    key = cache_key({"settings": settings, "kb": kb, "kb_labels": data.kb_digest(kb), "seed": seed,
                     "modalities": modalities, "noisy": noisy,
                     "vote": vote, "shift": None if shift is None else [round(float(x), 6) for x in shift],
                     "version": __version__, "code": code.hexdigest()})
    return data.root / "heads" / key


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
    scale), where one pass per scale cost 5 passes over the 12,386 training images per row. ``absolute``:
    ``scales`` are vote weights (:meth:`LabelVote.set_weight`) instead of multiples of the trained one. The head is
    left unchanged."""
    from retrofit.calibration import logits_by_vote_scale as by_scale

    fs = _features(head, data, kb, split, noisy, shift)
    return by_scale(head, fs, scales, data.kb(kb), absolute=absolute, device="cpu")


def scale_on_training_images(head: Any, data: DemoData, kb: str, noisy: bool, shift: torch.Tensor | None,
                              scales: tuple[float, ...]) -> float:
    """The vote scale with the best balanced top-1 on the long-tail training images (neighbours from ``kb``
    without their own entry, cross-fitted host logits); ties: the scale nearest 1."""
    labels = data.train_features(kb, noisy=noisy).labels
    best = None
    for sc, logits in logits_by_vote_scale(head, data, kb, "lt", noisy, shift, scales).items():
        key = (balanced_top1(logits, labels), nearness_to_one(sc))
        if best is None or key > best[0]:
            best = (key, sc)
    return best[1]
