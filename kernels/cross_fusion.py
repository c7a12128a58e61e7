"""Fused Triton kernels for the two-direction cross-fusion attention (forward and backward).

Spec: :func:`retrofit.functional.cross_fusion_attention_reference`. For one cross-fusion layer::

    new_i = res_i + softmax(q_t k_i^T * scale + mask) v_i     direction 0: text queries over image keys
    new_t = res_t + softmax(q_i k_t^T * scale + mask) v_t     direction 1: image queries over text keys

Every tensor is (B, S, H, Dh), usually a strided view of a (B, S, H * Dh) projection: the launchers pass
strides, nothing is copied. ``key_mask`` (B, S) bool marks attendable keys (shared by both directions).

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

fp32 inputs use IEEE fp32 dots (no tf32), so fp32 results match the reference to fp32 rounding; fp16/bf16
inputs use tensor-core dots with fp32 accumulation (P and dS are rounded to the input dtype before
their dot, as in flash-attention).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from retrofit.functional import FUSED_MAX_HEAD_DIM

__all__ = ["CrossFusionAttention", "cross_fusion_attention_fused"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = FUSED_MAX_HEAD_DIM  # 128: the dispatcher sends larger heads to the PyTorch path
_LOG2E = 1.4426950408889634


def _configs() -> list[triton.Config]:
    """Autotune space on CUDA; one fixed config under the interpreter (multi-config autotune fails there)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # (BLOCK_M, BLOCK_N, num_warps, num_stages): small blocks for short sequences (k = 16, 32), larger for k >= 64
    space = [(16, 16, 2, 1), (16, 32, 2, 1), (32, 32, 4, 1), (32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2),
             (64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in space]


_FP64_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose blocks are much larger than the sequence (pure padding work); fp64 (multiply-sum
    products with (M, K, N) temporaries) always takes 16 x 16 blocks."""
    if kwargs.get("ACC") == tl.float64:
        return [_FP64_CONFIG]
    s = named_args["S"]
    cap = max(16, triton.next_power_of_2(s))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap]
    return kept or configs[:1]


# Tuned once per (S, Dh, dtypes); results are cached on disk next to Triton's compile cache.
_AUTOTUNE = dict(configs=_configs(), key=["S", "HEAD_DIM", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)


# ----------------------------------------------------------------------------------------------------------------------
# forward


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
def _fwd_tile(Q, K, V, R, OUT, KM, LSE, b, h, pid_m, S, lse_base, scale_log2,
              sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, srb, srs, srh, srd,
              sob, sos, soh, sod, smb, sms,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, ACC)  # finite floor: an all-masked block never gives -inf - -inf
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)  # (BLOCK_M, BLOCK_D)
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        nd_ok = n_ok[:, None] & d_ok[None, :]
        keep = tl.load(KM + b * smb + offs_n * sms, mask=n_ok, other=0) != 0  # (BLOCK_N,)
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=nd_ok, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=nd_ok, other=0.0)
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
    r = tl.load(R + b * srb + h * srh + offs_m[:, None] * srs + offs_d[None, :] * srd, mask=md_ok, other=0.0)
    new = r.to(ACC) + acc / l_safe[:, None]  # all-masked rows: acc = 0 -> new = res
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
             new.to(OUT.dtype.element_ty), mask=md_ok)
    lse = tl.where(has_key, m_i + tl.log2(l_safe), 0.0)  # base-2 log-sum-exp of the scaled scores
    tl.store(LSE + lse_base + offs_m, lse, mask=m_ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _fwd_kernel(Qt, Ki, Vi, Ri, Ni, Qi, Kt, Vt, Rt, Nt, KM, LSE, B, H, S, scale_log2,
                s0b, s0s, s0h, s0d, s1b, s1s, s1h, s1d, s2b, s2s, s2h, s2d, s3b, s3s, s3h, s3d,
                s4b, s4s, s4h, s4d, s5b, s5s, s5h, s5d, s6b, s6s, s6h, s6d, s7b, s7s, s7h, s7d,
                snb, sns, snh, snd, smb, sms,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    direction = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    lse_base = ((direction * B + b) * H + h) * S
    if direction == 0:  # image stream update: text queries over image keys / values
        _fwd_tile(Qt, Ki, Vi, Ri, Ni, KM, LSE, b, h, pid_m, S, lse_base, scale_log2,
                  s0b, s0s, s0h, s0d, s1b, s1s, s1h, s1d, s2b, s2s, s2h, s2d, s3b, s3s, s3h, s3d,
                  snb, sns, snh, snd, smb, sms, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)
    else:  # text stream update: image queries over text keys / values
        _fwd_tile(Qi, Kt, Vt, Rt, Nt, KM, LSE, b, h, pid_m, S, lse_base, scale_log2,
                  s4b, s4s, s4h, s4d, s5b, s5s, s5h, s5d, s6b, s6s, s6h, s6d, s7b, s7s, s7h, s7d,
                  snb, sns, snh, snd, smb, sms, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)


# ----------------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_dq_tile(Q, K, V, DO, DQ, KM, LSE, DELTA, b, h, pid_m, S, lse_base, scale, scale_log2,
                 sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sgb, sgs, sgh, sgd,
                 sob, sos, soh, sod, smb, sms,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgs + offs_d[None, :] * sgd, mask=md_ok, other=0.0)
    do = do.to(q.dtype)
    lse = tl.load(LSE + lse_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    # pass 1: delta = rowsum(P * dP) (= rowsum(dO * O) for the attention output O)
    delta = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        nd_ok = n_ok[:, None] & d_ok[None, :]
        keep = tl.load(KM + b * smb + offs_n * sms, mask=n_ok, other=0) != 0
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=nd_ok, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=nd_ok, other=0.0)
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
        keep = tl.load(KM + b * smb + offs_n * sms, mask=n_ok, other=0) != 0
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=nd_ok, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=nd_ok, other=0.0)
        s = _mm(q, tl.trans(k), ACC, PRECISION) * scale_log2
        p = tl.where(keep[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), ACC, PRECISION)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq += _mm(ds.to(k.dtype), k, ACC, PRECISION)
    dq = dq * scale
    tl.store(DQ + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
             dq.to(DQ.dtype.element_ty), mask=md_ok)
    tl.store(DELTA + lse_base + offs_m, delta, mask=m_ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _bwd_dq_kernel(Qt, Ki, Vi, Gi, DQt, Qi, Kt, Vt, Gt, DQi, KM, LSE, DELTA, B, H, S, scale, scale_log2,
                   s0b, s0s, s0h, s0d, s1b, s1s, s1h, s1d, s2b, s2s, s2h, s2d, s3b, s3s, s3h, s3d,
                   s4b, s4s, s4h, s4d, s5b, s5s, s5h, s5d, s6b, s6s, s6h, s6d, s7b, s7s, s7h, s7d,
                   snb, sns, snh, snd, smb, sms,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    direction = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    lse_base = ((direction * B + b) * H + h) * S
    if direction == 0:
        _bwd_dq_tile(Qt, Ki, Vi, Gi, DQt, KM, LSE, DELTA, b, h, pid_m, S, lse_base, scale, scale_log2,
                     s0b, s0s, s0h, s0d, s1b, s1s, s1h, s1d, s2b, s2s, s2h, s2d, s3b, s3s, s3h, s3d,
                     snb, sns, snh, snd, smb, sms, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)
    else:
        _bwd_dq_tile(Qi, Kt, Vt, Gt, DQi, KM, LSE, DELTA, b, h, pid_m, S, lse_base, scale, scale_log2,
                     s4b, s4s, s4h, s4d, s5b, s5s, s5h, s5d, s6b, s6s, s6h, s6d, s7b, s7s, s7h, s7d,
                     snb, sns, snh, snd, smb, sms, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)


@triton.jit
def _bwd_dkdv_tile(Q, K, V, DO, DK, DV, KM, LSE, DELTA, b, h, pid_n, S, lse_base, scale, scale_log2,
                   sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sgb, sgs, sgh, sgd,
                   sob, sos, soh, sod, smb, sms,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S
    d_ok = offs_d < HEAD_DIM
    nd_ok = n_ok[:, None] & d_ok[None, :]
    keep = tl.load(KM + b * smb + offs_n * sms, mask=n_ok, other=0) != 0  # (BLOCK_N,)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=nd_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=nd_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < S
        md_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
        do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgs + offs_d[None, :] * sgd, mask=md_ok, other=0.0)
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
    tl.store(DK + b * sob + h * soh + offs_n[:, None] * sos + offs_d[None, :] * sod,
             dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + b * sob + h * soh + offs_n[:, None] * sos + offs_d[None, :] * sod,
             dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _bwd_dkdv_kernel(Qt, Ki, Vi, Gi, DKi, DVi, Qi, Kt, Vt, Gt, DKt, DVt, KM, LSE, DELTA, B, H, S, scale, scale_log2,
                     s0b, s0s, s0h, s0d, s1b, s1s, s1h, s1d, s2b, s2s, s2h, s2d, s3b, s3s, s3h, s3d,
                     s4b, s4s, s4h, s4d, s5b, s5s, s5h, s5d, s6b, s6s, s6h, s6d, s7b, s7s, s7h, s7d,
                     snb, sns, snh, snd, smb, sms,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    direction = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    lse_base = ((direction * B + b) * H + h) * S
    if direction == 0:
        _bwd_dkdv_tile(Qt, Ki, Vi, Gi, DKi, DVi, KM, LSE, DELTA, b, h, pid_n, S, lse_base, scale, scale_log2,
                       s0b, s0s, s0h, s0d, s1b, s1s, s1h, s1d, s2b, s2s, s2h, s2d, s3b, s3s, s3h, s3d,
                       snb, sns, snh, snd, smb, sms, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)
    else:
        _bwd_dkdv_tile(Qi, Kt, Vt, Gt, DKt, DVt, KM, LSE, DELTA, b, h, pid_n, S, lse_base, scale, scale_log2,
                       s4b, s4s, s4h, s4d, s5b, s5s, s5h, s5d, s6b, s6s, s6h, s6d, s7b, s7s, s7h, s7d,
                       snb, sns, snh, snd, smb, sms, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, PRECISION)


# ----------------------------------------------------------------------------------------------------------------------
# launchers

_NAMES = ("q_t", "k_i", "v_i", "q_i", "k_t", "v_t", "res_i", "res_t")


def _check_inputs(tensors: dict[str, torch.Tensor], key_mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate the eight (B, S, H, Dh) tensors and the (B, S) mask; returns (B, S, H, Dh)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cross_fusion_attention_fused: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"cross_fusion_attention_fused: {name} must be 4-D (B, S, H, Dh), got shape "
                             f"{tuple(t.shape)}")
    shape = tensors["q_t"].shape
    for name, t in tensors.items():
        if t.shape != shape:
            raise ValueError(f"cross_fusion_attention_fused: {name} has shape {tuple(t.shape)} but q_t has "
                             f"{tuple(shape)}; all eight inputs must share (B, S, H, Dh)")
    B, S, H, Dh = shape
    if min(B, S, H, Dh) < 1:
        raise ValueError(f"cross_fusion_attention_fused: empty input of shape {tuple(shape)}")
    if Dh > _MAX_HEAD_DIM:
        raise ValueError(f"cross_fusion_attention_fused: head dim Dh={Dh} is not supported; allowed 1..{_MAX_HEAD_DIM} "
                         "(tuned for 32, 64, 128)")
    dtype = tensors["q_t"].dtype
    if dtype not in _DTYPES:
        raise ValueError(f"cross_fusion_attention_fused: dtype {dtype} is not supported; allowed {list(_DTYPES)}")
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
    for name, t in list(tensors.items()) + [("key_mask", key_mask)]:
        _check_offsets(name, t)
    return B, S, H, Dh


def _check_offsets(name: str, t: torch.Tensor) -> None:
    """Kernels index with int32 offsets: the largest element offset must fit."""
    if any(st < 0 for st in t.stride()):
        raise ValueError(f"cross_fusion_attention_fused: {name} has a negative stride {t.stride()}")
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    if span >= 2**31:
        raise ValueError(f"cross_fusion_attention_fused: {name} spans {span} elements (strides {t.stride()}), over "
                         "the int32 offsets the kernel uses; split the batch")


def _strides(*ts: torch.Tensor) -> list[int]:
    return [s for t in ts for s in t.stride()]


def _meta(dtype: torch.dtype, Dh: int) -> dict:
    return dict(
        HEAD_DIM=Dh,
        BLOCK_D=max(16, triton.next_power_of_2(Dh)),
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        PRECISION="ieee",  # only affects fp32 inputs: no tf32 truncation
    )


def _grid(B: int, H: int, S: int, block: str):
    return lambda meta: (B * H, triton.cdiv(S, meta[block]), 2)


def _forward(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale):
    """Launch the forward kernel; returns new_i, new_t (B, S, H, Dh) and the log-sum-exp (2, B, H, S)."""
    B, S, H, Dh = q_t.shape
    acc = torch.float64 if q_t.dtype == torch.float64 else torch.float32
    new_i = torch.empty((B, S, H, Dh), dtype=res_i.dtype, device=res_i.device)  # (B, S, H, Dh)
    new_t = torch.empty((B, S, H, Dh), dtype=res_t.dtype, device=res_t.device)  # (B, S, H, Dh)
    lse = torch.empty((2, B, H, S), dtype=acc, device=q_t.device)  # base-2 log-sum-exp per query row
    km = key_mask.view(torch.uint8)  # (B, S) same bytes, no copy
    _fwd_kernel[_grid(B, H, S, "BLOCK_M")](
        q_t, k_i, v_i, res_i, new_i, q_i, k_t, v_t, res_t, new_t, km, lse, B, H, S, scale * _LOG2E,
        *_strides(q_t, k_i, v_i, res_i, q_i, k_t, v_t, res_t, new_i), *km.stride(),
        **_meta(q_t.dtype, Dh),
    )
    return new_i, new_t, lse


def _backward(g_i, g_t, q_t, k_i, v_i, q_i, k_t, v_t, key_mask, lse, scale):
    """Launch the two backward kernels; returns dq_t, dk_i, dv_i, dq_i, dk_t, dv_t."""
    B, S, H, Dh = q_t.shape
    grads = [torch.empty((B, S, H, Dh), dtype=q_t.dtype, device=q_t.device) for _ in range(6)]
    dq_t, dk_i, dv_i, dq_i, dk_t, dv_t = grads  # each (B, S, H, Dh)
    delta = torch.empty_like(lse)  # (2, B, H, S) rowsum(P * dP)
    km = key_mask.view(torch.uint8)
    meta = _meta(q_t.dtype, Dh)
    common = (B, H, S, scale, scale * _LOG2E, *_strides(q_t, k_i, v_i, g_i, q_i, k_t, v_t, g_t, dq_t), *km.stride())
    _bwd_dq_kernel[_grid(B, H, S, "BLOCK_M")](
        q_t, k_i, v_i, g_i, dq_t, q_i, k_t, v_t, g_t, dq_i, km, lse, delta, *common, **meta
    )
    _bwd_dkdv_kernel[_grid(B, H, S, "BLOCK_N")](
        q_t, k_i, v_i, g_i, dk_i, dv_i, q_i, k_t, v_t, g_t, dk_t, dv_t, km, lse, delta, *common, **meta
    )
    return dq_t, dk_i, dv_i, dq_i, dk_t, dv_t


class CrossFusionAttention(torch.autograd.Function):
    """Autograd wrapper: saves q/k/v of both directions, the mask and the log-sum-exp (not the probabilities)."""

    @staticmethod
    def forward(ctx, q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale):
        new_i, new_t, lse = _forward(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale)
        ctx.save_for_backward(q_t, k_i, v_i, q_i, k_t, v_t, key_mask, lse)
        ctx.scale = scale
        return new_i, new_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_i, g_t):
        q_t, k_i, v_i, q_i, k_t, v_t, key_mask, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        if any(need[:6]):
            dq_t, dk_i, dv_i, dq_i, dk_t, dv_t = _backward(
                g_i, g_t, q_t, k_i, v_i, q_i, k_t, v_t, key_mask, lse, ctx.scale
            )
        else:
            dq_t = dk_i = dv_i = dq_i = dk_t = dv_t = None
        # d new / d res is the identity: the incoming gradients are the residuals' gradients.
        return dq_t, dk_i, dv_i, dq_i, dk_t, dv_t, g_i if need[6] else None, g_t if need[7] else None, None, None


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
    weights): inputs (B, S, H, Dh) on one CUDA device (or CPU under ``TRITON_INTERPRET=1``), any strides;
    q, k, v of both directions share one dtype (fp16, bf16, fp32 or fp64), each residual may have its own
    (as under autocast); ``key_mask`` (B, S) bool; ``scale`` defaults to 1/sqrt(Dh). Outputs are new
    contiguous (B, S, H, Dh) tensors in the residuals' dtypes; differentiable in all eight tensor inputs.
    """
    tensors = dict(zip(_NAMES, (q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t)))
    B, S, H, Dh = _check_inputs(tensors, key_mask)
    scale = Dh**-0.5 if scale is None else float(scale)
    return CrossFusionAttention.apply(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, key_mask, scale)
