"""Every benchmark script runs as a user runs it (``python benchmarks/NAME.py``) at its quick size and prints one
JSON line whose figures agree with each other: a benchmark that broke, or whose derived figures (fractions of the
matmul rate, ratios, overheads) stopped matching the timings they come from, fails here. Times on this shared
machine mean nothing and are not compared with targets (the benchmarks themselves do that). The kernel benchmark
has its own test (tests/test_kernel_cross_fusion.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(name: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``benchmarks/<name>.py args`` in a fresh interpreter; stdout must be exactly one JSON object."""
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]
    out = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"{name}: {c} in the JSON line"))
    assert out["benchmark"] == name
    assert out["machine"]["torch"] and out["machine"]["cpu_count"] >= 1
    return out


def close(a: float, b: float, rel: float = 0.03) -> bool:
    """Equal up to the rounding of the printed figures."""
    return math.isclose(a, b, rel_tol=rel)


def test_head_benchmark():
    out = run_benchmark("head", "--device", "cpu", "--batch", "32", "--k", "16", "--dim", "64", "--depth", "1",
                        "--heads", "4", "--repeats", "1", "--no-attention-paths")
    assert out["shape"] == {"batch": 32, "k": 16, "dim": 64, "depth": 1, "heads": 4, "query_dim": 512,
                            "image_dim": 512, "text_dim": 384, "classes": 1000}
    assert 0 < out["flops_fwd"] < out["flops_fwd_bwd"]
    cpu = out["cpu"]
    assert cpu["gemm_gflops"] > 0 and cpu["fwd_median_s"] > 0 and cpu["fwd_bwd_median_s"] > 0
    assert close(cpu["fwd_gflops"], out["flops_fwd"] / cpu["fwd_median_s"] / 1e9)
    assert close(cpu["fwd_bwd_gflops"], out["flops_fwd_bwd"] / cpu["fwd_bwd_median_s"] / 1e9)
    assert close(cpu["fwd_frac_of_gemm"], cpu["fwd_gflops"] / cpu["gemm_gflops"])  # one round: its ratio
    assert close(cpu["queries_per_s_fwd"], 32 / cpu["fwd_median_s"])
    assert cpu["fwd_target_met"] == (cpu["fwd_frac_of_gemm"] >= out["targets"]["fwd_frac_of_gemm"])
    assert cpu["fwd_bwd_target_met"] == (cpu["fwd_bwd_frac_of_gemm"] >= out["targets"]["fwd_bwd_frac_of_gemm"])


def test_train_benchmark():
    out = run_benchmark("train", "--samples", "256", "--epochs", "1", "--kb-size", "2000", "--batch", "64",
                        "--k", "16", "--dim", "64", "--depth", "1", "--heads", "4", "--classes", "10")
    assert out["samples"] == 256 and out["shape"]["classes"] == 10 and math.isfinite(out["final_loss"])
    cpu = out["cpu"]
    assert cpu["samples_per_s"] == max(cpu["samples_per_s_per_epoch"]) and len(cpu["samples_per_s_per_epoch"]) == 1
    assert close(cpu["samples_per_s"], 64 / cpu["step_s"])
    assert close(cpu["train_gflops"], cpu["flops_per_step"] / cpu["step_s"] / 1e9)
    assert close(cpu["frac_of_gemm"], cpu["train_gflops"] / cpu["gemm_gflops"])
    assert cpu["target_met"] == (cpu["frac_of_gemm"] >= cpu["target"])
    gather = out["neighbor_gather_per_batch_s"]
    assert gather["kb_size"] == 2000 and gather["ram_table"] > 0 and gather["kb_gather"] > 0


def test_build_benchmark(data_dir):
    out = run_benchmark("build", "--limit", "64", "--workers", "0", env={"RETROFIT_DATA_DIR": str(data_dir)})
    assert out["samples"] == out["written"] == 64 and out["skipped"] == 0
    assert close(out["images_per_s"], 64 / out["total_s"])
    assert math.isclose(out["overhead"], (out["total_s"] - out["encode_s"]) / out["total_s"], abs_tol=0.01)
    assert math.isclose(out["encode_s"], sum(out["encode_split_s"].values()), abs_tol=0.02)
    assert 0 < out["encode_s"] <= out["total_s"]
    assert "darknet-tiny" in out["image_encoder"] and "MiniLM" in out["text_encoder"]


def test_store_benchmark(tmp_path):
    out = run_benchmark("store", "--n", "3000", "--queries", "128", "--no-real", "--dir", str(tmp_path))
    assert out["n"] == 3000 and out["k"] == 32 and out["ef_construction"] == 80
    assert 0.9 <= out["recall_at_32"] <= 1.0  # against exact search on the same keys
    assert close(out["qps_over_raw"], out["qps"] / out["qps_faiss_raw"])
    assert out["build_s"] > 0 and out["open_s"] > 0 and out["gather_ms"] > 0
    assert out["bytes_per_vector"] >= out["index_bytes_per_vector"] > 0


def test_overhead_benchmark(tmp_path):
    args = ("--kb-size", "3000", "--batch", "2", "--size", "64", "--repeats", "1", "--cache-dir", str(tmp_path))
    out = run_benchmark("overhead", *args)
    assert out["kb_size"] == 3000 and out["k"] == 32 and out["depth"] == 4 and out["batch"] == 2
    assert close(out["ratio"], out["retrofit_ms"] / out["host_ms"])
    assert close(out["ratio_from_parts"], (out["host_ms"] + out["search_ms"] + out["head_ms"]) / out["host_ms"])
    assert out["tuned_recall"] >= 0.96  # the build tuned efSearch to the library's recall target
    assert out["ef_construction"] == 80  # the library's default HNSW build beam
    assert out["host_ms_spread"][0] <= out["host_ms"] <= out["host_ms_spread"][1]
    again = run_benchmark("overhead", *args)  # the KB cached under --cache-dir is reused, not rebuilt
    assert out["kb_build_s"] > 0 and again["kb_build_s"] == "cached" and again["ef_search"] == out["ef_search"]
