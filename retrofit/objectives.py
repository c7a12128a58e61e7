"""The training objective's pieces: the learning-rate schedule, cross-entropy against soft targets (label
smoothing, mixup), per-class loss weights and the log prior of logit-adjusted cross-entropy."""

from __future__ import annotations

import math

import torch

__all__ = ["lr_at", "soft_cross_entropy", "class_balance_weights", "log_prior"]


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``base_lr * min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of (B, C) logits against (B, C) target distributions; with ``class_weights`` (C,)
    each sample's loss is weighted by its target's expected class weight ``targets @ class_weights``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # a class with zero target weight adds nothing, also where its logit is -inf (0 * -inf would be NaN)
    loss = -torch.where(targets > 0, targets * logp, 0.0).sum(-1)  # (B,)
    if class_weights is not None:
        loss = loss * (targets.float() @ class_weights)
    return loss.mean()


def class_balance_weights(labels: torch.Tensor, num_classes: int, power: float) -> torch.Tensor:
    """(C,) loss weights ``n_c ** -power`` scaled so that the mean weight over ``labels`` is 1; a class with no
    sample weighs 0 (label smoothing and mixup spread target mass over it: a single sample's weight there, the
    largest of all, would add ``smoothing / C * w`` to every sample and undo the balance)."""
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).float()
    w = counts.clamp_min(1.0).pow(-float(power)) * (counts > 0)
    return w * counts.sum() / (w * counts).sum().clamp_min(1e-12)


def log_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) log class frequencies of ``labels`` (classes never seen count as one sample)."""
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).float().clamp_min(1.0)
    return (counts / counts.sum()).log()
