"""``retrofit info``: versions, devices, which code paths will run, where the data is."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
from typing import Any

from retrofit._env import data_dir
from retrofit._version import __version__


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def collect() -> dict[str, Any]:
    """Everything ``retrofit info`` reports, as a dict."""
    import torch

    from retrofit.functional import FUSED_MAX_HEAD_DIM, fused_kernel_status

    faiss_gpus = 0
    try:
        import faiss

        faiss_gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:
        pass
    from retrofit._env import fused_flag

    try:
        fused, why = fused_kernel_status()
        if fused_flag() is True and not fused:
            why = (f"RETROFIT_FUSED=1 forces the kernel but it cannot run here ({why}): every head forward will "
                   "raise; unset RETROFIT_FUSED or set it to 0")
        elif fused and fused_flag() is None:
            why += (f"; fp16 / bf16 only (autocast or a half-precision head): fp32 computation, and heads with "
                    f"dim / heads above {FUSED_MAX_HEAD_DIM}, take PyTorch's attention")
    except ValueError as e:  # a RETROFIT_FUSED value it does not understand
        fused, why = False, str(e)
    d = data_dir()
    return {
        "retrofit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "faiss": _version("faiss"),
        "lmdb": _version("lmdb"),
        "timm": _version("timm"),
        "open_clip": _version("open_clip"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "faiss_gpus": faiss_gpus,
        "fused_kernel": fused,
        "fused_kernel_reason": why,
        "data_dir": str(d) if d else None,
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, bool):
            v = "yes" if v else "no"
        elif v is None:
            v = "not installed" if k not in ("data_dir",) else "not found (set RETROFIT_DATA_DIR)"
        elif isinstance(v, list):
            v = ", ".join(v) or "none"
        print(f"{k:<{width}}  {v}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="versions, GPU / faiss-GPU availability, fused-kernel status, data dir",
        description="Print versions, devices and which code paths retrofit will use. Example: retrofit info --json",
    )
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)
