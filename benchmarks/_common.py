"""Shared helpers of the benchmark scripts: timing, the machine's matmul rate, one-JSON-line output.

Every benchmark prints exactly one JSON line (``emit``). Figures that depend on the machine come with
``gemm_gflops``: the fp32 matrix-multiply rate measured in the same run, so that a result can be read
as a fraction of what this machine can do at the moment it ran (the project's CPU machine is shared).
Use from a benchmark script::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import emit, gemm_gflops, time_fn
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["emit", "gemm_gflops", "time_fn", "sync", "machine_info", "positive_int", "nonnegative_int", "parser",
           "run"]


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a 0 or negative size used to run, and report, a meaningless benchmark)."""
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"expected a positive int, got {text!r}") from None
    if v < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"must be a positive int, got {v}")
    return v


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0 (worker counts)."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {v}")
    return v


def parser(doc: str) -> Any:
    """The script's ArgumentParser: ``--help`` shows its whole docstring (what it measures, its quick setting)."""
    import argparse

    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run(main: Callable[[], Any]) -> None:
    """Run ``main``; a setting the library refuses (``ValueError``, a path error) is one ``error:`` line, exit 2."""
    try:
        code = main()
    except (ValueError, NotADirectoryError, FileExistsError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5, device: torch.device | str | None = None,
            min_seconds: float = 0.0) -> dict[str, float]:
    """Wall time of ``fn()`` in seconds: ``best`` and ``median`` over ``repeats`` runs after ``warmup``.

    Keeps repeating until ``min_seconds`` of measured time have passed (fast functions on a GPU).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"best": min(times), "median": statistics.median(times), "runs": len(times)}


def gemm_gflops(n: int = 2048, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                repeats: int = 5) -> float:
    """The machine's dense matrix-multiply rate (GFLOP/s, best of ``repeats``) for an n x n x n product.

    On CPU this is the ceiling a projection-dominated model can approach; ``n = 2048`` is large enough
    for MKL / oneDNN to reach its steady rate.
    """
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    t = time_fn(lambda: torch.mm(a, b, out=out), warmup=1, repeats=repeats, device=device,
                min_seconds=0.5 if torch.device(device).type == "cuda" else 0.0)
    return 2 * n**3 / t["best"] / 1e9


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit(figures: dict[str, Any]) -> None:
    """Print one JSON line: ``figures`` plus the machine description under ``"machine"``."""
    record = dict(figures)
    record.setdefault("machine", machine_info())
    sys.stdout.write(json.dumps(record, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()
