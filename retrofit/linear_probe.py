"""Host classifiers for frozen features: a linear probe, and cross-fitted host logits.

Training the head against the host's logits on the host's own training set leaks the host's fit: those
logits are far more confident (and right) than on unseen images, so the head learns to trust the host too
much. ``cross_fit_logits`` gives every training sample logits from a linear classifier that never saw it
(K-fold: fit on K-1 folds, predict the held-out fold).
"""

from __future__ import annotations

import logging
import math
import numbers

import torch
from torch import nn

__all__ = ["fit_linear_probe", "cross_fit_logits", "nested_cross_fit_logits", "stratified_folds", "class_indices"]

log = logging.getLogger(__name__)


def check_weight_decay(weight_decay: float) -> None:
    """The probe's L2 strength must be a finite number >= 0 (a negative one made L-BFGS diverge, NaN failed in it)."""
    if (not isinstance(weight_decay, numbers.Real) or isinstance(weight_decay, bool) or not math.isfinite(weight_decay)
            or weight_decay < 0):
        raise ValueError(f"weight_decay must be a finite number >= 0 (the probe's L2 strength), got {weight_decay!r}")


def fit_linear_probe(z: torch.Tensor, labels: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-3,
                     max_iter: int = 1000, seed: int = 0) -> nn.Linear:
    """Multinomial logistic regression on (N, D) features: full-batch L-BFGS on CE + wd/2 * ||W||^2, run to
    convergence (warns when ``max_iter`` iterations did not get there).

    It is solved in standardised coordinates (each feature centred and scaled to unit variance, the penalty mapped
    back so the objective and its optimum are unchanged) and returned as a layer on the raw features. On unit-norm
    embeddings (per-feature spread ~0.03) L-BFGS in raw coordinates needs ~500 iterations; stopped at 100, its
    predictions moved with float rounding (3% of CIFAR-10 test predictions for a 1e-4 relative perturbation of
    the features), so the same data gave other figures on another machine. Standardised, it converges in
    ~100-250 iterations and that perturbation moves 0.05% of its predictions.
    """
    labels = class_indices(labels)
    z = _features(z, labels)
    if labels.numel() == 0:
        raise ValueError("fit_linear_probe got no samples")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    check_weight_decay(weight_decay)
    x64 = z.detach().cpu().double()
    mean = x64.mean(0)
    scale = x64.std(0, correction=0) if len(x64) > 1 else torch.ones_like(mean)
    varies = scale > 0
    scale = torch.where(varies, scale, torch.ones_like(scale))  # a constant feature: centred to 0, weight 0 below
    x = ((x64 - mean) / scale).float()
    inv_scale = (1.0 / scale).float()
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=g)
        layer.bias.zero_()
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=int(max_iter), max_eval=int(max_iter) * 2,
                            history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-7,
                            tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (nn.functional.cross_entropy(layer(x), labels)
                + 0.5 * weight_decay * (layer.weight * inv_scale).pow(2).sum())  # = wd/2 ||W_raw||^2
        loss.backward()
        return loss

    opt.step(closure)
    steps = int(opt.state[layer.weight].get("n_iter", 0))  # L-BFGS keeps its state on the first parameter
    if steps >= max_iter:
        closure()
        grad = max(float(p.grad.abs().max()) for p in layer.parameters())
        log.warning("the linear probe did not converge in max_iter=%d L-BFGS iterations (largest gradient %.3g): "
                    "its predictions may vary with float rounding (another machine, thread count); raise max_iter",
                    max_iter, grad)
    with torch.no_grad():  # back to raw coordinates: W_raw = W / scale, b_raw = b - W_raw @ mean
        w = torch.where(varies, layer.weight.double() / scale, 0.0)  # constant features: the penalty's optimum, 0
        b = layer.bias.double() - w @ mean
        out = nn.Linear(x.shape[1], num_classes)
        out.weight.copy_(w.float())
        out.bias.copy_(b.float())
    return out.eval()


def class_indices(labels: object) -> torch.Tensor:
    """(N,) int64 class indices; float labels only when whole numbers (1.7 was truncated to class 1, silently)."""
    t = torch.as_tensor(labels).reshape(-1)
    if t.is_floating_point() and not bool((t == t.round()).all()):
        bad = t[t != t.round()][:5].tolist()
        raise ValueError(f"labels must be class indices (whole numbers), got {bad}")
    return t.to(torch.int64)


def _features(z: object, labels: torch.Tensor) -> torch.Tensor:
    """``z`` as an (N, D) tensor (numpy arrays too) with one row per label, or a ValueError naming the shapes."""
    try:
        z = torch.as_tensor(z)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"z must be an (N, D) tensor or array, got {type(z).__name__}") from None
    if z.dim() != 2 or z.shape[0] != labels.numel():
        raise ValueError(f"z must be (N, D) with N = {labels.numel()} labels, got {tuple(z.shape)}")
    if z.numel() and not bool(torch.isfinite(z).all()):  # L-BFGS failed deep inside its line search on them
        rows = (~torch.isfinite(z)).any(1).nonzero().flatten()
        raise ValueError(f"z holds NaN or inf in {rows.numel()} row(s) (e.g. {rows[:5].tolist()}): give finite "
                         "features")
    return z


def _same_fold_for_twins(z: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
    """Identical rows of ``z`` (a duplicated image, an oversampled tail class) all go to the fold of their first
    copy: a twin in another fold would hand the probe the held-out sample. Without duplicates ``fold`` is kept."""
    _, group = torch.unique(z.detach().float().cpu(), dim=0, return_inverse=True)  # (N,) one id per distinct row
    first = torch.full((int(group.max()) + 1,), len(group), dtype=torch.int64)
    first.scatter_reduce_(0, group, torch.arange(len(group)), reduce="amin")  # each group's first row
    return fold[first[group]]


def stratified_folds(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """(N,) fold of each sample: every class dealt round-robin over the folds in a seeded random order, each class
    starting where the previous one stopped (fold sizes differ by at most one; classes with fewer samples than
    folds are spread over the folds instead of all landing in fold 0)."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(labels)
    start = 0  # the fold the next class starts at
    for c in labels.unique():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(rows.numel(), generator=g)]
        fold[rows] = (torch.arange(rows.numel()) + start) % folds
        start = (start + rows.numel()) % folds
    return fold


def cross_fit_logits(z: torch.Tensor, labels: torch.Tensor, num_classes: int, *, folds: int = 5, seed: int = 0,
                     weight_decay: float = 1e-3, max_iter: int = 1000) -> torch.Tensor:
    """(N, C) out-of-fold logits: each sample's logits come from a linear probe fitted on the other folds.

    Folds are stratified by class (:func:`stratified_folds`); identical rows of ``z`` share a fold.
    """
    z, labels, fold = _cross_fit_setup(z, labels, folds, seed, weight_decay, "cross_fit_logits", 2)
    out = torch.empty(labels.numel(), num_classes)
    for f in range(int(folds)):
        held = fold == f
        if not held.any():
            continue
        probe = fit_linear_probe(z[~held], labels[~held], num_classes, weight_decay=weight_decay,
                                 max_iter=max_iter, seed=(seed + f) % (1 << 64))  # (seeds < 2**64 taken)
        with torch.no_grad():
            out[held] = probe(z[held].float().cpu())
        log.info("cross-fit fold %d/%d: %d held out", f + 1, folds, int(held.sum()))
    return out


def nested_cross_fit_logits(z: torch.Tensor, labels: torch.Tensor, num_classes: int, *, folds: int = 5,
                            seed: int = 0, weight_decay: float = 1e-3, max_iter: int = 1000) -> torch.Tensor:
    """(folds, N, C) host logits for a second-stage model that is itself cross-validated over the same folds.

    A model trained on folds other than ``f`` against :func:`cross_fit_logits` still learns from fold ``f``'s
    labels: the probes that gave its training samples their logits were fitted on fold ``f`` too. Entry ``[f]``
    holds what such a model may see without that leak: on every fold ``g != f`` the logits of a probe fitted on
    the folds other than ``f`` and ``g``, and on fold ``f`` itself those of a probe fitted on all the other folds
    (:func:`cross_fit_logits`'s, bit for bit: the host of a world without fold ``f``). ``folds * (folds - 1) / 2
    + folds`` probes (15 for 5 folds), on the folds of :func:`cross_fit_logits` (same ``folds`` and ``seed``).
    """
    z, labels, fold = _cross_fit_setup(z, labels, folds, seed, weight_decay, "nested_cross_fit_logits", 3)
    folds = int(folds)
    plain = cross_fit_logits(z, labels, num_classes, folds=folds, seed=seed, weight_decay=weight_decay,
                             max_iter=max_iter)
    out = torch.empty(folds, labels.numel(), num_classes)
    for f in range(folds):  # each fold's own rows: the plain cross-fit's
        out[f, fold == f] = plain[fold == f]
    pairs = [(f, g) for f in range(folds) for g in range(f + 1, folds)]
    for i, (f, g) in enumerate(pairs):  # a probe without folds f and g serves entry f on fold g and entry g on f
        fit = (fold != f) & (fold != g)
        probe = fit_linear_probe(z[fit], labels[fit], num_classes, weight_decay=weight_decay, max_iter=max_iter,
                                 seed=(seed + folds + i) % (1 << 64))
        with torch.no_grad():
            for a, b in ((f, g), (g, f)):
                rows = fold == b
                if rows.any():
                    out[a, rows] = probe(z[rows].float().cpu())
        log.info("nested cross-fit: probe %d/%d (without folds %d and %d)", i + 1, len(pairs), f, g)
    return out


def _cross_fit_setup(z: object, labels: object, folds: object, seed: int, weight_decay: float, what: str,
                     least: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked ``(z, labels, fold of each row)`` for a cross-fit over ``folds`` (>= ``least``) folds."""
    if not isinstance(folds, numbers.Integral) or isinstance(folds, bool) or folds < least:
        raise ValueError(f"folds must be an int >= {least}, got {folds!r}")
    check_weight_decay(weight_decay)
    labels = class_indices(labels)
    z = _features(z, labels)
    if labels.numel() == 0:
        raise ValueError(f"{what} got no samples")
    fold = _same_fold_for_twins(z, stratified_folds(labels, int(folds), seed))
    filled = int(fold.unique().numel())
    if filled < least:  # every row identical (a dead backbone?), or too few samples
        n, distinct = labels.numel(), int(torch.unique(z, dim=0).shape[0])
        why = f"all {n} rows are identical" if distinct == 1 and n > 1 else f"{n} row(s), {distinct} distinct"
        raise ValueError(f"{what} needs rows in at least {least} folds to fit its probes; {why}, and identical rows "
                         f"share a fold, so they fill {filled}")
    return z, labels, fold
