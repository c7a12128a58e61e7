"""RetrievalHead and CrossFusionLayer: masking, invariances, modalities, tau, gradients, retrieval."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrofit.fusion import CrossFusionLayer
from retrofit.head import HeadConfig, HeadOutput, RetrievalHead
from retrofit.neighbors import Neighbors
from retrofit.store import InMemoryStore

DQ, DI, DT, C = 24, 20, 12, 7


def make_head(dtype: torch.dtype = torch.float64, **kw) -> RetrievalHead:
    cfg = dict(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, dim=32, depth=2, heads=4, k=6)
    cfg.update(kw)
    head = RetrievalHead(HeadConfig(**cfg)).to(dtype)
    with torch.no_grad():  # a trained-looking head: non-zero readout so L_R carries the fusion's output
        head.readout.fc.weight.normal_(0, 0.3)
        head.readout.fc.bias.normal_(0, 0.1)
    return head


def make_neighbors(B: int = 3, k: int = 6, dtype: torch.dtype = torch.float64, p_valid: float = 0.6,
                   gen: torch.Generator | None = None) -> Neighbors:
    mask = torch.rand(B, k, generator=gen) < p_valid
    return Neighbors(
        ids=torch.arange(B * k).view(B, k).masked_fill(~mask, -1),
        scores=torch.rand(B, k, generator=gen).masked_fill(~mask, float("-inf")),
        mask=mask,
        image=torch.randn(B, k, DI, generator=gen, dtype=dtype) * mask[..., None],
        text=torch.randn(B, k, DT, generator=gen, dtype=dtype) * mask[..., None],
        labels=torch.randint(0, C, (B, k), generator=gen).masked_fill(~mask, -1),
    )


def replace_nb(nb: Neighbors, **kw) -> Neighbors:
    d = {n: getattr(nb, n) for n in ("ids", "scores", "mask", "image", "text", "labels")}
    d.update(kw)
    return Neighbors(**d)


def test_fresh_head_reproduces_host(seed):
    head = RetrievalHead(HeadConfig(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, dim=32, depth=2, heads=4))
    z, host = torch.randn(4, DQ), torch.randn(4, C)
    out = head(z, host, neighbors=make_neighbors(4, 5, torch.float32))
    assert isinstance(out, HeadOutput) and out.host_logits is host
    assert torch.equal(out.retrieval_logits, torch.zeros(4, C))
    assert torch.equal(out.logits, host)  # tau = 2 default: untrained head == host, exactly
    assert out.attention is None


def test_tau_semantics(seed):
    nb, z, host = make_neighbors(), torch.randn(3, DQ, dtype=torch.float64), torch.randn(3, C, dtype=torch.float64)
    fixed = make_head(tau=3.0)
    out = fixed(z, host, neighbors=nb)
    assert out.retrieval_logits.abs().max() > 0
    torch.testing.assert_close(out.logits, 1.5 * (host + out.retrieval_logits), rtol=0, atol=0)
    alone = fixed(z, neighbors=nb)  # no host: the head runs alone
    assert alone.host_logits is None
    torch.testing.assert_close(alone.logits, 1.5 * out.retrieval_logits, rtol=0, atol=0)
    assert "tau" in dict(fixed.named_buffers()) and "tau" not in dict(fixed.named_parameters())
    learn = make_head(tau=3.0, learnable_tau=True)
    assert isinstance(learn.tau, nn.Parameter)
    learn(z, host, neighbors=nb).logits.sum().backward()
    assert learn.tau.grad is not None and learn.tau.grad.abs() > 0
    with pytest.raises(ValueError, match="tau"):
        HeadConfig(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, tau=0.0)


@pytest.mark.parametrize("modalities", ["image+text", "image", "text"])
def test_masked_neighbours_have_no_influence(seed, modalities):
    head = make_head(modalities=modalities)
    nb = make_neighbors()
    nb.mask[:, 0] = True  # at least one valid neighbour per row
    nb.mask[0, -1] = False  # and at least one masked one
    z = torch.randn(3, DQ, dtype=torch.float64)

    def run(nbx: Neighbors) -> tuple[torch.Tensor, ...]:
        zz = z.clone().requires_grad_(True)
        img, txt = nbx.image.clone().requires_grad_(True), nbx.text.clone().requires_grad_(True)
        out = head(zz, neighbors=replace_nb(nbx, image=img, text=txt), return_attention=True)
        (out.logits * torch.linspace(-1, 1, C, dtype=torch.float64)).sum().backward()
        keep = nbx.mask[..., None]
        gi = torch.zeros_like(img) if img.grad is None else img.grad  # None: the modality is removed
        gt = torch.zeros_like(txt) if txt.grad is None else txt.grad
        return out.logits, out.attention, zz.grad, gi * keep, gt * keep, gi, gt

    base = run(nb)
    noisy = ~nb.mask[..., None]
    garbage = replace_nb(nb, image=torch.where(noisy, torch.randn_like(nb.image) * 100, nb.image),
                         text=torch.where(noisy, torch.full_like(nb.text, float("nan")), nb.text))
    other = run(garbage)
    for a, b in zip(base[:5], other[:5]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(other[0]).all()
    assert (base[1][~nb.mask] == 0).all()  # masked slots get no attention
    assert (base[5][~nb.mask] == 0).all() and (base[6][~nb.mask] == 0).all()  # and no gradient


def test_all_masked_equals_no_neighbours(seed):
    head = make_head()
    z, host = torch.randn(3, DQ, dtype=torch.float64), torch.randn(3, C, dtype=torch.float64)
    none = head(z, host, neighbors=Neighbors.empty(3, 0, DI, DT, dtype=torch.float64), return_attention=True)
    assert none.attention.shape == (3, 0)
    nb = make_neighbors()
    masked = replace_nb(nb, mask=torch.zeros_like(nb.mask), image=torch.randn_like(nb.image))
    out = head(z, host, neighbors=masked, return_attention=True)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits, none.logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.attention, torch.zeros(3, 6, dtype=out.attention.dtype))
    partly = replace_nb(nb, mask=nb.mask.clone())
    partly.mask[1] = False  # one all-masked row inside a batch with valid rows
    mixed = head(z, host, neighbors=partly)
    torch.testing.assert_close(mixed.logits[1], none.logits[1], rtol=1e-12, atol=1e-12)


def test_permutation_invariance(seed):
    head = make_head()
    nb, z = make_neighbors(p_valid=0.8), torch.randn(3, DQ, dtype=torch.float64)
    perm = torch.randperm(nb.k)
    shuffled = replace_nb(nb, **{n: getattr(nb, n)[:, perm] for n in ("ids", "scores", "mask", "image", "text",
                                                                        "labels")})
    a, b = head(z, neighbors=nb, return_attention=True), head(z, neighbors=shuffled, return_attention=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.attention[:, perm], b.attention, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("modalities", ["image+text", "image", "text"])
def test_query_text_is_zero_and_modalities(seed, modalities):
    head = make_head(modalities=modalities)
    nb, z = make_neighbors(p_valid=1.0), torch.randn(3, DQ, dtype=torch.float64)
    seen = {}
    head.streams.register_forward_hook(lambda m, args, out: seen.update(I=out[0], T=out[1]))
    out = head(z, neighbors=nb)
    assert torch.equal(seen["T"][:, 0], torch.zeros_like(seen["T"][:, 0]))  # the query's own text slot
    assert seen["I"][:, 0].abs().sum() > 0  # the query's image token is z's projection
    # what each modality removes: its neighbour vectors have no effect at all
    new_img = head(z, neighbors=replace_nb(nb, image=torch.randn_like(nb.image))).logits
    new_txt = head(z, neighbors=replace_nb(nb, text=torch.randn_like(nb.text))).logits
    assert torch.equal(new_txt, out.logits) == (modalities == "image")
    assert torch.equal(new_img, out.logits) == (modalities == "text")
    if modalities == "image":
        assert head.streams.proj_t is None and torch.equal(seen["T"], torch.zeros_like(seen["T"]))
    if modalities == "text":
        assert head.streams.proj_i is None and torch.equal(seen["I"][:, 1:], torch.zeros_like(seen["I"][:, 1:]))


def test_store_retrieval_honours_exclude_and_casts(seed, caplog):
    N = 40
    keys = F.normalize(torch.randn(N, DQ), dim=1)
    store = InMemoryStore(DQ, DI, DT)
    ids = store.add(keys, torch.randn(N, DI), torch.randn(N, DT), labels=torch.randint(0, C, (N,)))
    head = make_head(k=5)
    head.attach(store)
    z = (keys[:4] * 3).double()  # the queries ARE KB entries 0..3 (scaled: the head normalises)
    plain = head(z)
    assert plain.neighbors.ids[:, 0].tolist() == ids[:4].tolist()  # each finds itself first
    out = head(z, exclude=ids[:4, None])
    assert out.neighbors.k == 5 and out.neighbors.mask.all()
    for row in range(4):
        assert row not in out.neighbors.ids[row].tolist()
    assert out.neighbors.image.dtype == torch.float64  # store float32 -> head dtype
    explicit = head(z, neighbors=store.search(F.normalize(z.float(), dim=1), 5, ids[:4, None]))
    torch.testing.assert_close(explicit.logits, out.logits, rtol=0, atol=0)
    tiny = InMemoryStore(DQ, DI, DT)
    tiny.add(keys[:2], torch.randn(2, DI), torch.randn(2, DT))
    with caplog.at_level("WARNING", logger="retrofit.head"):
        head.attach(store)
        assert "fewer than" not in caplog.text
        few = head.attach(tiny)(z)  # fewer entries than k: masked slots, finite output, a warning
    assert "the attached store holds 2 entries, fewer than the head's k=5" in caplog.text
    assert few.neighbors.mask.sum(1).tolist() == [2] * 4 and torch.isfinite(few.logits).all()
    alone = make_head(k=0).attach(store)(z)  # k = 0: no search, the query tokens attend only to themselves
    assert alone.neighbors.k == 0 and torch.isfinite(alone.logits).all()


def test_no_store_no_neighbours_and_bad_inputs():
    head = make_head()
    from retrofit.errors import RetrofitError

    with pytest.raises(RetrofitError, match="attach"):
        head(torch.randn(2, DQ, dtype=torch.float64))
    with pytest.raises(ValueError, match="z must be"):
        head(torch.randn(2, DQ + 1, dtype=torch.float64), neighbors=make_neighbors(2))
    with pytest.raises(ValueError, match="host_logits"):
        head(torch.randn(2, DQ, dtype=torch.float64), torch.randn(2, C + 1), neighbors=make_neighbors(2))
    # found by a review: these were cast (an int / bool z, a complex one losing its imaginary part with a warning)
    # or failed with AttributeError deep inside
    import dataclasses

    z, nb = torch.randn(2, DQ, dtype=torch.float64), make_neighbors(2)
    for bad, says in ((z.long(), "z must be a floating-point tensor of .* got torch.int64"),
                      (z.bool(), "got torch.bool"), (z.to(torch.complex128), "got torch.complex128"),
                      (z.numpy(), r"z must be a torch.Tensor .* got ndarray \(torch.from_numpy\(z\)\)")):
        with pytest.raises(TypeError, match=says):
            head(bad, neighbors=nb)
    with pytest.raises(TypeError, match="host_logits must be a floating-point tensor"):
        head(z, torch.zeros(2, C, dtype=torch.long), neighbors=nb)
    with pytest.raises(TypeError, match="neighbors must be a retrofit Neighbors .* got dict"):
        head(z, neighbors={"ids": nb.ids})
    with pytest.raises(TypeError, match="neighbors.image must be a floating-point tensor"):
        head(z, neighbors=dataclasses.replace(nb, image=nb.image.to(torch.complex128)))
    assert torch.isfinite(head(z.float(), neighbors=nb).logits).all()  # a float32 z is taken (cast to the head's)
    with pytest.raises(ValueError, match="divisible"):
        HeadConfig(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, dim=30, heads=4)
    with pytest.raises(ValueError, match="modalities"):
        HeadConfig(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, modalities="audio")


def test_gradients_reach_only_the_head(seed):
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(10, DQ), nn.ReLU())
    classifier = nn.Linear(DQ, C)
    for p in [*host.parameters(), *classifier.parameters()]:
        p.requires_grad_(False)
    head = make_head(dtype=torch.float32, learnable_tau=True)
    x = torch.randn(3, 10)
    z = host(x)
    out = head(z, classifier(z), neighbors=make_neighbors(dtype=torch.float32, p_valid=1.0))
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None for p in [*host.parameters(), *classifier.parameters()])
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_layer_matches_einsum_reference(seed):
    B, S, d, H = 3, 5, 16, 4
    Dh = d // H
    layer = CrossFusionLayer(d, H).double()
    with torch.no_grad():
        for n in (layer.norm_i, layer.norm_t):
            n.weight.normal_(1, 0.2)
            n.bias.normal_(0, 0.2)
    xi, xt = torch.randn(B, S, d, dtype=torch.float64), torch.randn(B, S, d, dtype=torch.float64)
    key_mask = torch.rand(B, S) < 0.6
    key_mask[:, 0] = True
    got_i, got_t, (p_i, p_t) = layer(xi, xt, key_mask, need_weights=True)

    def ln(x, n):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + n.eps) * n.weight + n.bias

    def split(x, lin):
        W, b = lin.weight.view(3, H, Dh, d), lin.bias.view(3, H, Dh)
        return torch.einsum("bsd,jhed->jbhse", x, W) + b[:, None, :, None, :]  # (3, B, H, S, Dh)

    qi, ki, vi = split(ln(xi, layer.norm_i), layer.qkv_i)
    qt, kt, vt = split(ln(xt, layer.norm_t), layer.qkv_t)
    neg = torch.where(key_mask, 0.0, float("-inf")).double()[:, None, None, :]  # (B, 1, 1, S)
    a_i = torch.softmax(torch.einsum("bhqe,bhke->bhqk", qt, ki) / Dh**0.5 + neg, dim=-1)
    a_t = torch.softmax(torch.einsum("bhqe,bhke->bhqk", qi, kt) / Dh**0.5 + neg, dim=-1)
    want_i = xi + torch.einsum("bhqk,bhke->bqhe", a_i, vi).reshape(B, S, d)
    want_t = xt + torch.einsum("bhqk,bhke->bqhe", a_t, vt).reshape(B, S, d)
    torch.testing.assert_close(got_i, want_i, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_t, want_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p_i, a_i, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p_t, a_t, rtol=1e-10, atol=1e-10)


def test_optional_mlp_and_dropout_modes(seed):
    head = make_head(mlp_ratio=2.0, dropout=0.1)
    assert head.layers[0].mlp_i is not None
    nb, z = make_neighbors(), torch.randn(3, DQ, dtype=torch.float64)
    head.eval()
    a, b = head(z, neighbors=nb).logits, head(z, neighbors=nb).logits
    assert torch.equal(a, b)  # eval: dropout off, deterministic
    head.train()
    assert not torch.equal(head(z, neighbors=nb).logits, a)
    head.eval()  # the MLPs are applied: changing either one's weights changes the output
    for mlp in (head.layers[0].mlp_i, head.layers[0].mlp_t):
        with torch.no_grad():
            for p in mlp.parameters():
                p.add_(0.5)
        changed = head(z, neighbors=nb).logits
        assert not torch.allclose(changed, a), "an MLP's weights do not reach the output"
        a = changed


def test_bf16_head_runs_and_casts(seed):
    head = make_head(dtype=torch.bfloat16)
    out = head(torch.randn(2, DQ), torch.randn(2, C), neighbors=make_neighbors(2, dtype=torch.float32))
    assert out.retrieval_logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_label_vote_is_optional_zero_init_and_label_aware(seed):
    nb = make_neighbors(4, 6, torch.float32)
    z, host = torch.randn(4, DQ), torch.randn(4, C)
    plain = RetrievalHead(HeadConfig(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, dim=32, depth=1, heads=4))
    assert plain.vote is None and "vote.weight" not in plain.state_dict()
    head = RetrievalHead(HeadConfig(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, dim=32, depth=1, heads=4,
                                    label_vote=True))
    assert torch.equal(head(z, host, neighbors=nb).logits, host)  # zero-initialised: a fresh head is the host
    p = head.vote.probs(nb.labels, nb.scores, nb.mask)  # (B, C)
    has = nb.mask.any(1)
    assert torch.allclose(p.sum(1), has.float(), atol=1e-6)
    assert torch.all(p[~has] == 0)
    for b in range(4):  # only valid slots vote, each for its own label
        voted = set(torch.nonzero(p[b] > 0).flatten().tolist())
        assert voted <= set(nb.labels[b][nb.mask[b]].tolist())
    with torch.no_grad():
        head.vote.weight.fill_(1.0 / head.vote.gain)  # beta = 1
    out = head(z, host, neighbors=nb)
    assert torch.allclose(out.retrieval_logits, (p + head.vote.eps).log(), atol=1e-5)  # readout still zero
    unanimous = replace_nb(nb, mask=torch.ones(4, 6, dtype=torch.bool), labels=torch.full((4, 6), 2),
                           scores=torch.rand(4, 6), ids=torch.arange(24).view(4, 6))
    r = head(z, host, neighbors=unanimous).retrieval_logits
    assert torch.all(r.argmax(1) == 2)
    r.sum().backward()
    for g in (head.vote.weight.grad, head.vote.log_temperature.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_label_vote_gradients_stay_finite_with_invalid_slots(seed):
    """Unknown labels (-1), masked slots (score -inf) and rows with no valid slot at all must not give the vote's
    weight or temperature a NaN gradient (a KB with captions but no labels has many -1 labels)."""
    from retrofit.fusion import LabelVote

    vote = LabelVote(3)
    with torch.no_grad():
        vote.weight.fill_(0.5 / vote.gain)
    labels = torch.tensor([[0, -1, 2, 1], [-1, -1, -1, -1], [1, 1, 0, 2]])
    scores = torch.tensor([[0.9, 0.8, float("-inf"), 0.1], [0.5, 0.4, 0.3, 0.2], [0.3, 0.2, 0.1, 0.0]])
    mask = torch.tensor([[True, True, False, True], [True] * 4, [True] * 4])
    out = vote(labels, scores, mask)  # (3, C)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[1], torch.full((3,), 0.5 * math.log(vote.eps)))  # nothing valid: a flat vote
    out[:, 0].sum().backward()
    for p in (vote.weight, vote.log_temperature):
        assert p.grad is not None and torch.isfinite(p.grad).all(), p.grad
    assert vote.log_temperature.grad != 0  # the valid slots of rows 0 and 2 still teach the temperature


def test_label_vote_precision_and_least_similar_neighbours(seed):
    """Found by a stress test: (1) an fp16 head over a KB where a class is rare gave all-NaN logits (1 / share
    overflowed fp16 in the rebalancing, even in a fresh head); (2) a valid neighbour scoring -inf gave the
    temperature a NaN gradient (one step disabled the vote for good); (3) an fp64 head's vote ran in fp32."""
    from torch.autograd import gradcheck

    from retrofit.fusion import LabelVote

    torch.manual_seed(seed)
    labels = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 1]])
    scores = torch.tensor([[0.9, 0.7, float("-inf"), 0.1], [0.8, 0.6, 0.5, 0.4]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    fresh = LabelVote(3).half()
    fresh.set_label_prior(torch.tensor([1e6, 1e6, 1.0]))  # class 2: one record in two million
    out = fresh(labels, scores.half(), mask)
    assert torch.equal(out, torch.zeros_like(out))  # zero weight: adds exactly nothing, no NaN
    fresh.set_weight(1.0)
    assert torch.isfinite(fresh(labels, scores.half(), mask)).all()

    vote = LabelVote(3)
    vote.set_weight(1.0)
    p = vote.probs(labels, scores, mask)
    assert p[0, 1] > 0 and torch.allclose(p.sum(1), torch.ones(2))  # the -inf slot weighs nothing, others do
    vote(labels, scores, mask)[:, 1].sum().backward()
    assert torch.isfinite(vote.log_temperature.grad) and vote.log_temperature.grad != 0

    v64 = LabelVote(3).double()
    v64.set_weight(2.0)
    assert v64.probs(labels, scores.double(), mask).dtype == torch.float64
    lt = v64.log_temperature.detach().clone().requires_grad_()
    f = lambda t: torch.func.functional_call(v64, {"log_temperature": t}, (labels, scores.double(), mask))
    assert gradcheck(f, (lt,))

    # an fp16 head's logits are fp16 with either vote form (the log form's vote, computed in fp32, made them fp32)
    for form in ("log", "mix"):
        h16 = RetrievalHead(HeadConfig(DQ, DI, DT, 3, dim=8, heads=2, depth=1, k=4, label_vote=True,
                                       vote_form=form)).half()
        h16.vote.set_weight(1.0)
        nb16 = Neighbors(ids=torch.arange(8).view(2, 4), scores=scores.clamp_min(0.0), mask=mask,
                         image=torch.randn(2, 4, DI), text=torch.randn(2, 4, DT), labels=labels)
        out16 = h16(torch.randn(2, DQ).half(), torch.randn(2, 3).half(), neighbors=nb16)
        assert out16.logits.dtype == torch.float16 and torch.isfinite(out16.logits).all(), form
    # (3) through the head too: a store's scores stay fp32 (Neighbors.to casts only the vectors); the vote used to
    # compute in fp32 there, and gradcheck of the head's logits in its temperature failed
    h64 = RetrievalHead(HeadConfig(DQ, DI, DT, 3, dim=8, heads=2, depth=1, k=4, label_vote=True)).double()
    h64.vote.set_weight(2.0)
    nb = Neighbors(ids=torch.arange(8).view(2, 4), scores=scores.clamp_min(0.0), mask=mask,
                   image=torch.randn(2, 4, DI), text=torch.randn(2, 4, DT), labels=labels)
    assert nb.scores.dtype == torch.float32 and h64.vote(labels, nb.scores, mask).dtype == torch.float64
    z = torch.randn(2, DQ, dtype=torch.float64)
    lt = h64.vote.log_temperature.detach().clone().requires_grad_()
    g = lambda t: torch.func.functional_call(h64, {"vote.log_temperature": t}, (z,), {"neighbors": nb}).logits
    assert gradcheck(g, (lt,))


def test_label_vote_rebalances_by_kb_prior(seed):
    from retrofit.fusion import LabelVote

    vote = LabelVote(3)
    labels = torch.tensor([[0, 0, 0, 1]])
    scores, mask = torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool)
    assert torch.allclose(vote.probs(labels, scores, mask), torch.tensor([[0.75, 0.25, 0.0]]))
    vote.set_label_prior(torch.tensor([300, 100, 50]))  # class 0 is 3x as frequent as class 1 in the KB
    assert torch.allclose(vote.probs(labels, scores, mask), torch.tensor([[0.5, 0.5, 0.0]]), atol=1e-6)
    vote.set_label_prior(None)
    assert torch.allclose(vote.probs(labels, scores, mask), torch.tensor([[0.75, 0.25, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        vote.set_label_prior(torch.ones(4))


def test_logits_are_affine_in_the_vote_scale(seed):
    """The demo scores every vote scale from the passes at scales 0 and 1 (demo_heads.logits_by_vote_scale)."""
    nb = make_neighbors(5, 6, torch.float64)
    z, host = torch.randn(5, DQ, dtype=torch.float64), torch.randn(5, C, dtype=torch.float64)
    head = make_head(label_vote=True, tau=1.5)
    with torch.no_grad():
        head.vote.weight.fill_(0.8 / head.vote.gain)
    logits = {}
    for s in (0.0, 1.0, 0.5, 3.0):
        head.vote.set_scale(s)
        logits[s] = head(z, host, neighbors=nb).logits
    assert not torch.allclose(logits[0.0], logits[1.0])  # the vote is live
    for s in (0.5, 3.0):  # tolerance: the vote runs in fp32
        torch.testing.assert_close(logits[s], logits[0.0] + s * (logits[1.0] - logits[0.0]), rtol=1e-6, atol=1e-6)


def _vote_head_and_inputs(weight: float) -> tuple[RetrievalHead, Neighbors, torch.Tensor, torch.Tensor]:
    """A one-layer head (zero readout) whose label vote has weight ``weight``, and float32 inputs for it."""
    nb = make_neighbors(4, 6, torch.float32)
    z, host = torch.randn(4, DQ), torch.randn(4, C)
    head = RetrievalHead(HeadConfig(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, dim=32, depth=1, heads=4,
                                    label_vote=True))
    with torch.no_grad():
        head.vote.weight.fill_(weight / head.vote.gain)
    return head, nb, z, host


def test_label_vote_set_weight_replaces_the_learned_weight(seed, tmp_path):
    import numpy as np

    head, nb, z, host = _vote_head_and_inputs(-0.01)  # what noisy training can leave: no scale >= 0 helps
    head.vote.set_scale(3.0)
    head.vote.set_weight(2.0)
    assert head.vote.effective_weight == pytest.approx(2.0) and float(head.vote.scale) == 1.0
    unit = head.vote.probs(nb.labels, nb.scores, nb.mask).add(head.vote.eps).log()  # (B, C)
    torch.testing.assert_close(head(z, host, neighbors=nb).retrieval_logits, 2.0 * unit)  # readout is zero
    head.vote.set_weight(np.float32(-0.5))  # numpy scalars are numbers too
    assert head.vote.effective_weight == pytest.approx(-0.5)
    loaded = RetrievalHead.load(head.save(tmp_path / "h"))  # the weight set is the head's weight from now on
    assert loaded.vote.effective_weight == pytest.approx(-0.5)
    torch.testing.assert_close(loaded(z, host, neighbors=nb).logits, head(z, host, neighbors=nb).logits)
    head.vote.set_scale(2.0)
    for bad in (float("nan"), float("inf"), 1e300, True, "2", None):  # 1e300: beyond the fp32 weight
        with pytest.raises(ValueError, match="vote weight"):
            head.vote.set_weight(bad)
    assert head.vote.effective_weight == pytest.approx(-1.0) and float(head.vote.scale) == 2.0  # nothing changed


def test_label_vote_scale_multiplies_the_vote_and_is_saved(seed, tmp_path):
    head, nb, z, host = _vote_head_and_inputs(0.7)
    base = head(z, host, neighbors=nb).retrieval_logits
    head.vote.set_scale(2.5)
    assert head.vote.effective_weight == pytest.approx(1.75)
    assert torch.allclose(head(z, host, neighbors=nb).retrieval_logits, 2.5 * base, atol=1e-5)  # readout is zero
    loaded = RetrievalHead.load(head.save(tmp_path / "h"))
    assert float(loaded.vote.scale) == 2.5
    assert torch.allclose(loaded(z, host, neighbors=nb).logits, head(z, host, neighbors=nb).logits)
    for bad in (-1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="vote scale"):
            head.vote.set_scale(bad)
    # a head saved before the scale existed loads with scale 1
    from safetensors.torch import load_file, save_file

    w = tmp_path / "h" / "model.safetensors"
    state = load_file(str(w))
    del state["vote.scale"]
    save_file(state, str(w), metadata={"format": "retrofit-head", "format_version": "1"})
    old = RetrievalHead.load(tmp_path / "h")
    assert float(old.vote.scale) == 1.0


def test_vote_balance_follows_the_attached_store(seed):
    from retrofit.head import store_label_counts

    def store_with(labels: list[int]) -> InMemoryStore:
        n = len(labels)
        st = InMemoryStore(DQ, DI, DT)
        st.add(torch.randn(n, DQ), torch.randn(n, DI), torch.randn(n, DT), labels=torch.tensor(labels))
        return st

    skewed = store_with([0] * 6 + [1] * 2 + [2] * 1 + [-1])  # one unknown label, not counted
    assert store_label_counts(skewed, C).tolist()[:3] == [6, 2, 1]
    gone = store_with([0] * 4 + [1, 2])
    gone.delete(torch.tensor([0, 1, 2]))  # deleted records vote for nothing: not counted
    assert store_label_counts(gone, C).tolist()[:3] == [1, 1, 1] and len(gone) == 3
    with pytest.raises(KeyError, match=r"unknown or deleted ids \[1\]"):
        gone.delete(torch.tensor([3, 1]))  # as KnowledgeBase.delete: refused, and nothing is deleted
    assert len(gone) == 3
    cfg = dict(query_dim=DQ, image_dim=DI, text_dim=DT, num_classes=C, dim=32, depth=1, heads=4, label_vote=True)
    head = RetrievalHead(HeadConfig(**cfg, vote_balance=True), skewed)
    labels, scores, mask = torch.tensor([[0, 0, 0, 1]]), torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool)
    p = head.vote.probs(labels, scores, mask).detach()
    assert float(p[0, 0] / p[0, 1]) == pytest.approx(1.0, rel=1e-5)  # 3 votes / 6 records vs 1 vote / 2 records
    balanced = store_with(list(range(C)) * 2)
    head.attach(balanced)  # a KB with another class mix swapped in: the vote follows it
    assert torch.allclose(head.vote.label_log_prior, torch.zeros(C), atol=1e-6)
    assert float(head.vote.probs(labels, scores, mask)[0, 0].detach()) == pytest.approx(0.75)
    plain = RetrievalHead(HeadConfig(**cfg), skewed)  # vote_balance off: the attach leaves the vote alone
    assert torch.all(plain.vote.label_log_prior == 0)
    with pytest.raises(ValueError, match="label_vote"):
        HeadConfig(**{**cfg, "label_vote": False}, vote_balance=True)
    # a view on another KB (head.attached_to): its own store and prior; the head is not touched at all (the first
    # version re-attached the head's own KB on the way, rewriting its prior, and shared its hook dicts)
    head.attach(skewed)
    with torch.no_grad():
        head.vote.label_log_prior.fill_(0.5)  # a prior set by hand: must survive
    view = head.attached_to(balanced)
    assert view.store is balanced and head.store is skewed
    assert torch.all(head.vote.label_log_prior == 0.5)
    assert torch.allclose(view.vote.label_log_prior, torch.zeros(C), atol=1e-6)
    assert view.vote.weight is head.vote.weight and view.readout is head.readout
    fired = []
    view.register_forward_hook(lambda *a: fired.append(1))
    z = torch.randn(2, DQ)
    head(z)
    assert not fired
    view(z)
    assert fired == [1]
    # a store that changes while attached (a KB grown by `kb add`, then refresh()): the prior follows it at the next
    # search (it kept the counts read at attach, for good)
    grown = store_with(list(range(C)) * 2)
    head.attach(grown)
    head(z)
    assert torch.allclose(head.vote.label_log_prior, torch.zeros(C), atol=1e-6)
    grown.add(torch.randn(6, DQ), torch.randn(6, DI), torch.randn(6, DT), labels=torch.zeros(6, dtype=torch.long))
    head(z)
    fresh = RetrievalHead(HeadConfig(**cfg, vote_balance=True), grown)
    assert float(head.vote.label_log_prior[0]) > 0.5  # class 0: 8 of the 14 records, log(8 / 14 * C)
    torch.testing.assert_close(head.vote.label_log_prior, fresh.vote.label_log_prior)


def test_a_path_or_another_object_as_store_is_a_clear_type_error() -> None:
    """``RetrievalHead(cfg, store="kb/")`` raised AttributeError: 'str' object has no attribute 'key_dim'."""
    cfg = HeadConfig(query_dim=8, image_dim=8, text_dim=4, num_classes=3, dim=16, depth=1, heads=2, k=4)
    with pytest.raises(TypeError, match=r"got the path 'kb/r18': open it with retrofit.KnowledgeBase.open\(path\)"):
        RetrievalHead(cfg, store="kb/r18")
    with pytest.raises(TypeError, match="must be a retrofit.KnowledgeBase or InMemoryStore .* got dict"):
        RetrievalHead(cfg).attach({"key_dim": 8})
