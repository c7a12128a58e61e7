"""The README's quick start script runs as is."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def test_quickstart_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchvision")
    pytest.importorskip("faiss")
    pytest.importorskip("lmdb")
    monkeypatch.setattr("sys.argv", [str(EXAMPLE)])  # as `python examples/quickstart.py` (it parses --help)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "fused logits (8, 1000)" in out
    ids = out.split("neighbour ids of image 0: [")[1].split("]")[0].split(", ")
    assert len(ids) == 8 and all(0 <= int(i) < 200 for i in ids)
    assert "max |fused - host| = 0.00e+00" in out
