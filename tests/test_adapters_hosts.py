"""Hosts found by sweeping architectures (a helper's stress test, 22 Nov): quantized classifiers, classifiers
without nn.Parameter, feature extractors made by replacing a classifier's last layer, hosts that call their
classifier by keyword or squeeze a batch of one, lazy layers, hosts shared by two wrappers, the wrapper's mode, and
tracing / exporting a model whose search is faiss work."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from test_adapters import C, SmallNet, make_head, make_store
from torch import nn

from retrofit.adapters import wrap
from retrofit.errors import RetrofitError
from retrofit.head import RetrievalHead


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch deprecates torch.ao.quantization; users still have such models
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear})


@pytest.mark.parametrize("family", ["timm", "torchvision"])
def test_dynamically_quantized_classifiers_give_their_logits(family: str, seed: int) -> None:
    """A dynamically quantized Linear has no nn.Parameter: timm hosts were taken as headless (their logits dropped,
    fused logits all zero), torchvision hosts refused ("holds no nn.Linear")."""
    if family == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("test_resnet", pretrained=False, num_classes=C).eval()
    else:
        tv = pytest.importorskip("torchvision")
        model = tv.models.resnet18(num_classes=C).eval()
    q = _quantize_dynamic(model)
    d = model.num_features if family == "timm" else 512
    clf = wrap(q, make_head(d, make_store(d)))
    assert not getattr(clf.backbone, "headless", False) and clf.backbone.num_classes == C
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = clf(x, return_output=True)
        torch.testing.assert_close(out.host_logits, q(x))
        torch.testing.assert_close(out.logits, q(x))  # a fresh head adds nothing


def test_statically_quantized_torchvision_host(seed: int, caplog) -> None:
    """torchvision's int8 resnet: its fc (a quantized Linear) was not found, and naming it crashed on quantized
    tensors; the embedding and logits are now dequantized, the logits are the model's."""
    tq = pytest.importorskip("torchvision.models.quantization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tq.resnet18(weights=None, quantize=True, num_classes=C).eval()
    x = torch.rand(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = wrap(model, make_head(512, make_store(512)))(x, return_output=True)
        ref = model(x)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.host_logits, ref)
    assert "transforms its classifier's output" not in caplog.text


def test_timm_classifier_holding_buffers_is_not_headless(seed: int) -> None:
    """A nearest-class-mean classifier keeping its prototypes in a buffer has no parameters: it was taken for timm's
    Identity (no classifier) and its logits were dropped."""
    timm = pytest.importorskip("timm")

    class NCM(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.register_buffer("protos", torch.nn.functional.normalize(torch.randn(C, d), dim=1))

        def forward(self, f: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(f, dim=1) @ self.protos.T

    model = timm.create_model("test_resnet", pretrained=False, num_classes=C).eval()
    model.fc = NCM(model.num_features)
    clf = wrap(model, make_head(model.num_features, make_store(model.num_features)))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), model(x))


def test_timm_mlp_classifier_registered_out_of_order(seed: int) -> None:
    """A replaced timm classifier whose output layer is registered before its hidden layer: the hidden width (128)
    was taken as the class count and a right head refused."""
    timm = pytest.importorskip("timm")

    class MLPHead(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.out = nn.Linear(32, C)  # registered first
            self.proj = nn.Linear(d, 32)

        def forward(self, f: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.proj(f)))

    model = timm.create_model("test_resnet", pretrained=False, num_classes=C).eval()
    d = model.num_features
    model.fc = MLPHead(d)
    clf = wrap(model, make_head(d, make_store(d)))
    assert clf.backbone.num_classes == C
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32)
        torch.testing.assert_close(clf(x), model(x))


@pytest.mark.parametrize("name", ["repvit_m1", "sequencer2d_s", "crossvit_tiny_240", "efficientvit_m0"])
def test_timm_heads_emptied_by_num_classes_0_are_headless(name: str, seed: int) -> None:
    """timm's num_classes=0 leaves other empty heads than Identity (a ModuleList of Identity, Dropout + Identity,
    a pooling head): a first version of the check by module type read them as classifiers (review, 22 Nov);
    efficientvit_m*'s get_classifier() raises AttributeError then (a timm bug): read as no classifier."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    d = model.num_features
    clf = wrap(model, make_head(d, make_store(d)))
    assert clf.backbone.headless and clf.backbone.num_classes is None
    if name == "repvit_m1":
        with torch.no_grad():
            assert clf(torch.rand(2, 3, 64, 64)).shape == (2, C)


def test_torchvision_quantizable_models_are_read_by_family(seed: int) -> None:
    """torchvision.models.quantization's classes were not in the family table: with fc = Identity they were refused
    ("no nn.Linear layer") instead of read as feature extractors."""
    tq = pytest.importorskip("torchvision.models.quantization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tq.resnet18(weights=None, quantize=True, num_classes=C).eval()
    x = torch.rand(2, 3, 32, 32)
    clf = wrap(model, make_head(512, make_store(512)))
    assert clf.backbone.family == "torchvision" and clf.backbone.num_classes == C
    model.fc = nn.Identity()
    headless = wrap(model, make_head(512, make_store(512)))
    assert headless.backbone.headless
    with torch.no_grad():
        assert headless(x).shape == (2, C)


def test_a_fused_linear_batchnorm_classifier_is_not_headless(seed: int) -> None:
    """Fusing fc = (Linear, BatchNorm1d) for quantization leaves (Linear, Identity): still a classifier, not a
    feature extractor whose 'embedding' would be the logits (review, 22 Nov)."""
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18()
    model.fc = nn.Sequential(nn.Linear(512, C), nn.BatchNorm1d(C))
    model.eval()
    fused = torch.ao.quantization.fuse_modules(model, [["fc.0", "fc.1"]])
    assert isinstance(fused.fc[1], nn.Identity)
    clf = wrap(fused, make_head(512, make_store(512)))
    assert not getattr(clf.backbone, "headless", False) and clf.backbone.classifier_name == "fc.0"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), fused(x))


def test_headless_timm_host_refuses_train_classifier(seed: int) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    with pytest.raises(RetrofitError, match="train_classifier=True, but the timm adapter .* has no classifier"):
        wrap(model, make_head(model.num_features, make_store(model.num_features)), train_classifier=True)


@pytest.mark.parametrize("case", ["mobilenet_v3 classifier[-1]", "convnext classifier[-1]", "convnext classifier"])
def test_torchvision_feature_extractors_made_by_replacing_the_last_layer(case: str, seed: int) -> None:
    """``classifier[-1] = nn.Identity()`` leaves hidden layers: mobilenet_v3's hidden Linear was taken as the
    classifier (its 1024 outputs read as logits); convnext with ``classifier[-1]`` or ``classifier`` replaced was
    refused. They are headless hosts: the model's output is the embedding."""
    tv = pytest.importorskip("torchvision")
    if case.startswith("mobilenet"):
        model, d = tv.models.mobilenet_v3_small(num_classes=C), 1024
        model.classifier[-1] = nn.Identity()
    else:
        model, d = tv.models.convnext_tiny(num_classes=C), 768
        if case.endswith("[-1]"):
            model.classifier[-1] = nn.Identity()
        else:
            model.classifier = nn.Identity()
    model.eval()
    clf = wrap(model, make_head(d, make_store(d)))
    assert clf.backbone.headless and clf.backbone.num_classes is None
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z, host = clf.features(x)
        assert host is None
        torch.testing.assert_close(z, model(x).flatten(1))
        assert clf(x).shape == (2, C)


def test_hosts_calling_their_classifier_by_keyword_or_squeezing_a_batch_of_one(seed: int) -> None:
    """``self.fc(input=f)`` gave IndexError inside the hook; ``f.squeeze()`` before fc, fine for the host with a
    batch of one, gave IndexError in retrofit."""

    class Keyword(SmallNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(input=torch.relu(self.hidden(self.trunk(x))))

    class Squeezes(SmallNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = nn.functional.adaptive_avg_pool2d(self.trunk[:3](x), 1).squeeze()  # (B, 8), or (8,) for B = 1
            return self.out(torch.relu(self.hidden(f)))

    for cls in (Keyword, Squeezes):
        model = cls().eval()
        clf = wrap(model, make_head(12, make_store(12)))
        for b in (2, 1):
            x = torch.rand(b, 3, 16, 16)
            with torch.no_grad():
                z, logits = clf.features(x)
                assert z.shape == (b, 12) and logits.shape == (b, C)
                torch.testing.assert_close(clf(x), model(x).reshape(b, C))


def test_lazy_host_and_logits_of_shape_b_c_1_1(seed: int, caplog) -> None:
    """An nn.LazyLinear classifier before its first call: "gives 0-d embeddings ... query_dim=0", then a raw error;
    a host returning its logits as (B, C, 1, 1) warned that it transforms them."""
    lazy = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(12), nn.ReLU(),
                         nn.Linear(12, C))
    with pytest.raises(RetrofitError, match=r"parameters not yet initialised \(3.weight.*run the model once"):
        wrap(lazy, make_head(12, make_store(12)), classifier="5")

    class Shaped(SmallNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[:, :, None, None]

    with caplog.at_level(logging.WARNING), torch.no_grad():
        model = Shaped().eval()
        x = torch.rand(2, 3, 16, 16)
        torch.testing.assert_close(wrap(model, make_head(12, make_store(12)))(x), model(x).flatten(1))
    assert "transforms its classifier's output" not in caplog.text


def test_a_host_shared_by_two_wrappers_with_other_train_classifier_warns(seed: int, caplog) -> None:
    """``wrap(m, h1, train_classifier=True)`` then ``wrap(m, h2)`` froze the classifier the first model trains (the
    flag lives on the shared host's parameters), silently. It warns now (a first version refused, which a review
    showed refusing spuriously: a re-wrap in a loop, a wrapper kept alive by a traceback); copies count too; a
    quantized classifier cannot be trained and says so."""
    import copy
    import gc

    model = SmallNet().eval()
    with caplog.at_level(logging.WARNING):
        first = wrap(model, make_head(12, make_store(12)), train_classifier=True)
        same = wrap(model, make_head(12, make_store(12)), train_classifier=True)  # the same setting: quiet
        assert "also wrapped" not in caplog.text and same.train_classifier
        frozen = wrap(model, make_head(12, make_store(12)))
        assert "also wrapped by another RetrofittedModel with train_classifier=True: this wrap freezes" in caplog.text
        assert not model.out.weight.requires_grad and not frozen.train_classifier
        del first, same, frozen
        gc.collect()
        caplog.clear()
        twin = copy.deepcopy(wrap(model, make_head(12, make_store(12)), train_classifier=True))
        gc.collect()
        wrap(twin.backbone.model, make_head(12, make_store(12)))  # the copy's own host
        assert "this wrap freezes" in caplog.text
    q = _quantize_dynamic(SmallNet().eval())
    with pytest.raises(RetrofitError, match="has no trainable parameters \\(a quantized layer\\?\\)"):
        wrap(q, make_head(12, make_store(12)), train_classifier=True)
    with caplog.at_level(logging.WARNING):  # a refused wrap registered nothing: the next one is quiet
        caplog.clear()
        wrap(q, make_head(12, make_store(12)))
        assert "also wrapped" not in caplog.text


def test_the_wrapped_model_takes_the_heads_mode(seed: int, tmp_path) -> None:
    """wrap() left the new model in train mode and switched an eval head back to training: a loaded head with
    dropout gave different logits on each call of ``clf(images)``. A loaded head is in eval mode, and the wrapped
    model follows its head."""
    model = SmallNet().eval()
    head = make_head(12, make_store(12), dropout=0.5)
    with torch.no_grad():  # a trained-looking head (a fresh one adds exactly zero, dropout or not)
        for p in head.parameters():
            p.normal_(0, 0.5)
    fresh = wrap(model, head)
    assert fresh.training  # a fresh head: ready to train
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(fresh(x), fresh(x))  # dropout on: what a loaded head did when served
    head.save(tmp_path / "h")
    loaded = RetrievalHead.load(tmp_path / "h", store=make_store(12))
    assert not loaded.training
    clf = wrap(SmallNet().eval(), loaded)
    assert not clf.training and not clf.head.training
    with torch.no_grad():
        torch.testing.assert_close(clf(x), clf(x), rtol=0, atol=0)
    clf.train()
    assert clf.head.training and not clf.backbone.training


def test_tracing_or_exporting_a_model_that_searches_a_knowledge_base_is_refused(seed: int, tmp_path) -> None:
    """jit.trace baked the neighbours found for the example input into the graph as constants (a traced model gave
    other logits than the eager one for new images); torch.export failed with GuardOnDataDependentSymNode."""
    from retrofit.knowledge_base import KnowledgeBase

    g = torch.Generator().manual_seed(0)
    kb = KnowledgeBase.create(tmp_path / "kb", 12, 8, 6)
    kb.add(nn.functional.normalize(torch.randn(40, 12, generator=g), dim=1), torch.randn(40, 8, generator=g),
           torch.randn(40, 6, generator=g), labels=torch.randint(0, C, (40,), generator=g))
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(RetrofitError, match="torch.export cannot hold a knowledge-base search"):
        # a fresh wrap (never called eagerly): its one-time check of the host's output compared values inside
        # the export (torch's DataDependentOutputException on aten.equal instead of this error)
        torch.export.export(wrap(SmallNet().eval(), make_head(12, kb)).eval(), (x,))
    clf = wrap(SmallNet().eval(), make_head(12, kb)).eval()
    with warnings.catch_warnings(), pytest.raises(RetrofitError, match="torch.jit.trace would record the neighbours"):
        warnings.simplefilter("ignore")
        torch.jit.trace(clf, x)
    with pytest.raises(RetrofitError, match="torch.export cannot hold a knowledge-base search"):
        torch.export.export(clf, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(clf.backbone, x, check_trace=False)  # the route the errors name
    with torch.no_grad():
        z, host = traced(x)
        torch.testing.assert_close(clf.head(z, host, neighbors=kb.search(z, 4)).logits, clf(x))
    kb.close()


def test_a_generic_adapter_hooks_the_classifier_of_the_model_it_holds(seed: int) -> None:
    """The adapter kept the classifier module it was built with and hooked it at every forward; nn.DataParallel's
    replicas (and a model whose classifier is replaced after wrapping) run another module, so the hook never fired
    ("ran 0 times"). It now looks the layer up by name in the model it holds."""
    import copy

    torch.manual_seed(seed)
    model = SmallNet().eval()
    clf = wrap(model, make_head(12, make_store(12))).eval()
    x = torch.rand(2, 3, 16, 16)
    replica = copy.deepcopy(model)  # a replica: same structure, other modules (what DataParallel hands each device)
    with torch.no_grad():
        replica.out.weight.mul_(2.0)
        clf.backbone.model = replica
        z, logits = clf.backbone(x)
        torch.testing.assert_close(logits, replica(x))
        torch.testing.assert_close(z, torch.relu(replica.hidden(replica.trunk(x))))
        model.out = nn.Linear(12, C)  # a classifier replaced after wrapping: its new layer is the one read
        clf.backbone.model = model
        torch.testing.assert_close(clf.backbone(x)[1], model(x))
    assert clf.backbone.classifier is model.out
    with pytest.raises(ValueError, match="classifier_name='hidden' does not name the classifier"):
        type(clf.backbone)(model, model.out, "hidden")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nn.DataParallel needs two GPUs")
def test_data_parallel_around_a_wrapped_generic_host(seed: int) -> None:
    torch.manual_seed(seed)
    model = SmallNet().eval().cuda()
    clf = wrap(model, make_head(12, make_store(12)).cuda()).eval()
    x = torch.rand(8, 3, 16, 16, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(nn.DataParallel(clf)(x), clf(x))


def test_the_wrapper_remembers_checked_knowledge_bases_by_weak_reference(seed: int) -> None:
    """The wrapper remembered the last checked KB by id(): a foreign KB allocated at a freed KB's address would
    skip the fingerprint check (CPython reuses addresses, though not on cue: no test can force it). It now holds
    a weak reference: it keeps no KB alive, and a freed KB matches no other."""
    import gc
    import weakref

    from retrofit.adapters.retrofitted import _LastStore
    from retrofit.errors import FingerprintMismatchError
    from retrofit.fingerprint import EncoderFingerprint
    from retrofit.store import InMemoryStore, KBFingerprint

    torch.manual_seed(seed)
    mine = EncoderFingerprint("generic", "smallnet", "random", 12)
    theirs = make_store(12, fingerprint=KBFingerprint(key=EncoderFingerprint("timm", "resnet50", "a1_in1k", 12)))
    clf = wrap(SmallNet().eval(), make_head(12, make_store(12, fingerprint=KBFingerprint(key=mine))),
               fingerprint=mine).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        clf(x)  # checks (and remembers) the attached KB
    checked = weakref.ref(clf.head.detach_store())
    gc.collect()
    assert checked() is None  # the wrapper's memory of it did not keep it alive
    clf.head.attach(theirs, allow_fingerprint_mismatch=True)  # the head lets it through; the wrapper must not
    with torch.no_grad(), pytest.raises(FingerprintMismatchError, match="resnet50"):
        clf(x)
    memory = _LastStore()
    memory.set(InMemoryStore(12, 8, 6))  # freed at once
    assert not memory.is_(InMemoryStore(12, 8, 6)) and not memory.is_(None)
    memory.set(theirs)
    assert memory.is_(theirs) and not memory.is_(make_store(12))


def test_a_copied_or_pickled_wrapper_checks_its_knowledge_base_again(seed: int, caplog) -> None:
    import pickle

    torch.manual_seed(seed)
    clf = wrap(SmallNet().eval(), make_head(12, make_store(12))).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        y = clf(x)
        back = pickle.loads(pickle.dumps(clf))
        torch.testing.assert_close(back(x), y)
    assert not back._checked_store.is_(clf.head.store) and back._checked_store.is_(back.head.store)
