"""retrofit.calibration: the vote scale chosen on labelled data from two passes, with a real KnowledgeBase."""

from __future__ import annotations

import pytest
import torch
from conftest import clustered_kb_and_queries

from retrofit.calibration import DEFAULT_SCALES, choose_vote_scale, logits_by_vote_scale, score_logits
from retrofit.feature_cache import FeatureSet
from retrofit.head import HeadConfig, RetrievalHead
from retrofit.training import predict_logits

C, D, T = 3, 8, 6


@pytest.fixture
def setting(tmp_path, seed):
    """A KB whose labels are the truth (3 clusters) and queries whose host logits are pure noise: the label
    vote is the only informative input, so more vote must score better."""
    kb, fs, g = clustered_kb_and_queries(tmp_path / "kb", seed, C, D, D, T, kb_per_class=20, queries_per_class=10,
                                         host_scale=3.0, class_names=["a", "b", "c"])
    head = RetrievalHead(HeadConfig(query_dim=D, image_dim=D, text_dim=T, num_classes=C, dim=8, depth=1, heads=2,
                                    k=5, label_vote=True), kb)
    with torch.no_grad():
        head.readout.fc.weight.normal_(0, 0.3, generator=g)
    head.vote.set_weight(0.5)
    head.vote.set_scale(1.3)
    yield head, fs, kb
    kb.close()


def _state(head):
    return head.vote.weight.detach().clone(), head.vote.scale.clone()


def test_logits_by_vote_scale_equals_one_pass_per_scale(setting):
    head, fs, kb = setting
    before = _state(head)
    got = logits_by_vote_scale(head, fs, (0.0, 0.7, 2.5), kb, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(_state(head), before))  # left exactly as it was
    for s, logits in got.items():
        head.vote.set_scale(s)
        torch.testing.assert_close(logits, predict_logits(head, fs, kb, device="cpu")["logits"], rtol=1e-5,
                                   atol=1e-5)
    assert not torch.allclose(got[0.7], got[2.5])  # the vote reaches the logits
    head.vote.set_scale(1.3)
    weights = logits_by_vote_scale(head, fs, (-1.0, 4.0), kb, absolute=True, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(_state(head), before))
    for w, logits in weights.items():
        head.vote.set_weight(w)
        torch.testing.assert_close(logits, predict_logits(head, fs, kb, device="cpu")["logits"], rtol=1e-5,
                                   atol=1e-5)


def test_choose_vote_scale_finds_the_informative_vote(setting):
    head, fs, kb = setting
    trained = float(head.vote.weight.detach()) * head.vote.gain
    before = _state(head)
    choice = choose_vote_scale(head, fs, kb, scales=(0.0, 1.0, 4.0, 16.0), apply=False, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(_state(head), before))  # apply=False changes nothing
    assert choice.n == len(fs) and choice.metric == "top1"
    assert choice.trained_weight == pytest.approx(trained)
    assert choice.scores[16.0] > choice.scores[0.0] + 0.3  # noise host: the vote is what classifies
    top = max(choice.scores.values())
    assert choice.scores[choice.scale] == top
    tied = [s for s, v in choice.scores.items() if v == top]
    assert choice.scale == min(tied, key=lambda s: abs(torch.tensor(s).log().item()))  # ties: nearest 1
    assert choice.weight == pytest.approx(choice.scale * trained)
    assert choice.at_largest == (choice.scale == 16.0)  # the largest candidate won: a larger one may do better
    with pytest.raises(ValueError, match="scales must be a list of numbers"):
        choose_vote_scale(head, fs, kb, scales=2.0, device="cpu")
    with pytest.raises(ValueError, match="scales must be a list of numbers"):
        choose_vote_scale(head, fs, kb, scales="12", device="cpu")  # was read as the scales 1 and 2

    applied = choose_vote_scale(head, fs, kb, scales=(0.0, 1.0, 4.0, 16.0), metric="balanced", device="cpu")
    assert float(head.vote.scale) == applied.scale  # applied
    head.vote.set_scale(applied.scale)
    assert score_logits(predict_logits(head, fs, kb, device="cpu")["logits"], fs.labels, "balanced") == \
        pytest.approx(applied.scores[applied.scale])

    by_ll = choose_vote_scale(head, fs, kb, scales=(0.0, 1.0, 4.0, 16.0), metric="balanced_nll", apply=False,
                              device="cpu")
    assert by_ll.metric == "balanced_nll"
    for scale, score in by_ll.scores.items():  # each candidate's score is the log-likelihood of its own logits
        head.vote.set_scale(scale)
        assert score_logits(predict_logits(head, fs, kb, device="cpu")["logits"], fs.labels, "balanced_nll") == \
            pytest.approx(score, rel=1e-5)
    assert by_ll.scores[by_ll.scale] == max(by_ll.scores.values()) and by_ll.scores[16.0] < 0


def test_choose_vote_scale_refuses_bad_input_and_changes_nothing(setting):
    head, fs, kb = setting
    before = _state(head)
    unlabelled = FeatureSet(z=fs.z, labels=torch.full_like(fs.labels, -1), host_logits=fs.host_logits)
    cases = [
        (dict(features=unlabelled), "labelled samples"),
        (dict(scales=(1.0, -2.0)), "scales must be"),
        (dict(scales=()), "scales must be"),
        (dict(scales=(float("nan"),)), "scales must be"),
        (dict(metric="f1"), "metric must be one of"),
    ]
    for kw, msg in cases:
        args = {"features": fs, "scales": DEFAULT_SCALES, **kw}
        with pytest.raises(ValueError, match=msg):
            choose_vote_scale(head, args.pop("features"), kb, device="cpu", **args)
        assert all(torch.equal(a, b) for a, b in zip(_state(head), before)), kw
    plain = RetrievalHead(HeadConfig(query_dim=D, image_dim=D, text_dim=T, num_classes=C, dim=8, depth=1, heads=2,
                                     k=5), kb)
    with pytest.raises(ValueError, match="no label vote"):
        choose_vote_scale(plain, fs, kb)
    with pytest.raises(ValueError, match="no label vote"):
        logits_by_vote_scale(plain, fs, (1.0,), kb)


def test_score_logits():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 0, 0])
    assert score_logits(logits, labels) == 0.75
    labels = torch.tensor([0, 0, 1, 1])  # class 0: 2/2, class 1: 1/2
    assert score_logits(logits, labels, "top1") == 0.75
    assert score_logits(logits, labels, "balanced") == 0.75
    labels = torch.tensor([0, 1, 1, 1])  # class 0: 1/1, class 1: 1/3
    assert score_logits(logits, labels, "top1") == 0.5
    assert score_logits(logits, labels, "balanced") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="metric"):
        score_logits(logits, labels, "macro")


def test_balanced_nll_is_the_class_mean_of_log_likelihoods_by_hand():
    import math

    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, float("-inf")]])
    labels = torch.tensor([0, 1, 1, 1])
    ll_right = math.log(1 / (1 + math.exp(-2)))  # log softmax of 2 against 0
    ll_wrong = math.log(1 / (1 + math.exp(2)))
    per_class_1 = (ll_wrong + math.log(0.5) + -100.0) / 3  # a label its logits mask counts as the floor, -100
    assert score_logits(logits, labels, "balanced_nll") == pytest.approx((ll_right + per_class_1) / 2)
    # a scale-free change of the logits (adding a constant per row) leaves it as it is; sharper right logits raise it
    assert score_logits(logits + torch.tensor([[3.0], [1.0], [-2.0], [0.0]]), labels, "balanced_nll") == \
        pytest.approx((ll_right + per_class_1) / 2)
    sharper = logits.clone()
    sharper[0] = torch.tensor([5.0, 0.0])
    assert score_logits(sharper, labels, "balanced_nll") > score_logits(logits, labels, "balanced_nll")
    from retrofit.calibration import per_sample_scores

    inf = float("inf")
    odd = torch.tensor([[-inf, -inf], [float("nan"), 0.0], [inf, 0.0], [inf, 0.0]])  # no score, NaN, certain
    got = per_sample_scores(odd, torch.tensor([0, 1, 0, 1]), "balanced_nll")
    assert got.tolist() == [-100.0, -100.0, 0.0, -100.0]  # a certain right label: log-likelihood 0, not the floor
    with pytest.raises(ValueError, match="metric must be one of"):
        per_sample_scores(logits, labels, "macro")
    with pytest.raises(ValueError, match=r"labels must be class indices 0..1 of the logits, got 0..2"):
        per_sample_scores(logits, torch.tensor([0, 1, 2, 1]), "balanced_nll")


def test_a_negative_trained_vote_weight_is_flagged(setting, caplog):
    """Scales multiply the trained weight: a head that learned to vote against its neighbours cannot be fixed by
    a scale, and the choice says so."""
    import logging

    head, fs, kb = setting
    head.vote.set_weight(-0.4)
    with caplog.at_level(logging.WARNING, logger="retrofit.calibration"):
        choice = choose_vote_scale(head, fs, kb, scales=(0.0, 1.0, 2.0), apply=False, device="cpu")
    assert choice.trained_weight == pytest.approx(-0.4)
    assert "trained vote weight is -0.4" in caplog.text and "set_weight" in caplog.text


def test_choose_vote_scale_refuses_labels_and_logits_it_cannot_score():
    """Labels outside the head's classes, float labels and NaN host logits gave a meaningless 'choice' (and
    applied it)."""
    from retrofit import choose_vote_scale
    from retrofit.feature_cache import FeatureSet
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.store import InMemoryStore

    g = torch.Generator().manual_seed(0)
    store = InMemoryStore(8, 4, 4)
    store.add(torch.randn(20, 8, generator=g), torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g),
              labels=torch.arange(20) % 3)
    head = RetrievalHead(HeadConfig(query_dim=8, image_dim=4, text_dim=4, num_classes=3, dim=8, depth=1, heads=2,
                                    k=4, label_vote=True), store)
    z = torch.randn(6, 8, generator=g)
    for fs, says in ((FeatureSet(z=z, labels=torch.tensor([0, 1, 2, 9, 0, 1])), "label 9 is not a class"),
                     (FeatureSet(z=z, labels=torch.tensor([0, 1, 2, 0, 1, 2]),
                                 host_logits=torch.full((6, 3), float("nan"))), "NaN or inf")):
        with pytest.raises(ValueError, match=says):
            choose_vote_scale(head, fs)
    assert head.vote.scale.item() == 1.0  # nothing applied


def test_vote_temperature_is_set_saved_and_refused_when_bad(setting, tmp_path):
    head, fs, kb = setting
    t0 = head.vote.temperature
    assert t0 == pytest.approx(0.05, rel=1e-5)  # the default init
    # queries between the clusters: neighbours of several classes, whose shares the temperature moves
    g = torch.Generator().manual_seed(1)
    fs = FeatureSet(z=fs.z.mean(0) + 0.5 * torch.randn(8, D, generator=g), labels=fs.labels[:8],
                    host_logits=fs.host_logits[:8])
    before = predict_logits(head, fs, kb, device="cpu")["logits"]
    head.vote.set_temperature(0.2)
    assert head.vote.temperature == pytest.approx(0.2, rel=1e-6)
    assert not torch.allclose(predict_logits(head, fs, kb, device="cpu")["logits"], before)  # it reaches the vote
    head.save(tmp_path / "h")
    loaded = RetrievalHead.load(tmp_path / "h", store=kb)
    assert loaded.vote.temperature == pytest.approx(0.2, rel=1e-6)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="vote temperature must be a finite number"):
            head.vote.set_temperature(bad)
    assert head.vote.temperature == pytest.approx(0.2, rel=1e-6)  # a refused value changes nothing


def test_choose_vote_scale_with_temperatures_is_the_best_pair(setting):
    head, fs, kb = setting
    before = _state(head) + (head.vote.log_temperature.detach().clone(),)
    temps = (0.01, 0.5, 3.0)
    choice = choose_vote_scale(head, fs, kb, scales=(0.0, 1.0, 4.0), temperatures=temps, apply=False,
                               device="cpu")
    after = _state(head) + (head.vote.log_temperature.detach().clone(),)
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # apply=False: the head exactly as it was
    trained_t = head.vote.temperature
    assert choice.trained_temperature == pytest.approx(trained_t)
    assert set(choice.scores_by_temperature) == {trained_t, *temps}
    # each candidate's score is what one pass with that (temperature, scale) gives
    for t, scores in choice.scores_by_temperature.items():
        head.vote.set_temperature(t)
        for s, v in scores.items():
            head.vote.set_scale(s)
            assert score_logits(predict_logits(head, fs, kb, device="cpu")["logits"], fs.labels) == \
                pytest.approx(v)
    best = max(v for scores in choice.scores_by_temperature.values() for v in scores.values())
    assert choice.scores_by_temperature[choice.temperature][choice.scale] == best
    assert choice.scores is choice.scores_by_temperature[choice.temperature]
    # the temperature matters here (else this test would prove little)
    assert len({round(v, 6) for scores in choice.scores_by_temperature.values() for v in scores.values()}) > 2
    applied = choose_vote_scale(head, fs, kb, scales=(0.0, 1.0, 4.0), temperatures=temps, device="cpu")
    assert head.vote.temperature == pytest.approx(applied.temperature, rel=1e-6)
    assert float(head.vote.scale) == applied.scale
    for bad in ((0.0,), (-0.1,), "0.1", ()):
        with pytest.raises(ValueError, match="temperatures must be"):
            choose_vote_scale(head, fs, kb, temperatures=bad, device="cpu")
    # without temperatures: the trained one, and no per-temperature table
    plain = choose_vote_scale(head, fs, kb, scales=(1.0,), apply=False, device="cpu")
    assert plain.temperature == pytest.approx(head.vote.temperature) and plain.scores_by_temperature == {}


def test_temperature_choice_prefers_the_trained_one_on_ties_and_restores_the_head(setting, monkeypatch):
    head, fs, kb = setting
    trained_t = head.vote.temperature
    # the clustered setting: every query's neighbours share one class, so any temperature gives the same vote
    choice = choose_vote_scale(head, fs, kb, scales=(1.0, 4.0), temperatures=(0.01, 0.05, 0.5), apply=False,
                               device="cpu")
    assert len({tuple(sc.values()) for sc in choice.scores_by_temperature.values()}) == 1  # all tie
    assert choice.temperature == trained_t
    assert set(choice.scores_by_temperature) == {trained_t, 0.01, 0.5}  # 0.05 is the trained one (float32)
    with pytest.raises(ValueError, match="temperatures must be >= 1e-6"):
        choose_vote_scale(head, fs, kb, temperatures=(1e-9,), device="cpu")
    # an error between candidates (after a temperature was set) leaves the head as it was
    before = head.vote.log_temperature.detach().clone()
    real = type(head.vote).set_temperature
    calls = []

    def set_then_fail(self, t):
        real(self, t)
        calls.append(t)
        if len(calls) == 2:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(type(head.vote), "set_temperature", set_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        choose_vote_scale(head, fs, kb, scales=(1.0,), temperatures=(0.01, 0.5), device="cpu")
    assert calls == [0.01, 0.5] and torch.equal(head.vote.log_temperature.detach(), before)


def test_paired_standard_error_by_hand():
    from retrofit.calibration import paired_standard_error

    diff = torch.tensor([1.0, 0.0, 0.0, -1.0, 1.0, 0.0])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    # top1: the sample standard deviation of the differences over sqrt(n)
    assert paired_standard_error(diff, labels) == pytest.approx(float(diff.std()) / 6 ** 0.5)
    # balanced: class 0 var 1/3 over 3 samples, class 1 var 2 over 2 samples, class 2 (one sample) adds none
    assert paired_standard_error(diff, labels, "balanced") == pytest.approx((1 / 9 + 1) ** 0.5 / 3)
    assert paired_standard_error(torch.zeros(6), labels, "balanced") == 0.0  # the same predictions: no error


def test_one_se_rule_takes_the_nearest_to_the_trained_vote_within_a_standard_error(setting):
    from retrofit.calibration import paired_standard_error

    head, fs, kb = setting
    scales, temps = (0.0, 0.5, 1.0, 2.0, 4.0, 16.0), (0.01, 0.5, 3.0)
    best = choose_vote_scale(head, fs, kb, scales=scales, temperatures=temps, metric="balanced", apply=False,
                             device="cpu")
    one = choose_vote_scale(head, fs, kb, scales=scales, temperatures=temps, metric="balanced", rule="one_se",
                            apply=False, device="cpu")
    assert best.rule == "best" and one.rule == "one_se"
    assert best.best_by_score == one.best_by_score == (best.temperature, best.scale)
    assert one.scores_by_temperature == best.scores_by_temperature
    # every (temperature, scale)'s hits from one pass, the standard error of its difference to the best by hand
    trained_t = head.vote.temperature
    hits = {}
    for t in (trained_t, *temps):
        head.vote.set_temperature(t)
        for s in scales:
            head.vote.set_scale(s)
            hits[t, s] = (predict_logits(head, fs, kb, device="cpu")["logits"].argmax(1) == fs.labels).double()
    top = best.best_by_score
    top_score = best.scores_by_temperature[top[0]][top[1]]

    def within(ts):
        se = paired_standard_error(hits[ts] - hits[top], fs.labels, "balanced")
        return best.scores_by_temperature[ts[0]][ts[1]] >= top_score - se - 1e-12

    def distance(ts):
        t, s = ts
        far = abs(torch.tensor(s).log().item()) if s > 0 else float("inf")
        return far + abs(torch.tensor(t / trained_t).log().item())

    chosen = (one.temperature, one.scale)
    assert within(chosen)
    assert one.standard_error == pytest.approx(paired_standard_error(hits[chosen] - hits[top], fs.labels,
                                                                     "balanced"))
    # nothing nearer the trained vote is within a standard error of the best
    assert all(not within(ts) for ts in hits if distance(ts) < distance(chosen) - 1e-9)
    assert distance(chosen) <= distance(top) + 1e-9
    with pytest.raises(ValueError, match="rule must be one of"):
        choose_vote_scale(head, fs, kb, rule="smallest", device="cpu")


def test_trained_rule_keeps_the_trained_vote_and_scores_the_rest(setting):
    head, fs, kb = setting
    before = _state(head)
    trained_t = head.vote.temperature
    best = choose_vote_scale(head, fs, kb, scales=(0.0, 4.0, 16.0), temperatures=(0.5,), apply=False, device="cpu")
    kept = choose_vote_scale(head, fs, kb, scales=(0.0, 4.0, 16.0), temperatures=(0.5,), rule="trained",
                             device="cpu")  # (applied: scale 1, the fixture's 1.3 undone)
    assert kept.rule == "trained" and (kept.scale, kept.temperature) == (1.0, trained_t)
    assert torch.equal(head.vote.weight.detach(), before[0]) and float(head.vote.scale) == 1.0
    assert head.vote.temperature == trained_t
    assert set(kept.scores) == {0.0, 1.0, 4.0, 16.0}  # 1 scored although not among the scales
    assert kept.best_by_score == (best.temperature, best.scale) != (trained_t, 1.0)  # the best is reported
    assert kept.scores[1.0] == pytest.approx(score_logits(predict_logits(head, fs, kb, device="cpu")["logits"],
                                                          fs.labels))
    assert list(kept.scores) == [0.0, 1.0, 4.0, 16.0]  # in order, 1 among the others
    head.vote.set_scale(1.3)
    dry = choose_vote_scale(head, fs, kb, scales=(0.0, 4.0), rule="trained", apply=False, device="cpu")
    assert (dry.scale, dry.temperature) == (1.0, trained_t) and float(head.vote.scale) == pytest.approx(1.3)


def test_one_se_choice_keeps_the_trained_vote_unless_another_is_clearly_better():
    from retrofit.calibration import one_se_choice

    labels = torch.tensor([0] * 10 + [1] * 10)
    base = torch.tensor([1.0] * 6 + [0.0] * 4 + [1.0] * 6 + [0.0] * 4)  # the trained vote (t 0.1, scale 1): 60%
    a_bit = base.clone()
    a_bit[[6, 7]] = 1.0  # scale 2 gets two more right and one it had right wrong (all class 0): 65%
    a_bit[0] = 0.0
    a_lot = torch.ones(20)  # scale 8: every sample right
    hits = {(0.1, 1.0): base, (0.1, 2.0): a_bit, (0.2, 1.0): base.clone()}
    # the best (scale 2) is 5 points up on a paired standard error of ~8.8 (top1), ~9.0 (balanced): the trained
    # vote is kept (and not its copy at another temperature, farther from the trained one)
    assert one_se_choice(hits, labels, "top1", (0.1, 2.0), 0.1) == (0.1, 1.0, pytest.approx(0.0881, abs=1e-4))
    assert one_se_choice(hits, labels, "balanced", (0.1, 2.0), 0.1) == (0.1, 1.0, pytest.approx(0.0897, abs=1e-4))
    # trained at 0.2, where scale 1 gets the best's hits: taken (distance 0, no error)
    hits[(0.2, 1.0)] = a_bit.clone()
    assert one_se_choice(hits, labels, "top1", (0.1, 2.0), 0.2) == (0.2, 1.0, 0.0)
    # 40 points up on ~11: clearly better; the trained vote is out, and so is scale 2 (35 points under it)
    hits = {(0.1, 1.0): base, (0.1, 2.0): a_bit, (0.1, 8.0): a_lot}
    assert one_se_choice(hits, labels, "top1", (0.1, 8.0), 0.1) == (0.1, 8.0, 0.0)
    # equally near the trained vote (scales 0.5 and 2), both within a standard error of the best: the better score
    swapped = a_bit.clone()
    swapped[[6, 8]] = torch.tensor([0.0, 1.0])  # 65% as the best, on other samples
    worse = swapped.clone()
    worse[7] = 0.0  # 60%
    hits = {(0.1, 0.5): worse, (0.1, 2.0): swapped, (0.1, 8.0): a_bit}
    assert one_se_choice(hits, labels, "top1", (0.1, 8.0), 0.1)[:2] == (0.1, 2.0)
