"""Knowledge-base build throughput: the 50,000 CIFAR-10 training images (webdataset shards) with Tiny Darknet
(64 px) as the image encoder and MiniLM as the text encoder, on CPU, into a fresh KB in a temporary directory.

Prints one JSON line: ``images_per_s`` (source samples per second of build wall time), ``encode_s`` (time
inside the encoders' forward), ``total_s`` (the whole ``build_kb`` call: enumerating the shards, decoding in
DataLoader workers, batching, LMDB writes, the HNSW build at the end), ``overhead = (total_s - encode_s) /
total_s`` (target <= 0.15: everything that is not the encoders hides behind them), the records written and
the machine's fp32 matmul rate measured in the same run. Loading the encoders is not timed.

Run: ``nice .venv/bin/python benchmarks/build.py [--limit N] [--workers W] [--batch-size B]``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, gemm_gflops, nonnegative_int, parser, positive_int, run


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--limit", type=positive_int, default=None, help="use only the first N samples (quick runs)")
    ap.add_argument("--workers", type=nonnegative_int, default=1, help="DataLoader decode workers")
    ap.add_argument("--batch-size", type=positive_int, default=256)
    ap.add_argument("--size", type=positive_int, default=64, help="Tiny Darknet input size")
    args = ap.parse_args()

    from retrofit._env import data_dir
    from retrofit.encoders import load_image_encoder, load_text_encoder
    from retrofit.ingest import build_kb
    from retrofit.sources import webdataset_source

    d = data_dir()
    if d is None or not (d / "cifar10").is_dir():
        emit({"benchmark": "build", "skipped": True, "reason": "CIFAR-10 shards not found; set RETROFIT_DATA_DIR"})
        return
    gflops = gemm_gflops()
    image = load_image_encoder(f"darknet-tiny@{args.size}")
    text = load_text_encoder("minilm")
    pattern = str(d / "cifar10" / "train-{000000..000004}.tar")
    with tempfile.TemporaryDirectory(prefix="retrofit-bench-") as tmp:
        t0 = time.perf_counter()
        if args.limit:
            src = webdataset_source(pattern)
            src.refs = src.refs[:: max(1, len(src.refs) // args.limit)][: args.limit]  # every class represented
            source = src
        else:
            source = pattern
        s = build_kb(source, Path(tmp) / "kb", image_encoder=image, text_encoder=text, batch_size=args.batch_size,
                     num_workers=args.workers, progress=False, class_names=None)
        total = time.perf_counter() - t0
        from retrofit.knowledge_base import KnowledgeBase

        with KnowledgeBase.open(Path(tmp) / "kb") as kb:
            info = kb.info()
    emit({
        "benchmark": "build",
        "samples": s.total,
        "written": s.written,
        "skipped": s.skipped,
        "duplicates": s.duplicates,
        "images_per_s": round(s.total / total, 1),
        "encode_s": round(s.encode_s, 2),
        "encode_split_s": {k: round(v, 2) for k, v in s.extra.get("encode_split_s", {}).items()},
        "total_s": round(total, 2),
        "overhead": round((total - s.encode_s) / total, 4),
        "index_build_s": round(s.extra.get("index_s", 0.0), 2),
        "unique_captions": s.extra.get("unique_captions"),
        "target_overhead": 0.15,
        "index": info.get("index", {}).get("kind") if isinstance(info.get("index"), dict) else info.get("index"),
        "image_encoder": str(image.fingerprint),
        "text_encoder": str(text.fingerprint),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "gemm_gflops": round(gflops, 1),
    })


if __name__ == "__main__":
    run(main)
