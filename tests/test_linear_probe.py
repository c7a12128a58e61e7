"""The linear probe on real Tiny Darknet features of CIFAR-10 images: it reaches the optimum of its objective,
whatever the features' scale, so float rounding (another machine, another thread count) does not move it."""

from __future__ import annotations

import pytest
import torch
from conftest import read_cifar_balanced

from retrofit.linear_probe import cross_fit_logits, fit_linear_probe

WD = 1e-3


@pytest.fixture(scope="module")
def feats(data_dir):
    from retrofit.models import darknet_tiny

    samples = read_cifar_balanced(data_dir, 40)  # 400 real images, 40 per class
    model = darknet_tiny(pretrained=True)
    pre = model.preprocess(64)
    with torch.no_grad():
        z = model.forward_head(model.forward_features(torch.stack([pre(s["image"]) for s in samples])),
                               pre_logits=True)
    z = torch.nn.functional.normalize(z, dim=1)  # unit norm, as the KB stores keys: a per-feature spread ~0.03
    y = torch.tensor([s["label"] for s in samples])
    return z[:300], y[:300], z[300:], y[300:]


def _objective(layer: torch.nn.Linear, z: torch.Tensor, y: torch.Tensor, wd: float) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(layer(z), y) + 0.5 * wd * layer.weight.pow(2).sum()


def test_the_probe_reaches_the_optimum_of_its_objective(feats):
    """Stopped at 100 L-BFGS iterations in raw coordinates, the demo's probe sat at loss 0.461 against an optimum of
    0.4356: its gradient here was far from zero. Now the objective's gradient at the returned layer vanishes."""
    z, y, _, _ = feats
    layer = fit_linear_probe(z, y, 10, weight_decay=WD)
    layer.requires_grad_(True)
    _objective(layer, z, y, WD).backward()
    grad = max(float(p.grad.abs().max()) for p in layer.parameters())
    assert grad < 1e-4, grad


def test_the_probe_does_not_depend_on_the_features_scale(feats):
    """Features scaled by c with the penalty scaled by c^2 pose the same problem (W -> W / c): the same logits.
    In raw coordinates L-BFGS's absolute tolerances stopped it at its start on small features."""
    z, y, zt, _ = feats
    ref = fit_linear_probe(z, y, 10, weight_decay=WD)
    c = 1e-3
    small = fit_linear_probe(z * c, y, 10, weight_decay=WD * c * c)
    with torch.no_grad():
        a, b = ref(zt), small(zt * c)
    assert torch.allclose(a, b, atol=1e-3 * float(a.abs().max())), float((a - b).abs().max())
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_rounding_the_features_does_not_move_the_probe(feats):
    """The same images embedded on another machine differ in the last bits: float16 rounding of the features
    (coarser than that) leaves the fitted probe's predictions as they were."""
    z, y, zt, _ = feats
    a = fit_linear_probe(z, y, 10, weight_decay=WD)
    b = fit_linear_probe(z.half().float(), y, 10, weight_decay=WD, seed=1)  # another start, too
    with torch.no_grad():
        la, lb = a(zt), b(zt)
    assert torch.equal(la.argmax(1), lb.argmax(1))
    assert float((la - lb).abs().max()) < 1e-2 * float(la.abs().max())


def test_a_probe_stopped_before_convergence_warns(feats, caplog):
    z, y, _, _ = feats
    with caplog.at_level("WARNING", logger="retrofit.linear_probe"):
        fit_linear_probe(z, y, 10, weight_decay=WD)
    assert "did not converge" not in caplog.text
    with caplog.at_level("WARNING", logger="retrofit.linear_probe"):
        fit_linear_probe(z, y, 10, weight_decay=WD, max_iter=3)
    assert "did not converge in max_iter=3" in caplog.text and "raise max_iter" in caplog.text


def test_bad_max_iter_is_refused_by_name(feats):
    z, y, _, _ = feats
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=r"max_iter must be an int >= 1, got"):
            fit_linear_probe(z, y, 10, max_iter=bad)
    with pytest.raises(ValueError, match=r"max_iter must be an int >= 1, got 0"):
        cross_fit_logits(z, y, 10, folds=3, max_iter=0)


def test_a_constant_feature_is_kept_out_of_the_fit(feats):
    """A feature with no spread (a dead channel) cannot be standardised; it gets weight 0 and the rest fit as
    without it."""
    z, y, zt, _ = feats
    dead = torch.cat([z, torch.full((len(z), 1), 0.25)], dim=1)
    layer = fit_linear_probe(dead, y, 10, weight_decay=WD)
    assert torch.isfinite(layer.weight).all() and float(layer.weight[:, -1].detach().abs().max()) == 0.0
    ref = fit_linear_probe(z, y, 10, weight_decay=WD)
    with torch.no_grad():
        assert torch.equal(layer(torch.cat([zt, torch.full((len(zt), 1), 0.25)], 1)).argmax(1), ref(zt).argmax(1))


@pytest.mark.parametrize("wd", [-1.0, float("nan"), float("inf"), "0.1", True])
def test_a_weight_decay_that_is_not_a_finite_number_ge_0_is_refused(feats, wd):
    """-1 and inf were accepted (the fit diverged or collapsed), NaN failed inside L-BFGS with an overflow error."""
    z, y, _, _ = feats
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        fit_linear_probe(z, y, 10, weight_decay=wd)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        cross_fit_logits(z, y, 10, weight_decay=wd)


def test_nested_cross_fit_keeps_each_fold_out_of_its_own_world(feats):
    """Entry f of the nested cross-fit is what a model cross-validated without fold f may see: on fold f the plain
    cross-fit's logits (bit for bit), on every other fold g a probe fitted without f and g. Changing fold f's
    images leaves entry f untouched outside fold f, and moves the other entries (they saw fold f)."""
    from retrofit.linear_probe import nested_cross_fit_logits, stratified_folds

    z, y, _, _ = feats
    fold = stratified_folds(y, 3, 0)
    nested = nested_cross_fit_logits(z, y, 10, folds=3, weight_decay=WD)
    assert nested.shape == (3, len(y), 10) and torch.isfinite(nested).all()
    plain = cross_fit_logits(z, y, 10, folds=3, weight_decay=WD)
    for f in range(3):
        assert torch.equal(nested[f][fold == f], plain[fold == f])
    fit = (fold != 0) & (fold != 2)  # a probe fitted on fold 1 alone gives entry 0 on fold 2 and entry 2 on fold 0
    probe = fit_linear_probe(z[fit], y[fit], 10, weight_decay=WD, seed=3 + 1)  # (the pair's seed: folds + its index)
    with torch.no_grad():
        torch.testing.assert_close(nested[0][fold == 2], probe(z[fold == 2]), rtol=0, atol=1e-6)
        torch.testing.assert_close(nested[2][fold == 0], probe(z[fold == 0]), rtol=0, atol=1e-6)
    other = z.clone()
    other[fold == 1] = -other[fold == 1]  # fold 1's images replaced (their labels, hence the folds, kept)
    moved = nested_cross_fit_logits(other, y, 10, folds=3, weight_decay=WD)
    assert torch.equal(moved[1][fold != 1], nested[1][fold != 1])
    for f in (0, 2):
        assert not torch.allclose(moved[f][fold != 1], nested[f][fold != 1])  # they were fitted on fold 1
    assert not torch.allclose(plain[fold != 1], cross_fit_logits(other, y, 10, folds=3, weight_decay=WD)[fold != 1])
    with pytest.raises(ValueError, match="folds must be an int >= 3, got 2"):
        nested_cross_fit_logits(z, y, 10, folds=2)
    with pytest.raises(ValueError, match="needs rows in at least 3 folds"):
        nested_cross_fit_logits(z[:2], y[:2], 10, folds=3)
