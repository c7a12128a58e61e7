"""Knowledge-base store benchmark: build time, disk, recall@32, queries/s vs raw faiss, gather, open cost.

Prints one JSON line. Synthetic data as hard as real embeddings, defined exactly so figures compare across
runs: a 64-d latent with 10,000 cluster centres drawn from N(0, I), each point = its centre + N(0, I) noise,
mapped to 512-d by one fixed Gaussian 64x512 matrix, plus N(0, 2.4^2) noise in every one of the 512 dims,
then L2-normalised (seeded). Keys = image vectors = those points; text vectors (384-d) = another fixed
projection of the same latent plus noise. Queries are held-out points of the same generator.
``real_*`` keys: the same figures on Tiny Darknet (64x64 input, pooled 512-d) embeddings of the 50,000
CIFAR-10 training images, queried with the 10,000 test images (text vectors: zeros; gather cost does not
depend on values).

    nice .venv/bin/python benchmarks/store.py                 # n = 1,000,000 (long on 2 cores)
    .venv/bin/python benchmarks/store.py --n 100000 --no-real  # a quick run
    .venv/bin/python benchmarks/store.py --no-synthetic --whiten 0.1   # CIFAR keys, whitened index
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, nonnegative_int, parser, positive_int, run

from retrofit.kb_index import IndexConfig
from retrofit.knowledge_base import KnowledgeBase

LATENT, DIM, TEXT_DIM, CENTRES, NOISE = 64, 512, 384, 10_000, 2.4
BLOCK = 16384


class Generator:
    """The benchmark's synthetic embedding distribution (deterministic for a seed)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.centres = rng.standard_normal((CENTRES, LATENT)).astype(np.float32)  # (C, 64)
        self.proj = rng.standard_normal((LATENT, DIM)).astype(np.float32)  # (64, 512)
        self.proj_text = rng.standard_normal((LATENT, TEXT_DIM)).astype(np.float32)  # (64, 384)

    def block(self, stream: int, i: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Points ``n`` of block ``i`` of ``stream`` (0 = KB, 1 = queries): (keys (n, 512), text (n, 384), labels)."""
        rng = np.random.default_rng([self.seed, stream, i])
        lab = rng.integers(0, CENTRES, n)
        z = self.centres[lab] + rng.standard_normal((n, LATENT), dtype=np.float32)  # (n, 64)
        x = z @ self.proj + NOISE * rng.standard_normal((n, DIM), dtype=np.float32)  # (n, 512)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t = z @ self.proj_text + NOISE * rng.standard_normal((n, TEXT_DIM), dtype=np.float32)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        return x, t, lab.astype(np.int64)

    def blocks(self, stream: int, n: int):
        for i, s in enumerate(range(0, n, BLOCK)):
            yield s, self.block(stream, i, min(BLOCK, n - s))


def exact_topk(queries: np.ndarray, blocks, k: int) -> np.ndarray:
    """True top-k ids by brute force over ``blocks`` of (start, keys) (float32)."""
    q = torch.from_numpy(queries)
    best_s = torch.full((len(q), k), -np.inf)
    best_i = torch.full((len(q), k), -1, dtype=torch.int64)
    for start, keys in blocks:
        s = q @ torch.from_numpy(keys).T  # (Q, block)
        cat_s = torch.cat([best_s, s], 1)
        cat_i = torch.cat([best_i, torch.arange(start, start + keys.shape[0]).expand(len(q), -1)], 1)
        best_s, pos = cat_s.topk(k, dim=1)
        best_i = cat_i.gather(1, pos)
    return best_i.numpy()


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true neighbours found (-1 pads of a KB smaller than k count for nothing)."""
    k = truth.shape[1]
    hits = []
    for a, b in zip(got[:, :k], truth):
        want = set(b.tolist()) - {-1}
        hits.append(len((set(a.tolist()) - {-1}) & want) / max(len(want), 1))
    return float(np.mean(hits))


OPEN_PROBE = """
import json, os, sys, time, resource
import faiss, lmdb, numpy, torch  # imported before the measurement: the open itself is measured
from retrofit.knowledge_base import KnowledgeBase
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def rss_split():  # (anonymous, file-backed) resident MiB
    f = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile")))
    return int(f["RssAnon"].split()[0]) / 1024, int(f["RssFile"].split()[0]) / 1024
if sys.argv[3] == "cold":  # drop the KB's files from the page cache first (clean pages: nothing is lost)
    for root, _, files in os.walk(sys.argv[1]):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
r0, (a0, f0) = rss(), rss_split(); t = time.perf_counter()
if sys.argv[2] == "kb":
    kb = KnowledgeBase.open(sys.argv[1])
    mapped = kb.info()["index"]["memory_mapped"]
else:  # the reference: faiss's own reader on the same index file, mapped
    state = json.load(open(os.path.join(sys.argv[1], "index.json")))
    index = faiss.read_index(os.path.join(sys.argv[1], state["file"]), faiss.IO_FLAG_MMAP_IFC)
    mapped = True
dt = time.perf_counter() - t
r1, (a1, f1) = rss(), rss_split()
print(json.dumps({"open_s": dt, "open_rss_mb": r1 - r0, "open_rss_anon_mb": a1 - a0, "open_rss_file_mb": f1 - f0,
                  "rss_mb_total": r1, "memory_mapped": mapped}))
"""


def open_probe(kb_dir: Path, what: str, cache: str = "warm") -> dict:
    """Open in a fresh process (``kb``: KnowledgeBase.open; ``faiss``: faiss.read_index of its index file);
    ``cache="cold"``: with the KB's files dropped from the page cache first."""
    probe = subprocess.run([sys.executable, "-c", OPEN_PROBE, str(kb_dir), what, cache], capture_output=True,
                           text=True)
    if probe.returncode:
        raise RuntimeError(probe.stderr)
    return json.loads(probe.stdout.strip().splitlines()[-1])


def measure(kb_dir: Path, build, queries: np.ndarray, truth, gather_arrays, k: int, batch: int,
            prefix: str, hnsw_storage: str = "fp16", warm: np.ndarray | None = None, whiten: float = 0.0,
            ef_construction: int = IndexConfig().ef_construction) -> dict:
    """Build the KB with ``build(kb)``, then measure everything on a fresh read-only handle. ``truth``: the exact
    top-k ids, or (with ``whiten``) a function of the KB's fitted transform giving them in the whitened space."""
    out: dict = {"hnsw_storage": hnsw_storage}
    t0 = time.perf_counter()
    rows, lab = gather_arrays  # in-RAM float16 (n, DIM + TEXT_DIM) image + text vectors, (n,) labels
    kb = KnowledgeBase.create(kb_dir, DIM, DIM, rows.shape[1] - DIM, hnsw_storage=hnsw_storage, whiten=whiten,
                              ef_construction=ef_construction)
    n = build(kb)  # the number of records, or (records, seconds spent outside the KB: making the data)
    n, aside = n if isinstance(n, tuple) else (n, 0.0)
    kb.close()
    out[prefix + "n"] = n
    out[prefix + "build_s"] = round(time.perf_counter() - t0 - aside, 2)  # the KB's own work
    out[prefix + "build_data_s"] = round(aside, 2)
    cold = open_probe(kb_dir, "kb", "cold")  # the files just written are in the page cache: evict them first
    out[prefix + "open_s_cold"] = round(cold["open_s"], 3)
    o = open_probe(kb_dir, "kb")
    out[prefix + "open_s"] = round(o["open_s"], 3)
    out[prefix + "open_rss_mb"] = round(o["open_rss_mb"], 1)  # total: anonymous + file-backed (+ shmem)
    out[prefix + "open_rss_anon_mb"] = round(o["open_rss_anon_mb"], 1)  # heap copies (faiss levels/offsets/id map)
    out[prefix + "open_rss_file_mb"] = round(o["open_rss_file_mb"], 1)  # mapped index / LMDB pages touched
    out[prefix + "open_rss_mb_process_total"] = round(o["rss_mb_total"], 1)
    ref = open_probe(kb_dir, "faiss")  # reference, same file, same run: faiss.read_index(IO_FLAG_MMAP_IFC)
    out[prefix + "open_s_faiss_reader"] = round(ref["open_s"], 3)
    out[prefix + "open_rss_mb_faiss_reader"] = round(ref["open_rss_mb"], 1)
    kb = KnowledgeBase.open(kb_dir)
    info = kb.info()
    out[prefix + "index"] = info["index"]["kind"]
    if info["index"]["kind"] != "hnsw":  # a KB below the flat threshold: no HNSW storage to report
        out["hnsw_storage"] = None
    out[prefix + "ef_search"] = info["index"]["ef_search"]
    out[prefix + "index_memory_mapped"] = info["index"]["memory_mapped"]
    out[prefix + "bytes_per_vector"] = round(info["bytes"]["records"] / n, 1)
    out[prefix + "records_over_raw_fp16"] = info["bytes"]["records_over_raw"]
    out[prefix + "index_bytes_per_vector"] = round(info["bytes"]["index"] / n, 1)
    warm = queries[:batch] if warm is None else warm  # warm-up queries, not timed below when given
    raw_queries, raw_warm = queries, warm  # what the raw faiss reference searches: whitened for a whitened index
    if kb._whiten is not None:  # (transformed once, outside its timing: qps_over_raw includes the KB's whitening)
        from retrofit.kb_whiten import apply_whitening

        t = time.perf_counter()
        truth = truth(kb._whiten)
        out[prefix + "truth_s"] = round(time.perf_counter() - t, 1)
        raw_queries, raw_warm = apply_whitening(queries, kb._whiten), apply_whitening(warm, kb._whiten)
        out[prefix + "whiten_fitted_on"] = info["index"]["whiten_fitted_on"]

    import faiss

    q_t = torch.from_numpy(queries)
    inner = faiss.downcast_index(kb._main.index)  # the very same faiss index, called directly
    params = faiss.SearchParametersHNSW() if isinstance(inner, faiss.IndexHNSW) else faiss.SearchParameters()
    if isinstance(inner, faiss.IndexHNSW):
        params.efSearch = kb.ef_search
    kb.search(torch.from_numpy(warm), k)  # warm-up (page in the mapped index and records)
    inner.search(raw_warm, k, params=params)
    # the machine is shared: interleave wrapper and raw batches so both see the same load
    ids, t_kb, t_raw = [], 0.0, 0.0
    for j, s in enumerate(range(0, len(q_t), batch)):
        for which in ((0, 1) if j % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            if which == 0:
                ids.append(kb.search(q_t[s:s + batch], k).ids.numpy())
                t_kb += time.perf_counter() - t
            else:
                inner.search(raw_queries[s:s + batch], k, params=params)
                t_raw += time.perf_counter() - t
    ids = np.concatenate(ids)
    out[prefix + "qps"] = round(len(q_t) / t_kb, 1)
    out[prefix + "qps_faiss_raw"] = round(len(q_t) / t_raw, 1)
    out[prefix + "qps_over_raw"] = round(t_raw / t_kb, 3)
    out[prefix + f"recall_at_{k}"] = round(recall(ids, truth), 4)
    out[prefix + "tuned_recall"] = info["index"]["tuned_recall"]

    sel = [ids[s:s + batch].reshape(-1) for s in range(0, min(len(ids), 8 * batch), batch)]
    sel = [s[s >= 0] for s in sel]

    def timed(fn) -> float:
        fn(sel[0])
        ts = []
        for s in sel:
            t = time.perf_counter()
            fn(s)
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)) * 1e3

    # the in-RAM reference: the same rows from one float16 array already in memory, converted by torch as
    # kb.gather converts them (numpy's float16 cast is ~7x slower and made the reference look slow)
    out[prefix + "gather_ms"] = round(timed(lambda s: kb.gather(s)), 3)
    out[prefix + "gather_ms_in_ram"] = round(timed(lambda s: (torch.from_numpy(rows[s]).float(), lab[s])), 3)
    kb.close()
    return out


def synthetic(args: argparse.Namespace, root: Path) -> dict:
    gen = Generator(args.seed)
    queries = np.concatenate([x for _, (x, _, _) in gen.blocks(1, args.queries)])
    t = time.perf_counter()
    if args.whiten:  # the exact top-k in the space the KB fits (measure() calls this with its transform)
        from retrofit.kb_whiten import apply_whitening

        def truth(w: np.ndarray) -> np.ndarray:
            return exact_topk(apply_whitening(queries, w),
                              ((s, apply_whitening(x, w)) for s, (x, _, _) in gen.blocks(0, args.n)), args.k)
    else:
        truth = exact_topk(queries, ((s, x) for s, (x, _, _) in gen.blocks(0, args.n)), args.k)
    truth_s = time.perf_counter() - t
    rows = np.empty((args.n, DIM + TEXT_DIM), np.float16)  # in-RAM copy for the gather reference
    lab = np.empty(args.n, np.int64)

    def build(kb: KnowledgeBase) -> tuple[int, float]:
        aside = 0.0  # generating the synthetic data and filling the in-RAM reference: not the KB's cost
        with kb.bulk():
            blocks = gen.blocks(0, args.n)
            while True:
                t = time.perf_counter()
                item = next(blocks, None)
                if item is not None:
                    s, (x, tx, lb) = item
                    rows[s:s + len(x), :DIM], rows[s:s + len(x), DIM:], lab[s:s + len(x)] = x, tx, lb
                aside += time.perf_counter() - t
                if item is None:
                    break
                kb.add(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(tx), labels=torch.from_numpy(lb))
        return args.n, aside

    warm = np.concatenate([x for _, (x, _, _) in gen.blocks(2, args.batch)])  # a third stream: warm-up only
    out = measure(root / "synthetic", build, queries, truth, (rows, lab), args.k, args.batch, "",
                  args.hnsw_storage, warm=warm, whiten=args.whiten, ef_construction=args.ef_construction)
    if not args.whiten:  # (whitened: measure() timed the truth in the fitted space)
        out["truth_s"] = round(truth_s, 1)
    return out


def cifar_embeddings(data: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiny Darknet (64x64) pooled embeddings of CIFAR-10 train and test, cached as .npy."""
    f = cache / "cifar10_darknet_tiny_64.npz"
    if f.is_file():
        z = np.load(f)
        return z["train"], z["test"], z["train_labels"]
    from PIL import Image

    from retrofit.models import darknet_tiny

    model = darknet_tiny(data_dir=data)
    pre = model.preprocess()

    def embed(shards: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        feats, labels, batch = [], [], []

        def flush() -> None:
            with torch.no_grad():
                x = torch.stack(batch)
                feats.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
            batch.clear()

        for shard in shards:
            with tarfile.open(shard) as tf:
                for m in tf:
                    if m.name.endswith(".jpg"):
                        batch.append(pre(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                        if len(batch) == 256:
                            flush()
                    elif m.name.endswith(".cls"):
                        labels.append(int(tf.extractfile(m).read()))
        if batch:
            flush()
        return np.concatenate(feats).astype(np.float32), np.asarray(labels, np.int64)

    train, train_labels = embed(sorted((data / "cifar10").glob("train-*.tar")))
    test, _ = embed([data / "cifar10" / "test-000000.tar"])
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, train=train, test=test, train_labels=train_labels)
    return train, test, train_labels


def real(args: argparse.Namespace, root: Path) -> dict:
    from retrofit._env import data_dir

    d = data_dir(required=True)
    train, test, labels = cifar_embeddings(d, Path(args.cache))
    keys = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = (test / np.linalg.norm(test, axis=1, keepdims=True)).astype(np.float32)
    truth = exact_topk(queries, [(0, keys.astype(np.float32))], args.k)
    if args.whiten:
        from retrofit.kb_whiten import apply_whitening

        # the KB's records hold float16 keys: its transform applies to those
        stored = keys.astype(np.float16).astype(np.float32)

        def truth(w: np.ndarray) -> np.ndarray:
            return exact_topk(apply_whitening(queries, w), [(0, apply_whitening(stored, w))], args.k)
    rows = np.concatenate([train.astype(np.float16), np.zeros((len(train), TEXT_DIM), np.float16)], axis=1)

    def build(kb: KnowledgeBase) -> int:
        with kb.bulk():
            for s in range(0, len(train), BLOCK):
                kb.add(torch.from_numpy(keys[s:s + BLOCK]), torch.from_numpy(train[s:s + BLOCK]),
                       torch.zeros(len(train[s:s + BLOCK]), TEXT_DIM), labels=torch.from_numpy(labels[s:s + BLOCK]))
        return len(train)

    return measure(root / "real", build, queries, truth, (rows, labels), args.k, args.batch, "real_",
                   args.hnsw_storage, warm=keys[:args.batch].astype(np.float32), whiten=args.whiten,
                   ef_construction=args.ef_construction)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=positive_int, default=1_000_000, help="synthetic KB size (default 1,000,000)")
    p.add_argument("--k", type=positive_int, default=32, help="neighbours per query (default 32)")
    p.add_argument("--batch", type=positive_int, default=256, help="queries per search call (default 256)")
    p.add_argument("--queries", type=positive_int, default=2048, help="held-out synthetic queries (default 2048)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--dir", default=None, help="where to build the KBs (default: a temporary directory)")
    p.add_argument("--no-real", action="store_true", help="skip the real_* (Tiny Darknet on CIFAR-10) figures")
    p.add_argument("--no-synthetic", action="store_true", help="only the real_* figures")
    p.add_argument("--cache", default=".retrofit_cache", help="where CIFAR-10 embeddings are cached")
    p.add_argument("--hnsw-storage", default="fp16", choices=["fp16", "float32"],
                   help="HNSW vector storage of the KBs (default fp16, the library's default)")
    p.add_argument("--whiten", type=float, default=0.0, metavar="SHRINKAGE",
                   help="build the KBs with key whitening (IndexConfig.whiten; default 0 = off): recall is then "
                        "against exact search in the whitened space, and the raw faiss reference searches "
                        "pre-whitened queries")
    p.add_argument("--ef-construction", type=positive_int, default=IndexConfig().ef_construction, metavar="EF",
                   help="HNSW efConstruction of the KBs (IndexConfig.ef_construction; default %(default)s, the "
                        "library's default since 24 Nov 2026; earlier figures used 40): a wider build beam costs "
                        "build time and lets the tuned efSearch drop")
    args = p.parse_args()
    if args.no_real and args.no_synthetic:
        p.error("--no-real and --no-synthetic together leave nothing to measure")
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        out: dict = {"benchmark": "store", "k": args.k, "batch": args.batch, "whiten": args.whiten,
                     "ef_construction": args.ef_construction}
        if not args.no_synthetic:
            out.update(synthetic(args, root))
        if not args.no_real:
            out.update(real(args, root))
        out["threads"] = torch.get_num_threads()
        emit(out)


if __name__ == "__main__":
    run(main)
