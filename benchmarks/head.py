"""RetrievalHead speed: forward and forward+backward at the paper's shape, as a fraction of the matmul rate.

Shape (defaults): B = 256 queries, k = 32 neighbours, d = 512, L = 4 layers, 8 heads, query / image dim
512, text dim 384 (MiniLM), 1000 classes. FLOPs are counted with ``torch.utils.flop_counter`` on the
einsum reference path (the fused CPU attention is not seen by the counter; the maths is the same), for
the forward and for one training step (forward + backward with the host frozen: no gradient to z or to
the neighbour vectors). ``gemm_gflops`` is this machine's fp32 matmul rate (2048^3, ``_common.gemm_gflops``),
measured in the same run right before each head timing; a fraction is the median over rounds of
(head GFLOP/s / gemm GFLOP/s of the same round), robust to the shared machine's changing load.
Targets: forward >= 50 % of gemm_gflops, forward+backward >= 40 %.

    .venv/bin/python benchmarks/head.py [--device cpu|cuda|all] [--batch 256] [--repeats 5]
        [--variants default native compiled graphs]   # CUDA: with / without the kernel, torch.compile, CUDA graphs

Quick (seconds, the demo's head size): ``--device cpu --batch 32 --k 16 --dim 64 --depth 1 --heads 4 --repeats 1
--no-attention-paths``.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, gemm_gflops, parser, positive_int, run, time_fn

from retrofit.head import HeadConfig, RetrievalHead
from retrofit.neighbors import Neighbors

FWD_TARGET, FWD_BWD_TARGET = 0.50, 0.40


def make_inputs(args: argparse.Namespace, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    B, k = args.batch, args.k
    mask = torch.rand(B, k, generator=g) < 0.9  # a few masked slots, as with exclusions / small KBs
    nb = Neighbors(
        ids=torch.arange(B * k).view(B, k), scores=torch.rand(B, k, generator=g), mask=mask,
        image=torch.randn(B, k, args.image_dim, generator=g), text=torch.randn(B, k, args.text_dim, generator=g),
        labels=torch.randint(0, args.classes, (B, k), generator=g),
    ).to(device, dtype)
    z = torch.randn(B, args.query_dim, generator=g).to(device, dtype)
    host = torch.randn(B, args.classes, generator=g).to(device, dtype)
    y = torch.randint(0, args.classes, (B,), generator=g).to(device)
    return z, host, nb, y


def make_head(args: argparse.Namespace, device: str, dtype: torch.dtype) -> RetrievalHead:
    cfg = HeadConfig(query_dim=args.query_dim, image_dim=args.image_dim, text_dim=args.text_dim,
                     num_classes=args.classes, dim=args.dim, depth=args.depth, heads=args.heads, k=args.k)
    torch.manual_seed(0)
    head = RetrievalHead(cfg).to(device, dtype)
    with torch.no_grad():  # a non-zero readout, like a trained head (the zero init would skip nothing anyway)
        head.readout.fc.weight.normal_(0, 0.02)
    return head


def count_flops(args: argparse.Namespace) -> tuple[int, int]:
    """(forward, forward+backward) FLOPs of the head at this shape, counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    head = make_head(args, "cpu", torch.float32)
    z, host, nb, y = make_inputs(args, "cpu", torch.float32)
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        head(z, host, neighbors=nb, return_attention=True)  # einsum reference: every matmul is visible
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(head(z, host, neighbors=nb, return_attention=True).logits, y).backward()
    return fwd.get_total_flops(), step.get_total_flops()


VARIANTS = {
    "default": "the head as users call it (on CUDA: the fused Triton kernel when it applies)",
    "native": "RETROFIT_FUSED=0: the PyTorch path (scaled_dot_product_attention), no fused kernel",
    "compiled": "torch.compile(head, fullgraph=True) (the kernel as a custom op inside the graph)",
    "graphs": "torch.compile(head, fullgraph=True, mode='reduce-overhead'): replayed as CUDA graphs",
}


def measure(args: argparse.Namespace, device: str, dtype: torch.dtype, flops: tuple[int, int],
            variant: str = "default") -> dict:
    import os
    from unittest import mock

    head = make_head(args, device, dtype)
    z, host, nb, y = make_inputs(args, device, dtype)
    with mock.patch.dict(os.environ, {"RETROFIT_FUSED": "0"} if variant == "native" else {}):  # restored after
        return _measure(args, head, (z, host, nb, y), device, dtype, flops, variant)


def _measure(args, head, inputs, device: str, dtype: torch.dtype, flops: tuple[int, int], variant: str) -> dict:
    z, host, nb, y = inputs
    call = head
    if variant in ("compiled", "graphs"):
        torch._dynamo.reset()
        call = torch.compile(head, fullgraph=True, **({"mode": "reduce-overhead"} if variant == "graphs" else {}))

    def forward() -> None:
        if variant == "graphs":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode():
            call(z, host, neighbors=nb)

    def step() -> None:
        if variant == "graphs":
            torch.compiler.cudagraph_mark_step_begin()
        head.zero_grad(set_to_none=True)
        F.cross_entropy(call(z, host, neighbors=nb).logits.float(), y).backward()

    gemm_dtype = torch.float32 if device == "cpu" else dtype
    min_s = 0.5 * (device != "cpu")
    for _ in range(2):  # warm-up (allocator, oneDNN / cuBLAS plans, autotuning)
        forward()
        step()
    # Paired rounds: a gemm measurement right before each head timing, so that each ratio compares the
    # head with the matmul rate of the same moment (the project's CPU machine is shared and its load moves).
    gemm, t_fwd, t_step = [], [], []
    for _ in range(args.repeats):
        gemm.append(gemm_gflops(device=device, dtype=gemm_dtype, repeats=2))
        t_fwd.append(time_fn(forward, warmup=0, repeats=1, device=device, min_seconds=min_s)["best"])
        t_step.append(time_fn(step, warmup=0, repeats=1, device=device, min_seconds=min_s)["best"])
    fwd_frac = statistics.median(flops[0] / t / 1e9 / g for t, g in zip(t_fwd, gemm))
    step_frac = statistics.median(flops[1] / t / 1e9 / g for t, g in zip(t_step, gemm))
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "variant": variant,
        "fwd_s": round(min(t_fwd), 4),
        "fwd_median_s": round(statistics.median(t_fwd), 4),
        "fwd_bwd_s": round(min(t_step), 4),
        "fwd_bwd_median_s": round(statistics.median(t_step), 4),
        "fwd_gflops": round(flops[0] / min(t_fwd) / 1e9, 2),
        "fwd_bwd_gflops": round(flops[1] / min(t_step) / 1e9, 2),
        "gemm_gflops": round(max(gemm), 2),
        "gemm_gflops_per_round": [round(g, 2) for g in gemm],
        "gemm_dtype": str(gemm_dtype).removeprefix("torch."),
        "fwd_frac_of_gemm": round(fwd_frac, 3),
        "fwd_bwd_frac_of_gemm": round(step_frac, 3),
        "fwd_target_met": fwd_frac >= FWD_TARGET,
        "fwd_bwd_target_met": step_frac >= FWD_BWD_TARGET,
        "queries_per_s_fwd": round(args.batch / min(t_fwd), 1),
    }


def attention_paths(args: argparse.Namespace) -> dict:
    """One layer's two-direction attention at this shape (CPU, fp32): the native (SDPA) path the head uses
    vs the einsum reference, forward and forward+backward, in seconds (best of ``repeats``)."""
    from retrofit.functional import cross_fusion_attention_native, cross_fusion_attention_reference

    B, S, H = args.batch, args.k + 1, args.heads
    g = torch.Generator().manual_seed(0)
    proj = [torch.randn(B, S, 3, H, args.dim // H, generator=g).requires_grad_(True) for _ in range(2)]
    res = [torch.randn(B, S, H, args.dim // H, generator=g).requires_grad_(True) for _ in range(2)]
    mask = torch.rand(B, S, generator=g) < 0.9
    mask[:, 0] = True
    out: dict = {}
    for name, fn in (("native", cross_fusion_attention_native), ("reference", cross_fusion_attention_reference)):
        def call(fn=fn):
            (q_i, k_i, v_i), (q_t, k_t, v_t) = proj[0].unbind(2), proj[1].unbind(2)
            return fn(q_t, k_i, v_i, q_i, k_t, v_t, res[0], res[1], mask)

        def fwd(call=call) -> None:
            with torch.inference_mode():
                call()

        def step(call=call) -> None:
            o = call()
            torch.autograd.grad(o[0].sum() + o[1].sum(), [*proj, *res])

        out[f"{name}_fwd_s"] = round(time_fn(fwd, warmup=1, repeats=args.repeats)["best"], 4)
        out[f"{name}_fwd_bwd_s"] = round(time_fn(step, warmup=1, repeats=args.repeats)["best"], 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="all = cpu, plus cuda when a GPU is present")
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--k", type=positive_int, default=32)
    p.add_argument("--dim", type=positive_int, default=512)
    p.add_argument("--depth", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--query-dim", type=positive_int, default=512)
    p.add_argument("--image-dim", type=positive_int, default=512)
    p.add_argument("--text-dim", type=positive_int, default=384)
    p.add_argument("--classes", type=positive_int, default=1000)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["default"],
                   help="on CUDA, the ways of running the head to time (default: default); "
                        + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    p.add_argument("--no-attention-paths", action="store_true",
                   help="skip the one-layer native vs einsum-reference attention timing")
    args = p.parse_args(argv)
    if args.variants != ["default"] and args.device == "cpu":
        p.error("--variants applies to the CUDA timings; with --device cpu the head runs as called")

    flops = count_flops(args)
    record: dict = {
        "benchmark": "head",
        "shape": {n: getattr(args, n) for n in ("batch", "k", "dim", "depth", "heads", "query_dim", "image_dim",
                                                 "text_dim", "classes")},
        "flops_fwd": flops[0],
        "flops_fwd_bwd": flops[1],
        "targets": {"fwd_frac_of_gemm": FWD_TARGET, "fwd_bwd_frac_of_gemm": FWD_BWD_TARGET},
    }
    if args.device in ("cpu", "all"):
        record["cpu"] = measure(args, "cpu", torch.float32, flops)
        if not args.no_attention_paths:
            record["cpu_attention_one_layer"] = attention_paths(args)
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU on this machine")
        from retrofit.functional import fused_kernel_status

        record["cuda_attention"] = (fused_kernel_status("cuda")[1] + "; float32 runs take PyTorch's attention "
                                    "unless RETROFIT_FUSED=1, bfloat16 the kernel")
        record["cuda"] = {}
        for dt in (torch.float32, torch.bfloat16):
            name = str(dt).removeprefix("torch.")
            for v in args.variants:
                r = measure(args, "cuda", dt, flops, v)
                print(json.dumps(r), file=sys.stderr, flush=True)  # each as it is done: a stopped run keeps it
                record["cuda"][name if v == "default" else f"{name}_{v}"] = r
    emit(record)
    return 0


if __name__ == "__main__":
    run(main)
