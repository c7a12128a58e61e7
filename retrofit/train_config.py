"""Head training settings: :class:`TrainConfig` (the hyper-parameters, checked by ``validate``) and
:class:`TrainResult` (what :func:`retrofit.training.train` returns)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

__all__ = ["TrainConfig", "TrainResult"]

_LOSSES = ("ce", "lace")
_U64 = 1 << 64  # torch generators take seeds below this: derived seeds wrap


def _plain(v: Any) -> Any:
    """A numpy scalar as the Python number it holds; anything else as it is."""
    if isinstance(v, np.ndarray):  # one number (0-d or 1 element), or a sequence (betas)
        return v.item() if v.size == 1 else tuple(v.tolist())
    return v.item() if isinstance(v, np.generic) else v


@dataclass
class TrainConfig:
    """Head training hyper-parameters (defaults: the RetFormer paper's)."""

    epochs: int = 25  # passes over the training features
    lr: float = 5e-4  # peak learning rate (after warm-up)
    batch_size: int = 256  # samples per step
    warmup_epochs: float = 1.0  # linear warm-up length, in epochs; then cosine decay
    min_lr_ratio: float = 0.0  # final lr as a fraction of ``lr``
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only; biases / norms get none)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping
    label_smoothing: float = 0.1  # weight spread uniformly over the classes
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) mixing of the head's inputs; 0 = no mixup
    loss: str = "ce"  # "ce" or "lace" (logit-adjusted CE: + tau_la * log prior during training)
    tau_la: float = 1.0  # logit-adjustment strength for loss="lace"
    # Per-sample loss weight n_c ** -class_balance (n_c: training samples of the target class), scaled to mean 1
    # over the training set: 0 = plain average, 1 = every class weighs the same (the balanced test's objective).
    class_balance: float = 0.0
    train_host: bool = False  # also train the host classifier layer (the paper's backbone branch)
    host_lr: float | None = None  # lr of the host classifier when train_host (None = ``lr``)
    k: int | None = None  # neighbours per sample (None = the head's k)
    seed: int = 0  # seeds shuffling, mixup and dropout (the head's initial weights: seed before building it)
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # autocast (bf16, or fp16 + grad scaling) on CUDA; ignored on CPU
    eval_batch_size: int = 1024  # batch size for validation / prediction
    log_every: int = 20  # steps between JSON-lines step records
    progress: bool = True  # tqdm progress bars

    def validate(self) -> None:
        for f in fields(self):  # numpy numbers (a sweep's np.float32 lr) become plain ones: the run's JSON takes them
            v = getattr(self, f.name)
            if isinstance(v, (tuple, list)):
                setattr(self, f.name, type(v)(_plain(x) for x in v))
            else:
                setattr(self, f.name, _plain(v))
        if self.loss not in _LOSSES:
            raise ValueError(f"TrainConfig.loss={self.loss!r}; allowed: {_LOSSES}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        def number(name: str) -> float:  # NaN passed every comparison below (nan < 0 is False), inf some
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"TrainConfig.{name} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {v!r}")
            return v

        if not number("lr") > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= number("label_smoothing") < 1.0:
            raise ValueError(f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("mixup_alpha", "warmup_epochs", "weight_decay"):
            if number(name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        number("tau_la")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas)):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < _U64:
            raise ValueError(f"TrainConfig.seed must be an int in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.class_balance, (int, float)) or not 0.0 <= self.class_balance <= 1.0:
            raise ValueError(f"TrainConfig.class_balance must be in [0, 1], got {self.class_balance!r}")
        if self.k is not None and (not isinstance(self.k, int) or self.k <= 0):
            raise ValueError(f"TrainConfig.k must be a positive int or None, got {self.k!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1] (the final lr as a fraction of lr), got "
                             f"{self.min_lr_ratio}")
        if not 0.0 <= self.grad_clip < math.inf:
            raise ValueError(f"TrainConfig.grad_clip must be a finite number >= 0 (0 = no clipping), got "
                             f"{self.grad_clip}")
        if self.host_lr is not None and not 0.0 <= self.host_lr < math.inf:
            raise ValueError(f"TrainConfig.host_lr must be None (= lr) or a finite number >= 0, got {self.host_lr}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        if unknown := set(d) - known:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; allowed: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class TrainResult:
    """What ``train`` returns."""

    head: nn.Module  # the trained head (in eval mode)
    host_classifier: nn.Module | None  # the (jointly trained) host classifier, if any
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    step_losses: list[float] = field(default_factory=list)  # training loss of every step run in this call
    out_dir: Path | None = None  # where logs / checkpoints went
