"""Cross-validated training length of the demo's heads (retrofit.demo_cv, examples/cifar10_lt_epochs_cv.py) and the
KB_ext heads' own epochs (DemoConfig.epochs_ext), on the miniature copy of the real data (tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import mini_settings

from retrofit.demo import DemoConfig, run_demo
from retrofit.demo_cv import cross_validate_epochs, fold_heads, fold_of_each, nested_host_logits, out_of_fold_logits
from retrofit.demo_data import prepare
from retrofit.demo_rules import balanced_top1
from retrofit.demo_train import head_cache_dir, head_epochs, new_head, one_thread, train_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cifar10_lt_epochs_cv.py"


def _cfg(mini_data: Path, tmp: Path, **kw) -> DemoConfig:
    return DemoConfig(**{**mini_settings(mini_data), "cache_dir": str(tmp / "cache"),
                         "results_dir": str(tmp / "results"), **kw})


def test_folds_hold_a_share_of_every_class():
    y = torch.tensor([0] * 23 + [1] * 7 + [2] * 2 + [3] * 50)
    f = fold_of_each(y, 5, seed=3)
    assert f.min() == 0 and f.max() == 4
    for c, n in ((0, 23), (1, 7), (2, 2), (3, 50)):
        per = torch.bincount(f[y == c], minlength=5)
        assert per.sum() == n and per.max() - per.min() <= 1, (c, per)
    sizes = torch.bincount(f, minlength=5)
    assert sizes.max() - sizes.min() <= 1  # remainders spread over the folds, not all in fold 0
    assert torch.equal(f, fold_of_each(y, 5, seed=3)) and not torch.equal(f, fold_of_each(y, 5, seed=4))
    with pytest.raises(ValueError, match="folds must be an int >= 2"):
        fold_of_each(y, 1)


def test_out_of_fold_logits_come_from_heads_that_never_saw_them(mini_data, tmp_path):
    cfg = _cfg(mini_data, tmp_path, vote_temperatures=(0.1,), vote_scales=(1.0, 2.0))
    data = prepare(cfg)
    try:
        oof = out_of_fold_logits(cfg, data, "in", "ext", 2, seed=0, folds=3)
        assert set(oof) == {(t, s) for t in ("trained", 0.1) for s in (1.0, 2.0)}
        n = len(data.split.lt)
        for logits in oof.values():
            assert logits.shape == (n, data.num_classes) and torch.isfinite(logits).all()
            assert (logits != 0).any(1).all()  # every image scored
        # fold 1's rows are what a head trained on the other folds gives, with KB_ext's neighbours, on the host
        # logits of the world without fold 1 (nested: none of them from a probe that saw fold 1)
        from dataclasses import replace

        from retrofit.training import predict_logits, train

        nested = nested_host_logits(cfg, data, folds=3)
        fs = replace(data.train_features("in"), host_logits=nested[1])
        fold = fold_of_each(fs.labels, 3)
        fit, held = (fold != 1).nonzero().flatten(), (fold == 1).nonzero().flatten()
        with one_thread():  # as the demo's heads and the CV's are trained
            head = train(new_head(cfg, data, "in", 0), fs.subset(fit), train_config(cfg, "in", 0, 2),
                         store=data.kb("in")).head
        head.attach(data.kb("ext"))
        fe = replace(data.train_features("ext"), host_logits=nested[1])
        want = predict_logits(head, fe.subset(held), data.kb("ext"), device="cpu")["logits"]
        torch.testing.assert_close(oof[("trained", 1.0)][held], want)  # (the vote mixed in as the scale grid does)
        # the demo's shared cross-fitted host logits (some from probes that saw fold 1) train another head
        assert not torch.equal(nested[1][fold != 1], data.train_features("in").host_logits[fold != 1])
        with one_thread():
            shared = train(new_head(cfg, data, "in", 0), data.train_features("in").subset(fit),
                           train_config(cfg, "in", 0, 2), store=data.kb("in")).head
        assert not all(torch.equal(a, b) for a, b in zip(shared.parameters(), head.parameters()))
        pooled = fold_heads(cfg, data, "in", [(2, 0)], folds=3)[(2, 0)][1]  # trained in a worker: the same weights
        assert all(torch.equal(a, b) for a, b in zip(pooled.parameters(), head.parameters()))  # (buffers: its KB's)
        # a head trained on every image (fold 1 included) scores fold 1 otherwise
        whole = train(new_head(cfg, data, "in", 0), fs, train_config(cfg, "in", 0, 2), store=data.kb("in")).head
        whole.attach(data.kb("ext"))
        seen = predict_logits(whole, fe.subset(held), data.kb("ext"), device="cpu")["logits"]
        assert not torch.allclose(seen, want)
        res = cross_validate_epochs(cfg, data, "in", "ext", epochs=(1, 2), seeds=(0, 1), folds=3)
        assert sorted(res) == [1, 2]
        for r in res.values():
            assert [s["seed"] for s in r["seeds"]] == [0, 1]
            assert r["balanced_top1"] == pytest.approx(sum(s["balanced_top1"] for s in r["seeds"]) / 2)
            assert all(0.0 < s["balanced_top1"] <= 1.0 and s["adjustment"] in cfg.posthoc for s in r["seeds"])
        # the figure is the best over the grids of the out-of-fold logits above (the same heads: CPU is deterministic)
        lp = data.log_prior()
        from retrofit.demo_rules import choose_adjustment

        shift = choose_adjustment(data.host_logits("val"), data.labels("val"), lp,
                                  tuple(x for x in cfg.posthoc if x >= 0)) * lp
        again = out_of_fold_logits(cfg, data, "in", "ext", 2, seed=0, folds=3, shift=shift)
        best = max(balanced_top1(v - a * lp, fs.labels) for v in again.values() for a in cfg.posthoc)
        assert res[2]["seeds"][0]["balanced_top1"] == pytest.approx(best)
        with pytest.raises(ValueError, match="epochs must be positive ints"):
            cross_validate_epochs(cfg, data, "in", epochs=(0,))
    finally:
        data.close()


def test_the_kb_ext_head_trains_for_its_own_epochs(mini_data, tmp_path):
    cfg = _cfg(mini_data, tmp_path, epochs=2, epochs_ext=1, rows=("4", "6"), plot=False)
    assert (head_epochs(cfg, "in"), head_epochs(cfg, "ext"), head_epochs(cfg, "in_noisy")) == (2, 1, 2)
    doc = run_demo(cfg)
    assert doc["rows"]["4"]["epochs"] == 2 and doc["rows"]["6"]["epochs"] == 1
    assert "2 epochs (1 for the head trained with KB_ext)" in (tmp_path / "results" / "cifar10_lt_if10.md").read_text()
    data = prepare(cfg)
    try:  # the cache key follows the epochs a head trains for, not the field that set them
        key = lambda c, kb: head_cache_dir(c, data, kb, 0, "image+text", False, None, True)
        same = _cfg(mini_data, tmp_path, epochs=2, epochs_ext=None)
        assert key(cfg, "in") == key(same, "in") and key(cfg, "ext") != key(same, "ext")
        assert key(cfg, "ext") == key(_cfg(mini_data, tmp_path, epochs=1, epochs_ext=None), "ext")
    finally:
        data.close()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="epochs_ext must be a positive int or None"):
            _cfg(mini_data, tmp_path, epochs_ext=bad).validate()


def test_the_epochs_cv_example_small(mini_data, tmp_path):
    spec = importlib.util.spec_from_file_location("cifar10_lt_epochs_cv", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    args = ex.parse_args(["--kbs", "ext", "--epochs", "1,2", "--seeds", "1", "--folds", "2", "--host", "shared",
                          "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")])
    doc = ex.run(args, **{k: v for k, v in mini_settings(mini_data).items()})
    saved = json.loads((tmp_path / "results" / "cifar10_lt_epochs_cv_shared.json").read_text())
    assert saved == json.loads(json.dumps(doc)) and sorted(doc["kbs"]["ext"]) == ["1", "2"]
    assert doc["host"] == "shared" and not (tmp_path / "results" / "cifar10_lt_epochs_cv.json").exists()
    lines = ex.table(doc).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| ext | 1 | ")
    with pytest.raises(SystemExit):
        ex.parse_args(["--kbs", "both"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--epochs", "0,3"])
    with pytest.raises(SystemExit):  # nested host logits need a third fold
        ex.parse_args(["--folds", "2"])


def test_rule_cross_validation_scores_each_fold_with_choices_made_on_the_others(mini_data, tmp_path):
    from retrofit.calibration import choose_vote_scale
    from retrofit.demo_rules import choose_adjustment
    from retrofit.demo_train import shifted
    from retrofit.training import predict_logits, train

    spec = importlib.util.spec_from_file_location("cifar10_lt_rule_cv", EXAMPLE.with_name("cifar10_lt_rule_cv.py"))
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    args = ex.parse_args(["--kbs", "in", "--seeds", "1", "--folds", "3", "--cache-dir", str(tmp_path / "cache"),
                          "--results-dir", str(tmp_path / "results"), "--metrics", "balanced,balanced_nll",
                          "--rules", "best,one_se,trained"])
    settings = {**mini_settings(mini_data), "epochs": 2, "vote_scales": (0.5, 1.0, 4.0), "vote_temperatures": (0.1,)}
    doc = ex.run(args, **settings)
    assert json.loads((tmp_path / "results" / "cifar10_lt_rule_cv.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["host"] == "nested"
    res = doc["kbs"]["in"]
    names = {"best", "one_se", "trained", "best/balanced_nll", "one_se/balanced_nll"}  # (trained: once)
    assert set(res) == {"in", "ext"} and all(set(r) == names for r in res.values())
    lines = ex.table(doc).splitlines()
    assert len(lines) == 2 + 10 and "| KB_in | KB_ext | one_se/balanced_nll |" in lines[-1]
    # the KB_in setting by hand: for each fold f a head trained on the others, the choices made on them, scored on
    # fold f, all on the host logits of the world without fold f; the figure is balanced top-1 over the folds
    from dataclasses import replace

    cfg = _cfg(mini_data, tmp_path, **settings)
    data = prepare(cfg)
    try:
        lp = data.log_prior()
        shift = choose_adjustment(data.host_logits("val"), data.labels("val"), lp,
                                  tuple(x for x in cfg.posthoc if x >= 0)) * lp
        nested = nested_host_logits(cfg, data, folds=3)
        labels = data.train_features("in").labels
        fold = fold_of_each(labels, 3)
        names = {"balanced": "best", "balanced_nll": "best/balanced_nll", None: "trained"}  # the same heads
        logits = {m: torch.zeros(len(labels), data.num_classes) for m in names}
        for f in (0, 1, 2):
            fs = shifted(replace(data.train_features("in"), host_logits=nested[f]), shift)
            fit, held = (fold != f).nonzero().flatten(), (fold == f).nonzero().flatten()
            with one_thread():
                head = train(new_head(cfg, data, "in", 0), fs.subset(fit), train_config(cfg, "in", 0),
                             store=data.kb("in")).head
            trained_t = head.vote.temperature
            for metric, name in names.items():
                c = choose_vote_scale(head, fs.subset(fit), data.kb("in"), scales=cfg.vote_scales,
                                      temperatures=cfg.vote_temperatures, metric=metric or "balanced",
                                      rule="best" if metric else "trained", device="cpu")
                on_fit = predict_logits(head, fs.subset(fit), data.kb("in"), device="cpu")["logits"]
                a = max((balanced_top1(on_fit - x * lp, fs.labels[fit]), -abs(x), x) for x in cfg.posthoc)[2]
                assert res["in"][name]["seeds"][0]["choices"][f] == [c.temperature, c.scale, a]
                assert metric or (c.scale, c.temperature) == (1.0, trained_t)  # "trained": the vote as trained
                logits[metric][held] = predict_logits(head, fs.subset(held), data.kb("in"),
                                                      device="cpu")["logits"] - a * lp
                head.vote.set_scale(1.0)
                head.vote.set_temperature(trained_t)
        for metric, name in names.items():
            assert res["in"][name]["balanced_top1"] == pytest.approx(balanced_top1(logits[metric], labels))
    finally:
        data.close()
    with pytest.raises(SystemExit):
        ex.parse_args(["--kbs", "both"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--metrics", "balanced,macro"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--rules", "best,widest"])
    assert ex.parse_args(["--rules", "trained, best"]).rules == ["trained", "best"]


def test_the_out_of_fold_choice_example_small(mini_data, tmp_path):
    """examples/cifar10_lt_oof_choice.py: the choice is one of the demo's grids, and the test figure is the demo's
    head scored with it."""
    from retrofit.demo_heads import head_logits
    from retrofit.demo_pool import host_shifts
    from retrofit.demo_rules import top1
    from retrofit.demo_train import train_head

    spec = importlib.util.spec_from_file_location("oof", EXAMPLE.with_name("cifar10_lt_oof_choice.py"))
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    args = ex.parse_args(["--kbs", "ext", "--seeds", "1", "--folds", "3", "--cache-dir", str(tmp_path / "cache"),
                          "--results-dir", str(tmp_path / "results")])
    settings = {**mini_settings(mini_data), "vote_scales": (0.5, 1.0, 4.0), "vote_temperatures": (0.1,)}
    doc = ex.run(args, **settings)
    assert json.loads((tmp_path / "results" / "cifar10_lt_oof_choice.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["host"] == "nested"
    (r,) = doc["kbs"]["ext"]["6"]["seeds"]
    cfg = _cfg(mini_data, tmp_path, **settings)
    assert r["temperature"] in ("trained", 0.1) and r["vote_scale"] in cfg.vote_scales
    assert r["adjustment"] in cfg.posthoc
    assert ex.table(doc).splitlines()[2].startswith(f"| 6 | {100 * r['test_top1']:.2f} |")
    data = prepare(cfg)
    try:
        shift = host_shifts(cfg, data)[False]
        head, info = train_head(cfg, data, "ext", 0, shift=shift)
        assert info["reused"]  # the head the example scored: the demo's, from the cache
        if r["temperature"] != "trained":
            head.vote.set_temperature(r["temperature"])
        head.vote.set_scale(r["vote_scale"])
        test = head_logits(head, data, "ext", "test", False, shift)
        assert r["test_top1"] == pytest.approx(top1(test - r["adjustment"] * data.log_prior(), data.labels("test")))
    finally:
        data.close()


def test_merge_results_keeps_the_rows_a_later_run_did_not_redo():
    from retrofit.demo_cv import merge_results

    def res(x):
        return {"balanced_top1": x, "seeds": [{"seed": 0, "balanced_top1": x}]}

    old = {"folds": 5, "seeds": 3, "kbs": {"in": {"in": {"best": res(0.6), "one_se": res(0.5)},
                                                  "ext": {"best": res(0.7)}},
                                           "ext": {"ext": {"best": res(0.8)}}}}
    new = {"folds": 5, "seeds": 3, "kbs": {"in": {"in": {"best": res(0.61), "trained": res(0.4)}}}}
    got = merge_results(old, new)
    assert got["kbs"]["in"]["in"] == {"best": res(0.61), "one_se": res(0.5), "trained": res(0.4)}  # redone: new's
    assert got["kbs"]["in"]["ext"] == {"best": res(0.7)} and got["kbs"]["ext"] == old["kbs"]["ext"]  # kept
    assert old["kbs"]["in"]["in"] == {"best": res(0.6), "one_se": res(0.5)}  # (old itself unchanged)
    assert merge_results({**old, "seeds": 1}, new) == new and merge_results(None, new) == new  # other seeds: new only
    nested = {**new, "host": "nested"}  # other host logits (a file without "host": the shared ones): new only
    assert merge_results(old, nested) == nested and merge_results({**old, "host": "nested"}, nested) != nested
    assert merge_results({**old, "host": "shared"}, new) == {**got, "host": "shared"}
    # an entry that is itself a result (the epochs' CV: {epochs: result}) is replaced, not merged
    epochs_old = {"folds": 5, "seeds": 3, "kbs": {"ext": {"1": res(0.7), "3": res(0.6)}}}
    epochs_new = {"folds": 5, "seeds": 3, "kbs": {"ext": {"1": res(0.71)}}}
    assert merge_results(epochs_old, epochs_new)["kbs"]["ext"] == {"1": res(0.71), "3": res(0.6)}


def test_nested_host_logits_agree_with_the_demos_on_each_held_out_fold(mini_data, tmp_path):
    """With the demo's 5 folds, entry f of the nested host logits is, on fold f, the demo's own cross-fitted host
    logits (the same probe); they are cached, and the noisy labels get their own."""
    from retrofit.demo_cv import fold_hosts

    cfg = _cfg(mini_data, tmp_path)
    data = prepare(cfg)
    try:
        nested = nested_host_logits(cfg, data, folds=5)
        fold = fold_of_each(data.labels("lt"), 5)
        for f in range(5):
            assert torch.equal(nested[f][fold == f], data.host_logits("lt")[fold == f])
        assert not torch.equal(nested[0], nested[1])
        (saved,) = Path(data.root).glob("host-nested-wd*-k5-c*.safetensors")
        saved.touch()
        assert torch.equal(nested_host_logits(cfg, data, folds=5), nested) and len(list(data.root.glob("host-n*"))) == 1
        noisy = nested_host_logits(cfg, data, noisy=True, folds=5)
        noisy_fold = fold_of_each(torch.from_numpy(data.noisy_lt_labels), 5)
        assert torch.equal(noisy[2][noisy_fold == 2], data.host_logits("lt", noisy=True)[noisy_fold == 2])
        assert fold_hosts(cfg, data, 4, host="shared") == [None] * 4
        with pytest.raises(ValueError, match="host must be one of nested, shared, got 'both'"):
            fold_hosts(cfg, data, 5, host="both")
        with pytest.raises(ValueError, match="host='nested' needs folds >= 3"):
            fold_hosts(cfg, data, 2)
    finally:
        data.close()
