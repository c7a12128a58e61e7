"""The CIFAR-10-LT demo end to end (``run_demo``, what ``make demo`` / ``retrofit demo`` run) on a miniature copy of
the real data: 400 real training images (40 per class), 100 real test images, the real Tiny Darknet and MiniLM, every
row, two seeds, the plot. The full-size run is the benchmark (README); this checks that every piece still joins up:
data preparation, the knowledge bases, head training and its cache, the choices, the table, the JSON and the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import mini_settings

from retrofit.cifar10_lt import class_counts
from retrofit.demo import GUARDS, ROWS, DemoConfig, run_demo

_MIX_ROWS = ("4", "5", "6", "8r")  # trained with the label vote (the demo's mix form)


def _config(mini_data: Path, tmp: Path, **kw) -> DemoConfig:
    base = dict(mini_settings(mini_data), cache_dir=str(tmp / "cache"), results_dir=str(tmp / "results"), seeds=2)
    return DemoConfig(**{**base, **kw})


def _not_json(name: str) -> None:
    raise AssertionError(f"the results JSON holds {name}, which strict JSON readers refuse")


def _figures(doc: dict) -> dict:
    """Every row's reported figures (no timings, no cache state)."""
    drop = {"train_s", "reused"}
    return {n: {k: ([{a: b for a, b in s.items() if a not in drop} for s in v] if k == "seeds" else v)
                for k, v in r.items() if k not in drop} for n, r in doc["rows"].items()}


def test_the_demo_runs_end_to_end_and_a_second_run_reuses_its_heads(mini_data, tmp_path):
    cfg = _config(mini_data, tmp_path)
    doc = run_demo(cfg)
    out = tmp_path / "results"
    md = (out / "cifar10_lt_if10.md").read_text()
    on_disk = json.loads((out / "cifar10_lt_if10.json").read_text(), parse_constant=_not_json)  # no NaN: empty groups
    assert (out / "cifar10_lt_if10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the table: every row and reference, the test set it was measured on, the seeds
    for name, title in {**ROWS, **GUARDS}.items():
        assert f"| {'ref' if name in GUARDS else name} | {title} |" in md, title
    assert "balanced 100-image test set; seeds: 2" in md and "10,000" not in md
    assert doc["table"] in md
    assert set(on_disk["rows"]) == set(ROWS) | set(GUARDS)

    for name, row in on_disk["rows"].items():
        assert row["n"] == 100 and 0.0 <= row["top1"] <= 1.0, name
        acc = np.array(row["per_class_acc"])  # (the mean over seeds for a trained row)
        if "seeds" not in row:  # one figure: each class's accuracy is a count of its 10 test images
            assert np.allclose(acc * 10, np.round(acc * 10)), name
        assert row["top1"] == pytest.approx(acc.mean(), abs=1e-6), name  # balanced test set: top-1 = class mean
        assert row["many"] is None and row["medium"] is None  # 40 images at most per class: all Few
        assert row["few"] == pytest.approx(row["top1"], abs=1e-6), name
    for name in ("4", "5", "6", "7i", "7t", "8r"):
        seeds = on_disk["rows"][name]["seeds"]
        assert [s["seed"] for s in seeds] == [0, 1], name
        assert on_disk["rows"][name]["top1"] == pytest.approx(np.mean([s["top1"] for s in seeds])), name
        assert on_disk["rows"][name]["top1_std"] == pytest.approx(np.std([s["top1"] for s in seeds], ddof=1),
                                                                  abs=1e-6), name
        assert all(s["posthoc_adjustment"] in cfg.posthoc for s in seeds), name
    # the floors: each retrofitted row against row 2 and the fixed rule on its KB (8r: 8h), gap = the table's
    # difference, the seeds' gaps around it, a standard error from the paired test images; in the report too
    floors = on_disk["floors"]
    assert {n: set(r) for n, r in floors.items()} == {"4": {"2", "g_in"}, "5": {"2", "g_ext"}, "6": {"2", "g_ext"},
                                                      "7i": {"2", "g_in"}, "7t": {"2", "g_in"}, "8r": {"8h"}}
    for name, refs in floors.items():
        for ref, g in refs.items():
            assert g["gap"] == pytest.approx(on_disk["rows"][name]["top1"] - on_disk["rows"][ref]["top1"], abs=1e-9)
            assert g["per_seed"] == pytest.approx([s["top1"] - on_disk["rows"][ref]["top1"]
                                                   for s in on_disk["rows"][name]["seeds"]], abs=1e-9)
            assert 0.0 <= g["se"] <= 0.15, (name, ref)  # 100 test images: at most ~1 / sqrt(100) * 1.5
    g4 = floors["4"]["2"]
    assert f"row 4: row 2 {100 * g4['gap']:+.2f} ± {100 * g4['se']:.2f}, the KB_in rule" in md
    for name in _MIX_ROWS:  # the trained and the chosen mixing weights are weights
        for s in on_disk["rows"][name]["seeds"]:
            assert 0.0 < s["vote_weight_trained"] < 1.0, (name, s)
            assert s["vote_scale"] in cfg.vote_scales, (name, s)
    for s4, s5 in zip(on_disk["rows"]["4"]["seeds"], on_disk["rows"]["5"]["seeds"]):  # row 5 = row 4's head moved
        assert s4["vote_weight_trained"] == s5["vote_weight_trained"]
    assert on_disk["rows"]["4"]["vote_weight_trained"] != on_disk["rows"]["6"]["vote_weight_trained"]
    assert "vote_weight_trained" not in on_disk["rows"]["7i"]  # the image-only ablation has no label vote
    for name in ("4", "5", "6", "7i", "7t"):  # the clean rows' adjustments: on the training images; 8r's: on val
        assert on_disk["rows"][name]["posthoc_chosen_on"] == "train", name
    assert on_disk["rows"]["8r"]["posthoc_chosen_on"] == "val"
    # rows 4-7's adjustments are the training images' choice for their heads at the scale and temperature reported
    from retrofit.demo_data import prepare
    from retrofit.demo_heads import adjustment_on_training_images
    from retrofit.demo_train import head_cache_dir
    from retrofit.head import RetrievalHead

    data = prepare(cfg)
    try:
        lp = data.log_prior(noisy=False)
        shift = on_disk["rows"]["2"]["posthoc_adjustment"] * lp  # the heads are fed row 2's logits
        for row, kb, modalities, vote in (("4", "in", "image+text", True), ("6", "ext", "image+text", True),
                                          ("7i", "in", "image", False), ("7t", "in", "text", True)):
            for seed, chosen in enumerate(on_disk["rows"][row]["seeds"]):
                head = RetrievalHead.load(head_cache_dir(cfg, data, kb, seed, modalities, False, shift, vote),
                                          store=data.kb(kb))
                if vote:
                    head.vote.set_temperature(chosen["vote_temperature"])
                    head.vote.set_scale(chosen["vote_scale"])
                got = adjustment_on_training_images(head, data, kb, False, shift, lp, cfg.posthoc)
                assert chosen["posthoc_adjustment"] == got, (row, seed)
    finally:
        data.close()
    trained = ("4", "6", "7i", "7t", "8r")  # (row 5 is row 4's head)
    assert not any(on_disk["rows"][n]["reused"] for n in trained)
    heads = Path(doc["protocol"]["cache"]) / "heads"
    cached = sorted(p.name for p in heads.iterdir())
    assert len(cached) == 2 * len(trained)  # one per row and seed

    # a second run: every head from the cache (none trained, none added), the same figures
    again = run_demo(cfg)
    assert all(again["rows"][n]["reused"] for n in trained)
    assert sorted(p.name for p in heads.iterdir()) == cached
    assert _figures(json.loads(json.dumps(again, default=str))) == _figures(on_disk)


def test_a_demo_of_some_rows_shows_the_fixed_rows_too(mini_data, tmp_path):
    """``--rows 4``: the trained row asked for, with rows 1-3 and the references it is judged against; no KB_ext
    work when no row needs it."""
    cfg = _config(mini_data, tmp_path, rows=("4",), seeds=1, plot=False)
    doc = run_demo(cfg)
    assert set(doc["rows"]) == {"1", "2", "3", "4", "g_in"}
    assert not (Path(doc["protocol"]["cache"]) / "kb_ext").exists()
    assert not (tmp_path / "results" / "cifar10_lt_if10.png").exists()
    assert "seeds: 1" in (tmp_path / "results" / "cifar10_lt_if10.md").read_text()
    assert doc["rows"]["4"]["top1_std"] == 0.0 and len(doc["rows"]["4"]["seeds"]) == 1
    # vote_rule="trained": the same cached head with its vote as trained, under a report name of its own
    kept = run_demo(_config(mini_data, tmp_path, rows=("4",), seeds=1, plot=False, vote_rule="trained"))
    seed = kept["rows"]["4"]["seeds"][0]
    assert seed["vote_scale"] == 1.0 and seed["vote_temperature"] == seed["vote_temperature_trained"]
    assert "the trained vote scales kept" in (tmp_path / "results" / "cifar10_lt_if10_trained.md").read_text()


def test_retrofit_demo_command_on_other_settings(mini_data, tmp_path, capsys):
    """``retrofit demo`` with an imbalance factor and a noise rate of its own: the table on stdout, the report
    under a name of its own (the default report is not overwritten), every option reaching the run."""
    from retrofit.cli import main

    res = tmp_path / "results"
    argv = ["demo", "--data-dir", str(mini_data), "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(res),
            "--imbalance-factor", "10", "--noise-rate", "0.2", "--rows", "4,8r", "--epochs", "1", "--k", "4",
            "--dim", "8", "--depth", "1", "--whiten-in", "0.1", "--vote-form", "log", "--vote-rule", "one_se",
            "--no-plot", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| 4 | retrofit: head on KB_in (LACE) |" in out and "| 8r | noisy 20%: retrofit head on KB_in |" in out
    assert "40%" not in out
    stem = "cifar10_lt_if10_noise0.2_one_se"
    assert sorted(p.name for p in res.iterdir()) == [f"{stem}.json", f"{stem}.md"]
    doc = json.loads((res / f"{stem}.json").read_text())
    assert doc["config"]["vote_rule"] == "one_se"
    assert "vote scales on the long-tail training images (own entries excluded) by the one-standard-error rule" in \
        (res / f"{stem}.md").read_text()
    c = doc["config"]
    assert (c["imbalance_factor"], c["noise_rate"], c["epochs"], c["k"], c["dim"], c["depth"]) == (10, 0.2, 1, 4, 8, 1)
    assert (c["whiten_in"], c["vote_form"], c["rows"], c["plot"], c["progress"]) == (0.1, "log", ["4", "8r"], False,
                                                                                     False)
    assert set(doc["rows"]) == {"1", "2", "3", "4", "8h", "8r", "g_in"}
    # IF 10 over 40 images per class; classes left with fewer than 20 others give up images to validation
    assert doc["protocol"]["counts"] == [min(n, 20) for n in class_counts(10.0, 40, 10)]
    assert doc["rows"]["8h"]["name"] == "noisy 20%: host + logit adjustment"
    noisy = np.array(doc["protocol"]["noisy_counts"])
    assert noisy.sum() == sum(doc["protocol"]["counts"]) and not np.array_equal(noisy, doc["protocol"]["counts"])


def test_report_names_keep_every_setting_apart():
    """Each setting writes its own report: exact numbers (100.0000001 is not IF 100), the choice protocol."""
    assert DemoConfig().results_stem == DemoConfig(imbalance_factor=100).results_stem == "cifar10_lt"
    assert DemoConfig(imbalance_factor=100.0000001).results_stem == "cifar10_lt_if100.0000001"
    assert DemoConfig(noise_rate=0.2).results_stem != DemoConfig(noise_rate=0.2000001).results_stem
    assert DemoConfig(imbalance_factor=1234567).results_stem == "cifar10_lt_if1234567"
    assert DemoConfig(posthoc_on="val").results_stem == "cifar10_lt_posthoc_val"
    assert DemoConfig(vote_scale_on="val", posthoc_on="val").results_stem == "cifar10_lt_scale_val"
    assert DemoConfig(vote_rule="one_se").results_stem == "cifar10_lt_one_se"
    assert DemoConfig(vote_rule="trained").results_stem == "cifar10_lt_trained"
    with pytest.raises(ValueError, match="vote_rule='one_se' applies to the choice on the training images"):
        DemoConfig(vote_rule="one_se", vote_scale_on="val", posthoc_on="val").validate()
    with pytest.raises(ValueError, match="vote_rule must be one of best, one_se, trained, got 'widest'"):
        DemoConfig(vote_rule="widest").validate()
    assert DemoConfig(ext_labels="captions", imbalance_factor=50).results_stem == "cifar10_lt_if50_ext_captions"


def test_the_data_cache_key_reads_numbers_as_numbers():
    """``imbalance_factor=10`` and ``10.0`` (the CLI's float) are one cache entry (encoding 60,000 images again
    for an int was the cost); the defaults keep the entry they had; another setting gets another entry."""
    from retrofit.demo_data import data_key

    key = data_key(DemoConfig(), 50_000, 10_000)
    assert key == "97b42f086c8c86ec38c6"  # the default setting's entry before the numbers were normalised
    assert data_key(DemoConfig(imbalance_factor=10), 50_000, 10_000) == data_key(
        DemoConfig(imbalance_factor=10.0), 50_000, 10_000) != key
    assert data_key(DemoConfig(noise_rate=0), 50_000, 10_000) == data_key(DemoConfig(noise_rate=0.0), 50_000, 10_000)
    assert data_key(DemoConfig(noise_rate=0.2), 50_000, 10_000) != key != data_key(DemoConfig(), 400, 100)


def test_the_noisy_row_keeps_its_adjustment_on_validation(mini_data, tmp_path):
    """posthoc_on="train" moves the clean rows' adjustment to the training images; row 8r, whose training labels
    are noisy, keeps the validation choice: its figures are those of posthoc_on="val"."""
    got = {}
    for where in ("train", "val"):
        cfg = _config(mini_data, tmp_path, rows=("8r",), seeds=1, plot=False, posthoc_on=where,
                      results_dir=str(tmp_path / where))
        doc = run_demo(cfg)
        got[where] = doc["rows"]["8r"]
        assert got[where]["posthoc_chosen_on"] == "val"
        assert cfg.results_stem == "cifar10_lt_if10" + ("_posthoc_val" if where == "val" else "")
        md = (tmp_path / where / f"{cfg.results_stem}.md").read_text()
        assert ("rows 4-7's: on the long-tail training images" in md) == (where == "train")
    drop = {"train_s", "reused"}  # (their figures are the same too)
    assert {k: v for k, v in got["train"].items() if k not in drop} == {k: v for k, v in got["val"].items()
                                                                         if k not in drop}


def test_a_prepared_cache_is_read_while_another_writer_holds_its_kbs(mini_data, tmp_path):
    """Preparing the demo's data a second time only reads the built knowledge bases (a second run, or a script
    beside a running demo, is not refused for a writer it does not need); changing a KB's whitening takes the
    writer's lock and says so when another holds it."""
    from retrofit.demo_data import prepare
    from retrofit.errors import KnowledgeBaseError
    from retrofit.knowledge_base import KnowledgeBase

    cfg = _config(mini_data, tmp_path, seeds=1)
    prepare(cfg).close()
    root = next((tmp_path / "cache").glob("*/kb_ext")).parent
    held = [KnowledgeBase.open(root / name, readonly=False) for name in ("kb_in", "kb_ext", "kb_in_noisy")]
    try:
        again = prepare(cfg)
        assert len(again.kb("ext")) == len(held[1]) and again.kb("ext").info()["index"]["config"]["whiten"] == 0.1
        # the recorded runs' HNSW build beam (demo_build.EF_CONSTRUCTION), not the library's default since 24 Nov
        assert [kb.info()["index"]["config"]["ef_construction"] for kb in held] == [40, 40, 40]
        again.close()
        with pytest.raises(KnowledgeBaseError, match="already open for writing in this process"):
            prepare(_config(mini_data, tmp_path, seeds=1, whiten_ext=0.3))
    finally:
        for kb in held:
            kb.close()
    assert prepare(_config(mini_data, tmp_path, seeds=1, whiten_ext=0.3)).kb("ext").info()["index"]["config"][
        "whiten"] == 0.3


def test_the_noisy_kb_reuses_kb_ins_neighbours_only_while_it_searches_alike(mini_data, tmp_path):
    """KB_in's noisy twin has KB_in's keys under the same ids and index: its neighbours are KB_in's (searched once)
    with the noisy labels, exactly what a search of the twin gives; once its index differs it is searched."""
    import torch

    from retrofit.demo_data import _same_index, prepare
    from retrofit.feature_cache import retrieve

    cfg = _config(mini_data, tmp_path, seeds=1)
    data = prepare(cfg)
    try:
        assert _same_index(data.kb("in"), data.kb("in_noisy"))
        noisy_labels = data.kb("in_noisy").labels()
        assert not torch.equal(noisy_labels, data.kb("in").labels())  # (the mini data has flipped labels)
        for split in ("lt", "val", "test"):
            got = (data.train_features("in_noisy", noisy=True) if split == "lt"
                   else data.eval_features(split, "in_noisy", noisy=True))
            live = retrieve(got, data.kb("in_noisy"), data.k)
            for f in ("neighbor_ids", "neighbor_scores", "neighbor_labels"):
                assert torch.equal(getattr(got, f), getattr(live, f)), (split, f)
            clean = data.train_features("in") if split == "lt" else data.eval_features(split, "in")
            assert torch.equal(got.neighbor_ids, clean.neighbor_ids)
    finally:
        data.close()
    # another index (whitened keys), or another size: not alike, so searched
    from retrofit.knowledge_base import KnowledgeBase

    root = next((tmp_path / "cache").glob("*/kb_in_noisy")).parent
    with KnowledgeBase.open(root / "kb_in_noisy", readonly=False) as kb:
        kb.compact(whiten=0.3)
    with KnowledgeBase.open(root / "kb_in") as a, KnowledgeBase.open(root / "kb_in_noisy") as b, \
            KnowledgeBase.open(root / "kb_ext") as c:
        assert not _same_index(a, b) and not _same_index(a, c) and _same_index(a, a)


def test_cached_noisy_kb_and_host_logits_follow_the_runs_labels(mini_data, tmp_path, monkeypatch):
    """The data key names the noise rate and seed, not the noise code: when that code changes, the cached noisy KB
    and the host logits fitted on the old noisy labels are rebuilt, not reused with the new labels (audit)."""
    import torch

    import retrofit.noise as noise
    from retrofit.demo_data import prepare
    from retrofit.linear_probe import fit_linear_probe

    cfg = _config(mini_data, tmp_path, seeds=1, rows=("1", "2", "8h"))
    first = prepare(cfg)
    old = first.noisy_lt_labels.copy()
    first.close()

    def other_noise(labels, rate, num_classes, seed=0):  # e.g. symmetric over all classes: other labels
        return (labels + 1) % num_classes, torch.ones_like(labels, dtype=torch.bool)

    monkeypatch.setattr(noise, "symmetric_noise", other_noise)
    data = prepare(cfg)
    try:
        assert not np.array_equal(data.noisy_lt_labels, old)
        assert np.array_equal(data.kb("in_noisy").labels().numpy(), data.noisy_lt_labels)
        probe = fit_linear_probe(data.tensors["z_lt"], torch.from_numpy(data.noisy_lt_labels), data.num_classes,
                                 weight_decay=cfg.host_weight_decay)
        with torch.no_grad():
            assert torch.allclose(probe(data.tensors["z_test"]), data.host_logits("test", noisy=True), atol=1e-5)
    finally:
        data.close()
