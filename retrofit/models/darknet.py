"""Tiny Darknet: the real ImageNet-1k pretrained classifier, loaded from its TensorFlow.js Keras layers files.

The files (``model.json`` + float32 weight shards + Darknet's class lists) live in
``$RETROFIT_DATA_DIR/darknet-tiny/``; elsewhere they are downloaded once from their public source
(ml5js/ml5-data-and-models, pjreddie/darknet) into ``~/.cache/retrofit/darknet-tiny``.

The network (16 convolutions with batch norm and leaky ReLU, 4 max pools, a final 1x1 convolution to
1000 classes and global average pooling) is rebuilt in NCHW PyTorch. Batch norm is folded into the
convolutions at load time (exact up to float rounding) so inference is one conv + leaky ReLU per block.

It follows timm's contract: ``forward_features(x)`` is the 512-channel map of the last 512-wide
convolution; ``forward_head(f, pre_logits=True)`` its global average (the 512-d embedding), else the
1000 logits (the 1x1 conv 512->128 block, global average pooling, then the final 1x1 conv as an
``nn.Linear``: a 1x1 conv followed by global average pooling equals pooling followed by the linear map).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.fingerprint import EncoderFingerprint

__all__ = ["DarknetTiny", "darknet_tiny", "DARKNET_FILES_URL"]

log = logging.getLogger(__name__)

# public sources of the files, used only when no local copy exists
DARKNET_FILES_URL = "https://raw.githubusercontent.com/ml5js/ml5-data-and-models/main/models/darknetclassifier/darknettiny/"
_CLASS_LIST_URLS = {
    "imagenet1k_darknet_shortnames.txt": "https://raw.githubusercontent.com/pjreddie/darknet/master/data/imagenet.shortnames.list",
    "imagenet1k_darknet_synsets.txt": "https://raw.githubusercontent.com/pjreddie/darknet/master/data/imagenet.labels.list",
}
_SUBDIR = "darknet-tiny"
_CPU_SLICE_PIXELS = 64 * 64 * 64  # forward_features on CPU: input pixels per slice of a batch
_SUPPORTED = ("InputLayer", "Conv2D", "BatchNormalization", "LeakyReLU", "MaxPooling2D", "GlobalAveragePooling2D")


class _ConvBlock(nn.Module):
    """Conv (batch norm folded in, so with bias) + leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, alpha: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=True)
        self.act = nn.LeakyReLU(alpha, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class DarknetTiny(nn.Module):
    """Tiny Darknet in NCHW with timm's classifier contract. Input: RGB in [0, 1], (B, 3, H, W), any H, W >= 1."""

    def __init__(self, features: nn.Sequential, head_block: nn.Module, fc: nn.Linear, class_names: list[str],
                 fingerprint: EncoderFingerprint | None = None, synsets: list[str] | None = None) -> None:
        super().__init__()
        self.features = features
        self.head_block = head_block  # (B, 512, h, w) -> (B, 128, h, w)
        self.fc = fc  # final 1x1 conv as a linear map on the pooled 128-d vector
        self.num_features = 512  # width of the pre-logits embedding (timm's attribute)
        self.class_names = list(class_names)  # Darknet's order (None once the classifier has other classes)
        self.synsets = list(synsets) if synsets is not None else None  # WordNet ids, Darknet's order
        self.default_input_size = 64
        self.pretrained_cfg = {"input_size": (3, 224, 224), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
        self.fingerprint = fingerprint

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 512, H/16, W/16) feature map (rounded up).

        Runs in channels_last memory format (about 2x faster on CPU than NCHW-contiguous). On CPU a large batch runs
        in slices of about 256K input pixels each (64 images at 64 px): the early blocks' activations then stay in
        the CPU cache instead of streaming 67 MB tensors through memory (model alone at 64 px, batch 256: ~1.7x;
        a KB build's image encoding ~1.3x), with bitwise the same outputs (slices of two images or more; a lone last
        image joins the slice before it). In training mode, and while traced, exported or compiled, the batch runs
        whole (BatchNorm's batch statistics; a graph with no batch size baked in).
        """
        x = x.contiguous(memory_format=torch.channels_last)
        graph = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
        # (training: BatchNorm's batch statistics; traced / exported / compiled: a slice count read from the batch
        # size would fix the batch size in the graph)
        if graph or self.training or x.device.type != "cpu":
            return self.features(x)
        per = max(1, _CPU_SLICE_PIXELS // max(1, x.shape[-2] * x.shape[-1]))
        if x.shape[0] <= per:
            return self.features(x)
        sizes = [per] * (x.shape[0] // per) + ([x.shape[0] % per] if x.shape[0] % per else [])
        if sizes[-1] == 1:  # a lone image convolves by another kernel path (last bits differ): keep it in company
            sizes[-2:] = [sizes[-2] + 1]
        return torch.cat([self.features(part) for part in x.split(sizes)])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> 512-d pooled embedding (``pre_logits``) or the 1000 logits."""
        if pre_logits:
            return x.mean(dim=(2, 3))  # (B, 512)
        h = self.head_block(x).mean(dim=(2, 3))  # (B, 128)
        return self.fc(h)  # (B, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    @property
    def num_classes(self) -> int:
        """Outputs of the current classifier (``self.fc`` may have been replaced for the user's classes)."""
        return int(self.fc.out_features)

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classifier's classes: ImageNet's for Darknet's own; None once ``fc`` has other classes
        (unless set)."""
        return self._class_names if len(self._class_names) == self.num_classes else None

    @class_names.setter
    def class_names(self, names: list[str] | None) -> None:
        self._class_names = list(names) if names is not None else []

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh linear classifier for ``num_classes`` classes on the 128-d pooled head (timm's API)."""
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.fc = nn.Linear(self.fc.in_features, num_classes)
        self._class_names = []

    def embed_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: ((B, 512) embedding, (B, 1000) logits)."""
        f = self.forward_features(x)
        return self.forward_head(f, pre_logits=True), self.forward_head(f)

    def preprocess(self, size: int | None = None) -> Any:
        """A picklable PIL -> (3, size, size) tensor transform: resize the short side, centre crop, [0, 1]."""
        from torchvision import transforms

        return transforms.Compose([*self.pixels(size).transforms[:-1], transforms.ToTensor()])

    def pixels(self, size: int | None = None) -> Any:
        """:meth:`preprocess` up to the uint8 pixels (3, size, size), before ToTensor's scaling to [0, 1]."""
        from torchvision import transforms

        s = int(size or self.default_input_size)
        return transforms.Compose([
            transforms.Resize(s, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(s),
            transforms.PILToTensor(),
        ])


def _find_files(data_dir: str | Path | None, download: bool) -> Path:
    """The directory holding ``model.json`` and the class lists."""
    if data_dir is not None:
        d = Path(data_dir)
        d = d / _SUBDIR if (d / _SUBDIR / "model.json").is_file() else d
        if not (d / "model.json").is_file():
            raise RetrofitError(
                f"Tiny Darknet files not found in {Path(data_dir)} (looked for {_SUBDIR}/model.json and model.json). "
                "Pass the data directory that holds darknet-tiny/, or set RETROFIT_DATA_DIR and leave data_dir=None."
            )
        return d
    from retrofit._env import data_dir as find_data_dir

    root = find_data_dir()
    if root is not None and (root / _SUBDIR / "model.json").is_file():
        return root / _SUBDIR
    cache = Path(os.environ.get("RETROFIT_CACHE_DIR", Path.home() / ".cache" / "retrofit")) / _SUBDIR
    if (cache / "model.json").is_file() and all((cache / n).is_file() for n in _CLASS_LIST_URLS):
        return cache
    where = f"RETROFIT_DATA_DIR={os.environ['RETROFIT_DATA_DIR']}" if "RETROFIT_DATA_DIR" in os.environ else (
        "RETROFIT_DATA_DIR is not set")
    if not download:
        raise RetrofitError(f"Tiny Darknet weights not found ({where}; no copy in {cache}). Set RETROFIT_DATA_DIR "
                            "to the directory that holds darknet-tiny/, or pass download=True.")
    try:
        _download(cache)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise RetrofitError(
            f"Tiny Darknet weights not found ({where}; no copy in {cache}) and the download from "
            f"{DARKNET_FILES_URL} failed ({e}). Set RETROFIT_DATA_DIR to the directory that holds darknet-tiny/."
        ) from e
    return cache


def _fetch(url: str, dest: Path, timeout: float = 10.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data = r.read()
    tmp = dest.with_suffix(dest.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)


def _download(dest: Path) -> None:
    """Fetch model.json, its shards and Darknet's class lists into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading Tiny Darknet from %s to %s", DARKNET_FILES_URL, dest)
    _fetch(DARKNET_FILES_URL + "model.json", dest / "model.json")
    manifest = json.loads((dest / "model.json").read_text())["weightsManifest"]
    for group in manifest:
        for p in group["paths"]:
            _fetch(DARKNET_FILES_URL + p, dest / p)
    for name, url in _CLASS_LIST_URLS.items():
        _fetch(url, dest / name)


def _read_weights(d: Path, manifest: list[dict]) -> tuple[dict[str, np.ndarray], str]:
    """All weight arrays by name, and ``sha256:<16 hex>`` of the shard bytes in manifest order."""
    h = hashlib.sha256()
    out: dict[str, np.ndarray] = {}
    for group in manifest:
        buf = b"".join((d / p).read_bytes() for p in group["paths"])
        h.update(buf)
        off = 0
        for w in group["weights"]:
            if w.get("dtype", "float32") != "float32" or "quantization" in w:
                raise RetrofitError(f"unsupported weight encoding for {w['name']}: dtype {w.get('dtype')}, "
                                    f"quantization {w.get('quantization')}; only plain float32 is supported")
            n = int(np.prod(w["shape"])) if w["shape"] else 1
            arr = np.frombuffer(buf, dtype="<f4", count=n, offset=off).reshape(w["shape"])
            out[w["name"]] = arr.copy()
            off += 4 * n
        if off != len(buf):
            raise RetrofitError(f"weight shards {group['paths']} hold {len(buf)} bytes, the manifest describes {off}")
    return out, "sha256:" + h.hexdigest()[:16]


def _layers(topology: dict) -> list[dict]:
    cfg = topology.get("model_config", topology)
    layers = cfg["config"]["layers"] if isinstance(cfg["config"], dict) else cfg["config"]
    names = [lay["config"]["name"] for lay in layers]
    for i, lay in enumerate(layers[1:], 1):  # check the graph is a plain chain
        inbound = lay.get("inbound_nodes") or [[[names[i - 1]]]]
        if len(inbound) != 1 or len(inbound[0]) != 1 or inbound[0][0][0] != names[i - 1]:
            raise RetrofitError(f"layer {names[i]} is not fed by the previous layer only; only chains are supported")
    return layers


def _fold_bn(kernel: np.ndarray, bn: dict[str, np.ndarray], eps: float, bias: np.ndarray | None):
    """Keras kernel (H, W, in, out) + batch norm -> torch weight (out, in, H, W) and bias (out,)."""
    w = torch.from_numpy(kernel).permute(3, 2, 0, 1).double()  # (out, in, H, W)
    b = torch.from_numpy(bias).double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is None:
        return w.float(), b.float()
    scale = torch.from_numpy(bn["gamma"]).double() / torch.sqrt(torch.from_numpy(bn["moving_variance"]).double() + eps)
    w = w * scale[:, None, None, None]
    b = (b - torch.from_numpy(bn["moving_mean"]).double()) * scale + torch.from_numpy(bn["beta"]).double()
    return w.float(), b.float()


def _build(d: Path) -> DarknetTiny:
    spec = json.loads((d / "model.json").read_text())
    weights, digest = _read_weights(d, spec["weightsManifest"])
    layers = _layers(spec["modelTopology"])
    blocks: list[nn.Module] = []  # conv blocks and pools in order
    widths: list[int] = []  # output channels after each entry of ``blocks``
    channels, final = 3, None
    i = 0
    while i < len(layers):
        cls, cfg = layers[i]["class_name"], layers[i]["config"]
        if cls not in _SUPPORTED:
            raise RetrofitError(f"unsupported Keras layer {cls} ({cfg.get('name')}); supported: {list(_SUPPORTED)}")
        if cls == "Conv2D":
            k, s, dil = cfg["kernel_size"], cfg["strides"], cfg.get("dilation_rate", [1, 1])
            if k[0] != k[1] or k[0] % 2 != 1 or list(s) != [1, 1] or list(dil) != [1, 1] or cfg["padding"] != "same":
                raise RetrofitError(
                    f"unsupported conv {cfg['name']}: kernel {k}, strides {s}, padding {cfg['padding']}")
            if cfg.get("activation", "linear") != "linear":
                raise RetrofitError(f"unsupported fused activation {cfg['activation']} in {cfg['name']}")
            kernel = weights[f"{cfg['name']}/kernel"]
            bias = weights.get(f"{cfg['name']}/bias") if cfg.get("use_bias") else None
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            bn, eps = None, 0.0
            if nxt is not None and nxt["class_name"] == "BatchNormalization":
                bc = nxt["config"]
                eps = float(bc["epsilon"])
                bn = {p: weights[f"{bc['name']}/{p}"] for p in ("gamma", "beta", "moving_mean", "moving_variance")}
                i += 1
            w, b = _fold_bn(kernel, bn, eps, bias)
            act = layers[i + 1] if i + 1 < len(layers) else None
            if act is not None and act["class_name"] == "LeakyReLU":
                block = _ConvBlock(channels, w.shape[0], k[0], float(act["config"]["alpha"]))
                block.conv.weight.data.copy_(w)
                block.conv.bias.data.copy_(b)
                blocks.append(block)
                widths.append(w.shape[0])
                i += 1
            else:  # the final linear 1x1 conv to the classes
                if k[0] != 1 or i + 2 != len(layers) or layers[i + 1]["class_name"] != "GlobalAveragePooling2D":
                    raise RetrofitError(f"conv {cfg['name']} without activation must be the final 1x1 conv + pooling")
                final = nn.Linear(channels, w.shape[0])
                final.weight.data.copy_(w[:, :, 0, 0])
                final.bias.data.copy_(b)
            channels = w.shape[0]
        elif cls == "MaxPooling2D":
            if list(cfg["pool_size"]) != list(cfg["strides"]):
                raise RetrofitError(
                    f"unsupported pooling {cfg['name']}: pool {cfg['pool_size']} strides {cfg['strides']}")
            p = cfg["pool_size"][0]
            # Keras "same" pads bottom/right with -inf to ceil(H/s): ceil_mode does exactly that
            blocks.append(nn.MaxPool2d(p, p, ceil_mode=cfg["padding"] == "same"))
            widths.append(channels)
        elif cls == "BatchNormalization":
            raise RetrofitError(f"batch norm {cfg['name']} does not follow a convolution")
        i += 1
    if final is None:
        raise RetrofitError("no final 1x1 conv + global average pooling found in model.json")
    split = max(j for j, c in enumerate(widths) if c == 512) + 1  # after the last 512-wide block
    features, head_block = nn.Sequential(*blocks[:split]), nn.Sequential(*blocks[split:])
    if widths[-1] != final.in_features or any(isinstance(b, nn.MaxPool2d) for b in blocks[split:]):
        raise RetrofitError("unexpected Tiny Darknet layout after the last 512-channel block")
    names = (d / "imagenet1k_darknet_shortnames.txt").read_text().splitlines()
    synsets_file = d / "imagenet1k_darknet_synsets.txt"
    synsets = synsets_file.read_text().splitlines() if synsets_file.is_file() else None
    names = [n.strip() for n in names if n.strip()]
    if len(names) != final.out_features:
        raise RetrofitError(f"{len(names)} class names for {final.out_features} outputs in {d}")
    fp = EncoderFingerprint(family="darknet-tiny", name="darknet-tiny", weights=digest, dim=512, normalized=True,
                            note="global average of the last 512-channel map")
    return DarknetTiny(features, head_block, final, names, fingerprint=fp,
                       synsets=[s.strip() for s in synsets if s.strip()] if synsets else None)


def darknet_tiny(pretrained: bool = True, data_dir: str | Path | None = None, *, download: bool = True) -> DarknetTiny:
    """The ImageNet-1k Tiny Darknet, in eval mode.

    ``data_dir``: a directory holding ``darknet-tiny/`` (or the files themselves); default
    ``RETROFIT_DATA_DIR``, then the download cache. ``pretrained=False`` keeps the architecture (and
    class names) but re-initialises every weight at random (its fingerprint says ``random``).
    """
    model = _build(_find_files(data_dir, download))
    if not pretrained:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        fp = model.fingerprint
        model.fingerprint = EncoderFingerprint(fp.family, fp.name, "random", fp.dim, fp.normalized, fp.note)
    return model.to(memory_format=torch.channels_last).eval()
