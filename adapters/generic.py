"""Adapter for any ``nn.Module`` classifier: a forward hook on its final ``nn.Linear`` captures the embedding.

The model runs unchanged, once; the classifier layer's output is the host logits and its input (both captured by a
hook registered for the duration of the call) the embedding ``z``. The model may return the logits, a Hugging
Face-style output with ``.logits``, a dict with ``"logits"`` or a tuple ``(logits, ...)``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from retrofit.adapters.base import BackboneAdapter
from retrofit.errors import RetrofitError

logger = logging.getLogger(__name__)

__all__ = ["HookAdapter", "find_classifier", "is_linear", "linear_layers", "model_logits"]


def is_linear(m: nn.Module) -> bool:
    """``nn.Linear``, or its quantized form (``torch.ao.quantization``: dynamic or static; no nn.Parameter)."""
    if isinstance(m, nn.Linear):
        return True
    q = sys.modules.get("torch.ao.nn.quantized")  # (loaded by torch itself; not imported here if it ever is not)
    return q is not None and isinstance(m, q.Linear)


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` (or quantized Linear) of ``model`` with its qualified name, in registration order."""
    return [(n, m) for n, m in model.named_modules() if is_linear(m)]


def _describe(layers: list[tuple[str, nn.Linear]], limit: int = 12) -> str:
    shown = [f"{n!r} ({m.in_features}->{m.out_features})" for n, m in layers[-limit:]]
    more = f" and {len(layers) - limit} earlier" if len(layers) > limit else ""
    return ", ".join(shown) + more if shown else "none"


def find_classifier(model: nn.Module, classifier: str | nn.Module | None = None,
                    num_classes: int | None = None) -> tuple[str, nn.Module]:
    """The host's classifier layer: the one the caller names, or the final ``nn.Linear`` with ``num_classes`` outputs.

    ``classifier``: a qualified submodule name (``"fc"``, ``"heads.head"``) or the module itself.
    Without it, the candidates are the ``nn.Linear`` layers whose output size is ``num_classes``
    (every ``nn.Linear`` when ``num_classes`` is None); exactly one must remain (or, when
    ``num_classes`` is None, the last registered one is taken). Errors list the candidates.
    """
    if classifier is not None:
        if isinstance(classifier, str):
            try:
                mod = model.get_submodule(classifier)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} has no submodule {classifier!r}; its nn.Linear layers are "
                                 f"{_describe(linear_layers(model))}") from None
            return classifier, mod
        if isinstance(classifier, nn.Module):
            for n, m in model.named_modules():
                if m is classifier:
                    return n, m
            raise ValueError(f"classifier={type(classifier).__name__} is not a submodule of {type(model).__name__}")
        raise TypeError(f"classifier must be a submodule name (str) or an nn.Module, got {type(classifier).__name__}")
    layers = linear_layers(model)
    if not layers:
        raise RetrofitError(
            f"{type(model).__name__} has no nn.Linear layer, so retrofit cannot find its classifier. Pass "
            "classifier='<submodule name>' naming the layer whose input is the embedding and output the logits "
            "(a model ending in a 1x1 conv: wrap it so that it ends in nn.Linear)."
        )
    if num_classes is None:
        return layers[-1]
    cands = [(n, m) for n, m in layers if m.out_features == num_classes]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise RetrofitError(
            f"no nn.Linear of {type(model).__name__} has {num_classes} outputs (the head's num_classes). "
            f"Its nn.Linear layers are {_describe(layers)}. Pass classifier='<name>' or build the head with the "
            "host's class count."
        )
    raise RetrofitError(
        f"{len(cands)} nn.Linear layers of {type(model).__name__} have {num_classes} outputs: {_describe(cands)}. "
        "Pass classifier='<name>' to say which one produces the model's output."
    )


def model_logits(out: object, model_name: str = "the model") -> Tensor:
    """The logits tensor in a model's output: the tensor itself, ``out["logits"]`` / ``out.logits`` (Hugging Face
    ``ModelOutput``, dicts, named tuples) or the first element of a tuple or list (``(logits, aux)``)."""
    if isinstance(out, Tensor):
        return out
    found = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if found is None and isinstance(out, (tuple, list)) and out:
        found = out[0]
    if not isinstance(found, Tensor):
        raise RetrofitError(f"{model_name} returned {type(out).__name__}, and retrofit finds no logits tensor in it "
                            "(it reads a tensor, a mapping or object with a 'logits' tensor, or a tuple whose first "
                            "element is the logits); wrap it in a module whose forward returns the (B, C) logits")
    return found


def _dequantized(t: Tensor) -> Tensor:
    return t.dequantize() if t.is_quantized else t


class HookAdapter(BackboneAdapter):
    """Runs ``model(x)`` once; a forward hook on ``classifier`` records its input as ``z``."""

    family = "generic"

    def __init__(self, model: nn.Module, classifier: nn.Module, classifier_name: str = "") -> None:
        super().__init__(model)
        if classifier_name:
            try:
                found = model.get_submodule(classifier_name)
            except AttributeError:
                found = None
            if found is not classifier:
                raise ValueError(f"classifier_name={classifier_name!r} does not name the classifier module in "
                                 f"{type(model).__name__}: pass the qualified name find_classifier() returns")
        elif classifier is not model:
            classifier_name = next((n for n, m in model.named_modules() if m is classifier), "")
            if not classifier_name:
                raise ValueError(f"the classifier {type(classifier).__name__} is not a submodule of "
                                 f"{type(model).__name__}")
        self.classifier_name = classifier_name
        self._checked_output = False  # the first forward warns when the model post-processes its logits

    @property
    def classifier(self) -> nn.Module:
        """The classifier layer, looked up by name in ``self.model`` at each use: a replica of this adapter
        (``nn.DataParallel`` copies the module tree, not attributes) or a model whose layer was replaced after
        wrapping then hooks its own layer, not the original's."""
        return self.model.get_submodule(self.classifier_name)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        captured: list[Tensor] = []
        produced: list[Tensor] = []
        me = None if torch.compiler.is_compiling() else threading.get_ident()

        def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
            # threads serving one model share its classifier: each forward records only its own thread's call
            # me is None: this forward was compiled, its thread unknown (accept the call; a hook that runs eagerly
            # inside a compiled host reads its thread id, a graph break there)
            if me is None or threading.get_ident() == me:
                # the input: first positional argument, or the one passed by keyword (self.fc(input=f))
                captured.append(args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None))
                produced.append(output)

        handle = self.classifier.register_forward_hook(grab, with_kwargs=True)
        try:
            out = self.model(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RetrofitError(f"the classifier layer {self.classifier_name!r} of {type(self.model).__name__} ran "
                                f"{len(captured)} times in one forward (expected once): retrofit takes the input and "
                                "output of the one call that makes the logits; pass classifier= naming that layer, "
                                "or wrap a module whose forward calls its classifier once")
        inp, res = captured[0], produced[0]
        if not isinstance(inp, Tensor) or not isinstance(res, Tensor):
            raise RetrofitError(f"the classifier layer {self.classifier_name!r} of {type(self.model).__name__} was "
                                "called without a tensor input or returned no tensor; pass classifier= naming the "
                                "layer that maps (B, D) features to (B, C) logits")
        inp, res = _dequantized(inp), _dequantized(res)  # a quantized host: float embedding and logits
        if inp.dim() == 1 and x.shape[0] == 1:  # a host that squeezes its batch of one away (f.squeeze())
            inp, res = inp[None], res.reshape(1, -1)
        lead = inp.shape[1:-1] if is_linear(self.classifier) else inp.shape[2:]
        if inp.dim() > 2 and any(n != 1 for n in lead):  # Linear: features last; conv: channels first
            raise RetrofitError(f"the classifier layer {self.classifier_name!r} of {type(self.model).__name__} takes "
                                f"a {tuple(inp.shape)} input, not (B, D) features: it runs per position or "
                                "token (a 1x1 conv, a per-token Linear); wrap the model so that it pools first and "
                                "ends in an nn.Linear on (B, D) features")
        z = inp.flatten(1)  # (B, D)
        logits = res.flatten(1)  # the classifier layer's own output: the logits
        if not torch.jit.is_tracing() and (z.shape[0] != x.shape[0] or logits.shape[0] != x.shape[0]):
            raise RetrofitError(f"the classifier layer {self.classifier_name!r} of {type(self.model).__name__} maps "
                                f"{tuple(inp.shape)} to {tuple(res.shape)} for a batch of {x.shape[0]} images: "
                                "retrofit needs one (D,) embedding and one (C,) logits row per image")
        if not self._checked_output and not _tracing():  # (a traced / exported graph cannot compare values)
            self._checked_output = True
            try:
                out = _dequantized(model_logits(out, type(self.model).__name__))
            except RetrofitError:  # e.g. {"scores": ...}: the logits are the classifier layer's output all the same
                logger.warning("%s returned %s with no 'logits' retrofit can read: retrofit fuses its classifier "
                               "layer %r's output as the host logits, and cannot check that the model's output is "
                               "the same", type(self.model).__name__, type(out).__name__, self.classifier_name)
                return z, logits
            if out.numel() != logits.numel() or not torch.equal(out.reshape(logits.shape), logits):
                logger.warning("%s transforms its classifier's output (e.g. a softmax after %r): retrofit fuses the "
                               "classifier layer's output, the logits, not the model's output",
                               type(self.model).__name__, self.classifier_name)
        return z, logits

    def classifier_modules(self) -> list[nn.Module]:
        return [self.classifier]

    @property
    def num_classes(self) -> int | None:
        n = getattr(self.classifier, "out_features", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @property
    def embed_dim(self) -> int | None:
        n = getattr(self.classifier, "in_features", None)  # 0: an nn.LazyLinear before its first call (unknown)
        return int(n) if isinstance(n, int) and n > 0 else None

    def describe(self) -> str:
        return f"{self.family} adapter of {type(self.model).__name__} (classifier {self.classifier_name!r})"


def _tracing() -> bool:
    """Inside torch.jit.trace, torch.compile or torch.export: tensors hold no values to compare."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
