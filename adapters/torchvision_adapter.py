"""torchvision classifiers: per-family knowledge of where the classifier layer lives.

The classifier is the last ``nn.Linear`` inside the family's head attribute (resnet ``fc``, vit
``heads``, swin ``head``, convnext / efficientnet / mobilenet / densenet / vgg / alexnet / maxvit
``classifier``, ...); the embedding is its input, captured by :class:`HookAdapter` in the one pass.
"""

from __future__ import annotations

from torch import Tensor, nn

from retrofit.adapters.base import PASS_THROUGH, BackboneAdapter, holds_weights
from retrofit.adapters.generic import HookAdapter, is_linear, linear_layers
from retrofit.errors import RetrofitError

__all__ = ["TorchvisionAdapter", "HeadlessTorchvisionAdapter", "TORCHVISION_HEADS", "is_torchvision", "is_headless"]

# torchvision model class -> attribute holding its classifier (the last nn.Linear inside it is used)
TORCHVISION_HEADS = {
    "ResNet": "fc",  # resnet, resnext, wide_resnet
    "RegNet": "fc",
    "GoogLeNet": "fc",
    "Inception3": "fc",
    "ShuffleNetV2": "fc",
    "VisionTransformer": "heads",
    "SwinTransformer": "head",
    "ConvNeXt": "classifier",
    "EfficientNet": "classifier",  # efficientnet and efficientnet_v2
    "MobileNetV2": "classifier",
    "MobileNetV3": "classifier",
    "DenseNet": "classifier",
    "VGG": "classifier",
    "AlexNet": "classifier",
    "MaxVit": "classifier",
    "MNASNet": "classifier",
    # torchvision.models.quantization (float or converted to int8)
    "QuantizableResNet": "fc",
    "QuantizableShuffleNetV2": "fc",
    "QuantizableGoogLeNet": "fc",
    "QuantizableInception3": "fc",
    "QuantizableMobileNetV2": "classifier",
    "QuantizableMobileNetV3": "classifier",
}


def is_torchvision(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models")


def is_headless(model: nn.Module) -> bool:
    """A torchvision model whose classifier was removed, the usual way to make a feature extractor: the classifier
    attribute replaced by a parameter-free module (``fc = nn.Identity()``), or the last layer of a ``Sequential``
    classifier replaced (``classifier[-1] = nn.Identity()``, which leaves hidden layers before it: mobilenet_v3,
    vgg, maxvit). Its output is then the embedding."""
    head = getattr(model, TORCHVISION_HEADS.get(type(model).__name__, ""), None)
    if not isinstance(head, nn.Module):
        return False
    if not holds_weights(head):  # (a quantized Linear has no nn.Parameter either, and it is a classifier)
        return True
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Identity):
        # the last layer replaced: what is left ends in a hidden layer's activation / norm. Not when a Linear still
        # ends it: fusing (Linear, BatchNorm1d) for quantization leaves (Linear, Identity), a classifier
        before = [m for m in list(head)[:-1] if not isinstance(m, PASS_THROUGH)]
        return bool(before) and not is_linear(before[-1])
    return False


class HeadlessTorchvisionAdapter(BackboneAdapter):
    """A torchvision feature extractor (classifier replaced by ``nn.Identity``): ``z = model(x)``, no host logits."""

    family = "torchvision"
    headless = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        z = self.model(x)
        if isinstance(z, Tensor) and z.dim() > 2 and all(n == 1 for n in z.shape[2:]):
            z = z.flatten(1)  # convnext with classifier = Identity: the pooled (B, D, 1, 1) map
        if not isinstance(z, Tensor) or z.dim() != 2:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise RetrofitError(f"torchvision {type(self.model).__name__} with its classifier replaced by "
                                f"{self._head_name()} returns {shape}, not (B, D) features; wrap a module that "
                                "returns the pooled embedding")
        return z, None

    def _head_name(self) -> str:
        attr = TORCHVISION_HEADS[type(self.model).__name__]
        return f"{attr} = {type(getattr(self.model, attr)).__name__}"

    def classifier_modules(self) -> list[nn.Module]:
        return []

    def describe(self) -> str:
        return f"torchvision adapter of {type(self.model).__name__} (headless: {self._head_name()})"


class TorchvisionAdapter(HookAdapter):
    """Hook adapter whose classifier layer comes from the model family, not from a search."""

    family = "torchvision"

    def __init__(self, model: nn.Module, num_classes: int | None = None) -> None:
        cls = type(model).__name__
        attr = TORCHVISION_HEADS.get(cls)
        if attr is None:
            raise KeyError(cls)
        head = getattr(model, attr)
        inside = linear_layers(head) if isinstance(head, nn.Module) else []
        if not inside:
            raise RetrofitError(
                f"torchvision {cls}.{attr} holds no nn.Linear ({type(head).__name__}); pass classifier='<name>' "
                f"naming the layer that produces the logits. nn.Linear layers of the model: "
                f"{[n for n, _ in linear_layers(model)] or 'none'}"
            )
        if num_classes is not None and len(inside) > 1 and inside[-1][1].out_features != num_classes:
            # a replaced head (e.g. fc = MLP registering its output layer first), or a wrong class count: say so
            # rather than guess (a hidden layer of C outputs would be read silently)
            fits = [f"{attr}.{n}" for n, m in inside if m.out_features == num_classes]
            raise RetrofitError(
                f"the last nn.Linear of torchvision {cls}.{attr} ({attr}.{inside[-1][0]}) gives "
                f"{inside[-1][1].out_features} outputs but the head has num_classes={num_classes}; "
                + (f"pass classifier='{fits[0]}' if that layer produces the logits" if fits else
                   "build the head with the model's class count")
                + f" (nn.Linear layers of {attr}: {[f'{attr}.{n}' for n, _ in inside]})")
        sub, lin = inside[-1]
        super().__init__(model, lin, f"{attr}.{sub}" if sub else attr)
