"""Fused Triton kernels for the two-direction cross-fusion attention (forward and backward).

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
~900; at unit-scale inputs it is within the tests' rule (2x + 1e-5). In fp16 the backward rounds dS and the upstream
gradient to fp16 for its dots (as flash-attention does): where they pass 65504 (upstream gradients scaled by a large
GradScaler factor onto large values) the gradients overflow to inf / NaN where the fp32 reference stays finite;
GradScaler then skips the step and lowers its scale, and bf16 has no such limit. Scaled scores below -1e30 (base 2)
count as masked. The kernels' gradients are not differentiable again: a backward with ``create_graph=True`` raises;
PyTorch's math attention has double backward (``RETROFIT_FUSED=0`` inside
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``). Under ``TRITON_INTERPRET=1`` bf16 q / k / v are refused: the
interpreter computes bf16 dots wrong.
"""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

from retrofit.functional import FUSED_MAX_HEAD_DIM

__all__ = ["CrossFusionAttention", "cross_fusion_attention_fused"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# q / k / v dtypes the kernel takes here: Triton's CPU interpreter computes bf16 dot products wrong (errors of
# ~1e9 against fp64), so under TRITON_INTERPRET=1 bf16 q / k / v are refused rather than answered wrongly
_QKV_DTYPES = tuple(d for d in _DTYPES if not (_INTERPRET and d == torch.bfloat16))
_MAX_HEAD_DIM = FUSED_MAX_HEAD_DIM  # 128: the dispatcher sends larger heads to the PyTorch path
_LOG2E = 1.4426950408889634


def _configs() -> list[triton.Config]:
    """Autotune space on CUDA; one fixed config under the interpreter (multi-config autotune fails without a driver).

    Five configs: measured on an H100 (fp16, Dh = 64), the picks were (32, 64) / (32, 32) for S = 17 .. 33 and
    (128, 64) / (32, 64) for S = 65; every extra config costs a compile (~1 s) at the first call per shape."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _SPACE]


# (BLOCK_M, BLOCK_N, num_warps, num_stages): small blocks for short sequences (k = 16, 32), larger for k >= 64
_SPACE = [(16, 16, 2, 1), (32, 32, 4, 2), (32, 64, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2)]
# fp32 inputs take IEEE fp32 dots (FMA loops, no tensor cores): tiles above this BLOCK_M * BLOCK_N * BLOCK_D took
# 20-40 s each to compile for sm_90 (the dq kernel at Dh = 128: 32 x 32 7 s, 32 x 64 19 s, 64 x 64 40 s), and
# 128 x 64 x 128 asks for 264 KB of shared memory (an H100 has 228 KB). On an H100 the first fp32 call at
# k = 256, Dh = 128 took 326 s to tune over the full space.
_FP32_TILE_BUDGET = 32 * 32 * 128


_FP64_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose blocks are much larger than the sequence (pure padding work) and, for fp32 inputs, tiles
    over ``_FP32_TILE_BUDGET``; fp64 (multiply-sum products with (M, K, N) temporaries) always takes 16 x 16."""
    if kwargs.get("ACC") == tl.float64:
        return [_FP64_CONFIG]
    s = named_args["S"]
    cap = max(16, triton.next_power_of_2(s))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap]
    if named_args["Qt"].dtype == torch.float32:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * kwargs["BLOCK_D"] <= _FP32_TILE_BUDGET]
    return kept or configs[:1]


# Tuned once per (S, Dh, dtypes) by Triton's autotuner (results cached on disk next to its compile cache); after
# that, _launch calls the kernel with the chosen config directly (the autotuner's per-call work is skipped).
_AUTOTUNE = dict(configs=_configs(), key=["S", "HEAD_DIM", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)


# ----------------------------------------------------------------------------------------------------------------------
# forward
#
# Layout contract (the launchers enforce it, copying only inputs that break it): the six q / k / v tensors share
# one set of strides (sb, ss, sh) with a unit stride on Dh, as the head's views of its two (B, S, 3, H, Dh)
# projections do; each residual has its own (rb, rs, rh), unit stride on Dh; outputs, incoming gradients, the
# mask and the log-sum-exp are contiguous, so their offsets come from B, S, H and Dh. Few scalar arguments keep
# Triton's per-launch Python work small: at B = 1 the launch, not the GPU, is the cost.


@triton.jit
def _mm(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """``a`` (M, K) @ ``b`` (K, N) accumulated in ``ACC``. fp64 uses a broadcast multiply-sum: Triton's fp64
    MMA lowering asserts on sm80+ ("fp64 don't support largeK MMA"); only gradcheck-sized work runs in fp64."""
    if ACC == tl.float64:
        c = tl.sum(a[:, :, None].to(ACC) * b[None, :, :].to(ACC), axis=1)
    else:
        c = tl.dot(a, b, input_precision=PRECISION).to(ACC)
    return c


@triton.jit
def _fwd_tile(Q, K, V, R, OUT, KM, LSE, b, h, pid_m, H, S, lse_base, scale_log2, sb, ss, sh, rb, rs, rh,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    base = b * sb + h * sh
    q = tl.load(Q + base + offs_m[:, None] * ss + offs_d[None, :], mask=md_ok, other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, ACC)  # finite floor: an all-masked block never gives -inf - -inf
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)  # (BLOCK_M, BLOCK_D)
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        nd_ok = n_ok[:, None] & d_ok[None, :]
        keep = tl.load(KM + b * S + offs_n, mask=n_ok, other=0) != 0  # (BLOCK_N,)
        k = tl.load(K + base + offs_n[:, None] * ss + offs_d[None, :], mask=nd_ok, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * ss + offs_d[None, :], mask=nd_ok, other=0.0)
        s = _mm(q, tl.trans(k), ACC, PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # masked keys: exp2(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = _mm(p.to(v.dtype), v, ACC, PRECISION)  # (BLOCK_M, BLOCK_D)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    r = tl.load(R + b * rb + h * rh + offs_m[:, None] * rs + offs_d[None, :], mask=md_ok, other=0.0)
    new = r.to(ACC) + acc / l_safe[:, None]  # all-masked rows: acc = 0 -> new = res
    out = ((b * S + offs_m[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]  # contiguous (B, S, H, Dh)
    tl.store(OUT + out, new.to(OUT.dtype.element_ty), mask=md_ok)
    lse = tl.where(has_key, m_i + tl.log2(l_safe), 0.0)  # base-2 log-sum-exp of the scaled scores
    tl.store(LSE + lse_base + offs_m, lse, mask=m_ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _fwd_kernel(Qt, Ki, Vi, Ri, Ni, Qi, Kt, Vt, Rt, Nt, KM, LSE, B, H, S, scale_log2, sb, ss, sh,
                r0b, r0s, r0h, r1b, r1s, r1h,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    direction = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    lse_base = ((direction * B + b) * H + h) * S
    if direction == 0:  # image stream update: text queries over image keys / values
        _fwd_tile(Qt, Ki, Vi, Ri, Ni, KM, LSE, b, h, pid_m, H, S, lse_base, scale_log2, sb, ss, sh, r0b, r0s, r0h,
                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)
    else:  # text stream update: image queries over text keys / values
        _fwd_tile(Qi, Kt, Vt, Rt, Nt, KM, LSE, b, h, pid_m, H, S, lse_base, scale_log2, sb, ss, sh, r1b, r1s, r1h,
                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)


# ----------------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_dq_tile(Q, K, V, DO, DQ, KM, LSE, DELTA, b, h, pid_m, H, S, lse_base, scale, scale_log2, sb, ss, sh,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    base = b * sb + h * sh
    rows = ((b * S + offs_m[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]  # contiguous dO / dq offsets
    q = tl.load(Q + base + offs_m[:, None] * ss + offs_d[None, :], mask=md_ok, other=0.0)
    do = tl.load(DO + rows, mask=md_ok, other=0.0).to(q.dtype)
    lse = tl.load(LSE + lse_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    # pass 1: delta = rowsum(P * dP) (= rowsum(dO * O) for the attention output O)
    delta = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        nd_ok = n_ok[:, None] & d_ok[None, :]
        keep = tl.load(KM + b * S + offs_n, mask=n_ok, other=0) != 0
        k = tl.load(K + base + offs_n[:, None] * ss + offs_d[None, :], mask=nd_ok, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * ss + offs_d[None, :], mask=nd_ok, other=0.0)
        s = _mm(q, tl.trans(k), ACC, PRECISION) * scale_log2
        p = tl.where(keep[None, :], tl.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        dp = _mm(do, tl.trans(v), ACC, PRECISION)  # (BLOCK_M, BLOCK_N)
        delta += tl.sum(p * dp, 1)
    # pass 2: dS = P * (dP - delta); dq = scale * dS k
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        nd_ok = n_ok[:, None] & d_ok[None, :]
        keep = tl.load(KM + b * S + offs_n, mask=n_ok, other=0) != 0
        k = tl.load(K + base + offs_n[:, None] * ss + offs_d[None, :], mask=nd_ok, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * ss + offs_d[None, :], mask=nd_ok, other=0.0)
        s = _mm(q, tl.trans(k), ACC, PRECISION) * scale_log2
        p = tl.where(keep[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), ACC, PRECISION)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq += _mm(ds.to(k.dtype), k, ACC, PRECISION)
    dq = dq * scale
    tl.store(DQ + rows, dq.to(DQ.dtype.element_ty), mask=md_ok)
    tl.store(DELTA + lse_base + offs_m, delta, mask=m_ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _bwd_dq_kernel(Qt, Ki, Vi, Gi, DQt, Qi, Kt, Vt, Gt, DQi, KM, LSE, DELTA, B, H, S, scale, scale_log2, sb, ss, sh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    direction = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    lse_base = ((direction * B + b) * H + h) * S
    if direction == 0:
        _bwd_dq_tile(Qt, Ki, Vi, Gi, DQt, KM, LSE, DELTA, b, h, pid_m, H, S, lse_base, scale, scale_log2, sb, ss, sh,
                     HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)
    else:
        _bwd_dq_tile(Qi, Kt, Vt, Gt, DQi, KM, LSE, DELTA, b, h, pid_m, H, S, lse_base, scale, scale_log2, sb, ss, sh,
                     HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)


@triton.jit
def _bwd_dkdv_tile(Q, K, V, DO, DK, DV, KM, LSE, DELTA, b, h, pid_n, H, S, lse_base, scale, scale_log2, sb, ss, sh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S
    d_ok = offs_d < HEAD_DIM
    nd_ok = n_ok[:, None] & d_ok[None, :]
    base = b * sb + h * sh
    keep = tl.load(KM + b * S + offs_n, mask=n_ok, other=0) != 0  # (BLOCK_N,)
    k = tl.load(K + base + offs_n[:, None] * ss + offs_d[None, :], mask=nd_ok, other=0.0)
    v = tl.load(V + base + offs_n[:, None] * ss + offs_d[None, :], mask=nd_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < S
        md_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + base + offs_m[:, None] * ss + offs_d[None, :], mask=md_ok, other=0.0)
        do = tl.load(DO + ((b * S + offs_m[:, None]) * H + h) * HEAD_DIM + offs_d[None, :], mask=md_ok, other=0.0)
        do = do.to(q.dtype)
        lse = tl.load(LSE + lse_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        delta = tl.load(DELTA + lse_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        st = _mm(k, tl.trans(q), ACC, PRECISION) * scale_log2  # (BLOCK_N, BLOCK_M)
        pt = tl.where(keep[:, None] & m_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += _mm(pt.to(do.dtype), do, ACC, PRECISION)
        dpt = _mm(v, tl.trans(do), ACC, PRECISION)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk += _mm(dst.to(q.dtype), q, ACC, PRECISION)
    dk = dk * scale
    rows = ((b * S + offs_n[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]  # contiguous dk / dv offsets
    tl.store(DK + rows, dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + rows, dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _bwd_dkdv_kernel(Qt, Ki, Vi, Gi, DKi, DVi, Qi, Kt, Vt, Gt, DKt, DVt, KM, LSE, DELTA, B, H, S, scale, scale_log2,
                     sb, ss, sh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    direction = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    lse_base = ((direction * B + b) * H + h) * S
    if direction == 0:
        _bwd_dkdv_tile(Qt, Ki, Vi, Gi, DKi, DVi, KM, LSE, DELTA, b, h, pid_n, H, S, lse_base, scale, scale_log2,
                       sb, ss, sh, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)
    else:
        _bwd_dkdv_tile(Qi, Kt, Vt, Gt, DKt, DVt, KM, LSE, DELTA, b, h, pid_n, H, S, lse_base, scale, scale_log2,
                       sb, ss, sh, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)


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
        if span >= 2**31:
            raise ValueError(f"cross_fusion_attention_fused: {name} span {span} elements, over the int32 offsets "
                             "the kernels use; split the batch")
    if 2 * B * H * S >= 2**31:  # the log-sum-exp / delta rows of both directions
        raise ValueError(f"cross_fusion_attention_fused: 2 * B * H * S = {2 * B * H * S} query rows, over the int32 "
                         "offsets the kernels use; split the batch")
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
    _launch(_bwd_dq_kernel, "BLOCK_M", B, H, S, (q_t, k_i, v_i, g_i, dq_t, q_i, k_t, v_t, g_t, dq_i, *common), meta,
            ("dq",) + key)
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
    ``key_mask`` (B, S) bool; ``scale`` defaults to 1/sqrt(Dh). Outputs are new contiguous (B, S, H, Dh) tensors
    in the residuals' dtypes; differentiable in all eight tensor inputs, once (a backward with
    ``create_graph=True`` raises; ``RETROFIT_FUSED=0`` inside ``sdpa_kernel(SDPBackend.MATH)`` has double backward).

    Strides: the kernels read the inputs in place when the six q / k / v tensors share one layout with a unit
    stride on Dh (the head's views of its (B, S, 3, H, Dh) projections do) and each residual has a unit stride on
    Dh; otherwise the offending tensors are copied to contiguous memory first (a copy of the whole input, once).

    Under ``torch.compile`` the call becomes the custom op ``torch.ops.retrofit.cross_fusion_fwd`` (see
    :mod:`retrofit.kernels.cross_fusion_op`): one node of the compiled graph, no graph break.
    """
    if torch.compiler.is_compiling():  # dynamo cannot trace the launcher; it keeps the custom op in its graph
        scale = q_t.shape[-1] ** -0.5 if scale is None else float(scale)
        new_i, new_t, _ = torch.ops.retrofit.cross_fusion_fwd(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask,
                                                              scale)
        return new_i, new_t
    from retrofit.functional import _check_scale

    scale = _check_scale(scale)
    tensors = dict(zip(_NAMES, (q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t)))
    B, S, H, Dh = _check_inputs(tensors, key_mask)
    if B == 0:  # an empty batch (the PyTorch path takes it too): nothing to attend, the launch grid would be empty
        return (res_i.clone(memory_format=torch.contiguous_format),
                res_t.clone(memory_format=torch.contiguous_format))
    scale = Dh**-0.5 if scale is None else float(scale)
    return CrossFusionAttention.apply(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale)


# registers torch.ops.retrofit.cross_fusion_fwd / _bwd (that module imports the launchers above: keep this last)
from retrofit.kernels import cross_fusion_op as _cross_fusion_op  # noqa: E402, F401
