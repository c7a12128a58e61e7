"""Functional ops of the retrieval head, dispatching between the fused Triton kernel and the reference.

The PyTorch reference here is the spec: ``retrofit.kernels.cross_fusion`` must match it in forward and
in every gradient. Three implementations of one contract:

- :func:`cross_fusion_attention_reference`: plain einsum + softmax, readable, returns the probabilities.
- :func:`cross_fusion_attention_native`: the same maths through ``torch.nn.functional.scaled_dot_product_attention``
  (PyTorch's fused CPU / CUDA attention: no (B, H, S, S) tensors kept for backward, reads the strided
  (B, S, H, Dh) views without copies). This is the PyTorch path used whenever no weights are asked for;
  on CPU it is 3x faster forward and ~8x faster forward+backward than the einsum reference.
- ``retrofit.kernels.cross_fusion.cross_fusion_attention_fused``: the Triton kernel.

Dispatch (``RETROFIT_FUSED``): ``0`` forces the PyTorch path, ``1`` forces the kernel (on CUDA, or on
CPU under ``TRITON_INTERPRET=1``), unset = the kernel for fp16 / bf16 CUDA tensors (mixed precision, autocast)
when Triton is available, the PyTorch path otherwise. fp32 CUDA tensors (no autocast) take the PyTorch path unless
forced: the kernel computes fp32 with IEEE fp32 dot products (no tensor cores), and on an H100 its forward+backward
at B = 256 took 1.7-2.9x the PyTorch path's GPU time (a d = 512, L = 4 head's fp32 training step: 19.6 vs 12.0 ms).
At B = 1 the kernel's single launch was 1.2-1.8x faster in wall time (fp32 forward, and forward+backward at
k = 16): small-batch fp32 serving that wants it can set ``RETROFIT_FUSED=1``, or serve under autocast.
Asking for attention weights always uses the reference.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os

import torch
import torch.nn.functional as F

from retrofit._env import fused_flag

__all__ = [
    "cross_fusion_attention",
    "cross_fusion_attention_reference",
    "cross_fusion_attention_native",
    "fused_kernel_status",
    "use_fused_kernel",
]


def cross_fusion_attention_reference(
    q_t: torch.Tensor,
    k_i: torch.Tensor,
    v_i: torch.Tensor,
    q_i: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    res_i: torch.Tensor,
    res_t: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float | None = None,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Both directions of one cross-fusion layer's multi-head attention, with the residual add.

    All of ``q_*``, ``k_*``, ``v_*``, ``res_*`` are (B, S, H, Dh) (S = k + 1 tokens, slot 0 the query).

        new_i = res_i + softmax(q_t k_i^T * scale + mask) v_i     text queries over image keys / values
        new_t = res_t + softmax(q_i k_t^T * scale + mask) v_t     image queries over text keys / values

    ``key_mask`` (B, S) bool is True for keys that may be attended to (the same slots in both streams).
    Scores and softmax are computed in fp32 (fp64 for fp64 inputs); a query whose keys are all masked gets
    a zero attention output (so ``new = res``), never NaN. ``scale`` defaults to 1/sqrt(Dh). Masked slots must
    hold finite values (the head zeroes them): a NaN / inf there can reach the outputs or the gradients on every
    path (a zero probability times an infinite value), here and in the kernel alike.

    Returns ``(new_i, new_t, weights)``; ``weights`` is None unless ``need_weights``, then the
    probabilities ``(p_i, p_t)``, each (B, H, S, S) fp32: ``p_i`` for the image-stream update (text
    queries over image keys), ``p_t`` for the text-stream update.
    """
    _check_mask(key_mask, q_t)
    Dh = q_t.shape[-1]
    scale = Dh**-0.5 if scale is None else scale
    acc = torch.promote_types(q_t.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (a true fp64 reference)
    keep = key_mask[:, None, None, :]  # (B, 1, 1, S)
    some = keep.any(-1, keepdim=True)  # (B, 1, 1, 1): rows with at least one key

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale  # (B, H, S, S)
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1).masked_fill(~some, 0.0)  # all-masked rows (softmax NaN) -> 0; a NaN score stays
        o = torch.einsum("bhqk,bkhd->bqhd", p, v.to(acc))  # (B, S, H, Dh)
        return o, p

    o_i, p_i = attend(q_t, k_i, v_i)  # image stream update: text queries, image keys/values
    o_t, p_t = attend(q_i, k_t, v_t)  # text stream update: image queries, text keys/values
    new_i = (res_i.to(acc) + o_i).to(res_i.dtype)  # (B, S, H, Dh)
    new_t = (res_t.to(acc) + o_t).to(res_t.dtype)  # (B, S, H, Dh)
    return new_i, new_t, ((p_i, p_t) if need_weights else None)


def cross_fusion_attention_native(
    q_t: torch.Tensor,
    k_i: torch.Tensor,
    v_i: torch.Tensor,
    q_i: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    res_i: torch.Tensor,
    res_t: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_fusion_attention_reference` (without weights) through PyTorch's fused attention.

    Same contract and result: ``(new_i, new_t)``, (B, S, H, Dh) in the residuals' dtype; an all-masked
    key row gives a zero attention output (``new = res``) and zero gradients, never NaN (PyTorch's
    ``scaled_dot_product_attention`` guarantees this for fully masked rows; the tests check it).
    fp16 / bf16 inputs are attended in their own dtype with fp32 accumulation; the residual add is fp32.
    """
    _check_mask(key_mask, q_t)
    scale = _check_scale(scale)
    mask = key_mask[:, None, None, :]  # (B, 1, 1, S) bool, True = attend

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           scale=scale)  # (B, H, S, Dh) logical
        return o.transpose(1, 2)  # (B, S, H, Dh)

    o_i = attend(q_t, k_i, v_i)  # image stream update: text queries, image keys/values
    o_t = attend(q_i, k_t, v_t)  # text stream update: image queries, text keys/values
    if res_i.dtype in (torch.float32, torch.float64):  # (the residuals' dtype, also for fp64 q / k / v)
        return (res_i + o_i).to(res_i.dtype), (res_t + o_t).to(res_t.dtype)  # (B, S, H, Dh)
    return (res_i.float() + o_i.float()).to(res_i.dtype), (res_t.float() + o_t.float()).to(res_t.dtype)


def _check_mask(key_mask: object, q: torch.Tensor) -> None:
    """``key_mask`` must be a (B, S) bool tensor: a float 0/1 mask would be *added* to the scores by
    ``scaled_dot_product_attention`` (masking nothing), silently."""
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        what = key_mask.dtype if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
        raise ValueError(f"cross_fusion_attention: key_mask must be a torch.bool tensor (True = attendable), got {what}"
                         "; convert a 0/1 mask with mask.bool()")
    if tuple(key_mask.shape) != tuple(q.shape[:2]):
        raise ValueError(f"cross_fusion_attention: key_mask has shape {tuple(key_mask.shape)}, expected (B, S) = "
                         f"{tuple(q.shape[:2])}")


def _check_scale(scale: object) -> float | None:
    """``scale``: None (1/sqrt(Dh)) or a finite real number (numpy scalars too). A tensor is refused: the fused
    kernel would take its value and drop its gradient, silently, where the reference differentiates it."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor) or isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        what = f"a tensor ({scale.dtype}, requires_grad={scale.requires_grad})" if isinstance(scale, torch.Tensor) \
            else repr(scale)
        raise TypeError(f"cross_fusion_attention: scale must be a Python number or None (1/sqrt(Dh)), got {what}; "
                        "pass float(scale) (a learned temperature is not differentiated here: scale the queries)")
    if not math.isfinite(scale):
        raise ValueError(f"cross_fusion_attention: scale must be finite, got {scale!r}")
    return float(scale)


_TRITON_IMPORTABLE: bool | None = None  # cached find_spec result (a plain global: torch.compile traces it cleanly)


def _triton_importable() -> bool:
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        _TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_IMPORTABLE


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_kernel_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the fused kernel would run for tensors on ``device`` (default: CUDA if present), and why."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    flag = fused_flag()
    if flag is False:
        return False, "RETROFIT_FUSED=0 forces the PyTorch reference"
    if not _triton_importable():
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, "CUDA tensors and triton available" + (" (forced by RETROFIT_FUSED=1)" if flag else "")
    if flag and _interpreting():
        return True, "RETROFIT_FUSED=1 with TRITON_INTERPRET=1: the kernel runs in Triton's CPU interpreter (slow)"
    return False, f"tensors on {device.type}: the fused kernel needs CUDA (or RETROFIT_FUSED=1 + TRITON_INTERPRET=1)"


FUSED_MAX_HEAD_DIM = 128  # the fused kernel's largest head dim Dh (one tile per head)
_FUSED_DEFAULT_DTYPES = (torch.float16, torch.bfloat16)  # unforced, the kernel runs for these q / k / v dtypes


def use_fused_kernel(t: torch.Tensor) -> bool:
    """The dispatch decision for a (B, S, H, Dh) tensor; raises if ``RETROFIT_FUSED=1`` asks for the impossible.
    Unforced, a head dim the kernel does not take (Dh > 128, e.g. ``dim=512, heads=2``) and fp32 / fp64 tensors
    (slower through the kernel than through PyTorch's attention on CUDA: see the module docstring) go to the
    PyTorch path."""
    ok, why = fused_kernel_status(t.device)
    if fused_flag() is True:
        if not ok:
            raise RuntimeError(
                f"RETROFIT_FUSED=1 but the fused kernel cannot run: {why}. Unset RETROFIT_FUSED or set it to 0."
            )
        return True  # the kernel itself names what it does not support
    return ok and t.shape[-1] <= FUSED_MAX_HEAD_DIM and t.dtype in _FUSED_DEFAULT_DTYPES


def cross_fusion_attention(
    q_t: torch.Tensor,
    k_i: torch.Tensor,
    v_i: torch.Tensor,
    q_i: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    res_i: torch.Tensor,
    res_t: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float | None = None,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Dispatching entry point; same contract as :func:`cross_fusion_attention_reference`.

    Order: the fused kernel (see the module docstring), else the PyTorch native path, and the einsum
    reference whenever ``need_weights`` (only it materialises the probabilities).
    """
    scale = _check_scale(scale)
    if not need_weights and use_fused_kernel(q_t):
        from retrofit.kernels.cross_fusion import cross_fusion_attention_fused

        new_i, new_t = cross_fusion_attention_fused(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale)
        return new_i, new_t, None
    if not need_weights:
        new_i, new_t = cross_fusion_attention_native(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale)
        return new_i, new_t, None
    return cross_fusion_attention_reference(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale, need_weights)
