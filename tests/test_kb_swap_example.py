"""examples/kb_swap.py at a small size on the real CIFAR-10 images: a head trained on a small KB, moved to a KB
with web pairs labelled from their captions, without retraining (the script itself raises if attaching changed a
trained weight)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kb_swap.py"
SMALL = ["--max-per-class", "60", "--imbalance", "10", "--val-per-class", "5", "--test-per-class", "20",
         "--epochs", "2", "--quiet"]


def _example():
    spec = importlib.util.spec_from_file_location("kb_swap_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kb_swap_example_small(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RETROFIT_DATA_DIR", str(data_dir))
    ex = _example()
    out = tmp_path / "run"
    first = ex.run(ex.parse_args([*SMALL, "--web", "400", "--out", str(out)]))

    labelled = sum(int(60 * 10 ** (-c / 9)) for c in range(10))  # 60 ... 6 per class
    assert first["sizes"] == {"labelled": labelled, "web": 400, "kb_big": labelled + 400, "val": 50, "test": 200}
    assert first["train_counts"] == [int(60 * 10 ** (-c / 9)) for c in range(10)]
    # labels read from the captions alone: mostly right (~75% at full size), some unknown, never all unknown
    assert first["web_caption_labels"]["correct"] > 0.5
    assert 0.0 < first["web_caption_labels"]["unknown"] < 0.3
    assert first["vote"]["chosen_scale"] in ex.SCALES
    rows = first["rows"]
    assert len(rows) == 8
    chosen = first["vote"]["with_temperature"]
    assert chosen["scale"] in ex.SCALES and chosen["temperature"] > 0
    for name, r in rows.items():
        assert 0.0 <= r["top1"] <= 1.0, name
        assert r["many"] is not None and r["few"] is not None, name  # the quantile cut-offs leave no group empty
    host = rows["host (linear probe)"]["top1"]
    assert host > 0.3  # 10 classes: a probe on real Tiny Darknet features is far above chance even at this size
    assert (out / "results.json").is_file()
    print(ex.table(first))

    # a second run with another web set: the labelled KB and everything trained on it are reused and identical
    # (CPU training is deterministic), the web KB and the merged KB are rebuilt at the new size
    stamp = (out / "kb_small" / "complete").stat().st_mtime_ns
    second = ex.run(ex.parse_args([*SMALL, "--web", "300", "--out", str(out), "--whiten", "0.1"]))
    assert second["kb_big_whiten"] == 0.1  # (KB_big searched whitened: only its rows may change)
    assert (out / "kb_small" / "complete").stat().st_mtime_ns == stamp
    assert second["sizes"]["web"] == 300 and second["sizes"]["kb_big"] == labelled + 300
    def no_web(summary):  # the rows that use no web data
        return [n for n in summary["rows"] if "KB_big" not in n and not n.startswith("reference")]

    before = no_web(first)
    assert len(before) == 3 and before == no_web(second)
    for name in before:
        assert second["rows"][name] == first["rows"][name], name
    assert second["vote"]["trained_weight"] == pytest.approx(first["vote"]["trained_weight"], abs=0)


@pytest.mark.parametrize("argv, says", [
    (["--web", "-5"], "--web must be >= 1"),  # a negative count read as "all but 5": 49,460 web pairs, silently
    (["--imbalance", "0"], "--imbalance must be >= 1"),
    (["--max-per-class", "10", "--imbalance", "20"], "leaves the rarest class no labelled image"),
    (["--test-per-class", "2000"], "--test-per-class must be <= 1000"),
])
def test_kb_swap_example_refuses_bad_options(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        _example().parse_args(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err
