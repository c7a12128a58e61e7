"""Adapters contract: one backbone pass gives z and host logits, for timm, torchvision and generic models."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

import retrofit
from retrofit.adapters import HookAdapter, TimmAdapter, TorchvisionAdapter, adapter_for, backbone, embedder, wrap
from retrofit.head import HeadConfig, RetrievalHead
from retrofit.store import InMemoryStore

C = 10  # classes of every test model


def make_head(query_dim: int, store: InMemoryStore | None = None, **kw) -> RetrievalHead:
    cfg = HeadConfig(query_dim=query_dim, image_dim=8, text_dim=6, num_classes=C, dim=16, depth=1, heads=2, k=4, **kw)
    return RetrievalHead(cfg, store)


def make_store(key_dim: int, n: int = 24, fingerprint=None) -> InMemoryStore:
    g = torch.Generator().manual_seed(0)
    s = InMemoryStore(key_dim, 8, 6, fingerprint)
    s.add(torch.randn(n, key_dim, generator=g), torch.randn(n, 8, generator=g), torch.randn(n, 6, generator=g),
          labels=torch.randint(0, C, (n,), generator=g))
    return s


def first_leaf(model: nn.Module) -> nn.Module:
    """The first leaf module with parameters (the stem): it runs once per backbone pass."""
    return next(m for m in model.modules() if not any(True for _ in m.children()) and any(True for _ in m.parameters()))


# ------------------------------------------------------------------------------------------ architectures
def _timm(name: str, size: int, **kw) -> Callable[[], tuple[nn.Module, int]]:
    def build():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=C, **kw), size
    return build


TIMM = {
    "resnet": _timm("test_resnet", 32),
    "efficientnet": _timm("test_efficientnet", 32),
    "convnext": _timm("test_convnext", 32),
    "vit": _timm("test_vit", 32, img_size=32),
    "deit": _timm("deit_tiny_patch16_224", 32, img_size=32, depth=1),
    "swin": _timm("swin_tiny_patch4_window7_224", 32, img_size=32, window_size=4, embed_dim=16, depths=(1, 1),
                  num_heads=(1, 2)),
    "regnet": _timm("regnetx_002", 32),
    "mobilenetv3": _timm("mobilenetv3_small_050", 32),
    "densenet": _timm("densenet121", 32, growth_rate=8, block_config=(1, 1, 1, 1)),
    "coatnet-hybrid": _timm("test_coatnet", 32, img_size=32),
    "mobilevit-hybrid": _timm("mobilevit_xxs", 64),
    "maxvit": _timm("test_maxvit", 32, img_size=32),
}


def _tv(build: Callable[[], nn.Module], size: int = 32) -> Callable[[], tuple[nn.Module, int]]:
    def make():
        pytest.importorskip("torchvision")
        return build(), size
    return make


def _tvm():
    import torchvision.models as m

    return m


TORCHVISION = {
    "resnet18": _tv(lambda: _tvm().resnet18(num_classes=C)),
    "resnext": _tv(lambda: _tvm().ResNet(_tvm().resnet.Bottleneck, [1, 1, 1, 1], num_classes=C, groups=4,
                                         width_per_group=8)),
    "regnet": _tv(lambda: _tvm().RegNet(_tvm().regnet.BlockParams.from_init_params(4, 8, 8.0, 2.0, 8),
                                        num_classes=C)),
    "vit": _tv(lambda: _tvm().VisionTransformer(32, 8, 1, 2, 32, 64, num_classes=C)),
    "vit-representation": _tv(lambda: _tvm().VisionTransformer(32, 8, 1, 2, 32, 64, num_classes=C,
                                                               representation_size=24)),
    "swin": _tv(lambda: _tvm().SwinTransformer([4, 4], 16, [1, 1], [1, 2], [2, 2], num_classes=C)),
    "convnext": _tv(lambda: _tvm().ConvNeXt([_tvm().convnext.CNBlockConfig(16, 32, 1),
                                             _tvm().convnext.CNBlockConfig(32, None, 1)], num_classes=C)),
    "efficientnet": _tv(lambda: _tvm().EfficientNet(
        _tvm().efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)[0], 0.2,
        num_classes=C)),
    "mobilenet_v2": _tv(lambda: _tvm().mobilenet_v2(num_classes=C, width_mult=0.25)),
    "mobilenet_v3_small": _tv(lambda: _tvm().mobilenet_v3_small(num_classes=C)),
    "densenet": _tv(lambda: _tvm().DenseNet(8, (1, 1), 16, num_classes=C)),
    "maxvit": _tv(lambda: _tvm().MaxVit((32, 32), 8, 2, [16], [1], 8, 0.0, num_classes=C)),
    "shufflenet": _tv(lambda: _tvm().shufflenet_v2_x0_5(num_classes=C)),
    "mnasnet": _tv(lambda: _tvm().mnasnet0_5(num_classes=C)),
    # the remaining mapped families, at their real classifier shapes with small trunks
    "vgg": _tv(lambda: _tvm().VGG(nn.Sequential(nn.Conv2d(3, 512, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                                  num_classes=C, init_weights=False)),
    "alexnet": _tv(lambda: _tvm().AlexNet(num_classes=C), size=64),
    "wide_resnet": _tv(lambda: _tvm().ResNet(_tvm().resnet.Bottleneck, [1, 1, 1, 1], num_classes=C,
                                             width_per_group=128)),
    "efficientnet_v2": _tv(lambda: _tvm().EfficientNet(
        _tvm().efficientnet._efficientnet_conf("efficientnet_v2_s")[0][:2], 0.2, num_classes=C, last_channel=256)),
    "googlenet": _tv(lambda: _tvm().GoogLeNet(num_classes=C, aux_logits=False, init_weights=False), size=64),
    "inception_v3": _tv(lambda: _tvm().Inception3(num_classes=C, aux_logits=False, init_weights=False), size=80),
}


class SmallNet(nn.Module):
    """A plain classifier no adapter knows: conv trunk, a hidden Linear, the classifier Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten())
        self.hidden = nn.Linear(8, 12)
        self.out = nn.Linear(12, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.trunk(x))))


GENERIC = {"smallnet": lambda: (SmallNet(), 16)}
ARCHS = {**{f"timm-{k}": v for k, v in TIMM.items()}, **{f"tv-{k}": v for k, v in TORCHVISION.items()},
         **{f"generic-{k}": v for k, v in GENERIC.items()}}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_contract(arch: str, seed: int) -> None:
    model, size = ARCHS[arch]()
    model.eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    adapter = adapter_for(model, num_classes=C)
    kind = {"timm": TimmAdapter, "tv": TorchvisionAdapter, "generic": HookAdapter}[arch.split("-")[0]]
    assert type(adapter) is kind
    with torch.no_grad():
        z_probe, _ = adapter(x)
    head = make_head(z_probe.shape[1], make_store(z_probe.shape[1]))
    wrapped = wrap(model, head)

    calls = []
    handle = first_leaf(model).register_forward_pre_hook(lambda m, i: calls.append(1))
    with torch.no_grad():
        z, host = wrapped.features(x)
        assert len(calls) == 1, f"backbone ran {len(calls)} times in features()"
        out = wrapped(x, return_output=True)
        assert len(calls) == 2, f"backbone ran {len(calls) - 1} times in forward()"
    handle.remove()

    # host logits are exactly the unwrapped model's output
    torch.testing.assert_close(host, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    torch.testing.assert_close(out.host_logits, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    # z is the pre-logits embedding
    with torch.no_grad():
        if kind is TimmAdapter:
            ref_z = model.forward_head(model.forward_features(x), pre_logits=True)
            torch.testing.assert_close(z, ref_z, rtol=1e-6, atol=1e-6)
        else:  # z is what the classifier Linear maps to the logits
            lin = adapter.classifier
            assert isinstance(lin, nn.Linear) and z.shape == (2, lin.in_features)
            torch.testing.assert_close(lin(z), expected, rtol=1e-5, atol=1e-5)
    assert z.shape[0] == 2 and z.dim() == 2
    # a fresh head adds zero retrieval logits: fused logits = host logits (tau = 2)
    torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert out.attention is not None and out.attention.shape == (2, 4)
    assert out.neighbors.ids.shape == (2, 4) and bool(out.neighbors.mask.all())


@pytest.mark.parametrize("train_classifier", [False, True])
def test_only_head_and_optionally_classifier_train(train_classifier: bool, seed: int) -> None:
    model = TORCHVISION["resnet18"]()[0]
    head = make_head(512, make_store(512))
    wrapped = wrap(model, head, train_classifier=train_classifier)
    wrapped.train()
    assert wrapped.head.training and not model.training and not any(m.training for m in model.modules())
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}  # params and BN buffers
    head_before = {n: p.detach().clone() for n, p in head.named_parameters()}
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, C, (4,))
    loss = nn.functional.cross_entropy(wrapped(x), y)
    loss.backward()
    opt.step()
    changed = {n for n, p in model.state_dict().items() if not torch.equal(p, before[n])}
    assert changed == ({"fc.weight", "fc.bias"} if train_classifier else set())
    assert any(not torch.equal(p, head_before[n]) for n, p in head.named_parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("fc."))


def test_generic_named_classifier_and_errors(seed: int) -> None:
    net = SmallNet().eval()
    head = make_head(12, make_store(12))
    wrapped = wrap(net, head, classifier="out")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z, host = wrapped.features(x)
        torch.testing.assert_close(host, net(x))
        torch.testing.assert_close(z, torch.relu(net.hidden(net.trunk(x))))
    with pytest.raises(ValueError, match="no submodule 'nope'.*'out'"):
        wrap(SmallNet(), make_head(12), classifier="nope")

    class TwoHeads(SmallNet):
        def __init__(self) -> None:
            super().__init__()
            self.aux = nn.Linear(8, C)

    with pytest.raises(retrofit.RetrofitError, match=r"2 nn.Linear.*'out'.*'aux'.*classifier="):
        wrap(TwoHeads(), make_head(12))
    convnet = nn.Sequential(nn.Conv2d(3, C, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(retrofit.RetrofitError, match="no nn.Linear.*classifier="):
        wrap(convnet, make_head(12))
    with pytest.raises(retrofit.RetrofitError, match="no nn.Linear of SmallNet has 7 outputs.*'hidden' \\(8->12\\)"):
        wrap(SmallNet(), RetrievalHead(HeadConfig(12, 8, 6, num_classes=7, dim=16, depth=1, heads=2)))


def test_dim_mismatch_says_what_to_pass() -> None:
    model = TORCHVISION["resnet18"]()[0]
    with pytest.raises(ValueError, match=r"512-d embeddings.*query_dim=64.*HeadConfig\(query_dim=512"):
        wrap(model, make_head(64))
    with pytest.raises(ValueError, match=r"predicts 10 classes.*num_classes=7"):
        wrap(model, RetrievalHead(HeadConfig(512, 8, 6, num_classes=7, dim=16, depth=1, heads=2)))
    with pytest.raises(TypeError, match="RetrievalHead"):
        wrap(model, nn.Linear(3, 3))
    wrapped = wrap(model, make_head(512, make_store(512)))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        wrapped(torch.rand(3, 32, 32))


def test_kb_from_another_backbone_is_refused(seed: int) -> None:
    from retrofit.errors import FingerprintMismatchError
    from retrofit.fingerprint import EncoderFingerprint
    from retrofit.store import KBFingerprint

    model = TORCHVISION["resnet18"]()[0]
    mine = EncoderFingerprint("torchvision", "resnet18", "random", 512)
    other = EncoderFingerprint("timm", "resnet50", "a1_in1k", 512)
    kb = make_store(512, fingerprint=KBFingerprint(key=other))
    with pytest.raises(FingerprintMismatchError, match="resnet50.*resnet18|resnet18.*resnet50"):
        wrap(model, make_head(512, kb), fingerprint=mine)
    # attaching the foreign KB after wrapping is caught at the first forward
    wrapped = wrap(model, make_head(512), fingerprint=mine)
    wrapped.head.attach(kb)
    with pytest.raises(FingerprintMismatchError, match="allow_fingerprint_mismatch"):
        wrapped(torch.rand(1, 3, 32, 32))
    ok = wrap(model, make_head(512, kb), fingerprint=mine, allow_fingerprint_mismatch=True)
    assert ok(torch.rand(1, 3, 32, 32)).shape == (1, C)
    same = wrap(model, make_head(512, make_store(512, fingerprint=KBFingerprint(key=mine))), fingerprint=mine)
    assert same(torch.rand(1, 3, 32, 32)).shape == (1, C)


def test_retriever_computes_the_keys(seed: int) -> None:
    model = SmallNet().eval()
    retriever = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 5))
    store = make_store(5)
    head = make_head(12, store, key_dim=5)
    wrapped = wrap(model, head, retriever=retriever)
    x = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        out = wrapped(x, return_output=True)
        expected = store.search(nn.functional.normalize(retriever(x), dim=-1), 4)
    assert torch.equal(out.neighbors.ids, expected.ids)
    assert not any(p.requires_grad for p in retriever.parameters()) and not retriever.training
    with pytest.raises(ValueError, match="no retriever"):
        wrap(SmallNet(), make_head(12, key_dim=5))


def test_retriever_can_be_an_image_encoder(seed: int) -> None:
    from retrofit.encoders import ImageEncoder
    from retrofit.errors import FingerprintMismatchError
    from retrofit.fingerprint import EncoderFingerprint
    from retrofit.store import KBFingerprint

    tower = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 5))
    fp = EncoderFingerprint("open_clip", "tiny", "random", 5)
    enc = ImageEncoder(tower, None, fp, module=tower)
    store = make_store(5, fingerprint=KBFingerprint(key=fp))
    wrapped = wrap(SmallNet().eval(), make_head(12, store, key_dim=5), retriever=enc)
    x = torch.rand(2, 3, 16, 16)
    out = wrapped(x, return_output=True)
    assert torch.equal(out.neighbors.ids, store.search(enc.encode(x), 4).ids)
    assert not any(p.requires_grad for p in tower.parameters())
    other = make_store(5, fingerprint=KBFingerprint(key=EncoderFingerprint("timm", "vit", "x", 5)))
    with pytest.raises(FingerprintMismatchError):
        wrap(SmallNet().eval(), make_head(12, other, key_dim=5), retriever=enc)


def test_dtype_device_follow_the_model_and_inference_mode(seed: int) -> None:
    model = SmallNet().double().eval()
    head = make_head(12, make_store(12))
    wrapped = wrap(model, head)
    assert head.readout.fc.weight.dtype == torch.float64
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        y = wrapped(x)  # float32 input is cast to the model's dtype
        assert y.dtype == torch.float64 and y.shape == (2, C)
        torch.testing.assert_close(y, model(x.double()))  # a fresh head: fused logits = host logits


def _headless(kind: str) -> nn.Module:
    if kind == "timm":
        return pytest.importorskip("timm").create_model("test_resnet", pretrained=False, num_classes=0).eval()
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=C) if kind == "tv-resnet" else tv.models.mobilenet_v3_small(num_classes=C)
    setattr(model, "fc" if kind == "tv-resnet" else "classifier", nn.Identity())  # the usual feature extractor
    return model.eval()


@pytest.mark.parametrize("kind", ["timm", "tv-resnet", "tv-mobilenet"])
def test_headless_host_gives_retrieval_logits_only(kind: str, seed: int, caplog) -> None:
    """A torchvision model with ``fc = nn.Identity()`` was refused ("holds no nn.Linear"); it is headless like a timm
    model with num_classes=0: z is its output, no host logits."""
    model = _headless(kind)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z = model(x)
    with caplog.at_level("WARNING"):
        wrapped = wrap(model, make_head(z.shape[1], make_store(z.shape[1])))
    assert any("has no classifier" in r.message for r in caplog.records)  # said, not silent
    with torch.no_grad():
        out = wrapped(x, return_output=True)
    assert out.host_logits is None and out.logits.shape == (2, C)
    torch.testing.assert_close(out.logits, out.retrieval_logits)  # tau/2 * L_R with tau = 2
    with torch.no_grad():
        torch.testing.assert_close(embedder(model)(x), z)  # the embedding is the headless model's output
    # a head of another width: said as the width of the host's embedding, by wrap or (a torchvision adapter cannot
    # tell the width before a forward) on the first call; the message blamed the knowledge base's keys and a retriever
    with pytest.raises(ValueError, match=rf"gives {z.shape[1]}-d embeddings but the head has query_dim="
                                         rf"{z.shape[1] // 2}: build the head with HeadConfig\(query_dim={z.shape[1]}"):
        wrap(model, make_head(z.shape[1] // 2, make_store(z.shape[1] // 2)))(x)


def test_a_wrapped_models_balanced_vote_follows_its_kb(seed: int) -> None:
    """clf(x) searched the KB itself and passed the neighbours to the head, so a balanced vote kept the class prior
    read at attach after the KB changed (head(z) followed it); the wrapped model follows it too."""
    model = SmallNet().eval()
    store = make_store(12)
    head = make_head(12, store, label_vote=True, vote_balance=True)
    head.vote.set_weight(1.0)
    clf = wrap(model, head).eval()
    x = torch.rand(2, 3, 32, 32)
    store.add(torch.randn(30, 12), torch.randn(30, 8), torch.randn(30, 6), labels=torch.zeros(30, dtype=torch.long))
    with torch.no_grad():
        y = clf(x)
    fresh = make_head(12, store, label_vote=True, vote_balance=True)  # the prior of the KB as it is now
    torch.testing.assert_close(head.vote.label_log_prior, fresh.vote.label_log_prior)
    assert float(head.vote.label_log_prior[0]) > 0.5  # class 0 now holds most records
    with torch.no_grad():
        assert torch.equal(clf(x), y)


def test_torch_compile_on_cpu(seed: int) -> None:
    model = SmallNet().eval()
    wrapped = wrap(model, make_head(12, make_store(12)))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        eager = wrapped(x)
        # aot_eager: dynamo + AOTAutograd without inductor's C++ build, which takes minutes on 2 shared cores
        compiled = torch.compile(wrapped, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_torch_compile_with_a_real_knowledge_base(seed: int, tmp_path) -> None:
    """torch.compile of a wrapped model whose head searches an LMDB + faiss KnowledgeBase: dynamo traced into the
    KB's numpy gather and crashed (AssertionError in wrap_numpy_ndarray); the search is now one graph break, the
    backbone and the head compile around it, the logits are the eager ones."""
    from retrofit.knowledge_base import KnowledgeBase

    g = torch.Generator().manual_seed(1)
    with KnowledgeBase.create(tmp_path / "kb", 12, 8, 6, index="flat") as kb:
        kb.add(torch.randn(60, 12, generator=g), torch.randn(60, 8, generator=g), torch.randn(60, 6, generator=g),
               labels=torch.randint(0, C, (60,), generator=g))
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        head = make_head(12, kb, label_vote=True)
        torch.nn.init.normal_(head.readout.fc.weight)  # a trained-looking head: the neighbours change the logits
        wrapped = wrap(SmallNet().eval(), head)
        x = torch.rand(3, 3, 16, 16)
        with torch.no_grad():
            torch._dynamo.reset()
            explained = torch._dynamo.explain(wrapped)(x)  # first: the eager first-batch checks have not run
            eager = wrapped(x)
            compiled = torch.compile(wrapped, backend="aot_eager")
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
        assert explained.graph_count >= 2  # backbone before and head after the search, compiled
        # the search is the only break (in retrofit/store.py: the search, or making it uncompiled on first use)
        assert explained.break_reasons and all(b.user_stack[-1].filename.endswith("retrofit/store.py")
                                               for b in explained.break_reasons)


def test_threads_serving_one_wrapped_model(seed: int) -> None:
    """Several threads calling one wrapped generic model (a threaded inference server): each forward captured every
    thread's classifier call ("ran 3 times in one forward"); each now sees its own, with the serial results."""
    import threading

    wrapped = wrap(SmallNet().eval(), make_head(12, make_store(12), label_vote=True))
    torch.nn.init.normal_(wrapped.head.readout.fc.weight)
    xs = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    with torch.no_grad():
        want = [wrapped(x) for x in xs]
    errors: list[str] = []
    wrong: list[int] = []

    def serve(t: int) -> None:
        try:
            with torch.no_grad():
                for i in range(len(xs)):
                    j = (i + 5 * t) % len(xs)
                    if not torch.equal(wrapped(xs[j]), want[j]):
                        wrong.append(j)
        except Exception as e:  # collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []


def test_darknet_with_a_real_kb(data_dir, cifar_train_small, seed: int) -> None:
    """The real pretrained Tiny Darknet, a KB of real CIFAR-10 images embedded by it: each image finds itself."""
    from retrofit.models import darknet_tiny
    from retrofit.store import KBFingerprint

    model = darknet_tiny(data_dir=data_dir)
    tf = model.preprocess()
    x = torch.stack([tf(s["image"]) for s in cifar_train_small[:40]])
    with torch.inference_mode():
        z, host = adapter_for(model)(x)
        torch.testing.assert_close(embedder(model)(x), z)
        assert type(backbone(model)) is TimmAdapter
    kb = InMemoryStore(512, 8, 6, KBFingerprint(key=model.fingerprint))
    kb.add(z, torch.randn(40, 8), torch.randn(40, 6), labels=torch.tensor([s["label"] for s in cifar_train_small[:40]]))
    head = RetrievalHead(HeadConfig(512, 8, 6, num_classes=1000, dim=16, depth=1, heads=2, k=3), kb)
    wrapped = wrap(model, head)
    with torch.inference_mode():
        out = wrapped(x[:8], return_output=True)
    assert torch.equal(out.neighbors.ids[:, 0], torch.arange(8))
    torch.testing.assert_close(out.logits, host[:8])
    assert wrapped.fingerprint == model.fingerprint


def test_darknet_with_its_classifier_replaced_for_my_classes(data_dir, seed: int) -> None:
    """A user's production Darknet: fc swapped for a 10-class layer (by hand or reset_classifier). Its class count
    follows the layer (wrap once said 'predicts 1000 classes', from a stale attribute)."""
    from retrofit.models import darknet_tiny

    for how in ("assign", "reset"):
        model = darknet_tiny(data_dir=data_dir)
        assert model.num_classes == 1000 and len(model.class_names) == 1000
        if how == "assign":
            model.fc = nn.Linear(model.fc.in_features, C)
        else:
            model.reset_classifier(C)
        assert model.num_classes == C and model.class_names is None  # ImageNet's names no longer apply
        assert backbone(model).num_classes == C
        head = RetrievalHead(HeadConfig(512, 8, 6, num_classes=C, dim=16, depth=1, heads=2, k=3), make_store(512))
        x = torch.rand(2, 3, 64, 64)
        with torch.inference_mode():
            assert wrap(model, head, allow_fingerprint_mismatch=True)(x).shape == (2, C)
    with pytest.raises(ValueError, match="positive int"):
        model.reset_classifier(0)


def test_passing_a_whole_batch_tuple_is_a_clear_type_error(seed: int) -> None:
    """``clf(*batch)`` with (images, labels): the labels used to land in return_output (a tensor's truth value)."""
    model, size = _tv(lambda: __import__("torchvision").models.resnet18(num_classes=C))()
    clf = wrap(model, make_head(512, make_store(512)))
    x, y = torch.rand(2, 3, size, size), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="positional argument"):
        clf(x, y)
    assert clf(x).shape == (2, C)


def test_a_model_ending_in_softmax_gives_its_logits_with_a_warning(seed: int, caplog) -> None:
    """The host logits are the classifier layer's output, not probabilities a final Softmax makes of them."""
    import logging

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, C), nn.Softmax(-1)).eval()
    adapter = adapter_for(model)
    x = torch.rand(4, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="retrofit.adapters.generic"):
        z, logits = adapter(x)
        adapter(x)
    torch.testing.assert_close(logits, model[:-1](x))  # pre-softmax
    assert caplog.text.count("transforms its classifier's output") == 1  # said once
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, C)).eval()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrofit.adapters.generic"):
        torch.testing.assert_close(adapter_for(plain)(x)[1], plain(x))
    assert "transforms" not in caplog.text


def test_unscaled_pixel_values_warn_once(seed: int, caplog) -> None:
    import logging

    model, size = _tv(lambda: __import__("torchvision").models.resnet18(num_classes=C))()
    clf = wrap(model, make_head(512, make_store(512)))
    with caplog.at_level(logging.WARNING, logger="retrofit.adapters.retrofitted"):
        clf(torch.rand(2, 3, size, size) * 255)
        clf(torch.rand(2, 3, size, size) * 255)
    assert caplog.text.count("0-255 pixel values?") == 1
    caplog.clear()
    clf2 = wrap(model, make_head(512, make_store(512)))
    with caplog.at_level(logging.WARNING, logger="retrofit.adapters.retrofitted"):
        clf2(torch.randn(2, 3, size, size))  # normalised images: no warning
    assert "pixel values" not in caplog.text


def test_images_of_another_size_than_the_kbs_warn_once(data_dir, cifar_train_small, seed: int, caplog) -> None:
    """A KB built by `retrofit kb build` at 64 px, a wrapped Tiny Darknet fed 32 px tensors: the host's embedding
    is another vector space (the neighbours were silently poor). One warning per KB; none at the right size."""
    import logging

    from retrofit.encoders import load_image_encoder
    from retrofit.models import darknet_tiny
    from retrofit.store import KBFingerprint

    enc = load_image_encoder("darknet-tiny")  # what the builder records: note "input 64px"
    assert enc.fingerprint.input_size == (64, 64)
    model = darknet_tiny(data_dir=data_dir)
    x = torch.stack([model.preprocess()(s["image"]) for s in cifar_train_small[:6]])  # (6, 3, 64, 64)
    kb = InMemoryStore(512, 8, 6, KBFingerprint(key=enc.fingerprint))
    kb.add(enc.encode(x), torch.randn(6, 8), torch.randn(6, 6), labels=torch.arange(6))
    clf = wrap(model, RetrievalHead(HeadConfig(512, 8, 6, num_classes=1000, dim=16, depth=1, heads=2, k=2), kb))
    with caplog.at_level(logging.WARNING, logger="retrofit.adapters.retrofitted"), torch.inference_mode():
        clf(x[:2])
        assert "were made from" not in caplog.text
        clf2 = wrap(model, RetrievalHead(HeadConfig(512, 8, 6, num_classes=1000, dim=16, depth=1, heads=2, k=2), kb))
        small = torch.nn.functional.interpolate(x, size=32)
        clf2(small[:2])
        clf2(small[2:4])
    assert caplog.text.count("keys were made from 64x64 images") == 1 and "fed 32x32" in caplog.text
    assert load_image_encoder("darknet-tiny@96").fingerprint.input_size == (96, 96)


def test_gradients_reach_images_that_require_them(seed: int) -> None:
    """Saliency maps / adversarial examples: the wrapped model ran the frozen backbone under no_grad, so x.grad stayed
    None (the host alone gives it); now the input gradient flows through the host and the head's query."""
    wrapped = wrap(SmallNet().eval(), make_head(12, make_store(12))).eval()
    torch.nn.init.normal_(wrapped.head.readout.fc.weight)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    torch.nn.functional.cross_entropy(wrapped(x), torch.tensor([1, 2])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in wrapped.backbone.parameters())  # the host stays frozen
    with torch.no_grad():  # plain inference keeps recording nothing
        assert not wrapped(torch.rand(2, 3, 16, 16)).requires_grad


def test_head_without_neighbours_k0_in_wrap_predict_and_train(seed: int) -> None:
    """HeadConfig(k=0) is a head configured without neighbours: wrap, predict_logits and train crashed asking the
    store for 0 neighbours ("k must be a positive int, got 0")."""
    from retrofit.feature_cache import FeatureSet

    head = RetrievalHead(HeadConfig(query_dim=12, image_dim=8, text_dim=6, num_classes=C, dim=16, depth=1, heads=2,
                                    k=0), make_store(12))
    assert wrap(SmallNet().eval(), head)(torch.rand(2, 3, 16, 16)).shape == (2, C)
    fs = FeatureSet(z=torch.randn(8, 12), labels=torch.arange(8) % C, host_logits=torch.randn(8, C))
    assert retrofit.predict_logits(head, fs, device="cpu")["logits"].shape == (8, C)
    res = retrofit.train(head, fs, retrofit.TrainConfig(epochs=1, batch_size=4, progress=False, device="cpu"))
    assert len(res.step_losses) == 2


def test_an_encoder_retriever_follows_the_models_dtype(seed: int) -> None:
    """An ImageEncoder retriever (docs/hosts.md: retriever=retrofit.load_image_encoder(spec)) is not a submodule, so
    wrapped.bfloat16() left it in float32 while the images were cast to bfloat16 ("Input type (c10::BFloat16) and
    bias type (float) should be the same"); the retriever now gets the images in its own dtype."""
    from retrofit.encoders import ImageEncoder
    from retrofit.fingerprint import EncoderFingerprint

    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 7)).eval()
    enc = ImageEncoder(net, lambda im: im, EncoderFingerprint("custom", "retriever", "test", 7), module=net)
    head = make_head(12, make_store(7), key_dim=7)
    wrapped = wrap(SmallNet().eval(), head, retriever=enc, allow_fingerprint_mismatch=True)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ids32 = wrapped(x, return_output=True).neighbors.ids
        out = wrapped.bfloat16()(x, return_output=True)
    assert out.logits.dtype == torch.bfloat16 and next(net.parameters()).dtype == torch.float32
    assert torch.equal(out.neighbors.ids, ids32)  # the keys are the retriever's float32 keys, as before


def test_compiled_wrapper_around_a_host_that_runs_eagerly(seed: int) -> None:
    """The whole wrapped model compiled while the host's own forward stays eager (torch.compiler.disable, or
    dynamo falling back): the classifier hook, registered inside the compiled forward, ran eagerly and dropped the
    call ('ran 0 times in one forward')."""

    class EagerHost(SmallNet):
        @torch.compiler.disable
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)

    wrapped = wrap(EagerHost().eval(), make_head(12, make_store(12)))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        eager = wrapped(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(wrapped, backend="aot_eager")(x), eager)


def test_hosts_retrofit_cannot_read_are_refused_saying_what_to_do(seed: int) -> None:
    """Found wrapping odd hosts: an unpooled timm model (global_pool='') and a per-token / 1x1-conv classifier gave
    errors about the KB's keys; a scripted torchvision model, and a model wrapped twice, were read wrongly or
    with a raw error."""
    from retrofit.errors import RetrofitError

    timm = pytest.importorskip("timm")

    unpooled = timm.create_model("test_resnet", pretrained=False, num_classes=0, global_pool="").eval()
    with torch.no_grad(), pytest.raises(RetrofitError, match=r"does not pool \(timm global_pool=''\)"):
        wrap(unpooled, make_head(unpooled.num_features, make_store(unpooled.num_features)))(torch.rand(2, 3, 32, 32))

    class PerToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 12)
            self.fc = nn.Linear(12, C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.embed(x.flatten(2).transpose(1, 2))  # (B, N, 12)
            return self.fc(tokens).mean(1)  # the classifier runs per token, then the logits are pooled

    with torch.no_grad(), pytest.raises(RetrofitError, match=r"takes a \(2, 16, 12\) input, not \(B, D\)"):
        wrap(PerToken().eval(), make_head(12, make_store(12)), classifier="fc")(torch.rand(2, 3, 4, 4))
    tv = pytest.importorskip("torchvision")
    import warnings

    with warnings.catch_warnings():  # torch deprecates jit.script; users still have scripted models
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(tv.models.resnet18(num_classes=C).eval())
    with pytest.raises(RetrofitError, match="TorchScript module: .* wrap the model before torch.jit.script"):
        wrap(scripted, make_head(512, make_store(512)))
    once = wrap(SmallNet().eval(), make_head(12, make_store(12)))
    with pytest.raises(RetrofitError, match="already retrofitted"):
        wrap(once, make_head(12, make_store(12)))


def test_a_replaced_torchvision_head_names_the_layer_that_gives_the_classes(seed: int) -> None:
    """fc replaced by a small MLP whose output Linear is registered first: the last registered Linear (the hidden
    one) was taken as the classifier, and following the error's advice gave a silently wrong model. Now the error
    names the layer with the head's class count; a hidden layer that happens to match a wrong count is not
    picked silently either."""
    from retrofit.errors import RetrofitError

    tv = pytest.importorskip("torchvision")

    class MLPHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(128, C)  # registered before the hidden layer
            self.proj = nn.Linear(512, 128)

        def forward(self, f: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.proj(f)))

    model = tv.models.resnet18()
    model.fc = MLPHead()
    model.eval()
    with pytest.raises(RetrofitError, match=r"gives 128 outputs but the head has num_classes=10; pass "
                                            r"classifier='fc.out'"):
        wrap(model, make_head(128, make_store(128)))
    wrapped = wrap(model, make_head(128, make_store(128)), classifier="fc.out")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x))  # a fresh head: exactly the host's logits


def test_hosts_returning_structured_outputs(seed: int, caplog) -> None:
    """A model returning a Hugging Face-style output (``.logits``), a dict or ``(logits, aux)`` was refused ("not a
    logits tensor") although the logits come from its classifier layer."""
    from collections import OrderedDict

    from retrofit.adapters.generic import model_logits
    from retrofit.errors import RetrofitError

    class Output(OrderedDict):  # what transformers' ModelOutput is: a mapping whose fields are also attributes
        def __getattr__(self, name: str):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    class Structured(SmallNet):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind

        def forward(self, x: torch.Tensor):
            logits = super().forward(x)
            return {"output": Output(logits=logits, hidden=x.mean()), "dict": {"logits": logits, "loss": None},
                    "tuple": (logits, x.mean()), "none": {"scores": logits}}[self.kind]

    torch.manual_seed(seed)
    x = torch.rand(3, 3, 16, 16)
    for kind in ("output", "dict", "tuple"):
        model = Structured(kind).eval()
        clf = wrap(model, make_head(12, make_store(12)))
        with torch.no_grad():
            torch.testing.assert_close(clf(x), SmallNet.forward(model, x))  # fresh head: fused = host logits
            z, logits = clf.backbone(x)
        assert z.shape == (3, 12) and logits.shape == (3, C)
    # a dict without "logits" (was refused at the first forward): the classifier layer's output is the logits all
    # the same; retrofit says it cannot compare it with the model's output
    model = Structured("none").eval()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="retrofit.adapters.generic"):
        torch.testing.assert_close(wrap(model, make_head(12, make_store(12)))(x), SmallNet.forward(model, x))
    assert "returned dict with no 'logits'" in caplog.text and "'out'" in caplog.text
    with pytest.raises(RetrofitError, match="returned dict, and retrofit finds no logits tensor"):
        model_logits({"scores": x}, "Structured")


def test_a_timm_classifier_replaced_by_an_mlp_gives_its_class_count(seed: int) -> None:
    """``model.fc = nn.Sequential(Linear, ReLU, Linear(., C))`` leaves timm's num_classes stale (1000): wrap refused
    the model, naming 1000 classes."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=1000).eval()
    d = model.num_features
    model.fc = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, C))
    clf = wrap(model, make_head(d, make_store(d)))
    assert clf.backbone.num_classes == C
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), model(x))  # a fresh head: the host's logits
