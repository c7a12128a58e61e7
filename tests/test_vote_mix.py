"""The label vote's mixture form (HeadConfig(vote_form="mix")): log((1 - a) softmax(logits) + a vote).

A fresh mix-form head is the fixed 50/50 rule the CIFAR-10-LT demo's learned heads must beat; its scale
multiplies the odds of the mixing weight; calibration scores every scale from one pass; it trains and saves.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import clustered_kb_and_queries

from retrofit.calibration import choose_vote_scale, logits_by_vote_scale
from retrofit.feature_cache import FeatureSet
from retrofit.fusion import LabelVote
from retrofit.head import HeadConfig, RetrievalHead
from retrofit.neighbors import Neighbors
from retrofit.training import TrainConfig, predict_logits, train

DQ, DI, DT, C = 16, 12, 8, 5


def _head(**kw) -> RetrievalHead:
    cfg = dict(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, dim=16, depth=1, heads=2, k=6,
               label_vote=True, vote_form="mix")
    return RetrievalHead(HeadConfig(**{**cfg, **kw}))


def _neighbors(B: int, k: int, gen: torch.Generator) -> Neighbors:
    mask = torch.rand(B, k, generator=gen) < 0.7
    mask[0] = False  # a query with no neighbour at all
    return Neighbors(ids=torch.arange(B * k).view(B, k).masked_fill(~mask, -1),
                     scores=torch.rand(B, k, generator=gen).masked_fill(~mask, float("-inf")), mask=mask,
                     image=torch.randn(B, k, DI, generator=gen) * mask[..., None],
                     text=torch.randn(B, k, DT, generator=gen) * mask[..., None],
                     labels=torch.randint(0, C, (B, k), generator=gen).masked_fill(~mask, -1))


def _knn(nb: Neighbors, t: float) -> torch.Tensor:
    """(B, C) similarity-weighted vote, written out here from its definition (not the library's code)."""
    out = torch.zeros(nb.labels.shape[0], C)
    for b in range(nb.labels.shape[0]):
        valid = nb.mask[b] & (nb.labels[b] >= 0)
        if valid.any():
            w = torch.softmax(nb.scores[b][valid] / t, 0)
            for lab, wi in zip(nb.labels[b][valid].tolist(), w):
                out[b, lab] += wi
    return out


def test_a_fresh_mix_head_is_the_fixed_rule(seed):
    g = torch.Generator().manual_seed(seed)
    nb, z, host = _neighbors(6, 6, g), torch.randn(6, DQ, generator=g), 3 * torch.randn(6, C, generator=g)
    head = _head()
    assert head.vote.form == "mix" and head.vote.effective_weight == pytest.approx(0.5)
    out = head(z, host, neighbors=nb)
    p = _knn(nb, 0.05)  # the vote's initial temperature
    rule = (0.5 * torch.softmax(host, 1) + 0.5 * p).log()
    torch.testing.assert_close(out.logits[1:], rule[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0], torch.log_softmax(host[0], 0))  # no neighbour: renormalised host
    assert torch.equal(out.retrieval_logits, torch.zeros(6, C))  # L_R: the (zero) readout, the vote is mixed in
    torch.testing.assert_close(out.vote_log_probs.exp()[1:], p[1:], rtol=1e-5, atol=1e-6)
    plain = _head(vote_form="log")
    assert plain(z, host, neighbors=nb).vote_log_probs is None


def test_mixing_weight_scale_and_set_weight(seed, tmp_path):
    g = torch.Generator().manual_seed(seed)
    nb, z, host = _neighbors(5, 6, g), torch.randn(5, DQ, generator=g), torch.randn(5, C, generator=g)
    head = _head(tau=1.5)
    with torch.no_grad():
        head.readout.fc.weight.normal_(0, 0.3, generator=g)
    fused = 0.75 * (host + head(z, host, neighbors=nb).retrieval_logits)  # tau / 2 * (L_I + L_R)
    p = _knn(nb, 0.05)

    def mixed(a: float) -> torch.Tensor:
        m = (1 - a) * torch.softmax(fused, 1) + a * p  # (row 0 has no neighbour: it sums to 1 - a)
        return (m / m.sum(1, keepdim=True)).log()

    head.vote.set_weight(0.2)
    assert head.vote.effective_weight == pytest.approx(0.2)
    torch.testing.assert_close(head(z, host, neighbors=nb).logits, mixed(0.2), rtol=1e-5, atol=1e-5)
    head.vote.set_scale(3.0)  # odds 0.25 -> 0.75
    assert head.vote.effective_weight == pytest.approx(0.75 / 1.75)
    torch.testing.assert_close(head(z, host, neighbors=nb).logits, mixed(0.75 / 1.75), rtol=1e-5, atol=1e-5)
    loaded = RetrievalHead.load(head.save(tmp_path / "h"))  # form, weight and scale travel with the head
    assert loaded.config.vote_form == "mix" and loaded.vote.form == "mix"
    torch.testing.assert_close(loaded(z, host, neighbors=nb).logits, head(z, host, neighbors=nb).logits)
    head.vote.set_scale(0.0)  # no vote: the fused logits as log-probabilities, exactly
    torch.testing.assert_close(head(z, host, neighbors=nb).logits, torch.log_softmax(fused, 1))
    head.vote.set_weight(0.0)  # off: the same as scale 0, under any scale
    assert head.vote.effective_weight == 0.0
    for s in (1.0, 1.7e37):
        head.vote.set_scale(s)
        torch.testing.assert_close(head(z, host, neighbors=nb).logits, torch.log_softmax(fused, 1))
    head.vote.set_weight(1.0)  # the vote alone (row 0: no neighbour, the host's)
    torch.testing.assert_close(head(z, host, neighbors=nb).logits[1:], p[1:].clamp_min(1e-30).log())
    head.vote.set_weight(0.4)
    for bad in (1.01, -0.1, 1.5, float("nan"), True, "0.3", None):
        with pytest.raises(ValueError, match=r"mixing weight .* \[0, 1\]"):
            head.vote.set_weight(bad)
    assert head.vote.effective_weight == pytest.approx(0.4)  # nothing changed


def test_mix_gradients_stay_finite_when_the_weight_saturates(seed):
    """a = sigmoid(20 * 3) is 1.0 in fp32: log(1 - a) = -inf; the log-sigmoid form keeps every gradient finite."""
    g = torch.Generator().manual_seed(seed)
    nb, z, host = _neighbors(4, 6, g), torch.randn(4, DQ, generator=g), torch.randn(4, C, generator=g)
    for w in (3.0, -3.0, 0.0):
        head = _head()
        with torch.no_grad():
            head.vote.weight.fill_(w)
            head.readout.fc.weight.normal_(0, 0.3, generator=g)
        out = head(z, host, neighbors=nb).logits
        assert torch.isfinite(out).all(), w
        torch.nn.functional.cross_entropy(out, torch.arange(4) % C).backward()
        for name, prm in head.named_parameters():
            assert prm.grad is None or torch.isfinite(prm.grad).all(), (w, name)
        assert head.vote.weight.grad is not None and head.readout.fc.weight.grad.abs().sum() > 0


def test_vote_form_is_checked():
    with pytest.raises(ValueError, match="vote_form must be one of"):
        _head(vote_form="sum")
    with pytest.raises(ValueError, match="needs label_vote=True"):
        _head(label_vote=False)
    with pytest.raises(ValueError, match="form must be one of"):
        LabelVote(3, form="product")


@pytest.fixture
def kb_setting(tmp_path, seed):
    """A real KB whose labels are the truth and queries with noise host logits: the vote classifies."""
    kb, fs, g = clustered_kb_and_queries(tmp_path / "kb", seed, C, DQ, DI, DT, kb_per_class=16, queries_per_class=12,
                                         host_scale=2.0, class_names=[f"c{i}" for i in range(C)])
    head = _head()
    head.attach(kb)
    with torch.no_grad():
        head.readout.fc.weight.normal_(0, 0.3, generator=g)
    head.vote.set_weight(0.3)
    head.vote.set_scale(1.5)
    yield head, fs, kb
    kb.close()


def test_calibration_of_a_mix_vote_equals_one_pass_per_scale(kb_setting):
    head, fs, kb = kb_setting
    before = (head.vote.weight.detach().clone(), head.vote.scale.clone())
    got = logits_by_vote_scale(head, fs, (0.0, 0.5, 1.0, 4.0), kb, device="cpu")
    assert torch.equal(head.vote.weight, before[0]) and torch.equal(head.vote.scale, before[1])  # left as it was
    for s, logits in got.items():
        head.vote.set_scale(s)
        torch.testing.assert_close(logits, predict_logits(head, fs, kb, device="cpu")["logits"], rtol=1e-5,
                                   atol=1e-5)
    assert not torch.allclose(got[0.5], got[4.0])
    weights = logits_by_vote_scale(head, fs, (0.0, 0.3, 0.9, 1.0), kb, absolute=True, device="cpu")
    for a, logits in weights.items():
        head.vote.set_weight(a)
        torch.testing.assert_close(logits, predict_logits(head, fs, kb, device="cpu")["logits"], rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="mixing weights in"):
        logits_by_vote_scale(head, fs, (0.5, 1.5), kb, absolute=True, device="cpu")


def test_calibration_keeps_masked_classes_and_renormalises_as_the_forward_does(kb_setting):
    head, fs, kb = kb_setting
    host = fs.host_logits.clone()
    host[:, 2] = float("-inf")  # class 2 masked by the host: the vote's share for it goes to the others
    masked = FeatureSet(z=fs.z, labels=fs.labels, host_logits=host)
    got = logits_by_vote_scale(head, masked, (0.0, 1.0, 5.0), kb, device="cpu")
    for s, logits in got.items():
        head.vote.set_scale(s)
        want = predict_logits(head, masked, kb, device="cpu")["logits"]
        assert torch.isneginf(want[:, 2]).all() and torch.isneginf(logits[:, 2]).all()
        torch.testing.assert_close(logits[:, [0, 1, 3, 4]], want[:, [0, 1, 3, 4]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits.logsumexp(1), torch.zeros(len(fs)), atol=1e-5, rtol=0)  # normalised


def test_a_balanced_mix_vote_divides_by_the_kbs_class_counts(tmp_path, seed):
    """vote_balance=True (the demo's setting): a fresh head mixes 0.5 of the host with 0.5 of the kNN vote
    divided by the KB's class frequencies (and renormalised), written out here by hand."""
    from retrofit.store import InMemoryStore

    g = torch.Generator().manual_seed(seed)
    counts = [12, 6, 3, 2, 1]
    y_kb = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    st = InMemoryStore(DQ, DI, DT)
    x = torch.randn(len(y_kb), DQ, generator=g)
    st.add(x, x[:, :DI], torch.randn(len(y_kb), DT, generator=g), labels=y_kb)
    head = _head(vote_balance=True, k=8)
    head.attach(st)
    z, host = torch.randn(6, DQ, generator=g), torch.randn(6, C, generator=g)
    out = head(z, host)
    nb = out.neighbors
    share = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    p = _knn(nb, 0.05) / share
    p = p / p.sum(1, keepdim=True)
    torch.testing.assert_close(out.logits, (0.5 * torch.softmax(host, 1) + 0.5 * p).log(), rtol=1e-5, atol=1e-5)
    plain = _knn(nb, 0.05)
    assert not torch.allclose(out.logits, (0.5 * torch.softmax(host, 1) + 0.5 * plain).log(), atol=1e-3)


def test_choose_vote_scale_on_a_mix_vote(kb_setting):
    head, fs, kb = kb_setting
    head.vote.set_weight(0.1)  # trained a = 0.1: too little vote for a noise host
    choice = choose_vote_scale(head, fs, kb, scales=(0.0, 1.0, 9.0, 81.0), temperatures=(0.2,), device="cpu")
    assert choice.form == "mix" and choice.trained_weight == pytest.approx(0.1)
    assert choice.scores[81.0] > choice.scores[0.0] + 0.3  # the vote is what classifies here
    assert choice.scale == max(choice.scores, key=lambda s: (choice.scores[s], -abs(math.log(s)) if s else -1e9))
    assert choice.weight == pytest.approx(head.vote.effective_weight)  # applied: the mixing weight in use
    assert choice.weight_at(9.0) == pytest.approx(0.5)  # odds 1/9 * 9 = 1
    assert choice.weight_at(0.0) == 0.0


def test_a_mix_head_trains_and_its_weight_moves(kb_setting):
    head, fs, kb = kb_setting
    fresh = _head()
    fresh.attach(kb)
    a0 = fresh.vote.effective_weight
    res = train(fresh, fs, TrainConfig(epochs=4, lr=3e-3, batch_size=20, loss="lace", tau_la=1.0, device="cpu",
                                       progress=False, seed=0), store=kb)
    losses = [h["train_loss"] for h in res.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    a1 = res.head.vote.effective_weight
    assert a1 > a0 + 0.05  # a noise host: training shifts the mixture towards the vote


def test_a_saturated_or_zero_mixing_weight_round_trips(seed):
    """Found by review: effective_weight read 1.0 for a saturated logit (fp32 sigmoid) and set_weight refused
    its own reading; set_weight(0) stored scale 0, so set_scale(1) brought a = 0.5 back."""
    from retrofit.calibration import VoteScaleChoice

    vote = LabelVote(3, form="mix")
    with torch.no_grad():
        vote.weight.fill_(0.9)  # logit 18
    a = vote.effective_weight
    assert 0.99999998 < a <= 1.0
    vote.set_weight(a)  # its own reading is accepted
    assert vote.effective_weight == pytest.approx(a, abs=1e-12)
    vote.set_weight(1.0)
    assert vote.effective_weight == pytest.approx(1.0, abs=1e-15)
    vote.set_weight(0.0)
    vote.set_scale(1.0)
    assert vote.effective_weight < 1e-15  # off stays off under any scale
    vote.set_scale(100.0)
    assert vote.effective_weight < 1e-14
    choice = VoteScaleChoice(scale=1.0, metric="top1", trained_weight=1 / (1 + math.exp(-18.0)), form="mix",
                             trained_logit=18.0)
    assert choice.weight_at(1e-6) == pytest.approx(1 / (1 + math.exp(-(18.0 + math.log(1e-6)))), rel=1e-12)
    assert choice.weight_at(0.0) == 0.0


def test_classes_the_host_masks_stay_masked_with_finite_gradients(seed):
    """Found by review: a class the host masks (-inf logit) took the vote's share in the mixture, and at a = 0
    both terms were -inf: NaN gradients in every parameter."""
    g = torch.Generator().manual_seed(seed)
    nb = _neighbors(4, 6, g)
    nb = Neighbors(ids=nb.ids, scores=nb.scores, mask=nb.mask, image=nb.image, text=nb.text,
                   labels=torch.full_like(nb.labels, 4).masked_fill(~nb.mask, -1))  # every neighbour votes 4
    z, host = torch.randn(4, DQ, generator=g), torch.randn(4, C, generator=g)
    host[:, 4] = float("-inf")  # class 4 masked by the host
    for scale in (1.0, 0.0):
        head = _head()
        with torch.no_grad():
            head.readout.fc.weight.normal_(0, 0.3, generator=g)
        head.vote.set_scale(scale)
        out = head(z, host, neighbors=nb).logits
        assert torch.isneginf(out[:, 4]).all() and torch.isfinite(out[:, :4]).all()
        assert not (out.argmax(1) == 4).any()
        torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
        for name, prm in head.named_parameters():
            assert prm.grad is None or torch.isfinite(prm.grad).all(), (scale, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mix_heads_in_other_precisions(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    nb = _neighbors(4, 6, g)
    z, host = torch.randn(4, DQ, generator=g), 4 * torch.randn(4, C, generator=g)
    ref = _head()
    with torch.no_grad():
        ref.readout.fc.weight.normal_(0, 0.3, generator=g)
    want = ref(z, host, neighbors=nb).logits
    head = _head().to(dtype)
    head.load_state_dict(ref.state_dict())
    out = head(z.to(dtype), host.to(dtype), neighbors=nb.to("cpu", dtype)).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    out.float().sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in head.parameters())


def test_a_checkpoint_from_before_the_vote_form_does_not_resume_as_a_mix_head(kb_setting, tmp_path):
    """Found by review: checkpoints recorded before vote_form existed (log form only) resumed silently into a
    mix head, reading the log-vote weight as the mixing weight's logit."""
    import json

    from retrofit.errors import RetrofitError

    _, fs, kb = kb_setting
    cfg = TrainConfig(epochs=1, lr=3e-3, batch_size=20, loss="lace", device="cpu", progress=False, seed=0)
    log_head = _head(vote_form="log")
    log_head.attach(kb)
    train(log_head, fs, cfg, store=kb, out_dir=tmp_path / "run")
    state = tmp_path / "run" / "checkpoints" / "last" / "state.json"
    doc = json.loads(state.read_text())
    assert doc["run"].pop("head.vote_form") == "log"
    state.write_text(json.dumps(doc))  # as written before the option
    mix = _head()
    mix.attach(kb)
    longer = TrainConfig(**{**cfg.to_dict(), "epochs": 2})
    with pytest.raises(RetrofitError, match="vote_form='log'"):
        train(mix, fs, longer, store=kb, out_dir=tmp_path / "run", resume=True)
    again = _head(vote_form="log")  # the same (log-form) head resumes
    again.attach(kb)
    res = train(again, fs, longer, store=kb, out_dir=tmp_path / "run", resume=True)
    assert [h["epoch"] for h in res.history][-1] == 2


@pytest.mark.cuda
def test_a_mix_head_on_cuda_matches_the_cpu(seed):
    """The same mix head on the GPU (fused attention kernel, vote in PyTorch) and on the CPU."""
    g = torch.Generator().manual_seed(seed)
    nb, z, host = _neighbors(8, 6, g), torch.randn(8, DQ, generator=g), torch.randn(8, C, generator=g)
    host[:, 3] = float("-inf")
    head = _head()
    with torch.no_grad():
        head.readout.fc.weight.normal_(0, 0.3, generator=g)
    head.vote.set_weight(0.35)
    want = head(z, host, neighbors=nb).logits
    got = head.cuda()(z.cuda(), host.cuda(), neighbors=nb.to("cuda")).logits
    assert torch.isneginf(got[:, 3]).all()
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)


def test_choosing_a_mix_votes_temperature_over_cached_neighbours_scores_as_full_passes(tmp_path, seed):
    """Over cached neighbours a mix vote's temperatures are scored from one pass of the head (the fused logits do
    not depend on the vote) and each temperature's vote from the neighbours' labels and scores: the same logits as a
    full pass per (temperature, scale), also scored with another KB than the head's (its class prior balances)."""
    from retrofit.calibration import _cached_vote_log_probs, _mixed, _unmixed
    from retrofit.feature_cache import retrieve
    from retrofit.prediction import serving_view
    from retrofit.store import InMemoryStore

    g = torch.Generator().manual_seed(seed)

    def store(counts):
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        st = InMemoryStore(DQ, DI, DT)
        x = torch.randn(len(y), DQ, generator=g)
        st.add(x, x[:, :DI], torch.randn(len(y), DT, generator=g), labels=y)
        return st

    home, other = store([8, 8, 8, 8, 8]), store([40, 20, 10, 6, 3])
    head = _head(vote_balance=True, k=6)
    head.attach(home)
    with torch.no_grad():
        head.readout.fc.weight.normal_(0, 0.3, generator=g)
    head.vote.set_weight(0.4)
    fs = FeatureSet(z=torch.randn(50, DQ, generator=g), labels=torch.randint(0, C, (50,), generator=g),
                    host_logits=torch.randn(50, C, generator=g))
    cached = retrieve(fs, other, 6)
    trained_t = head.vote.temperature
    scales = (0.0, 0.5, 1.0, 3.0)
    base = _unmixed(head, head.vote, cached, other, {"device": "cpu"})[0]
    votes = []
    for t in (0.02, 0.3, trained_t):
        head.vote.set_temperature(t)
        v = _cached_vote_log_probs(serving_view(head, other), cached, 6)
        votes.append(v)
        fast = _mixed(head.vote, base, v, scales)
        for s in scales:
            head.vote.set_scale(s)
            full = predict_logits(head, cached, other, device="cpu")["logits"]
            live = predict_logits(head, fs, other, device="cpu")["logits"]  # a live search: the same neighbours
            torch.testing.assert_close(fast[s], full, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(full, live, rtol=1e-5, atol=1e-5)
        head.vote.set_scale(1.0)
    assert not torch.allclose(votes[0], votes[1], atol=1e-3)  # the temperature matters here
    assert head.store is home  # scored with `other` through a view; the head stays attached to its own KB
    head.vote.set_temperature(trained_t)
    a = choose_vote_scale(head, cached, other, scales=scales, temperatures=(0.02, 0.3), apply=False, device="cpu")
    b = choose_vote_scale(head, fs, other, scales=scales, temperatures=(0.02, 0.3), apply=False, device="cpu")
    assert a.scores_by_temperature.keys() == b.scores_by_temperature.keys()
    for t, scores in a.scores_by_temperature.items():
        assert scores == pytest.approx(b.scores_by_temperature[t])
    assert (a.scale, a.temperature) == (b.scale, b.temperature)
