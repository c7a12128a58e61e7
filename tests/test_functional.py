"""retrofit.functional: the einsum reference, the native (SDPA) path, and the dispatcher."""

from __future__ import annotations

import importlib

import pytest
import torch

from retrofit.functional import (
    cross_fusion_attention,
    cross_fusion_attention_native,
    cross_fusion_attention_reference,
    fused_kernel_status,
    use_fused_kernel,
)


def make_args(B: int, S: int, H: int, Dh: int, dtype: torch.dtype = torch.float64, p_valid: float = 0.6,
              all_masked_row: bool = True, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q_t, k_i, v_i, q_i, k_t, v_t as strided views of two (B, S, 3, H, Dh) projections, like the layer."""
    g = torch.Generator().manual_seed(seed)
    proj_i = torch.randn(B, S, 3, H, Dh, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    proj_t = torch.randn(B, S, 3, H, Dh, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    res_i = torch.randn(B, S, H, Dh, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    res_t = torch.randn(B, S, H, Dh, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    mask = torch.rand(B, S, generator=g) < p_valid
    mask[:, 0] = True
    if all_masked_row:
        mask[-1] = False
    return proj_i, proj_t, res_i, res_t, mask


def run(fn, proj_i, proj_t, res_i, res_t, mask, **kw):
    q_i, k_i, v_i = proj_i.unbind(2)
    q_t, k_t, v_t = proj_t.unbind(2)
    out = fn(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, mask, **kw)
    new_i, new_t = out[0], out[1]
    g = torch.Generator().manual_seed(1)
    w_i, w_t = torch.randn(new_i.shape, generator=g).to(new_i), torch.randn(new_t.shape, generator=g).to(new_t)
    grads = torch.autograd.grad((new_i * w_i).sum() + (new_t * w_t).sum(), (proj_i, proj_t, res_i, res_t))
    return (new_i, new_t, *grads)


@pytest.mark.parametrize("B,S,H,Dh", [(1, 1, 1, 4), (3, 5, 2, 8), (2, 33, 4, 16), (4, 7, 3, 5)])
def test_native_matches_reference_fp64(B, S, H, Dh):
    args = make_args(B, S, H, Dh, all_masked_row=B > 1)
    want = run(cross_fusion_attention_reference, *args)
    got = run(cross_fusion_attention_native, *args)
    for w, g in zip(want, got):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_native_low_precision_against_fp64(dtype, atol):
    ref = run(cross_fusion_attention_reference, *make_args(3, 9, 2, 16))
    got = run(cross_fusion_attention_native, *make_args(3, 9, 2, 16, dtype=dtype))
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for w, g in zip(ref, got):
        torch.testing.assert_close(g.double(), w, rtol=atol, atol=atol)


def test_all_masked_rows_give_residual_and_zero_gradients():
    proj_i, proj_t, res_i, res_t, mask = make_args(2, 6, 2, 4, p_valid=0.0, all_masked_row=False)
    mask[:] = False
    for fn in (cross_fusion_attention_reference, cross_fusion_attention_native):
        new_i, new_t, g_pi, g_pt, g_ri, g_rt = run(fn, proj_i, proj_t, res_i, res_t, mask)
        torch.testing.assert_close(new_i, res_i, rtol=0, atol=0)
        torch.testing.assert_close(new_t, res_t, rtol=0, atol=0)
        assert torch.equal(g_pi, torch.zeros_like(g_pi)) and torch.equal(g_pt, torch.zeros_like(g_pt))


def test_reference_weights_are_masked_distributions():
    proj_i, proj_t, res_i, res_t, mask = make_args(3, 6, 2, 4)
    q_i, k_i, v_i = proj_i.unbind(2)
    q_t, k_t, v_t = proj_t.unbind(2)
    _, _, (p_i, p_t) = cross_fusion_attention_reference(q_t, k_i, v_i, q_i, k_t, v_t, res_i, res_t, mask,
                                                         need_weights=True)
    for p in (p_i, p_t):
        assert p.shape == (3, 2, 6, 6)
        assert (p[~mask[:, None, None, :].expand_as(p)] == 0).all()
        sums = p.sum(-1)  # (B, H, S)
        torch.testing.assert_close(sums[:2], torch.ones_like(sums[:2]))
        assert (sums[2] == 0).all()  # the all-masked row


def test_a_nan_in_a_valid_key_is_not_hidden():
    """The reference used to zero every attention row holding a NaN (nan_to_num meant for all-masked rows), so a
    corrupt neighbour silently dropped the attention; the native path and the kernel return NaN. Now all agree;
    all-masked rows still give zeros."""
    proj_i, proj_t, res_i, res_t, mask = make_args(2, 4, 1, 4, dtype=torch.float32, all_masked_row=False)
    mask[:] = True
    proj_i = proj_i.detach().clone()
    proj_i[0, 1, 1] = float("nan")  # k_i of batch row 0, key slot 1 (valid)
    for fn in (cross_fusion_attention_reference, cross_fusion_attention_native):
        q_i, k_i, v_i = proj_i.unbind(2)
        q_t, k_t, v_t = proj_t.detach().unbind(2)
        new_i, _, *_ = fn(q_t, k_i, v_i, q_i, k_t, v_t, res_i.detach(), res_t.detach(), mask)
        assert new_i[0].isnan().all() and torch.isfinite(new_i[1]).all(), fn.__name__


def test_a_mask_that_is_not_bool_is_refused_on_every_path():
    """SDPA adds a float mask to the scores: a 0/1 float mask masked nothing on the native path, silently."""
    proj_i, proj_t, res_i, res_t, mask = make_args(2, 5, 1, 4, dtype=torch.float32)
    for fn in (cross_fusion_attention_reference, cross_fusion_attention_native, cross_fusion_attention):
        with pytest.raises(ValueError, match="key_mask must be a torch.bool tensor .* got torch.float32"):
            run(fn, proj_i, proj_t, res_i, res_t, mask.float())
        with pytest.raises(ValueError, match=r"key_mask has shape \(2, 4\), expected \(B, S\) = \(2, 5\)"):
            run(fn, proj_i, proj_t, res_i, res_t, mask[:, :4])


def test_a_tensor_or_non_finite_scale_is_refused_and_the_output_takes_the_residuals_dtype():
    """A tensor scale lost its gradient in the fused kernel, silently (float(scale)), and was a TypeError deep in
    SDPA on the native path; fp64 q / k / v with fp32 residuals gave fp64 outputs on the native path only."""
    proj_i, proj_t, res_i, res_t, mask = make_args(2, 5, 1, 4, dtype=torch.float64)
    for fn in (cross_fusion_attention_native, cross_fusion_attention):
        with pytest.raises(TypeError, match=r"scale must be a Python number or None .* got a tensor .*float\(scale\)"):
            run(fn, proj_i, proj_t, res_i, res_t, mask, scale=torch.tensor(0.5, requires_grad=True))
        with pytest.raises(ValueError, match="scale must be finite, got nan"):
            run(fn, proj_i, proj_t, res_i, res_t, mask, scale=float("nan"))
    want = run(cross_fusion_attention_reference, proj_i, proj_t, res_i, res_t, mask, scale=0.5)
    got = run(cross_fusion_attention, proj_i, proj_t, res_i, res_t, mask, scale=0.5)  # an int or float is taken
    torch.testing.assert_close(got[0], want[0])
    import numpy as np

    got = run(cross_fusion_attention, proj_i, proj_t, res_i, res_t, mask, scale=np.float32(0.5))  # numpy too
    torch.testing.assert_close(got[0], want[0])
    r32_i, r32_t = res_i.detach().float().requires_grad_(), res_t.detach().float().requires_grad_()
    for fn in (cross_fusion_attention_reference, cross_fusion_attention_native, cross_fusion_attention):
        new_i, new_t = run(fn, proj_i, proj_t, r32_i, r32_t, mask)[:2]
        assert new_i.dtype == new_t.dtype == torch.float32, fn.__name__


def test_dispatcher_paths(monkeypatch):
    args = make_args(2, 5, 2, 4, dtype=torch.float32)
    monkeypatch.setenv("RETROFIT_FUSED", "0")
    ok, why = fused_kernel_status("cpu")
    assert not ok and "RETROFIT_FUSED=0" in why
    q_i, k_i, v_i = args[0].unbind(2)
    q_t, k_t, v_t = args[1].unbind(2)
    new_i, new_t, w = cross_fusion_attention(q_t, k_i, v_i, q_i, k_t, v_t, args[2], args[3], args[4])
    assert w is None
    ref = cross_fusion_attention_reference(q_t, k_i, v_i, q_i, k_t, v_t, args[2], args[3], args[4])
    torch.testing.assert_close(new_i, ref[0])
    torch.testing.assert_close(new_t, ref[1])
    _, _, w = cross_fusion_attention(q_t, k_i, v_i, q_i, k_t, v_t, args[2], args[3], args[4], need_weights=True)
    assert w is not None and w[0].shape == (2, 2, 5, 5)
    monkeypatch.setenv("RETROFIT_FUSED", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="RETROFIT_FUSED=1"):
        use_fused_kernel(q_t)
    monkeypatch.setenv("RETROFIT_FUSED", "maybe")
    with pytest.raises(ValueError, match="RETROFIT_FUSED"):
        fused_kernel_status("cpu")


def test_head_through_fused_kernel_under_interpreter(monkeypatch):
    """The head's layers run through the Triton kernel (interpreter on CPU) and agree with the PyTorch path."""
    pytest.importorskip("triton")
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.neighbors import Neighbors

    torch.manual_seed(0)
    head = RetrievalHead(HeadConfig(query_dim=8, image_dim=6, text_dim=5, num_classes=3, dim=16, depth=1, heads=2))
    torch.nn.init.normal_(head.readout.fc.weight)
    B, k = 2, 3
    mask = torch.tensor([[True, False, True], [False, False, False]])
    nb = Neighbors(ids=torch.zeros(B, k, dtype=torch.int64), scores=torch.zeros(B, k), mask=mask,
                   image=torch.randn(B, k, 6), text=torch.randn(B, k, 5), labels=torch.zeros(B, k, dtype=torch.int64))
    z = torch.randn(B, 8)
    if torch.cuda.is_available():  # the kernel runs compiled on the GPU (the interpreter is the CPU's stand-in)
        head, nb, z = head.cuda(), nb.to("cuda"), z.cuda()
    monkeypatch.setenv("RETROFIT_FUSED", "0")
    want = head(z, neighbors=nb).logits
    monkeypatch.setenv("RETROFIT_FUSED", "1")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert fused_kernel_status("cpu")[0]
    cf = importlib.import_module("retrofit.kernels.cross_fusion")
    calls = []
    monkeypatch.setattr(cf.CrossFusionAttention, "apply",
                        lambda *a, _apply=cf.CrossFusionAttention.apply: (calls.append(1), _apply(*a))[1])
    got = head(z, neighbors=nb).logits
    assert len(calls) == 1  # the kernel really ran, once per layer
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", ["0", "1"], ids=["native", "fused-kernel"])
def test_head_compiles_without_graph_breaks(fused, monkeypatch):
    """torch.compile(fullgraph=True) of the head with given neighbours (the label vote on, rebalanced by a KB's
    class counts): one graph, through the PyTorch path or the fused kernel, with the eager logits and gradients."""
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.neighbors import Neighbors

    if fused == "1":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RETROFIT_FUSED", fused)
    torch.manual_seed(0)
    head = RetrievalHead(HeadConfig(query_dim=8, image_dim=6, text_dim=5, num_classes=3, dim=16, depth=2, heads=2,
                                    label_vote=True))
    torch.nn.init.normal_(head.readout.fc.weight)
    head.vote.set_label_prior(torch.tensor([50.0, 10.0, 2.0]))
    with torch.no_grad():
        head.vote.weight.fill_(0.1)
    B, k = 3, 4
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, True, True]])
    nb = Neighbors(ids=torch.zeros(B, k, dtype=torch.int64), scores=torch.rand(B, k), mask=mask,
                   image=torch.randn(B, k, 6), text=torch.randn(B, k, 5), labels=torch.randint(0, 3, (B, k)))
    z, host = torch.randn(B, 8), torch.randn(B, 3)
    if fused == "1" and torch.cuda.is_available():  # RETROFIT_FUSED=1 needs CUDA tensors there (no interpreter)
        head, nb, z, host = head.cuda(), nb.to("cuda"), z.cuda(), host.cuda()

    def loss_and_grads(fn):
        head.zero_grad(set_to_none=True)
        logits = fn(z, host, nb)
        logits.square().sum().backward()
        return logits.detach(), [p.grad for p in head.parameters()]

    def step(z, host, nb):
        return head(z, host, neighbors=nb).logits

    want, want_g = loss_and_grads(step)
    calls = []
    if fused == "1":  # count the custom op's kernel launches: the compiled head must go through the kernel
        op = importlib.import_module("retrofit.kernels.cross_fusion_op")
        monkeypatch.setattr(op, "_forward", lambda *a, _f=op._forward: (calls.append(1), _f(*a))[1])
    torch._dynamo.reset()
    got, got_g = loss_and_grads(torch.compile(step, backend="aot_eager", fullgraph=True))
    assert len(calls) == (2 if fused == "1" else 0)  # one per layer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sum(g is not None for g in got_g) == sum(g is not None for g in want_g) > 20
    for a, b in zip(got_g, want_g):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_head_on_cuda_fused_matches_native(monkeypatch):
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.neighbors import Neighbors

    torch.manual_seed(0)
    head = RetrievalHead(HeadConfig(query_dim=64, image_dim=48, text_dim=32, num_classes=10, dim=128, depth=2,
                                    heads=4)).cuda()
    torch.nn.init.normal_(head.readout.fc.weight, std=0.05)
    B, k = 16, 7
    mask = torch.rand(B, k) < 0.7
    mask[0] = False
    nb = Neighbors(ids=torch.zeros(B, k, dtype=torch.int64), scores=torch.zeros(B, k), mask=mask,
                   image=torch.randn(B, k, 48), text=torch.randn(B, k, 32), labels=torch.zeros(B, k, dtype=torch.int64))
    z = torch.randn(B, 64, device="cuda")
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("RETROFIT_FUSED", flag)
        head.zero_grad(set_to_none=True)
        logits = head(z, neighbors=nb).logits
        logits.square().sum().backward()
        outs[flag] = (logits.detach(), head.layers[0].qkv_i.weight.grad.clone())
    torch.testing.assert_close(outs["1"][0], outs["0"][0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(outs["1"][1], outs["0"][1], rtol=1e-3, atol=1e-3)


def test_forced_kernel_names_an_unsupported_head_dim(monkeypatch):
    """Forced (RETROFIT_FUSED=1), a head dim above the kernel's 128 is a clear error; see the CUDA test below for
    the unforced default, which takes the PyTorch path instead (it used to crash at the first forward on a GPU)."""
    pytest.importorskip("triton")
    q_i, k_i, v_i = make_args(1, 3, 1, 256, dtype=torch.float32)[0].unbind(2)
    args = make_args(1, 3, 1, 256, dtype=torch.float32)
    q_t, k_t, v_t = args[1].unbind(2)
    monkeypatch.setenv("RETROFIT_FUSED", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_fused_kernel(q_t)
    with pytest.raises(ValueError, match="head dim Dh=256 is not supported; allowed 1..128"):
        cross_fusion_attention(q_t, k_i, v_i, q_i, k_t, v_t, args[2], args[3], args[4])


@pytest.mark.cuda
def test_wide_heads_take_the_pytorch_path_on_cuda(monkeypatch):
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.neighbors import Neighbors

    monkeypatch.delenv("RETROFIT_FUSED", raising=False)
    torch.manual_seed(0)
    head = RetrievalHead(HeadConfig(query_dim=8, image_dim=6, text_dim=5, num_classes=3, dim=512, depth=1,
                                    heads=2)).cuda()
    B, k = 2, 3
    nb = Neighbors(ids=torch.zeros(B, k, dtype=torch.int64), scores=torch.zeros(B, k),
                   mask=torch.ones(B, k, dtype=torch.bool), image=torch.randn(B, k, 6), text=torch.randn(B, k, 5),
                   labels=torch.zeros(B, k, dtype=torch.int64)).to("cuda")
    z = torch.randn(B, 8, device="cuda")
    q = torch.zeros(B, k + 1, 2, 256, device="cuda")
    assert not use_fused_kernel(q)
    assert torch.isfinite(head(z, neighbors=nb).logits).all()


@pytest.mark.cuda
def test_unforced_kernel_runs_for_half_precision_only_on_cuda(monkeypatch):
    """Unforced, fp16 / bf16 (autocast) take the kernel on CUDA; fp32 / fp64 take PyTorch's attention (the
    kernel's IEEE fp32 path took 1.7-2.9x PyTorch's GPU time on an H100); RETROFIT_FUSED=1 still forces the kernel."""
    from retrofit.head import HeadConfig, RetrievalHead
    from retrofit.neighbors import Neighbors

    cf = importlib.import_module("retrofit.kernels.cross_fusion")
    monkeypatch.delenv("RETROFIT_FUSED", raising=False)
    for dtype, want in ((torch.float16, True), (torch.bfloat16, True), (torch.float32, False),
                        (torch.float64, False)):
        assert use_fused_kernel(torch.zeros(2, 5, 4, 64, device="cuda", dtype=dtype)) is want, dtype
    torch.manual_seed(0)
    head = RetrievalHead(HeadConfig(query_dim=8, image_dim=6, text_dim=5, num_classes=3, dim=64, depth=1,
                                    heads=2)).cuda()
    torch.nn.init.normal_(head.readout.fc.weight)  # (zero at init: every logit 0, the comparisons below empty)
    B, k = 2, 3
    nb = Neighbors(ids=torch.zeros(B, k, dtype=torch.int64), scores=torch.zeros(B, k),
                   mask=torch.ones(B, k, dtype=torch.bool), image=torch.randn(B, k, 6), text=torch.randn(B, k, 5),
                   labels=torch.zeros(B, k, dtype=torch.int64)).to("cuda")
    z = torch.randn(B, 8, device="cuda")
    calls = []
    monkeypatch.setattr(cf.CrossFusionAttention, "apply",
                        lambda *a, _apply=cf.CrossFusionAttention.apply: (calls.append(1), _apply(*a))[1])
    fp32 = head(z, neighbors=nb).logits
    assert not calls and fp32.abs().min() > 0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        amp = head(z, neighbors=nb).logits
    assert len(calls) == 1
    monkeypatch.setenv("RETROFIT_FUSED", "1")
    forced = head(z, neighbors=nb).logits
    assert len(calls) == 2
    torch.testing.assert_close(forced, fp32, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(amp.float(), fp32, rtol=5e-2, atol=5e-2)
