"""examples/noisy_labels_external_kb.py on the miniature copy of the real data (tests/conftest.py): the
noisy KB_in merged with the pool into KB_ext_noisy, the row-8r heads moved to it, every row of its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from conftest import mini_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "noisy_labels_external_kb.py"


def _example():
    spec = importlib.util.spec_from_file_location("noisy_labels_external_kb", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_noisy_labels_example_small(mini_data, tmp_path):
    from retrofit.demo import DemoConfig, run_demo
    from retrofit.knowledge_base import KnowledgeBase

    ex = _example()
    cache = tmp_path / "cache"
    args = ex.parse_args(["--seeds", "2", "--cache-dir", str(cache)])
    doc = ex.run(args, **mini_settings(mini_data))
    rows = doc["rows"]
    head_rows = [k for k in rows if k.startswith("8r")]
    assert len(rows) == 10 and len(head_rows) == 4
    for name, r in rows.items():
        assert 0.0 <= r["top1"] <= 1.0, name
    for name in head_rows:
        assert [s["seed"] for s in rows[name]["seeds"]] == [0, 1], name
        assert rows[name]["top1"] == np.mean([s["top1"] for s in rows[name]["seeds"]]), name
    as_trained = rows["8r head + KB_ext_noisy swapped in, vote as trained"]["seeds"]
    on_in = rows["8r: head trained on the noisy labels, noisy KB_in"]["seeds"]
    assert [s["vote_weight"] for s in as_trained] == [s["vote_weight"] for s in on_in]  # the same heads, moved
    for s in rows["8r head + KB_ext_noisy swapped in, vote weight chosen on val"]["seeds"]:
        assert s["vote_weight"] in ex.WEIGHTS and s["posthoc_adjustment"] in mini_settings(mini_data)["posthoc"]
    assert "| 8h: noisy host + logit adjustment |" in ex.table(doc) and "40% symmetric label noise" in ex.table(doc)
    json.dumps(doc, default=float)  # what main() prints

    # KB_ext_noisy = the noisy KB_in, then the pool with its own labels
    cfg = DemoConfig(**mini_settings(mini_data), cache_dir=str(cache), results_dir=str(tmp_path / "results"),
                     rows=("8h",), plot=False)
    demo = run_demo(cfg)
    root = Path(demo["protocol"]["cache"])
    with KnowledgeBase.open(root / "kb_in_noisy") as noisy, KnowledgeBase.open(root / "kb_pool") as pool, \
            KnowledgeBase.open(root / "kb_ext_noisy") as merged:
        assert len(merged) == len(noisy) + len(pool) == demo["protocol"]["kb_ext"]
        assert torch.equal(merged.labels(), torch.cat([noisy.labels(), pool.labels()]))
    # the example's 8h is the demo's row 8h
    assert rows["8h: noisy host + logit adjustment"]["top1"] == demo["rows"]["8h"]["top1"]

    # a second run merges nothing again and gives the same figures (heads from the cache)
    stamp = (root / "kb_ext_noisy" / "done.json").stat().st_mtime_ns
    again = ex.run(args, **mini_settings(mini_data))
    assert (root / "kb_ext_noisy" / "done.json").stat().st_mtime_ns == stamp
    assert json.dumps(again, default=float) == json.dumps(doc, default=float)
