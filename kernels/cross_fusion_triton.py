"""The Triton kernels of the fused cross-fusion attention and their autotune space: one forward kernel and two
backward kernels (dq; dk and dv), each covering both directions. The launchers, the layout checks and the autograd
function are in :mod:`retrofit.kernels.cross_fusion`, whose docstring describes the algorithm and its numerics."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from retrofit.functional import FUSED_MAX_HEAD_DIM

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
