"""Fused Triton kernels for the two-direction cross-fusion attention (forward and backward): the launchers, the
layout checks and the autograd function here, the ``@triton.jit`` kernels and their autotune space in
:mod:`retrofit.kernels.cross_fusion_triton`.

Spec: :func:`retrofit.functional.cross_fusion_attention_reference`. For one cross-fusion layer::

    new_i = res_i + softmax(q_t k_i^T * scale + mask) v_i     direction 0: text queries over image keys
    new_t = res_t + softmax(q_i k_t^T * scale + mask) v_t     direction 1: image queries over text keys

Every tensor is (B, S, H, Dh), usually a strided view of a (B, S, 3, H, Dh) projection: the launchers pass
strides and read such views in place (the six q / k / v tensors share one layout with a unit stride on Dh,
each residual has a unit stride on Dh; inputs that break this are copied once, see
:func:`cross_fusion_attention_fused`). ``key_mask`` (B, S) bool marks attendable keys (shared by both
directions). After the first call per (S, Dh, dtypes), which goes through Triton's autotuner, the launchers
call the chosen config directly: at B <= 32 a call's cost is its Python launch work, not the GPU's. Under
``torch.compile`` the call becomes the custom op in :mod:`retrofit.kernels.cross_fusion_op` (no graph break).

- Forward: ONE launch, grid (B * H, cdiv(S, BLOCK_M), 2); the last axis is the direction. Each program
  streams key blocks with an online softmax (fp32 accumulators, fp64 for fp64 inputs), adds the residual
  and stores the new stream in the residual's dtype, plus the row log-sum-exp (base 2) for the backward.
  S is padded to the block size inside the kernel and masked; Dh is padded to a power of two >= 16.
  A query whose keys are all masked gets a zero attention output (so ``new = res``), never NaN.
- Backward: two launches, each covering both directions. ``_bwd_dq_kernel`` recomputes the
  probabilities from the saved log-sum-exp, computes ``delta = rowsum(P * dP)`` and dq;
  ``_bwd_dkdv_kernel`` (per key block) recomputes P^T and accumulates dk, dv. No probabilities are
  stored. The residuals' gradients are the incoming gradients themselves (d new / d res = identity), so
  they are returned without a kernel or a copy.

fp32 inputs use IEEE fp32 dots (no tf32: slow, so the dispatcher runs fp32 only when forced), so fp32 outputs match
the reference to fp32 rounding; fp16/bf16 inputs use tensor-core dots with fp32 accumulation (P and dS are rounded
to the input dtype before their dot, as in flash-attention). The backward recomputes P as ``exp2(s - lse)`` from the
log-sum-exp stored in fp32 (as flash-attention does), whose rounding grows with the scores' size: with scaled scores
of magnitude ~70 (inputs 4x unit scale at Dh = 16) the fp32 gradients' error is ~2.7x the fp32 reference's (1.8e-4
against 6.6e-5 in a stress test), ~5x at ~300; a later review measured up to ~7x at scores ~55 (Dh = 64) and ~17x at
~900, and a third ~100x in a saturated softmax (inputs 16x unit scale at Dh = 16: 1.8e-4 against the reference's
1.8e-6; the ratio is large where the reference's own error is tiny); at unit-scale inputs it is within the tests'
rule (2x + 1e-5). On a GPU ``scale`` reaches the kernels as an fp32 argument (Triton types a Python float as
fp32): fp64 inputs (run by the kernel only when forced, ``RETROFIT_FUSED=1``) get fp64 accumulation but a scale
rounded to fp32, ~1e-8 relative error instead of fp64's ~1e-16 (the interpreter passes the float unrounded, so the
CPU tests cannot see it). In fp16 the backward rounds dS and the upstream
gradient to fp16 for its dots (as flash-attention does): where they pass 65504 (upstream gradients scaled by a large
GradScaler factor onto large values) the gradients overflow to inf / NaN where the fp32 reference stays finite;
GradScaler then skips the step and lowers its scale, and bf16 has no such limit. Scaled scores below -1e30 (base 2)
count as masked. The kernels' gradients are not differentiable again: a backward with ``create_graph=True`` raises;
PyTorch's math attention has double backward (``RETROFIT_FUSED=0`` inside
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``). Under ``TRITON_INTERPRET=1`` bf16 q / k / v are refused: the
interpreter computes bf16 dots wrong.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl

from retrofit.functional import (
    FUSED_MAX_HEAD_DIM,  # noqa: F401  (kept importable from here)
    _check_scale,
)
from retrofit.kernels.cross_fusion_triton import (  # noqa: F401  (the tests reach the autotune space through here)
    _DTYPES,
    _FP64_CONFIG,
    _INTERPRET,
    _LOG2E,
    _MAX_HEAD_DIM,
    _QKV_DTYPES,
    _SPACE,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _fwd_kernel,
    _prune,
)

__all__ = ["CrossFusionAttention", "cross_fusion_attention_fused"]

# ----------------------------------------------------------------------------------------------------------------------
# launchers

_NAMES = ("q_t", "k_i", "v_i", "q_i", "k_t", "v_t", "res_i", "res_t")
_BEST: dict[tuple, triton.Config] = {}  # (kernel, S, Dh, dtypes) -> the config Triton's autotuner chose
_META: dict[tuple, dict] = {}
_TUNE_LOCK = threading.Lock()


def _check_inputs(tensors: dict[str, torch.Tensor], key_mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate the eight (B, S, H, Dh) tensors and the (B, S) mask; returns (B, S, H, Dh). A quick test of the
    usual case comes first; only input that fails it goes through the checks that name what is wrong."""
    ts = tuple(tensors.values())
    q = ts[0]
    try:
        shape, dtype, device = q.shape, q.dtype, q.device
        if (len(shape) == 4 and 0 < shape[3] <= _MAX_HEAD_DIM and min(shape) > 0 and dtype in _QKV_DTYPES
                and key_mask.dtype == torch.bool and key_mask.shape == shape[:2] and key_mask.device == device
                and (device.type == "cuda" or _INTERPRET)
                and all(t.shape == shape and t.device == device for t in ts)
                and all(t.dtype == dtype for t in ts[:6]) and ts[6].dtype in _DTYPES and ts[7].dtype in _DTYPES):
            return tuple(shape)
    except AttributeError:  # not a tensor: the checks below name it
        pass
    return _explain(tensors, key_mask)


def _explain(tensors: dict[str, torch.Tensor], key_mask: torch.Tensor) -> tuple[int, int, int, int]:
    """The slow path of :func:`_check_inputs`: raises naming the first thing that is wrong."""
    for name, t in list(tensors.items()) + [("key_mask", key_mask)]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cross_fusion_attention_fused: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"cross_fusion_attention_fused: {name} must be 4-D (B, S, H, Dh), got shape "
                             f"{tuple(t.shape)}")
    shape = tensors["q_t"].shape
    for name, t in tensors.items():
        if t.shape != shape:
            raise ValueError(f"cross_fusion_attention_fused: {name} has shape {tuple(t.shape)} but q_t has "
                             f"{tuple(shape)}; all eight inputs must share (B, S, H, Dh)")
    B, S, H, Dh = shape
    if min(S, H, Dh) < 1:  # (an empty batch, B = 0, is fine: the caller returns the residuals)
        raise ValueError(f"cross_fusion_attention_fused: empty input of shape {tuple(shape)}; S, H and Dh must be "
                         ">= 1")
    if Dh > _MAX_HEAD_DIM:
        raise ValueError(f"cross_fusion_attention_fused: head dim Dh={Dh} is not supported; allowed 1..{_MAX_HEAD_DIM} "
                         "(tuned for 32, 64, 128)")
    dtype = tensors["q_t"].dtype
    if dtype not in _DTYPES:
        raise ValueError(f"cross_fusion_attention_fused: dtype {dtype} is not supported; allowed {list(_DTYPES)}")
    if dtype not in _QKV_DTYPES:
        raise ValueError("cross_fusion_attention_fused: bf16 q / k / v under TRITON_INTERPRET=1 are not supported: "
                         "Triton's CPU interpreter computes bf16 dot products wrong. Use fp16 / fp32 / fp64 there, "
                         "or RETROFIT_FUSED=0 (the PyTorch path takes bf16); on CUDA the kernel takes bf16")
    for name, t in tensors.items():
        if name.startswith("res_"):  # residuals may be wider (autocast: fp16 projections, fp32 streams)
            if t.dtype not in _DTYPES:
                raise ValueError(f"cross_fusion_attention_fused: {name} dtype {t.dtype} is not supported; allowed "
                                 f"{list(_DTYPES)}")
        elif t.dtype != dtype:
            raise ValueError(f"cross_fusion_attention_fused: {name} is {t.dtype} but q_t is {dtype}; q, k and v of "
                             "both directions must share one dtype")
    device = tensors["q_t"].device
    for name, t in list(tensors.items()) + [("key_mask", key_mask)]:
        if t.device != device:
            raise ValueError(f"cross_fusion_attention_fused: {name} is on {t.device} but q_t is on {device}; all "
                             "inputs must be on one device")
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"cross_fusion_attention_fused: tensors on {device} need TRITON_INTERPRET=1 (set before "
                         "importing this module); the compiled kernel runs on CUDA only")
    if key_mask.dtype != torch.bool:
        raise ValueError(f"cross_fusion_attention_fused: key_mask must be torch.bool (True = attendable), got "
                         f"{key_mask.dtype}")
    if tuple(key_mask.shape) != (B, S):
        raise ValueError(f"cross_fusion_attention_fused: key_mask has shape {tuple(key_mask.shape)}, expected (B, S) "
                         f"= {(B, S)}")
    return B, S, H, Dh


def _bsh_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(batch, seq, head) strides of a (B, S, H, Dh) tensor, 0 for size-1 dims (never indexed past 0); None
    unless Dh has a unit stride (the kernels index Dh contiguously)."""
    n, st = t.shape, t.stride()
    if st[3] != 1 and n[3] != 1:
        return None
    return (0 if n[0] == 1 else st[0], 0 if n[1] == 1 else st[1], 0 if n[2] == 1 else st[2])


def _qkv_layout(qkv: list[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
    """The six q / k / v tensors sharing one (batch, seq, head) stride set with unit stride on Dh (else all six
    contiguous copies), and that stride set."""
    st = _bsh_strides(qkv[0])
    if st is None or any(_bsh_strides(t) != st for t in qkv[1:]):
        qkv = [t.contiguous() for t in qkv]
        st = _bsh_strides(qkv[0])
    return qkv, st


_INT32_LIMIT = 2**31  # the kernels' offsets are int32: a launch indexes no tensor over this many elements


def _rows_per_launch(tensors: list[torch.Tensor]) -> int:
    """The most batch rows one launch can take with every offset in int32: each input's span (over its own strides,
    or a contiguous copy's, whichever is larger), the outputs' and the log-sum-exp / delta rows of both directions.
    Raises when a single batch row is already too big."""
    B, S, H, Dh = tensors[0].shape
    row, last = S * H * Dh, 2 * H * S  # a contiguous row's elements; log-sum-exp rows per batch row
    fits = (_INT32_LIMIT - 1) // last
    for t in tensors:
        st = _bsh_strides(t) or (row, H * Dh, Dh)
        step = max(st[0], row)
        one = max((S - 1) * st[1] + (H - 1) * st[2] + Dh, row)  # the span of one batch row
        if one >= _INT32_LIMIT:
            raise ValueError(f"cross_fusion_attention_fused: one batch row spans {one} elements (S={S}, H={H}, "
                             f"Dh={Dh}), over the int32 offsets the kernels use; use fewer neighbours or "
                             "RETROFIT_FUSED=0 (the PyTorch path)")
        fits = min(fits, (_INT32_LIMIT - 1 - one) // step + 1)
    return max(1, fits)


def _layout(qkv: list[torch.Tensor], res: list[torch.Tensor], key_mask: torch.Tensor):
    """Bring the inputs to the kernels' layout contract, copying only what breaks it: the six q / k / v share one
    set of strides with unit stride on Dh (else all six are made contiguous), each residual has unit stride on Dh,
    the mask is contiguous. Returns (qkv, res, mask as uint8, qkv strides, residual strides)."""
    qkv, st = _qkv_layout(qkv)
    res_st = []
    for j, r in enumerate(res):
        rst = _bsh_strides(r)
        if rst is None:
            res[j] = r = r.contiguous()
            rst = _bsh_strides(r)
        res_st.append(rst)
    B, S, H, Dh = qkv[0].shape
    out_st = (S * H * Dh, H * Dh, Dh)  # contiguous outputs and gradients
    for name, s in (("q / k / v", st), ("res_i", res_st[0]), ("res_t", res_st[1]), ("the outputs", out_st)):
        span = (B - 1) * s[0] + (S - 1) * s[1] + (H - 1) * s[2] + Dh
        if span >= _INT32_LIMIT:  # (eager calls split the batch before: see _rows_per_launch)
            raise ValueError(f"cross_fusion_attention_fused: {name} span {span} elements, over the int32 offsets "
                             "the kernels use; split the batch (under torch.compile the call is not split)")
    if 2 * B * H * S >= _INT32_LIMIT:  # the log-sum-exp / delta rows of both directions
        raise ValueError(f"cross_fusion_attention_fused: 2 * B * H * S = {2 * B * H * S} query rows, over the int32 "
                         "offsets the kernels use; split the batch (under torch.compile the call is not split)")
    km = key_mask if key_mask.is_contiguous() else key_mask.contiguous()
    return qkv, res, km.view(torch.uint8), st, res_st


def _meta(dtype: torch.dtype, Dh: int) -> dict:
    m = _META.get((dtype, Dh))
    if m is None:
        m = _META[(dtype, Dh)] = dict(
            HEAD_DIM=Dh,
            BLOCK_D=max(16, triton.next_power_of_2(Dh)),
            ACC=tl.float64 if dtype == torch.float64 else tl.float32,
            PRECISION="ieee",  # only affects fp32 inputs: no tf32 truncation
        )
    return m


def _launch(kernel, block: str, B: int, H: int, S: int, args: tuple, meta: dict, key: tuple) -> None:
    """First call per ``key``: through Triton's autotuner (which tunes, or reads its disk cache). Later calls: the
    chosen config straight to the compiled kernel, skipping the autotuner's per-call Python work."""
    cfg = _BEST.get(key)
    if cfg is None:
        with _TUNE_LOCK:  # best_config is the autotuner's last pick: no other thread may tune in between
            kernel[lambda m: (B * H, triton.cdiv(S, m[block]), 2)](*args, **meta)
            _BEST[key] = kernel.best_config
        return
    kernel.fn[(B * H, triton.cdiv(S, cfg.kwargs[block]), 2)](*args, **meta, **cfg.all_kwargs())


def _on_device(device: torch.device):
    """Triton launches on the *current* CUDA device and its current stream, whatever device the tensors are on: a
    call with tensors on cuda:1 while cuda:0 is current ran on cuda:0 (an invalid-pointer error, or, with peer access,
    cuda:1 memory read by a cuda:0 kernel on a stream unordered with cuda:1's work). Switch to the tensors' device."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _forward(qkv, res, km, st, res_st, scale):
    """Launch the forward kernel; returns new_i, new_t (B, S, H, Dh) and the log-sum-exp (2, B, H, S)."""
    q_t, k_i, v_i, q_i, k_t, v_t = qkv
    res_i, res_t = res
    B, S, H, Dh = q_t.shape
    acc = torch.float64 if q_t.dtype == torch.float64 else torch.float32
    new_i = torch.empty((B, S, H, Dh), dtype=res_i.dtype, device=res_i.device)  # (B, S, H, Dh)
    new_t = torch.empty((B, S, H, Dh), dtype=res_t.dtype, device=res_t.device)  # (B, S, H, Dh)
    lse = torch.empty((2, B, H, S), dtype=acc, device=q_t.device)  # base-2 log-sum-exp per query row
    args = (q_t, k_i, v_i, res_i, new_i, q_i, k_t, v_t, res_t, new_t, km, lse, B, H, S, scale * _LOG2E, *st,
            *res_st[0], *res_st[1])
    with _on_device(q_t.device):
        _launch(_fwd_kernel, "BLOCK_M", B, H, S, args, _meta(q_t.dtype, Dh),
                ("fwd", S, Dh, q_t.dtype, res_i.dtype, res_t.dtype))
    return new_i, new_t, lse


def _backward(g_i, g_t, qkv, km, lse, st, scale):
    """Launch the two backward kernels; returns dq_t, dk_i, dv_i, dq_i, dk_t, dv_t."""
    q_t, k_i, v_i, q_i, k_t, v_t = qkv
    B, S, H, Dh = q_t.shape
    g_i, g_t = g_i.contiguous(), g_t.contiguous()  # autograd's gradients: contiguous already, as a rule
    grads = [torch.empty((B, S, H, Dh), dtype=q_t.dtype, device=q_t.device) for _ in range(6)]
    dq_t, dk_i, dv_i, dq_i, dk_t, dv_t = grads  # each (B, S, H, Dh), contiguous
    delta = torch.empty_like(lse)  # (2, B, H, S) rowsum(P * dP)
    meta = _meta(q_t.dtype, Dh)
    key = (S, Dh, q_t.dtype, g_i.dtype, g_t.dtype)
    common = (km, lse, delta, B, H, S, scale, scale * _LOG2E, *st)
    with _on_device(q_t.device):
        _launch(_bwd_dq_kernel, "BLOCK_M", B, H, S, (q_t, k_i, v_i, g_i, dq_t, q_i, k_t, v_t, g_t, dq_i, *common),
                meta, ("dq",) + key)
        _launch(_bwd_dkdv_kernel, "BLOCK_N", B, H, S,
                (q_t, k_i, v_i, g_i, dk_i, dv_i, q_i, k_t, v_t, g_t, dk_t, dv_t, *common), meta, ("dkdv",) + key)
    return dq_t, dk_i, dv_i, dq_i, dk_t, dv_t


class CrossFusionAttention(torch.autograd.Function):
    """Autograd wrapper: saves q/k/v of both directions, the mask and the log-sum-exp (not the probabilities).
    Inputs are not validated here: call :func:`cross_fusion_attention_fused`."""

    @staticmethod
    def forward(ctx, q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale):
        qkv, res, km, st, res_st = _layout([q_t, k_i, v_i, q_i, k_t, v_t], [res_i, res_t], key_mask)
        new_i, new_t, lse = _forward(qkv, res, km, st, res_st, scale)
        ctx.save_for_backward(*qkv, km, lse)
        ctx.scale = scale
        return new_i, new_t

    @staticmethod
    def backward(ctx, g_i, g_t):
        no_double_backward()
        *qkv, km, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        if any(need[:6]):
            # strides read again: saved-tensor hooks (torch.autograd.graph.save_on_cpu, activation offloading) may
            # hand back other layouts than the ones saved (the six views of one projection as separate tensors)
            qkv, st = _qkv_layout(qkv)
            km, lse = km.contiguous(), lse.contiguous()
            dq_t, dk_i, dv_i, dq_i, dk_t, dv_t = _backward(g_i, g_t, qkv, km, lse, st, ctx.scale)
        else:
            dq_t = dk_i = dv_i = dq_i = dk_t = dv_t = None
        # d new / d res is the identity: the incoming gradients are the residuals' gradients.
        return dq_t, dk_i, dv_i, dq_i, dk_t, dv_t, g_i if need[6] else None, g_t if need[7] else None, None, None


def no_double_backward() -> None:
    """Raise when a backward runs with ``create_graph=True`` (grad mode on): the kernels' gradients are not
    differentiable, and ``@once_differentiable`` would hand a gradient penalty ``None`` for them, silently, under
    ``autograd.grad(..., allow_unused=True)``."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fused cross-fusion kernel has no double backward (a backward with create_graph=True, as in a "
            "gradient penalty): run with RETROFIT_FUSED=0 inside `with torch.nn.attention.sdpa_kernel("
            "torch.nn.attention.SDPBackend.MATH):` (PyTorch's math attention has double backward; its fused "
            "attention kernels do not)"
        )


def cross_fusion_attention_fused(
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
    """Fused two-direction cross-fusion attention with the residual add; returns ``(new_i, new_t)``.

    Same contract as :func:`retrofit.functional.cross_fusion_attention_reference` (without attention
    weights): inputs (B, S, H, Dh) on one CUDA device (or CPU under ``TRITON_INTERPRET=1``); q, k, v of both
    directions share one dtype (fp16, bf16, fp32 or fp64), each residual may have its own (as under autocast);
    ``key_mask`` (B, S) bool; ``scale`` defaults to 1/sqrt(Dh). A batch whose tensors span more elements than the
    kernels' int32 offsets reach is run in slices of the batch (eager calls only). Outputs are new contiguous
    (B, S, H, Dh) tensors in the residuals' dtypes; differentiable in all eight tensor inputs, once (a backward with
    ``create_graph=True`` raises; ``RETROFIT_FUSED=0`` inside ``sdpa_kernel(SDPBackend.MATH)`` has double backward).

    Strides: the kernels read the inputs in place when the six q / k / v tensors share one layout with a unit
    stride on Dh (the head's views of its (B, S, 3, H, Dh) projections do) and each residual has a unit stride on
    Dh; otherwise the offending tensors are copied to contiguous memory first (a copy of the whole input, once).

    Under ``torch.compile`` the call becomes the custom op ``torch.ops.retrofit.cross_fusion_fwd`` (see
    :mod:`retrofit.kernels.cross_fusion_op`): one node of the compiled graph, no graph break.
    """
    scale = _check_scale(scale)  # (also while compiling: a tensor scale lost its gradient there, a NaN one passed)
    if torch.compiler.is_compiling():  # dynamo cannot trace the launcher; it keeps the custom op in its graph
        scale = q_t.shape[-1] ** -0.5 if scale is None else scale
        new_i, new_t, _ = torch.ops.retrofit.cross_fusion_fwd(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask,
                                                              scale)
        return new_i, new_t
    tensors = dict(zip(_NAMES, (q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t)))
    B, S, H, Dh = _check_inputs(tensors, key_mask)
    if B == 0:  # an empty batch (the PyTorch path takes it too): nothing to attend, the launch grid would be empty
        return (res_i.clone(memory_format=torch.contiguous_format),
                res_t.clone(memory_format=torch.contiguous_format))
    scale = Dh**-0.5 if scale is None else float(scale)
    eight = [q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t]
    rows = _rows_per_launch(eight)
    if rows >= B:
        return CrossFusionAttention.apply(*eight, key_mask, scale)
    # a batch too big for int32 offsets: batch rows attend independently, so launches over slices of the batch
    # (views: no copy) give the same result
    parts = [CrossFusionAttention.apply(*(t.narrow(0, i, min(rows, B - i)) for t in eight),
                                        key_mask.narrow(0, i, min(rows, B - i)), scale) for i in range(0, B, rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# registers torch.ops.retrofit.cross_fusion_fwd / _bwd (that module imports the launchers above: keep this last)
from retrofit.kernels import cross_fusion_op as _cross_fusion_op  # noqa: E402, F401
