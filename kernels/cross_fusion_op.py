"""The fused cross-fusion kernels as ``torch.library`` custom ops, for ``torch.compile``.

Eager calls of :func:`retrofit.kernels.cross_fusion.cross_fusion_attention_fused` go through
:class:`~retrofit.kernels.cross_fusion.CrossFusionAttention` (an ``autograd.Function``: the least Python work per
launch). While ``torch.compile`` traces, the same function calls ``torch.ops.retrofit.cross_fusion_fwd`` instead:
dynamo keeps the op in its graph as one opaque node (the fake implementations below give it the output shapes and
dtypes; AOTAutograd gets the backward from :func:`_autograd_backward`), so a compiled model has no graph break at the
attention, ``fullgraph=True`` compiles, and the projections around the kernel stay in one graph.

- ``retrofit::cross_fusion_fwd(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale) -> (new_i, new_t, lse)``
- ``retrofit::cross_fusion_bwd(g_i, g_t, q_t, k_i, v_i, q_i, k_t, v_t, key_mask, lse, scale) -> (dq_t, ..., dv_t)``

Both accept any strides (inputs that break the kernels' layout contract are copied inside, as in eager); every
output is a new contiguous tensor. Imported by :mod:`retrofit.kernels.cross_fusion` (which registers these ops
when it is imported).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from retrofit.kernels.cross_fusion import (
    _NAMES,
    _backward,
    _check_inputs,
    _forward,
    _layout,
    _qkv_layout,
    no_double_backward,
)

__all__ = ["cross_fusion_fwd", "cross_fusion_bwd"]


@torch.library.custom_op("retrofit::cross_fusion_fwd", mutates_args=())
def cross_fusion_fwd(q_t: Tensor, k_i: Tensor, v_i: Tensor, q_i: Tensor, k_t: Tensor, v_t: Tensor, res_i: Tensor,
                     res_t: Tensor, key_mask: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """new_i, new_t (B, S, H, Dh) in the residuals' dtypes and the base-2 log-sum-exp (2, B, H, S)."""
    _check_inputs(dict(zip(_NAMES, (q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t))), key_mask)
    qkv, res, km, st, res_st = _layout([q_t, k_i, v_i, q_i, k_t, v_t], [res_i, res_t], key_mask)
    return _forward(qkv, res, km, st, res_st, scale)


@cross_fusion_fwd.register_fake
def _fwd_fake(q_t: Tensor, k_i: Tensor, v_i: Tensor, q_i: Tensor, k_t: Tensor, v_t: Tensor, res_i: Tensor,
              res_t: Tensor, key_mask: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    # the same checks as the real op, at trace time: bad input fails when the model is compiled
    _check_inputs(dict(zip(_NAMES, (q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t))), key_mask)
    B, S, H, Dh = q_t.shape
    acc = torch.float64 if q_t.dtype == torch.float64 else torch.float32
    return (res_i.new_empty((B, S, H, Dh)), res_t.new_empty((B, S, H, Dh)), q_t.new_empty((2, B, H, S), dtype=acc))


@torch.library.custom_op("retrofit::cross_fusion_bwd", mutates_args=())
def cross_fusion_bwd(g_i: Tensor, g_t: Tensor, q_t: Tensor, k_i: Tensor, v_i: Tensor, q_i: Tensor, k_t: Tensor,
                     v_t: Tensor, key_mask: Tensor, lse: Tensor, scale: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the six q / k / v inputs (the residuals' gradients are ``g_i`` / ``g_t`` themselves)."""
    qkv, st = _qkv_layout([q_t, k_i, v_i, q_i, k_t, v_t])
    km = key_mask.contiguous().view(torch.uint8)
    return _backward(g_i, g_t, qkv, km, lse.contiguous(), st, scale)


@cross_fusion_bwd.register_fake
def _bwd_fake(g_i: Tensor, g_t: Tensor, q_t: Tensor, k_i: Tensor, v_i: Tensor, q_i: Tensor, k_t: Tensor,
              v_t: Tensor, key_mask: Tensor, lse: Tensor, scale: float
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(q_t.new_empty(q_t.shape) for _ in range(6))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q_t, k_i, v_i, q_i, k_t, v_t, _res_i, _res_t, key_mask, scale = inputs
    ctx.save_for_backward(q_t, k_i, v_i, q_i, k_t, v_t, key_mask, output[2])
    ctx.scale = scale
    ctx.mark_non_differentiable(output[2])


def _autograd_backward(ctx: Any, g_i: Tensor, g_t: Tensor, _g_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    no_double_backward()
    *qkv, key_mask, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    if any(need[:6]):
        grads = tuple(torch.ops.retrofit.cross_fusion_bwd(g_i, g_t, *qkv, key_mask, lse, ctx.scale))
    else:
        grads = (None,) * 6
    # d new / d res is the identity: the incoming gradients are the residuals' gradients
    return (*grads, g_i if need[6] else None, g_t if need[7] else None, None, None)


cross_fusion_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)
