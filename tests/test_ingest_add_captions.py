"""``kb add`` of web data without labels, its labels read from the captions (--labels-from-captions)."""

from __future__ import annotations

import json

import pytest
from test_ingest import FAST, _records, _web_manifest
from test_sources import make_manifest, mini_samples, real_encoders  # noqa: F401  (mini_samples is a fixture)

from retrofit.cli import main
from retrofit.ingest import add_to_kb, build_kb


@pytest.fixture(scope="module")
def encoders():
    return real_encoders()


def test_kb_add_reads_labels_from_captions(tmp_path, mini_samples, cifar_classes, encoders, capsys):  # noqa: F811
    """A labelled KB grows by unlabelled web data: with --labels-from-captions the added rows get the class their
    caption names, by the KB's own class list (no --classes needed); given labels stay; the build's records stay."""
    build_kb(make_manifest(tmp_path / "lab", mini_samples[:20], cifar_classes), tmp_path / "kb", **encoders, **FAST,
             class_names=cifar_classes)
    before = _records(tmp_path / "kb")
    web = _web_manifest(tmp_path / "web", mini_samples[20:60], cifar_classes)
    rc = main(["kb", "add", str(tmp_path / "kb"), str(web), "--labels-from-captions", "--quiet", "--json"])
    assert rc == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs = _records(tmp_path / "kb")
    kept = [(r["id"], r["label"], r["source"]) for r in recs[:20]]
    assert kept == [(r["id"], r["label"], r["source"]) for r in before]
    assert len(recs) == 60 and out["written"] == 40
    added, truth = [r["label"] for r in recs[20:]], [m["label"] for m in mini_samples[20:60]]
    read = [n for n in range(40) if (20 + n) % 10]  # every tenth row has a (wrong) label of its own
    for n in range(40):
        if n not in read:
            assert added[n] == (truth[n] + 1) % 10
    right = sum(added[n] == truth[n] for n in read) / len(read)
    assert right >= 0.3 and out["extra"]["labels_from_captions"] == sum(added[n] >= 0 for n in read)  # chance: 0.1
    # the labels a build of the same rows reads from their captions
    build_kb(web, tmp_path / "kb_web", **encoders, **FAST, class_names=cifar_classes, caption_labels=True)
    assert [r["label"] for r in _records(tmp_path / "kb_web")] == added
    # without the option the rows stay unlabelled; a bad threshold fails before any work
    plain = add_to_kb(tmp_path / "kb", str(_web_manifest(tmp_path / "web2", mini_samples[60:70], cifar_classes)),
                      **encoders, **FAST)
    assert plain.written == 10 and "labels_from_captions" not in plain.extra
    assert [r["label"] for r in _records(tmp_path / "kb")[61:70]] == [-1] * 9
    with pytest.raises(ValueError, match="cosine"):
        add_to_kb(tmp_path / "kb", str(_web_manifest(tmp_path / "web3", mini_samples[70:80], cifar_classes)),
                  **encoders, **FAST, caption_labels=True, caption_min_similarity=2.0)
    assert len(_records(tmp_path / "kb")) == 70
