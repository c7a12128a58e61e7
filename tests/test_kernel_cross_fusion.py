"""The fused cross-fusion attention kernel against the PyTorch reference (the spec).

Without a GPU these run through Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small. Tolerance rule (DESIGN.md, flash-attention's): for every output and gradient,
the kernel's error against the reference computed in fp64 is at most 2x the reference's own error
in the tested dtype, plus ``atol``.
"""

from __future__ import annotations

import importlib
import shutil

import pytest
import torch

from retrofit.functional import cross_fusion_attention, cross_fusion_attention_reference

pytest.importorskip("triton")  # only triton's absence skips: an error in the kernel module itself fails the tests
cf = importlib.import_module("retrofit.kernels.cross_fusion")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q_t", "k_i", "v_i", "q_i", "k_t", "v_t", "res_i", "res_t")
# atol of the tolerance rule, per dtype (covers outputs / gradients whose true value is ~0).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(B, S, H, Dh, dtype, device=DEVICE, masked_rows=(), p_drop=0.3, seed=0):
    """Eight (B, S, H, Dh) leaf tensors and a (B, S) key mask (slot 0, the query, always kept unless the row
    is listed in ``masked_rows``, which get no attendable key at all)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, S, H, Dh, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in NAMES]
    mask = torch.rand(B, S, generator=g) > p_drop
    mask[:, 0] = True
    for r in masked_rows:
        mask[r] = False
    return xs, mask.to(device)


def run(fn, xs, mask, grads, **kw):
    """Outputs and the gradients of all eight inputs for upstream gradients ``grads``."""
    out = fn(*xs, mask, **kw)[:2]
    gs = torch.autograd.grad(out, xs, [g.to(out[0].dtype) for g in grads])
    return [o.detach() for o in out], list(gs)


def fused(*args, **kw):
    return cf.cross_fusion_attention_fused(*args, **kw)


def reference(*args, **kw):
    return cross_fusion_attention_reference(*args, **kw)


def check_against_fp64(xs, mask, scale=None):
    """Apply the tolerance rule to the 2 outputs and 8 gradients; returns the worst (kernel_err, ref_err)."""
    dtype = xs[0].dtype
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(xs[0].shape, generator=g).to(xs[0].device) for _ in range(2)]
    x64 = [x.detach().double().requires_grad_() for x in xs]
    truth_out, truth_g = run(reference, x64, mask, grads, scale=scale)
    ref_out, ref_g = run(reference, xs, mask, grads, scale=scale)
    ker_out, ker_g = run(fused, xs, mask, grads, scale=scale)
    names = ["new_i", "new_t"] + [f"grad {n}" for n in NAMES]
    for name, t, r, k in zip(names, truth_out + truth_g, ref_out + ref_g, ker_out + ker_g):
        assert k.dtype == dtype and k.shape == t.shape, (name, k.dtype, k.shape)
        assert torch.isfinite(k).all(), f"{name}: non-finite values"
        ref_err = (r.double() - t).abs().max().item()
        ker_err = (k.double() - t).abs().max().item()
        bound = 2 * ref_err + ATOL[dtype]
        assert ker_err <= bound, f"{name} ({dtype}): kernel err {ker_err:.3g} > {bound:.3g} (ref err {ref_err:.3g})"
    return ker_out, ker_g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "B,k,H,Dh",
    [(1, 1, 2, 32), (2, 7, 2, 32), (2, 31, 1, 64), (2, 32, 2, 32), (1, 63, 1, 16), (1, 100, 1, 32)],
    ids=["k1-one-row", "k7", "k31-dh64", "k32", "k63-s64", "k100"],
)
def test_forward_and_gradients_match_reference(B, k, H, Dh, dtype):
    xs, mask = make_inputs(B, k + 1, H, Dh, dtype)
    check_against_fp64(xs, mask)


def test_head_dim_128_and_custom_scale():
    xs, mask = make_inputs(1, 17, 1, 128, torch.float32)
    check_against_fp64(xs, mask, scale=0.3)


def test_head_dim_not_a_power_of_two():
    xs, mask = make_inputs(2, 5, 2, 12, torch.float32)
    check_against_fp64(xs, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_odd_heads_and_head_dim_with_a_lone_neighbour_past_the_first_key_block(dtype):
    """H = 3, Dh = 5 (neither a power of two) and, in row 1, one valid neighbour in slot 37: the only key besides
    the query lies past the first 32 keys, so the online softmax meets whole key blocks with nothing to attend before
    it (row 0 keeps the random mask)."""
    xs, mask = make_inputs(2, 40, 3, 5, dtype)
    mask[1] = False
    mask[1, 0] = mask[1, 37] = True
    check_against_fp64(xs, mask)
    solo = mask.clone()
    solo[1, 0] = False  # the lone neighbour is the only key: the query slot itself masked
    check_against_fp64(xs, solo)


def test_fully_masked_rows_give_residual_and_zero_grads():
    xs, mask = make_inputs(3, 9, 2, 32, torch.float32, masked_rows=(1,))
    out, grads = check_against_fp64(xs, mask)
    assert torch.equal(out[0][1], xs[6].detach()[1]) and torch.equal(out[1][1], xs[7].detach()[1])
    for g in grads[:6]:  # q / k / v of both directions get nothing from a row with no attendable key
        assert torch.count_nonzero(g[1]) == 0
    assert torch.count_nonzero(grads[0][0]) > 0


def test_everything_masked_is_finite():
    xs, mask = make_inputs(2, 4, 1, 16, torch.float16, masked_rows=(0, 1))
    out, grads = check_against_fp64(xs, mask)
    assert torch.equal(out[0], xs[6].detach()) and torch.equal(out[1], xs[7].detach())


def test_an_empty_batch_gives_empty_outputs_like_the_reference():
    """B = 0 (an empty last batch) worked on the PyTorch path but the kernel refused it ("empty input")."""
    xs, mask = make_inputs(0, 5, 2, 8, torch.float32)
    out = fused(*xs, mask)
    ref = reference(*xs, mask)
    for o, r in zip(out, ref[:2]):
        assert o.shape == r.shape == (0, 5, 2, 8) and o.dtype == r.dtype
    grads = torch.autograd.grad([o.sum() for o in out], xs, allow_unused=True)
    assert all(g is None or g.shape == (0, 5, 2, 8) for g in grads)
    bad, mask1 = make_inputs(1, 5, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="empty input of shape .* S, H and Dh must be >= 1"):
        fused(*[x[:, :, :0] for x in bad], mask1)


def test_mixed_precision_residuals():
    """Autocast-style inputs: fp16 q/k/v, fp32 residual streams (outputs and residual grads stay fp32)."""
    xs, mask = make_inputs(2, 9, 2, 32, torch.float16)
    xs[6] = xs[6].detach().float().requires_grad_()
    xs[7] = xs[7].detach().float().requires_grad_()
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(xs[0].shape, generator=g).to(DEVICE) for _ in range(2)]
    truth_out, truth_g = run(reference, [x.detach().double().requires_grad_() for x in xs], mask, grads)
    ref_out, ref_g = run(reference, xs, mask, grads)
    ker_out, ker_g = run(fused, xs, mask, grads)
    assert [o.dtype for o in ker_out] == [torch.float32] * 2
    assert [x.dtype for x in ker_g] == [x.dtype for x in xs]
    for t, r, k in zip(truth_out + truth_g, ref_out + ref_g, ker_out + ker_g):
        ref_err, ker_err = (r.double() - t).abs().max().item(), (k.double() - t).abs().max().item()
        assert ker_err <= 2 * ref_err + ATOL[torch.float16]


def test_non_contiguous_inputs():
    """Head views of fused (B, S, 3d) projections, a transposed residual and an expanded mask: strides are
    honoured without copies."""
    B, S, H, Dh = 2, 12, 2, 32
    d = H * Dh
    g = torch.Generator().manual_seed(3)
    qkv_t = torch.randn(B, S, 3 * d, generator=g).to(DEVICE).requires_grad_()
    qkv_i = torch.randn(B, S, 3 * d, generator=g).to(DEVICE).requires_grad_()
    res_i = torch.randn(S, B, d, generator=g).to(DEVICE).requires_grad_()  # (S, B, d), used transposed
    res_t = torch.randn(B, S, 2 * d, generator=g).to(DEVICE).requires_grad_()  # every other channel used

    def views(qkv_t, qkv_i, res_i, res_t):
        q_t, k_t, v_t = (x.view(B, S, H, Dh) for x in qkv_t.split(d, dim=-1))
        q_i, k_i, v_i = (x.view(B, S, H, Dh) for x in qkv_i.split(d, dim=-1))
        r_i = res_i.transpose(0, 1).unflatten(-1, (H, Dh))  # (B, S, H, Dh), batch stride d
        r_t = res_t[..., ::2].unflatten(-1, (H, Dh))  # (B, S, H, Dh), channel stride 2
        return [q_t, k_i, v_i, q_i, k_t, v_t, r_i, r_t]

    leaves = [qkv_t, qkv_i, res_i, res_t]
    xs = views(*leaves)
    assert not any(x.is_contiguous() for x in xs)
    mask = torch.ones(S, dtype=torch.bool, device=DEVICE).expand(B, S).clone()
    mask[1, 5:] = False
    mask = mask.t().contiguous().t()  # (B, S) with column-major strides
    gout = [torch.randn(B, S, H, Dh, generator=g).to(DEVICE) for _ in range(2)]
    outs = {}
    for name, fn in (("fused", fused), ("reference", reference)):
        o = fn(*views(*leaves), mask)[:2]
        outs[name] = [x.detach() for x in o] + list(torch.autograd.grad(o, leaves, gout))
    for a, b in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["expanded", "transposed", "offset"])
def test_broadcast_transposed_and_offset_inputs(layout):
    """Layouts a caller may hand in (found untested by a review): one key/value set broadcast over the batch
    (stride 0), (B, H, S, Dh) tensors seen transposed, and views with a storage offset."""
    B, S, H, Dh = 2, 9, 2, 16
    g = torch.Generator().manual_seed(5)
    shape = {"expanded": (1, S, H, Dh), "transposed": (B, H, S, Dh), "offset": (B, S + 1, H, Dh)}[layout]
    leaves = [torch.randn(shape, generator=g).to(DEVICE).requires_grad_() for _ in NAMES]

    def view(x):
        return {"expanded": lambda: x.expand(B, S, H, Dh), "transposed": lambda: x.transpose(1, 2),
                "offset": lambda: x[:, 1:]}[layout]()

    mask = torch.rand(B, S, generator=g).to(DEVICE) > 0.3
    mask[:, 0] = True
    gout = [torch.randn(B, S, H, Dh, generator=g).to(DEVICE) for _ in range(2)]
    outs = {}
    for name, fn in (("fused", fused), ("reference", reference)):
        o = fn(*[view(x) for x in leaves], mask)[:2]
        outs[name] = [x.detach() for x in o] + list(torch.autograd.grad(o, leaves, gout))
    for a, b in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_fp64():
    """The kernel supports fp64 (fp64 accumulators, IEEE dots), so gradcheck runs through it directly; also
    over several key blocks (S = 40 > BLOCK_N) with a row that has no attendable key (fast mode: random
    directions, few launches)."""
    xs, mask = make_inputs(1, 3, 1, 2, torch.float64, p_drop=0.0)
    mask[0, 2] = False
    assert torch.autograd.gradcheck(lambda *a: fused(*a, mask), tuple(xs), eps=1e-6, atol=1e-6)
    xs, mask = make_inputs(2, 40, 1, 3, torch.float64, masked_rows=(1,))
    assert torch.autograd.gradcheck(lambda *a: fused(*a, mask), tuple(xs), eps=1e-6, atol=1e-6, fast_mode=True)


def test_dispatcher_uses_kernel_when_forced(monkeypatch):
    xs, mask = make_inputs(2, 6, 2, 16, torch.float32)
    direct = fused(*xs, mask)
    monkeypatch.setenv("RETROFIT_FUSED", "1")
    via = cross_fusion_attention(*xs, mask)
    assert via[2] is None
    assert torch.equal(via[0], direct[0]) and torch.equal(via[1], direct[1])
    assert via[0].grad_fn is not None and "CrossFusionAttention" in type(via[0].grad_fn).__name__
    monkeypatch.setenv("RETROFIT_FUSED", "0")
    ref = cross_fusion_attention(*xs, mask)
    assert "CrossFusionAttention" not in type(ref[0].grad_fn).__name__
    torch.testing.assert_close(ref[0], direct[0], rtol=1e-5, atol=1e-5)


def test_launcher_errors():
    xs, mask = make_inputs(2, 5, 2, 16, torch.float32)
    xs = [x.detach() for x in xs]
    with pytest.raises(ValueError, match=r"k_i has shape \(2, 4, 2, 16\)"):
        fused(xs[0], xs[1][:, :4], *xs[2:], mask)
    with pytest.raises(ValueError, match="must be 4-D"):
        fused(xs[0].flatten(2), *xs[1:], mask)
    with pytest.raises(ValueError, match="v_t is torch.float16 but q_t is torch.float32; q, k and v"):
        fused(*xs[:5], xs[5].half(), *xs[6:], mask)
    with pytest.raises(ValueError, match="dtype torch.int32 is not supported"):
        fused(*[x.int() for x in xs], mask)
    with pytest.raises(ValueError, match="res_i dtype torch.int64 is not supported"):
        fused(*xs[:6], xs[6].long(), xs[7], mask)
    with pytest.raises(ValueError, match="key_mask must be torch.bool"):
        fused(*xs, mask.float())
    with pytest.raises(ValueError, match=r"key_mask has shape \(2, 4\), expected"):
        fused(*xs, mask[:, :4])
    big = [torch.zeros(1, 2, 1, 256) for _ in NAMES]
    with pytest.raises(ValueError, match="head dim Dh=256 is not supported"):
        fused(*big, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_mask is on meta"):
        fused(*xs, mask.to("meta"))
    with pytest.raises(TypeError, match="res_t must be a torch.Tensor"):
        fused(*xs[:7], None, mask)
    with pytest.raises(TypeError, match="scale must be a Python number"):  # its gradient was dropped, silently
        fused(*xs, mask, torch.tensor(0.25, requires_grad=True))


def test_double_backward_is_refused_not_silently_dropped():
    """The kernel's gradients are not differentiable: a gradient penalty (create_graph=True) used to get None
    for them under allow_unused=True, silently. It raises, naming the way out; the PyTorch path has it."""
    xs, mask = make_inputs(2, 5, 1, 16, torch.float32)
    for fn in (fused, lambda *a: cf.CrossFusionAttention.apply(*a, 16**-0.5)):
        out = fn(*xs, mask)
        with pytest.raises(RuntimeError, match="no double backward .* RETROFIT_FUSED=0 inside .*SDPBackend.MATH"):
            torch.autograd.grad(out[0].pow(2).sum(), xs[:3], create_graph=True, allow_unused=True)
    new_i, _, _ = reference(*xs, mask)  # the reference's double backward: a real second derivative
    (g,) = torch.autograd.grad(new_i.pow(2).sum(), xs[0], create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), xs[1])
    assert gg.abs().sum() > 0
    # the way out the error names gives the same second derivative (RETROFIT_FUSED=0 alone, the advice before,
    # failed: PyTorch's fused CPU attention has no double backward)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from retrofit.functional import cross_fusion_attention_native

    with sdpa_kernel(SDPBackend.MATH):
        new_i, _ = cross_fusion_attention_native(*xs, mask)
        (g2,) = torch.autograd.grad(new_i.pow(2).sum(), xs[0], create_graph=True)
        (gg2,) = torch.autograd.grad(g2.pow(2).sum(), xs[1])
    torch.testing.assert_close(gg2, gg, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's bf16 guard (CPU only)")
def test_bf16_under_the_interpreter_is_refused():
    """Triton's interpreter computes bf16 dots wrong (errors ~1e9 against fp64): refused, not answered."""
    xs, mask = make_inputs(2, 5, 1, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 q / k / v under TRITON_INTERPRET=1 are not supported"):
        fused(*xs, mask)
    res = [x.detach().bfloat16() for x in xs[6:]]  # bf16 residuals with fp32 q / k / v: no bf16 dot, accepted
    xs32 = [x.detach().float() for x in xs[:6]]
    new_i, _ = fused(*xs32, *res, mask)
    assert new_i.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------------
# CUDA only (skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("k,Dh", [(16, 64), (63, 32), (256, 128)])
def test_cuda_bf16(k, Dh):
    xs, mask = make_inputs(4, k + 1, 8, Dh, torch.bfloat16, device="cuda")
    check_against_fp64(xs, mask)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,k,Dh", [(32, 32, 64), (64, 64, 64), (8, 256, 128), (3, 200, 32)])
def test_cuda_larger_shapes(B, k, Dh, dtype):
    xs, mask = make_inputs(B, k + 1, 8, Dh, dtype, device="cuda", masked_rows=(1,))
    check_against_fp64(xs, mask)


@pytest.mark.cuda
def test_cuda_autotune_picks_a_config():
    assert len(cf._fwd_kernel.configs) > 1
    xs, mask = make_inputs(16, 33, 8, 64, torch.float16, device="cuda")
    check_against_fp64(xs, mask)
    for kern in (cf._fwd_kernel, cf._bwd_dq_kernel, cf._bwd_dkdv_kernel):
        assert kern.best_config is not None and kern.best_config.kwargs["BLOCK_M"] in (16, 32, 64, 128)
    again = fused(*xs, mask)  # cached config: same result
    ref = fused(*xs, mask)
    assert torch.equal(again[0], ref[0])


# ----------------------------------------------------------------------------------------------------------------------
# the whole RetrievalHead, RETROFIT_FUSED=1 vs =0


def test_retrieval_head_same_with_fused_and_reference(monkeypatch):
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.neighbors import Neighbors

    torch.manual_seed(0)
    B, k, C = 3, 7, 5
    cfg = HeadConfig(query_dim=24, image_dim=20, text_dim=12, num_classes=C, dim=32, depth=2, heads=2, k=k)
    head = RetrievalHead(cfg).to(DEVICE)
    torch.nn.init.normal_(head.readout.fc.weight, std=0.5)  # the readout starts at zero: make gradients flow
    mask = torch.rand(B, k) > 0.3
    mask[2] = False  # a query with no neighbour at all
    image = torch.randn(B, k, cfg.image_dim) * mask[..., None]
    text = torch.randn(B, k, cfg.text_dim) * mask[..., None]
    ids = torch.where(mask, torch.arange(B * k).view(B, k), -1)
    nb = Neighbors(ids=ids, scores=torch.where(mask, 0.5, float("-inf")), mask=mask, image=image, text=text,
                   labels=torch.full((B, k), -1)).to(DEVICE)
    z = torch.randn(B, cfg.query_dim, device=DEVICE)
    host = torch.randn(B, C, device=DEVICE)
    target = torch.tensor([0, 3, 1], device=DEVICE)
    params = [p for p in head.parameters() if p.requires_grad]
    calls = []
    kernel = cf.cross_fusion_attention_fused

    def counting(*a, **kw):  # the real kernel, counted: proves the fused path ran
        calls.append(1)
        return kernel(*a, **kw)

    monkeypatch.setattr(cf, "cross_fusion_attention_fused", counting)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("RETROFIT_FUSED", flag)
        zz = z.clone().requires_grad_()
        out = head(zz, host_logits=host, neighbors=nb)
        loss = torch.nn.functional.cross_entropy(out.logits, target)
        grads = torch.autograd.grad(loss, [zz] + params)
        results[flag] = [out.logits.detach(), out.retrieval_logits.detach()] + list(grads)
    assert len(calls) == cfg.depth, f"fused kernel ran {len(calls)} times, expected once per layer ({cfg.depth})"
    assert any(torch.count_nonzero(g) for g in results["1"][3:]), "no gradient reached the fusion layers"
    for ref, ker in zip(results["0"], results["1"]):
        torch.testing.assert_close(ker, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile the kernels ahead of time for sm_90 (Triton -> PTX -> cubin with the
# bundled ptxas). The interpreter cannot catch lowering failures (e.g. Triton's fp64 MMA assert); this does.

_AOT = r"""
import sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from retrofit.kernels import cross_fusion as cf

def signature(fn, dt, const):
    sig = {}
    for n in fn.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n == "KM":
            sig[n] = "*u8"
        elif n in ("LSE", "DELTA"):
            sig[n] = "*fp64" if dt == "fp64" else "*fp32"
        elif n[0].isupper() and n not in ("B", "H", "S"):
            sig[n] = "*" + dt
        else:
            sig[n] = "fp32" if n.startswith("scale") else "i32"
    return sig

for name, dt, D in [a.split(":") for a in sys.argv[1:]]:
    kern = getattr(cf, name)
    acc = tl.float64 if dt == "fp64" else tl.float32
    cfg = cf._FP64_CONFIG if dt == "fp64" else kern.configs[2]
    const = dict(HEAD_DIM=int(D), BLOCK_D=int(D), ACC=acc, PRECISION="ieee", **cfg.kwargs)
    src = ASTSource(fn=kern.fn, signature=signature(kern.fn, dt, const), constexprs=const)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert len(k.asm["cubin"]) > 0
    print("compiled", name, dt, D, flush=True)
"""


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, never a cache hit
    jobs = ["_fwd_kernel:fp16:64", "_bwd_dq_kernel:bf16:64", "_bwd_dkdv_kernel:fp64:32"]
    r = subprocess.run([sys.executable, "-c", _AOT, *jobs], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == len(jobs), r.stdout


# ----------------------------------------------------------------------------------------------------------------------
# the launch path: layout contract and the autotuner bypass


def test_head_layout_is_read_in_place_and_odd_layouts_are_copied():
    """The head's views of its (B, S, 3, H, Dh) projections and (B, S, d) streams go to the kernels as they are;
    a residual with a non-unit Dh stride, or q / k / v with differing layouts, are copied (the documented rule)."""
    B, S, H, Dh = 2, 5, 2, 16
    qkv_i, qkv_t = (torch.randn(B, S, 3, H, Dh) for _ in range(2))
    q_i, k_i, v_i = qkv_i.unbind(2)
    q_t, k_t, v_t = qkv_t.unbind(2)
    qkv = [q_t, k_i, v_i, q_i, k_t, v_t]
    res = [torch.randn(B, S, H * Dh).view(B, S, H, Dh), torch.randn(B, S, H * Dh).view(B, S, H, Dh)]
    mask = torch.ones(B, S, dtype=torch.bool)
    got_qkv, got_res, km, st, res_st = cf._layout(list(qkv), list(res), mask)
    assert all(a is b for a, b in zip(got_qkv, qkv)) and all(a is b for a, b in zip(got_res, res))
    assert st == (S * 3 * H * Dh, 3 * H * Dh, Dh) and res_st == [(S * H * Dh, H * Dh, Dh)] * 2
    assert km.dtype == torch.uint8 and km.data_ptr() == mask.data_ptr()
    odd_res = torch.randn(B, S, Dh, H).transpose(2, 3)  # Dh stride H
    odd_k = k_i.contiguous()  # same values, another layout than the other five
    got_qkv, got_res, _, st, res_st = cf._layout([q_t, odd_k, v_i, q_i, k_t, v_t], [odd_res, res[1]], mask)
    assert all(t.is_contiguous() for t in got_qkv) and st == (S * H * Dh, H * Dh, Dh)
    assert got_res[0].is_contiguous() and torch.equal(got_res[0], odd_res) and got_res[1] is res[1]


def test_later_calls_skip_the_autotuner_with_the_same_result(monkeypatch):
    xs, mask = make_inputs(2, 6, 2, 16, torch.float32, seed=4)
    calls = []
    for kern in (cf._fwd_kernel, cf._bwd_dq_kernel, cf._bwd_dkdv_kernel):
        orig = kern.run
        monkeypatch.setattr(kern, "run", lambda *a, _o=orig, _k=kern, **kw: (calls.append(_k), _o(*a, **kw))[1])
    monkeypatch.setattr(cf, "_BEST", {})
    g = [torch.randn(2, 6, 2, 16).to(DEVICE) for _ in range(2)]
    first = run(fused, xs, mask, g)
    assert len(calls) == 3 and len(cf._BEST) == 3  # forward, dq, dk/dv: each tuned (or read) once
    second = run(fused, xs, mask, g)
    assert len(calls) == 3, "the second call went through the autotuner again"
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def test_autotune_space_prunes_padding_and_big_fp32_tiles():
    """The CUDA autotune space, pruned per call: no blocks far larger than S, no fp32 tile over the budget (those
    took 20-40 s each to compile and one exceeds an H100's shared memory), a single 16 x 16 config for fp64."""
    import triton.language as tl

    space = [cf.triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cf._SPACE]

    def kept(S, dtype, Dh):
        args = {"S": S, "Qt": torch.empty(0, dtype=dtype)}
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in cf._prune(space, args, BLOCK_D=Dh, ACC=acc)]

    assert kept(257, torch.float16, 128) == [(m, n) for m, n, _, _ in cf._SPACE]
    assert kept(17, torch.float16, 64) == [(16, 16), (32, 32)]
    assert kept(257, torch.float32, 128) == [(16, 16), (32, 32)]
    assert kept(65, torch.float32, 64) == [(16, 16), (32, 32), (32, 64)]
    assert kept(2, torch.float64, 16) == [(16, 16)]


def test_saved_tensor_hooks_that_change_layouts():
    """``save_on_cpu(pin_memory=...)`` gives the backward the saved q / k / v as separate contiguous tensors, not
    the projection's views they were: the backward must read their strides again (it used the forward's: NaN)."""
    B, S, H, Dh = 2, 5, 2, 16
    g = torch.Generator().manual_seed(6)
    leaves = [torch.randn(B, S, 3, H, Dh, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
    res = [torch.randn(B, S, H, Dh, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
    mask = (torch.rand(B, S, generator=g) > 0.3).to(DEVICE)
    mask[:, 0] = True
    gout = [torch.randn(B, S, H, Dh, generator=g).to(DEVICE) for _ in range(2)]

    def grads(fn, hook: bool):
        q_i, k_i, v_i = leaves[0].unbind(2)
        q_t, k_t, v_t = leaves[1].unbind(2)
        args = (q_t, k_i, v_i, q_i, k_t, v_t, *res, mask)
        if hook:
            with torch.autograd.graph.save_on_cpu(pin_memory=True):  # packs into new dense tensors
                out = fn(*args)[:2]
        else:
            out = fn(*args)[:2]
        return torch.autograd.grad(out, leaves + res, gout)

    want = grads(reference, hook=False)
    for got in (grads(fused, hook=True), grads(fused, hook=False)):
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_benchmark_table_runs_and_checks_the_kernel(monkeypatch):
    """benchmarks/kernel.py's table on one tiny shape (CPU: the interpreter, so the times mean nothing): every
    implementation is timed, the kernel is checked against fp64 (outputs and gradients), targets are reported."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("kernel")

    impls = {"fused": fused, "eager": reference}
    if shutil.which("g++") or shutil.which("c++") or DEVICE == "cuda":  # inductor on CPU needs a C++ compiler
        # --graphs: the kernel inside a graph compiled with mode="reduce-overhead" (CUDA graphs on a GPU)
        impls["fused_graphed"] = bench.Compiled(fused, mode="reduce-overhead", fullgraph=True)
    out = bench.run_table([(1, 1)], torch.float32, impls, device=DEVICE, repeats=2, copy_bytes=2**20)
    row = out["rows"][0]
    if "fused_graphed" in impls:
        assert row["fused_graphed_fwd_us"] > 0 and row["speedup_vs_fused_graphed_fwd_bwd"] > 0
    assert row["S"] == 2 and row["fused_within_tolerance"] and out["targets"]["fused_correct_every_shape"]
    assert row["fused_max_abs_grad_err_vs_fp64"] < 1e-4 and row["fused_fwd_us"] > 0 and row["eager_fwd_bwd_us"] > 0
    assert {"min_speedup_vs_eager_fwd_B1_B32", "met_2x_fwd_bwd_B1_B32"} <= set(out["targets"])
    assert row["speedup_vs_eager_fwd"] == round(row["eager_fwd_us"] / row["fused_fwd_us"], 2)


def test_custom_ops_pass_opcheck():
    """torch.library's own checks of the custom ops torch.compile uses: schema (no input mutated or aliased), the
    fake implementations against the real ones (shapes, dtypes, strides), the autograd registration, AOTAutograd."""
    xs, mask = make_inputs(2, 5, 2, 16, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.retrofit.cross_fusion_fwd.default, (*xs, mask, 0.3))
    new_i, new_t, lse = torch.ops.retrofit.cross_fusion_fwd(*[x.detach() for x in xs], mask, 0.3)
    g = [torch.randn_like(new_i), torch.randn_like(new_t)]
    torch.library.opcheck(torch.ops.retrofit.cross_fusion_bwd.default,
                          (*g, *[x.detach() for x in xs[:6]], mask, lse, 0.3))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_torch_compile_the_kernel_is_one_graph_node(backend, monkeypatch):
    """torch.compile(fullgraph=True) of code calling the kernel: no graph break (the call becomes the custom op
    retrofit::cross_fusion_fwd, its backward retrofit::cross_fusion_bwd), the kernel really runs, and outputs and
    gradients are the eager ones."""
    if backend == "inductor" and DEVICE == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    xs, mask = make_inputs(2, 5, 2, 16, torch.float32, seed=7)
    g = [torch.randn(2, 5, 2, 16).to(DEVICE) for _ in range(2)]
    want = run(fused, xs, mask, g)
    op = importlib.import_module("retrofit.kernels.cross_fusion_op")
    calls = []

    def counted(name):
        real = getattr(op, name)
        return lambda *a: (calls.append(name), real(*a))[1]

    for name in ("_forward", "_backward"):
        monkeypatch.setattr(op, name, counted(name))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: fused(*a), backend=backend, fullgraph=True)
    got = run(compiled, xs, mask, g)
    assert calls == ["_forward", "_backward"]  # through the custom ops, once each
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_under_torch_compile_bad_input_is_refused_at_compile_time():
    xs, mask = make_inputs(1, 3, 1, 16, torch.float32)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="key_mask must be torch.bool"):
        compiled(*xs, mask.float())


@pytest.mark.parametrize("fullgraph", [False, True])
def test_under_torch_compile_a_tensor_or_non_finite_scale_is_refused_as_in_eager(fullgraph):
    """The compiled branch skipped _check_scale: a tensor scale's gradient was dropped silently (fullgraph=False) and
    a NaN / inf scale gave NaN outputs, where eager raises."""
    xs, mask = make_inputs(1, 3, 1, 16, torch.float32)
    for scale, err in ((float("nan"), "scale must be finite"), (float("inf"), "scale must be finite"),
                       (torch.tensor(0.3, requires_grad=True), "scale must be a Python number")):
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a, s=scale: fused(*a, scale=s), backend="aot_eager", fullgraph=fullgraph)
        with pytest.raises(Exception, match=err):  # (fullgraph: dynamo's Unsupported, naming the error)
            compiled(*xs, mask)


def test_launches_switch_to_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: tensors on another GPU must switch to theirs (CPU-checkable part:
    the guard's decision; the two-GPU test below runs it)."""
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: (entered.append(d), cf.contextlib.nullcontext())[1])
    with cf._on_device(torch.device("cuda", 1)):
        pass
    with cf._on_device(torch.device("cuda", 0)), cf._on_device(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_tensors_on_a_device_that_is_not_current():
    torch.cuda.set_device(0)
    xs, mask = make_inputs(2, 9, 2, 32, torch.float16, device="cuda:1")
    ker_out, ker_g = run(fused, xs, mask, [torch.randn(2, 9, 2, 32, device="cuda:1") for _ in range(2)])
    assert all(t.device == torch.device("cuda", 1) for t in ker_out + ker_g)
    check_against_fp64(xs, mask)


@pytest.mark.parametrize("layout", ["contiguous", "head-views"])
def test_a_batch_over_the_int32_offsets_is_run_in_slices(layout, monkeypatch):
    """A batch whose tensors span >= 2^31 elements was refused ("split the batch"); the eager call now launches
    over slices of the batch. The limit is lowered here so that a small batch crosses it (2^31 elements do not
    fit this machine): every launch must pass the layout's own offset check, and the result is the unsplit one."""
    B, S, H, Dh = 5, 4, 2, 16
    xs, mask = make_inputs(B, S, H, Dh, torch.float32)
    if layout == "head-views":  # q / k / v as views of (B, S, 3, H, Dh) projections: batch stride 3 rows
        g = torch.Generator().manual_seed(3)
        proj = [torch.randn(B, S, 3, H, Dh, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
        xs = [proj[0][:, :, 0], proj[0][:, :, 1], proj[0][:, :, 2], proj[1][:, :, 0], proj[1][:, :, 1],
              proj[1][:, :, 2], *xs[6:]]
    leaves = proj + xs[6:] if layout == "head-views" else xs
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(B, S, H, Dh, generator=g).to(DEVICE) for _ in range(2)]

    def outputs_and_grads():
        out = fused(*xs, mask)
        return [o.detach() for o in out] + list(torch.autograd.grad(out, leaves, grads))

    whole = outputs_and_grads()
    launches = []
    real_forward = cf._forward
    monkeypatch.setattr(cf, "_forward", lambda *a: launches.append(a[0][0].shape[0]) or real_forward(*a))
    # a batch row spans 128 elements, 128 apart (head views: 320, 384 apart): two rows per launch
    monkeypatch.setattr(cf, "_INT32_LIMIT", 300 if layout == "contiguous" else 800)
    sliced = outputs_and_grads()
    assert launches == [2, 2, 1]
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same kernels on the same rows: bitwise
    monkeypatch.setattr(cf, "_INT32_LIMIT", 100)  # one row alone is over it: nothing to split
    with pytest.raises(ValueError, match=f"one batch row spans {128 if layout == 'contiguous' else 320} elements "
                                         ".*RETROFIT_FUSED=0"):
        fused(*xs, mask)
