"""Long-tail evaluation of classifier logits: ``evaluate`` and post-hoc ``logit_adjust``.

``evaluate(logits, labels, train_labels=...)`` gives overall top-1 / top-5, Many / Medium / Few accuracy
(groups by training images per class; ImageNet-LT cut-offs by default: Many > 100, Medium 20-100,
Few < 20), mean per-class accuracy, NLL and expected calibration error, as a JSON-able dict;
``markdown_table`` renders several such results side by side. Tensors in, numbers out.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "evaluate",
    "logit_adjust",
    "expected_calibration_error",
    "class_groups",
    "markdown_table",
    "save_results",
    "METRIC_KEYS",
]

# every key of evaluate()'s result, in the order the markdown table shows the scalar ones
METRIC_KEYS = ("top1", "top5", "many", "medium", "few", "mean_per_class", "nll", "ece", "n", "num_classes",
               "cutoffs", "group_sizes", "per_class_acc", "per_class_count", "train_counts")
_TABLE_KEYS = ("top1", "top5", "many", "medium", "few", "mean_per_class", "nll", "ece")


def _counts(train_labels: torch.Tensor | None, train_counts: Any, num_classes: int) -> torch.Tensor:
    if train_counts is not None:
        c = _whole_counts(train_counts)
        if c.numel() != num_classes:
            raise ValueError(f"train_counts has {c.numel()} entries but the logits have {num_classes} classes")
        return c
    if train_labels is None:
        raise ValueError("evaluate needs train_labels or train_counts to form the Many / Medium / Few groups")
    lab = torch.as_tensor(train_labels, dtype=torch.int64).reshape(-1)
    lab = lab[lab >= 0]
    if lab.numel() and int(lab.max()) >= num_classes:
        raise ValueError(f"train label {int(lab.max())} is out of range for {num_classes} classes")
    return torch.bincount(lab, minlength=num_classes)


def _whole_counts(train_counts: Any) -> torch.Tensor:
    """(C,) int64 training images per class; fractions (class frequencies, 100.7) are refused, not truncated."""
    try:
        c = torch.as_tensor(train_counts).reshape(-1)
    except TypeError:  # numpy uint16 / uint32 / uint64 arrays
        c = torch.as_tensor(np.asarray(train_counts).astype(np.int64)).reshape(-1)
    if c.dtype in (torch.uint16, torch.uint32, torch.uint64):
        c = c.to(torch.int64)  # (comparisons are not implemented for them)
    if c.dtype == torch.bool or c.is_complex():
        raise ValueError(f"train_counts must be numbers of training images per class, got {c.dtype}")
    if c.is_floating_point():
        if not bool(torch.isfinite(c).all()) or bool((c != c.round()).any()):
            raise ValueError(f"train_counts must be whole numbers of training images per class (not frequencies), "
                             f"got {c.tolist()[:10]}")
    if c.numel() and bool((c < 0).any()):
        raise ValueError(f"train_counts must be non-negative numbers of images per class, got {c.tolist()[:10]}")
    return c.to(torch.int64)


def class_groups(train_counts: torch.Tensor, cutoffs: tuple[int, int] = (100, 20)) -> dict[str, torch.Tensor]:
    """Boolean (C,) masks: ``many`` count > hi, ``medium`` lo <= count <= hi, ``few`` count < lo."""
    try:
        hi, lo = cutoffs
        ok = lo <= hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"cutoffs must be (many_above, few_below) with few_below <= many_above, got {cutoffs!r}")
    c = torch.as_tensor(train_counts)
    if c.dtype == torch.bool or c.is_complex() or (c.numel() and bool((c < 0).any())):
        raise ValueError(f"train counts must be non-negative numbers of images per class, got {c.tolist()[:10]}")
    return {"many": c > hi, "medium": (c >= lo) & (c <= hi), "few": c < lo}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins (top-1 confidence vs accuracy, weighted by bin size).
    ``probs`` (N, C) probabilities (``logits.softmax(1)``), ``labels`` (N,) class ids."""
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels).reshape(-1)
    if not isinstance(bins, numbers.Integral) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    if probs.dim() != 2 or probs.shape[0] != labels.numel():
        raise ValueError(f"probs must be (N, C) with N = {labels.numel()} labels, got {tuple(probs.shape)}")
    if probs.numel() and not bool(((probs >= -1e-6) & (probs <= 1 + 1e-6)).all()):
        raise ValueError("probs must be probabilities in [0, 1] (logits.softmax(1)), got values outside it: logits?")
    conf, pred = probs.max(dim=1)  # (N,), (N,)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for i in range(bins):
        sel = (conf > edges[i]) & (conf <= edges[i + 1]) if i else (conf >= 0) & (conf <= edges[1])
        if sel.any():
            ece += sel.float().mean().item() * abs(conf[sel].mean().item() - correct[sel].mean().item())
    return ece


def logit_adjust(logits: torch.Tensor, train_counts: Any, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021): ``logits - tau * log prior`` (prior from training counts;
    classes with no training sample count as one)."""
    logits = torch.as_tensor(logits)  # numpy arrays too
    if not logits.is_floating_point():
        logits = logits.float()  # integer logits: the adjustment is not a whole number
    c = _whole_counts(train_counts).double().clamp_min(1.0)
    if c.numel() != logits.shape[-1]:
        raise ValueError(f"train_counts has {c.numel()} classes but the logits have {logits.shape[-1]}")
    prior = (c / c.sum()).log().to(logits.dtype).to(logits.device)  # (C,)
    return logits - tau * prior


def _acc(correct: torch.Tensor, sel: torch.Tensor) -> float | None:
    return correct[sel].float().mean().item() if sel.any() else None


def evaluate(
    logits: torch.Tensor,
    labels: torch.Tensor,
    train_labels: torch.Tensor | None = None,
    *,
    train_counts: Any = None,
    cutoffs: tuple[int, int] = (100, 20),
    ece_bins: int = 15,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Metrics of (N, C) ``logits`` against (N,) ``labels`` (see ``METRIC_KEYS``).

    Groups come from ``train_labels`` or ``train_counts`` (C,) (one of the two is required) with
    ``cutoffs = (many_above, few_below)``.
    Group accuracies are over the test samples of the group's classes; a group with no class is None.
    Accuracies are fractions in [0, 1]; ``top5`` is top-min(5, C).
    """
    logits = torch.as_tensor(logits)  # numpy arrays too
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
    if not isinstance(ece_bins, numbers.Integral) or isinstance(ece_bins, bool) or ece_bins < 1:
        raise ValueError(f"ece_bins must be an int >= 1, got {ece_bins!r}")
    ece_bins = int(ece_bins)
    labels = labels.to(torch.int64).reshape(-1).cpu()
    N, C = logits.shape
    if labels.numel() != N:
        raise ValueError(f"{N} rows of logits but {labels.numel()} labels")
    if N == 0:
        raise ValueError("evaluate got no samples")
    if int(labels.min()) < 0 or int(labels.max()) >= C:
        raise ValueError(f"labels must be in 0..{C - 1} (the logits have {C} classes), got "
                         f"{int(labels.min())}..{int(labels.max())}: a class-count mismatch between data and model")
    logits = logits.detach().double().cpu()
    # NaN or +inf (an fp16 overflow) break every metric; -inf rules a class out (fine) unless it is the true class
    # or every class of the row
    broken = torch.isnan(logits).any(1) | (logits == math.inf).any(1) | (logits == -math.inf).all(1)
    broken |= logits.gather(1, labels[:, None])[:, 0] == -math.inf
    if bool(broken.any()):
        raise ValueError(f"logits hold NaN or +inf, or -inf on the true class, in {int(broken.sum())} of {N} rows: "
                         "the model's output is broken there (check its inputs and weights, or an fp16 overflow); "
                         "no metric is meaningful")
    counts = _counts(train_labels, train_counts, C)
    groups = class_groups(counts, cutoffs)
    pred = logits.argmax(1)
    correct = pred == labels
    top5 = (logits.topk(min(5, C), dim=1).indices == labels[:, None]).any(1)
    per_class = [(_acc(correct, labels == c)) for c in range(C)]
    seen = [a for a in per_class if a is not None]
    logp = torch.log_softmax(logits, dim=1)
    out: dict[str, Any] = {
        "top1": correct.double().mean().item(),
        "top5": top5.double().mean().item(),
        **{g: _acc(correct, m[labels]) for g, m in groups.items()},
        "mean_per_class": sum(seen) / len(seen),
        "nll": -logp.gather(1, labels[:, None]).mean().item(),
        "ece": expected_calibration_error(logp.exp(), labels, ece_bins),
        "n": N,
        "num_classes": C,
        "cutoffs": {"many_above": cutoffs[0], "few_below": cutoffs[1]},
        "group_sizes": {g: int(m.sum()) for g, m in groups.items()},
        "per_class_acc": per_class,
        "per_class_count": torch.bincount(labels, minlength=C).tolist(),
        "train_counts": counts.tolist(),
    }
    if class_names is not None:
        if len(class_names) != C:
            raise ValueError(f"{len(class_names)} class names for {C} classes")
        out["class_names"] = list(class_names)
    return out


def _fmt(v: Any, pct: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:.4f}"


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table with one row per named result (accuracies in %, NLL and ECE as numbers)."""
    head = ["model", "top-1", "top-5", "many", "medium", "few", "mean/class", "NLL", "ECE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, r in results.items():
        cells = [_fmt(r.get(k), k not in ("nll", "ece")) for k in _TABLE_KEYS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    any_r = next(iter(results.values()), None)
    if any_r is not None:
        co, gs = any_r["cutoffs"], any_r["group_sizes"]
        lines.append("")
        lines.append(f"Groups by training images per class: many > {co['many_above']} ({gs['many']} classes), "
                     f"medium {co['few_below']}-{co['many_above']} ({gs['medium']}), few < {co['few_below']} "
                     f"({gs['few']}); {any_r['n']} evaluated samples.")
    return "\n".join(lines) + "\n"


def _json_safe(v: Any) -> Any:
    """NaN / inf (a metric of an empty group) as null: strict JSON readers refuse NaN."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def save_results(results: dict[str, dict[str, Any]], json_path: str | Path, markdown_path: str | Path | None = None,
                 meta: dict[str, Any] | None = None) -> None:
    """Write ``results`` (name -> evaluate() dict) as JSON and, optionally, the markdown table. ``meta``: what was
    evaluated (data, head, KB, settings), stored under the JSON's ``"meta"`` key and listed under the table."""
    if meta is not None and "meta" in results:
        raise ValueError("a result named 'meta' would clash with the meta entry; rename it")
    for path in (json_path, markdown_path):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    doc = {**results, "meta": meta} if meta is not None else results
    Path(json_path).write_text(json.dumps(_json_safe(doc), indent=1, allow_nan=False))  # NaN -> null
    if markdown_path is not None:
        lines = [f"- {k}: {v}" for k, v in (meta or {}).items()]
        Path(markdown_path).write_text(markdown_table(results) + ("\n\n" + "\n".join(lines) + "\n" if lines else ""))
