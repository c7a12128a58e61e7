"""Training the demo's heads several at a time (retrofit.demo_pool) on the miniature real data: worker processes
give exactly the heads one-at-a-time training gives, whatever the thread count of the caller; the rows load them as
trained in this run; bad settings are refused by name."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import mini_settings

from retrofit.demo import DemoConfig, run_demo
from retrofit.demo_data import prepare
from retrofit.demo_pool import (
    HEAD_OF_ROW,
    _cost,
    _jobs,
    available_memory,
    default_workers,
    host_shifts,
    train_heads,
    usable_cores,
)
from retrofit.demo_train import head_cache_dir, one_thread


def _config(mini_data: Path, cache: Path, **kw) -> DemoConfig:
    return DemoConfig(**{**mini_settings(mini_data), "cache_dir": str(cache), "plot": False, **kw})


def _weights(path: Path) -> str:
    """A digest of a saved head's tensors (not of the file: safetensors writes its metadata in any order)."""
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    return hashlib.sha256(b"".join(n.encode() + state[n].numpy().tobytes() for n in sorted(state))).hexdigest()


def test_one_thread_runs_the_block_with_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with one_thread():
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_the_jobs_are_one_per_head_and_seed_in_row_order():
    cfg = DemoConfig()
    jobs = _jobs(cfg, range(2), ("8r", "5", "4", "1", "7t"))
    # rows 4 and 5 share one head; rows without a head (1) add none; the table's order, seed by seed
    assert jobs == [(s, HEAD_OF_ROW[r]) for s in (0, 1) for r in ("4", "7t", "8r")]
    assert _jobs(cfg, range(3), ("1", "2", "3")) == []
    assert usable_cores() >= 1
    assert 1 <= default_workers(5) <= min(usable_cores(), 5) and default_workers(1) == 1
    free = available_memory()  # (this project's machines are Linux: MemAvailable)
    assert free is not None and free > 0
    assert default_workers(5) <= max(1, free // (1.5 * 2**30))
    # the costliest heads go to the workers first: ten epochs with both modalities, then one, then row 6's one epoch
    n = 1000
    assert _cost(cfg, HEAD_OF_ROW["4"], n) == _cost(cfg, HEAD_OF_ROW["8r"], n) > _cost(cfg, HEAD_OF_ROW["7i"], n) \
        > _cost(cfg, HEAD_OF_ROW["6"], n) > 0
    assert _cost(cfg, HEAD_OF_ROW["6"], n, epochs=10) == _cost(cfg, HEAD_OF_ROW["4"], n)


def test_the_workers_copy_of_the_data_carries_its_features_not_its_open_kbs(mini_data, tmp_path):
    """What a worker gets: the tensors and the features retrieved so far (pickled, as spawn sends it), no open
    knowledge base; it opens its own when asked, and its features are the parent's."""
    import pickle

    cfg = _config(mini_data, tmp_path / "c")
    data = prepare(cfg)
    try:
        fs = data.train_features("in")
        copy = pickle.loads(pickle.dumps(data.portable()))
        assert data._kbs and not copy._kbs  # (the parent's stay open; the copy holds none)
        got = copy.train_features("in")  # no search: the parent's
        for f in ("z", "labels", "host_logits", "neighbor_ids", "neighbor_scores", "neighbor_labels"):
            assert torch.equal(getattr(got, f), getattr(fs, f)), f
        assert not copy._kbs
        assert len(copy.kb("in")) == len(data.kb("in")) and copy.kb("in") is not data.kb("in")
        copy.close()
    finally:
        data.close()


def test_heads_trained_in_workers_are_the_heads_trained_here(mini_data, tmp_path):
    """Two worker processes and one-at-a-time training in this process (with two intra-op threads around it)
    write bit-identical heads; the report says they were trained in this run, and a second run reuses them."""
    rows = ("4", "7i", "8r")
    pooled = _config(mini_data, tmp_path / "a", rows=rows, seeds=2, workers=2, results_dir=str(tmp_path / "ra"))
    here = _config(mini_data, tmp_path / "b", rows=rows, seeds=2, workers=1, results_dir=str(tmp_path / "rb"))
    doc = run_demo(pooled)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's count must not reach the heads
    try:
        doc_here = run_demo(here)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for d in (doc, doc_here):
        assert not any(d["rows"][n]["reused"] for n in ("4", "7i", "8r"))
    heads_a = sorted(p for p in (Path(doc["protocol"]["cache"]) / "heads").iterdir())
    heads_b = sorted(p for p in (Path(doc_here["protocol"]["cache"]) / "heads").iterdir())
    assert len(heads_a) == len(heads_b) == 6  # 3 heads x 2 seeds
    assert [p.name for p in heads_a] == [p.name for p in heads_b]  # the same keys: the same inputs
    assert [_weights(p) for p in heads_a] == [_weights(p) for p in heads_b]
    for n in rows:
        assert doc["rows"][n]["top1"] == doc_here["rows"][n]["top1"], n

    again = run_demo(pooled)  # everything cached: nothing trained, every row reports its head reused
    assert all(again["rows"][n]["reused"] for n in rows)
    assert [_weights(p) for p in heads_a] == [_weights(p) for p in
                                              sorted((Path(doc["protocol"]["cache"]) / "heads").iterdir())]


def test_retrain_trains_cached_heads_again_once(mini_data, tmp_path):
    """``reuse_heads=False``: the pool trains every head again (the same weights), and the rows load those
    instead of training a second time."""
    cfg = _config(mini_data, tmp_path / "c", rows=("4",), seeds=1, workers=1, results_dir=str(tmp_path / "r"))
    run_demo(cfg)
    data = prepare(cfg)
    try:
        shifts = host_shifts(cfg, data)
        path = head_cache_dir(cfg, data, "in", 0, "image+text", False, shifts[False], True)
        first = _weights(path)
        assert train_heads(cfg, data, range(1), ("4",), shifts) == {}  # cached: nothing to train
        cfg.reuse_heads = False
        trained = train_heads(cfg, data, range(1), ("4",), shifts)
        assert list(trained) == [str(path)] and trained[str(path)]["reused"] is False
        assert _weights(path) == first
    finally:
        data.close()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_worker_counts_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"workers must be an int >= 0 .*" + repr(bad).replace(".", r"\.")):
        DemoConfig(workers=bad).validate()


def test_a_script_without_a_main_guard_gets_told_what_to_do(mini_data, tmp_path):
    """Spawned workers import the calling script: one that calls run_demo at import time makes them fail to
    start, and the error says why and what to do instead of a bare BrokenProcessPool."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    settings = {**mini_settings(mini_data), "cache_dir": str(tmp_path / "cache"), "results_dir": str(tmp_path / "r"),
                "plot": False, "rows": ("4",), "seeds": 2, "workers": 2}
    script.write_text(f"from retrofit.demo import DemoConfig, run_demo\nrun_demo(DemoConfig(**{settings!r}))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert 'if __name__ == "__main__":' in out.stderr and "--workers 1" in out.stderr, out.stderr[-2000:]
