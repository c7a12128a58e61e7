"""Adapter for models that follow timm's contract (``forward_features``, ``forward_head``, ``get_classifier``).

Besides timm's own models this covers retrofit's ``DarknetTiny``. One call of ``forward_features``
(the backbone) feeds both ``forward_head(f, pre_logits=True)`` (the embedding) and
``forward_head(f)`` (the logits), so the host logits are bit-for-bit what ``model(x)`` returns and
only the cheap pooling / norm part of the head runs twice.
"""

from __future__ import annotations

from torch import Tensor, nn

from retrofit.adapters.base import BackboneAdapter, holds_weights
from retrofit.errors import RetrofitError

__all__ = ["TimmAdapter", "is_timm_like"]


def is_timm_like(model: nn.Module) -> bool:
    """True when ``model`` has timm's ``forward_features`` / ``forward_head`` / ``get_classifier``."""
    return all(callable(getattr(model, n, None)) for n in ("forward_features", "forward_head", "get_classifier"))


def _as_modules(clf: object) -> list[nn.Module]:
    if isinstance(clf, nn.Module):
        return [clf]
    if isinstance(clf, (tuple, list)):  # e.g. distilled models: (head, head_dist)
        return [c for c in clf if isinstance(c, nn.Module)]
    return []


def _classifier(model: nn.Module) -> list[nn.Module]:
    """``model.get_classifier()`` as a list of modules; [] when it fails (timm's efficientvit_m* / shvit with
    num_classes=0 raise AttributeError there: their emptied head has no such layer)."""
    try:
        return _as_modules(model.get_classifier())
    except AttributeError:
        return []


def _width(layer: nn.Module, side: str) -> object:
    """A Linear's ``{side}_features`` or a conv's ``{side}_channels`` (side: "in" / "out"); None for other layers."""
    return getattr(layer, f"{side}_features", getattr(layer, f"{side}_channels", None))


class TimmAdapter(BackboneAdapter):
    """``(forward_head(f, pre_logits=True), forward_head(f))`` with ``f = forward_features(x)``."""

    family = "timm"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        mods = _classifier(model)
        # a headless timm model (num_classes=0) has an empty classifier (Identity, pooling, ...): no host logits.
        # Not judged by parameters alone: a quantized Linear, or a nearest-class-mean layer holding buffers, has none
        self.headless = not any(holds_weights(m) for m in mods)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        f = self.model.forward_features(x)  # the backbone, once
        z = self.model.forward_head(f, pre_logits=True)  # (B, D)
        if z.dim() != 2:
            raise RetrofitError(f"{type(self.model).__name__}'s pre-logits features have shape {tuple(z.shape)}, not "
                                "(B, D): it does not pool (timm global_pool=''); create it with global_pool='avg' "
                                "(or 'token'), or model.reset_classifier(num_classes, 'avg')")
        logits = None if self.headless else self.model.forward_head(f)  # (B, C)
        return z, logits

    def classifier_modules(self) -> list[nn.Module]:
        return [] if self.headless else _classifier(self.model)

    @property
    def num_classes(self) -> int | None:
        if self.headless:
            return None
        for m in self.classifier_modules():  # the layer itself: a classifier replaced by hand leaves num_classes stale
            layers = [c for c in m.modules() if isinstance(_width(c, "out"), int)]
            if layers:
                # a replaced MLP: the output layer's width is the one no other layer takes in (its registration
                # order says nothing); when that is ambiguous, the head checks the logits' width on the first call
                ins = {_width(c, "in") for c in layers}
                outs = {_width(c, "out") for c in layers if len(layers) == 1 or _width(c, "out") not in ins}
                return outs.pop() if len(outs) == 1 and min(outs) > 0 else None
        n = getattr(self.model, "num_classes", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @property
    def embed_dim(self) -> int | None:
        # timm >= 1.0: head_hidden_size is the pre-logits width when a head has a hidden layer
        for attr in ("head_hidden_size", "num_features"):
            v = getattr(self.model, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        return None
