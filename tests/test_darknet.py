"""Tiny Darknet loaded from the real TensorFlow.js files: structure, an independent reference pass, real photos."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retrofit.errors import RetrofitError
from retrofit.models import darknet_tiny
from retrofit.models.darknet import _layers, _read_weights

CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}


@pytest.fixture(scope="module")
def model(data_dir: Path):
    if not (data_dir / "darknet-tiny" / "model.json").is_file():
        pytest.skip("darknet-tiny/ not in the data directory")
    return darknet_tiny(data_dir=data_dir)


def _reference_logits(d: Path, x: torch.Tensor) -> torch.Tensor:
    """Layer-by-layer from model.json with unfolded batch norm and explicit Keras 'same' padding, in float64."""
    spec = json.loads((d / "model.json").read_text())
    w, _ = _read_weights(d, spec["weightsManifest"])
    t = lambda a: torch.from_numpy(a).double()
    h = x.double()
    for lay in _layers(spec["modelTopology"]):
        c, name = lay["config"], lay["config"]["name"]
        if lay["class_name"] == "Conv2D":
            k = c["kernel_size"][0]
            h = F.pad(h, [(k - 1) // 2, k // 2, (k - 1) // 2, k // 2])
            b = t(w[f"{name}/bias"]) if c["use_bias"] else None
            h = F.conv2d(h, t(w[f"{name}/kernel"]).permute(3, 2, 0, 1), b)
        elif lay["class_name"] == "BatchNormalization":
            h = F.batch_norm(h, t(w[f"{name}/moving_mean"]), t(w[f"{name}/moving_variance"]), t(w[f"{name}/gamma"]),
                             t(w[f"{name}/beta"]), training=False, eps=c["epsilon"])
        elif lay["class_name"] == "LeakyReLU":
            h = F.leaky_relu(h, c["alpha"])
        elif lay["class_name"] == "MaxPooling2D":
            p = c["pool_size"][0]
            ph, pw = (-h.shape[2]) % p, (-h.shape[3]) % p
            h = F.max_pool2d(F.pad(h, [0, pw, 0, ph], value=float("-inf")), p, p)
        elif lay["class_name"] == "GlobalAveragePooling2D":
            h = h.mean(dim=(2, 3))
    return h


def test_structure_and_fingerprint(model) -> None:
    assert model.num_features == 512 and model.num_classes == 1000 and model.default_input_size == 64
    assert len(model.class_names) == 1000 and model.class_names[0] == "kit fox"
    assert model.synsets is not None and model.synsets[0] == "n02119789"
    fc = model.get_classifier()
    assert isinstance(fc, torch.nn.Linear) and fc.out_features == 1000
    fp = model.fingerprint
    assert fp.family == "darknet-tiny" and fp.dim == 512 and fp.weights.startswith("sha256:")
    assert not model.training


def test_matches_independent_reference(model, data_dir: Path, seed: int) -> None:
    # odd sizes exercise Keras "same" max pooling (bottom/right padding)
    x = torch.rand(2, 3, 37, 50)
    with torch.inference_mode():
        got = model(x)
        f = model.forward_features(x)
    ref = _reference_logits(data_dir / "darknet-tiny", x)
    assert f.shape == (2, 512, 3, 4)  # ceil(37/16), ceil(50/16)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_timm_contract_one_pass(model, seed: int) -> None:
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        f = model.forward_features(x)
        z = model.forward_head(f, pre_logits=True)
        logits = model.forward_head(f)
        z2, logits2 = model.embed_and_logits(x)
        # the final 1x1 conv then pooling equals pooling then the Linear classifier
        h = model.head_block(f)
        fc = model.get_classifier()
        conv_then_pool = F.conv2d(h, fc.weight[:, :, None, None], fc.bias).mean(dim=(2, 3))
    assert z.shape == (3, 512) and logits.shape == (3, 1000)
    torch.testing.assert_close(z, f.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close((z2, logits2), (z, logits))
    torch.testing.assert_close(conv_then_pool, logits, rtol=1e-5, atol=1e-5)


def _top5(model, image, size: int) -> list[str]:
    x = model.preprocess(size)(image)[None]
    with torch.inference_mode():
        return [model.class_names[i] for i in model(x)[0].topk(5).indices.tolist()]


def test_classifies_real_photos(model) -> None:
    pytest.importorskip("skimage")
    from PIL import Image
    from skimage import data

    cat, coffee = Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())
    top = _top5(model, cat, 224)
    assert top[0] in CATS and len(CATS & set(top)) >= 3, top
    assert _top5(model, cat, 64)[0] in CATS
    top = _top5(model, coffee, 224)
    assert top[0] == "espresso" and {"cup", "coffee mug"} & set(top), top


def test_preprocess_is_picklable_and_in_unit_range(model) -> None:
    from PIL import Image

    tf = pickle.loads(pickle.dumps(model.preprocess()))
    x = tf(Image.new("RGB", (40, 30), (255, 0, 128)))
    assert x.shape == (3, 64, 64) and float(x.max()) == 1.0 and float(x.min()) == 0.0


def test_random_weights_change_fingerprint(data_dir: Path, model, seed: int) -> None:
    rnd = darknet_tiny(pretrained=False, data_dir=data_dir)
    assert rnd.fingerprint.weights == "random" and not rnd.fingerprint.matches(model.fingerprint)
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        assert not torch.allclose(rnd(x), model(x))


def test_missing_files_say_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RetrofitError, match="RETROFIT_DATA_DIR"):
        darknet_tiny(data_dir=tmp_path)
    monkeypatch.setenv("RETROFIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RETROFIT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RetrofitError, match="RETROFIT_DATA_DIR"):
        darknet_tiny(download=False)


def test_large_cpu_batches_run_in_slices_with_the_same_outputs(model, seed: int) -> None:
    """forward_features runs a large CPU batch in slices (cache-sized; ~1.7x faster at 64 px): bitwise the same
    features as one pass (each image alone); in training mode BatchNorm's batch statistics need the whole batch."""
    import retrofit.models.darknet as dk

    x = torch.rand(70, 3, 64, 64)
    with torch.inference_mode():
        sliced = model.forward_features(x)  # 70 > 64 images per slice: two slices
        whole = model.features(x.contiguous(memory_format=torch.channels_last))
        lone = torch.rand(129, 3, 64, 64)  # 64 + 64 + 1: the lone image joins the last slice (its bits differed)
        assert torch.equal(model.forward_features(lone), model.features(lone.contiguous(
            memory_format=torch.channels_last)))
    assert torch.equal(sliced, whole) and x.shape[0] > dk._CPU_SLICE_PIXELS // (64 * 64)
    with torch.no_grad():  # traced at 70 images, run at 10: the trace must not bake the slicing in (it failed)
        class Features(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, t: torch.Tensor) -> torch.Tensor:
                return self.model.forward_features(t)

        traced = torch.jit.trace(Features(), x, check_trace=False)
        assert torch.allclose(traced(x[:10]), whole[:10], atol=1e-5)
    calls = []
    hook = model.features.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with torch.inference_mode():
            model.forward_features(x)
        assert calls == [64, 6]
    finally:
        hook.remove()
    import copy

    training = copy.deepcopy(model).train()  # (a copy: a training-mode pass updates BatchNorm's running stats)
    training.features.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    calls.clear()
    with torch.no_grad():
        training.forward_features(x[:66])
    assert calls == [66]
