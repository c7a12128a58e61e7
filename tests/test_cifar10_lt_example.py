"""examples/cifar10_lt.py (the demo from Python) on the miniature copy of the real data (tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import mini_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cifar10_lt.py"


def _example():
    spec = importlib.util.spec_from_file_location("cifar10_lt_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cifar10_lt_example_small(mini_data, tmp_path):
    ex = _example()
    res = tmp_path / "results"
    args = ex.parse_args(["--seeds", "2", "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(res)])
    doc = ex.run(args, **mini_settings(mini_data), rows=("4",), plot=False)
    assert doc["config"]["seeds"] == 2 and doc["config"]["rows"] == ["4"]
    assert [s["seed"] for s in doc["rows"]["4"]["seeds"]] == [0, 1]
    saved = json.loads((res / "cifar10_lt_if10.json").read_text())
    assert saved["rows"]["4"]["top1"] == doc["rows"]["4"]["top1"]
    line = ex.summary(doc)
    r4, r2 = doc["rows"]["4"], doc["rows"]["2"]
    assert line == (f"retrofit head on KB_in: {100 * r4['top1']:.1f}% overall, {100 * r4['few']:.1f}% Few "
                    f"(logit-adjusted host: {100 * r2['top1']:.1f}% / {100 * r2['few']:.1f}%)")


def test_cifar10_lt_example_refuses_bad_seeds(capsys):
    ex = _example()
    with pytest.raises(SystemExit) as e:
        ex.parse_args(["--seeds", "0"])
    assert e.value.code == 2 and "seeds" in capsys.readouterr().err
