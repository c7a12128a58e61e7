"""What :func:`retrofit.training.train` checks before it trains: class counts, shapes, labels and finite
features and host logits, each refused with a message naming the value and the fix."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.feature_cache import FeatureSet
from retrofit.train_config import TrainConfig

__all__ = ["check_features", "check_finite_features", "check_train_inputs"]

log = logging.getLogger("retrofit.training")  # (train()'s logger: these warnings are training's)


def _num_classes(head: nn.Module) -> int:
    cfg = getattr(head, "config", None)
    c = getattr(cfg, "num_classes", None)
    if not isinstance(c, int):
        raise TypeError(f"{type(head).__name__} has no config.num_classes; train() needs a RetrievalHead")
    return c


def check_features(fs: FeatureSet, num_classes: int, what: str, host: nn.Module | None = None) -> None:
    """Class-count and shape checks with messages that name the values and the fix."""
    out_features = getattr(host, "out_features", None)
    if out_features is not None and out_features != num_classes:
        raise RetrofitError(f"{what}: the host classifier has {out_features} outputs but the head has {num_classes} "
                            "classes; give a host layer for the head's classes (e.g. fit_linear_probe)")
    if fs.host_logits is not None and fs.host_logits.shape[1] != num_classes and host is None:
        raise RetrofitError(
            f"{what}: the host logits have {fs.host_logits.shape[1]} classes but the head has {num_classes}. Give a "
            "head with the same classes, or a host classifier for the head's classes (train_host, or --host probe "
            "on the CLI)."
        )
    if fs.labels.is_floating_point() or fs.labels.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be integer class ids (int64), got {fs.labels.dtype}")
    lab = fs.labels[fs.labels >= 0]
    if lab.numel() and int(lab.max()) >= num_classes:
        raise RetrofitError(f"{what}: label {int(lab.max())} is out of range for a head with {num_classes} classes "
                            f"(allowed 0..{num_classes - 1}); build the head with num_classes > {int(lab.max())}")


def check_finite_features(f: FeatureSet, name: str) -> None:
    """Refuse NaN / inf embeddings, naming the rows (training said "lower the learning rate"; validation scored
    them silently)."""
    if bool(torch.isfinite(f.z).all()):
        return
    bad = torch.nonzero(~torch.isfinite(f.z).all(dim=1)).flatten()
    raise ValueError(f"the {name} features (embeddings z) hold NaN or inf in {len(bad)} of {len(f.z)} rows "
                     f"(first: {bad[:5].tolist()}): the backbone gave non-finite embeddings for those images; check "
                     "them and the model (fp16 overflow?)")


def check_train_inputs(head: nn.Module, features: FeatureSet, val_features: FeatureSet | None,
                       host_classifier: nn.Module | None, cfg: TrainConfig, C: int) -> None:
    """Every check of ``train``'s inputs that needs no store: raises before anything is trained or written."""
    if cfg.warmup_epochs > cfg.epochs:
        log.warning("TrainConfig.warmup_epochs=%g is longer than epochs=%d: the learning rate rises for the whole run "
                    "and ends at %.3g of lr=%g, never reaching it; warm up for at most the run's length "
                    "(--warmup-epochs %d)", cfg.warmup_epochs, cfg.epochs, cfg.epochs / cfg.warmup_epochs, cfg.lr,
                    cfg.epochs)
    if len(features) == 0:
        raise ValueError("train() got an empty FeatureSet")
    if cfg.train_host and host_classifier is None:
        raise RetrofitError("train_host=True needs host_classifier= (the host's final linear layer, e.g. from "
                            "retrofit.linear_probe.fit_linear_probe or the model's get_classifier())")
    if host_classifier is not None:
        check_features(features.subset(slice(0, 0)), C, "host classifier", host_classifier)
    check_features(features, C, "training features", host_classifier if cfg.train_host else None)
    qdim = getattr(getattr(head, "config", None), "query_dim", None)
    for name, f in (("training", features), ("validation", val_features)):
        if f is not None and qdim is not None and f.z.shape[1] != qdim:
            raise ValueError(f"{name} features: z is {f.z.shape[1]}-d but the head takes {qdim}-d queries "
                             f"(HeadConfig(query_dim=...)): build the head with query_dim={f.z.shape[1]}")
    if val_features is not None:
        check_features(val_features, C, "validation features", host_classifier if cfg.train_host else None)
    if (val_features is not None and host_classifier is None
            and (features.host_logits is None) != (val_features.host_logits is None)):
        has, lacks = ("training", "validation") if features.host_logits is not None else ("validation", "training")
        raise ValueError(f"the {has} features carry host logits but the {lacks} features do not: validation would "
                         "score the head with other inputs than it trains with. Give both FeatureSets host_logits "
                         "(the host's logits on those images) or neither, or pass host_classifier=")
    if (features.labels < 0).any():
        raise ValueError("training labels must all be known (>= 0)")
    for name, f in (("training", features), ("validation", val_features)):
        if f is not None:
            check_finite_features(f, name)
        hl = None if f is None else f.host_logits
        if hl is None or bool(torch.isfinite(hl).all()):
            continue
        if bool(torch.isnan(hl).any() | (hl == math.inf).any()):
            raise ValueError(f"the {name} host logits hold NaN or +inf: give finite logits (-inf marks a masked "
                             "class)")
        if cfg.label_smoothing > 0:
            raise ValueError(f"the {name} host logits hold -inf (masked classes) and label_smoothing="
                             f"{cfg.label_smoothing} spreads target mass over every class: the loss would be "
                             "infinite. Train with label_smoothing=0, or mask with a large finite value (-1e4; "
                             "not with a vote_form='mix' head: its vote still gives such a class its share)")
