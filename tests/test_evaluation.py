"""Metrics of ``retrofit.evaluation`` on cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from retrofit.evaluation import (
    METRIC_KEYS,
    class_groups,
    evaluate,
    expected_calibration_error,
    logit_adjust,
    markdown_table,
)


def _onehot_logits(pred: list[int], C: int, scale: float = 10.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), C).float() * scale


def test_groups_and_accuracies():
    # 4 classes with 150 / 50 / 10 / 0 training images: many, medium, few, few (ImageNet-LT cut-offs)
    train_labels = torch.cat([torch.full((n,), c) for c, n in enumerate([150, 50, 10, 0])])
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    pred = [0, 0, 1, 0, 3, 3, 3, 1]  # class 0: 2/2, class 1: 1/2, class 2: 0/2, class 3: 1/2
    r = evaluate(_onehot_logits(pred, 4), torch.tensor(labels), train_labels)
    assert set(METRIC_KEYS) <= set(r)
    assert r["top1"] == pytest.approx(4 / 8)
    assert r["many"] == pytest.approx(1.0) and r["medium"] == pytest.approx(0.5)
    assert r["few"] == pytest.approx(1 / 4)  # classes 2 and 3: 1 right of 4
    assert r["per_class_acc"] == pytest.approx([1.0, 0.5, 0.0, 0.5])
    assert r["mean_per_class"] == pytest.approx(0.5)
    assert r["group_sizes"] == {"many": 1, "medium": 1, "few": 2}
    assert r["train_counts"] == [150, 50, 10, 0] and r["top5"] == 1.0  # C = 4 < 5: top-4


def test_cutoffs_boundaries_and_empty_group():
    g = class_groups(torch.tensor([101, 100, 20, 19]), (100, 20))
    assert g["many"].tolist() == [True, False, False, False]
    assert g["medium"].tolist() == [False, True, True, False]
    assert g["few"].tolist() == [False, False, False, True]
    r = evaluate(_onehot_logits([0, 1], 2), torch.tensor([0, 1]), train_counts=[5000, 3000], cutoffs=(1000, 200))
    assert r["few"] is None and r["medium"] is None and r["many"] == 1.0
    assert "–" in markdown_table({"m": r})  # empty groups shown as a dash
    with pytest.raises(ValueError, match="few_below <= many_above"):
        class_groups(torch.tensor([1]), (20, 100))


def test_nll_ece_top5():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0, -3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([1, 5])
    r = evaluate(logits, labels, train_counts=[1] * 6)
    expect = -(torch.log_softmax(logits, 1)[0, 1] + math.log(1 / 6)) / 2
    assert r["nll"] == pytest.approx(float(expect), rel=1e-12)
    logits[1] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    r = evaluate(logits, labels, train_counts=[1] * 6)
    assert r["top1"] == 0.0 and r["top5"] == 0.5  # class 1 is 2nd in row 0; class 5 is 6th in row 1
    # ECE: one sample at confidence 0.9 wrong, one at 0.6 right -> (0.9 + 0.4) / 2
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert expected_calibration_error(probs, torch.tensor([1, 0]), bins=10) == pytest.approx(0.65)


def test_logit_adjust_favours_rare_classes():
    logits = torch.tensor([[1.0, 0.9]])
    counts = [900, 100]
    adj = logit_adjust(logits, counts, tau=1.0)
    assert adj.argmax().item() == 1
    torch.testing.assert_close(adj - logits, -torch.log(torch.tensor([[0.9, 0.1]])))
    assert torch.equal(logit_adjust(logits, counts, tau=0.0), logits)
    with pytest.raises(ValueError, match="train_counts has 3 classes but the logits have 2"):
        logit_adjust(logits, [1, 2, 3])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="class-count mismatch"):
        evaluate(torch.zeros(2, 3), torch.tensor([0, 5]), train_counts=[1, 1, 1])
    with pytest.raises(ValueError, match="train_labels or train_counts"):
        evaluate(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="3 classes"):
        evaluate(torch.zeros(2, 3), torch.tensor([0, 1]), train_counts=[1, 1])


def test_infinite_logits_are_refused_and_results_are_strict_json(tmp_path):
    """An fp16 overflow gave inf logits: evaluate reported NLL NaN and eval.json held NaN (not JSON)."""
    import json
    import math

    from retrofit.evaluation import evaluate, save_results

    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or \\+inf, or -inf on the true class, in 1 of 6 rows"):
        evaluate(logits, labels, train_counts=[5, 5, 5])
    # -inf rules a class out: fine (it was refused), unless it is the true class
    ruled_out = torch.randn(6, 3)
    ruled_out[:, 2] = float("-inf")
    ruled_out[[2, 5], 2] = 0.0
    r = evaluate(ruled_out, labels, train_counts=[5, 5, 5])
    want = -torch.log_softmax(ruled_out.double(), 1).gather(1, labels[:, None]).mean()
    assert r["nll"] == pytest.approx(float(want)) and math.isfinite(r["ece"])
    ruled_out[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="in 1 of 6 rows"):
        evaluate(ruled_out, labels, train_counts=[5, 5, 5])
    r = evaluate(torch.randn(6, 3), labels, train_counts=[500, 50, 5], cutoffs=(100, 20))
    r["nll"] = float("nan")  # as an empty group's mean would be
    save_results({"x": r}, tmp_path / "eval.json")
    back = json.loads((tmp_path / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert back["x"]["nll"] is None and math.isfinite(back["x"]["top1"])


@pytest.mark.parametrize("kw, says", [(dict(cutoffs=(10,)), "cutoffs must be"), (dict(ece_bins=0), "ece_bins"),
                                      (dict(train_counts=[5, -1, 5]), "non-negative"),
                                      (dict(train_counts=[100.7, 5, 5]), "whole numbers .*not frequencies"),
                                      (dict(train_counts=[0.5, 0.3, 0.2]), "whole numbers"),
                                      (dict(labels=torch.tensor([True, False, True])), "integer class ids")])
def test_odd_evaluate_arguments_are_named(kw, says):
    from retrofit.evaluation import evaluate

    args = dict(logits=torch.randn(3, 3), labels=torch.tensor([0, 1, 2]), train_counts=[5, 5, 5])
    with pytest.raises(ValueError, match=says):
        evaluate(**{**args, **kw})


def test_calibration_error_adjustment_and_saving_check_their_inputs(tmp_path):
    """Found by a stress test: ECE broadcast (N, 1) labels to (N, N) and took logits for probabilities silently;
    logit_adjust refused numpy, rounded integer logits' adjustment and clamped frequencies to one (no adjustment);
    save_results did not create the markdown's folder."""
    import numpy as np

    from retrofit.evaluation import evaluate, expected_calibration_error, logit_adjust, save_results

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    p = logits.softmax(1)
    conf, pred = p.max(1)
    want = 0.0  # by hand, 5 bins
    for lo in np.linspace(0, 0.8, 5):
        sel = (conf > lo) & (conf <= lo + 0.2) if lo else conf <= 0.2
        if sel.any():
            want += sel.float().mean() * abs(conf[sel].mean() - (pred[sel] == labels[sel]).float().mean())
    assert expected_calibration_error(p, labels[:, None], 5) == pytest.approx(float(want), abs=1e-6)
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        expected_calibration_error(logits * 5, labels)
    with pytest.raises(ValueError, match="bins must be an int >= 1"):
        expected_calibration_error(p, labels, 0)
    counts = [800, 200, 20, 4]
    ref = logit_adjust(logits, counts)
    torch.testing.assert_close(logit_adjust(logits.numpy(), counts), ref)
    adj = logit_adjust(torch.zeros(2, 4, dtype=torch.int64), counts)
    assert adj.is_floating_point() and adj[0, 3] == pytest.approx(-math.log(4 / 1024), rel=1e-5)
    with pytest.raises(ValueError, match="not frequencies"):
        logit_adjust(logits, [0.78, 0.2, 0.02, 0.004])
    for typed in (np.array(counts, dtype=np.uint32), torch.tensor(counts, dtype=torch.uint32),
                  np.array(counts, dtype=np.float32)):  # unsigned / whole float counts: as before, not refused
        torch.testing.assert_close(logit_adjust(logits, typed), ref)
    r = evaluate(logits, labels, train_counts=counts)
    save_results({"m": r}, tmp_path / "a" / "eval.json", tmp_path / "b" / "c" / "table.md")
    assert (tmp_path / "b" / "c" / "table.md").is_file()
