"""What every backbone adapter provides: one pass from images to (embedding z, host logits)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BackboneAdapter", "PASS_THROUGH", "holds_weights"]

# modules that pass features through unchanged (at inference)
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Flatten)


def holds_weights(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule holds weights: parameters, buffers (a nearest-class-mean layer's prototypes)
    or packed quantized weights (a quantized Linear has neither). A classifier without any is no classifier but an
    empty head (timm's ``num_classes=0``: Identity, pooling, dropout, a ModuleList of them): a feature extractor."""
    return any(any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
               or callable(getattr(m, "weight", None)) or hasattr(m, "_packed_params") for m in module.modules())


class BackboneAdapter(nn.Module):
    """Wraps a host classifier ``model`` (kept as the submodule ``model``, weights shared, not copied).

    ``forward(x)`` runs the host's backbone exactly once and returns ``(z, host_logits)``: ``z`` (B, D)
    the pre-logits embedding, ``host_logits`` (B, C) the host classifier layer's output for ``x``: what the
    unwrapped model returns, unless it transforms that output (a final softmax: the logits before it are taken);
    None for a headless model.
    """

    family: str = "generic"  # "timm", "torchvision" or "generic"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def classifier_modules(self) -> list[nn.Module]:
        """The host classifier layer(s): the only backbone parameters ``train_classifier=True`` unfreezes."""
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def num_classes(self) -> int | None:
        """Number of host classes (out_features of the classifier), None when unknown or headless."""
        return None

    @property
    def embed_dim(self) -> int | None:
        """Width of ``z`` when known without running the model, else None."""
        return None

    def describe(self) -> str:
        return f"{self.family} adapter of {type(self.model).__name__}"
