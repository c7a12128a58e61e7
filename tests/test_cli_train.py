"""`retrofit train / eval / predict` end to end on real CIFAR-10 shards (a small subset written as a
webdataset shard), a real KB built from it (Tiny Darknet + MiniLM), and the errors users meet."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile

import pytest
from conftest import read_cifar_members

from retrofit.cli import main

PER_CLASS_TRAIN, PER_CLASS_TEST = 10, 5


def _write(path, samples) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
    from retrofit.ingest import build_kb

    root = tmp_path_factory.mktemp("cli")
    train, test = [], []
    n = PER_CLASS_TRAIN + PER_CLASS_TEST
    for i in range(5):
        for start in (0, 5000):  # shard i holds classes 2i and 2i+1 in blocks of 5,000
            block = read_cifar_members(data_dir / "cifar10" / f"train-00000{i}.tar", start, n)
            train += block[:PER_CLASS_TRAIN]
            test += [(k, {e: v for e, v in m.items() if e != "txt"}) for k, m in block[PER_CLASS_TRAIN:]]
    _write(root / "train.tar", train)
    _write(root / "test.tar", test)
    (root / "classes.json").write_bytes((data_dir / "cifar10" / "classes.json").read_bytes())
    build_kb(str(root / "train.tar"), root / "kb", image_encoder="darknet-tiny", text_encoder="minilm",
             progress=False, num_workers=0)
    return root


def _train_args(root, out, *extra: str) -> list[str]:
    return ["train", "--model", "darknet-tiny", "--data", str(root / "train.tar"), "--kb", str(root / "kb"),
            "--out", str(out), "--epochs", "2", "--batch-size", "25", "--k", "6", "--dim", "32", "--depth", "1",
            "--heads", "4", "--cross-fit", "2", "--quiet", "--json", *extra]


@pytest.mark.parametrize("command", ["train", "eval", "predict", "calibrate"])
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and f"retrofit {command} " in text


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A 2-epoch `retrofit train` run (host: linear probe with 2-fold cross-fitted logits)."""
    import contextlib

    out = tmp_path_factory.mktemp("trained") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(_train_args(setup, out)) == 0
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert summary["epochs"] == 2 and summary["host"] == "probe" and summary["samples"] == 10 * PER_CLASS_TRAIN
    return out


def test_train_resume_eval_predict(setup, trained, capsys, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for f in ("run.json", "head/config.json", "host_probe.safetensors", "checkpoints/last/state.json",
              "train_log.jsonl"):
        assert (out / f).is_file(), f
    # the KB holds the training images themselves (same order): no sample may retrieve its own entry
    (nb_dir,) = (out / "cache").glob("train.neighbors-*")
    ids = load_file(str(nb_dir / "tensors.safetensors"))["neighbor_ids"]
    import torch

    assert ids.shape == (10 * PER_CLASS_TRAIN, 6) and not (ids == torch.arange(len(ids))[:, None]).any()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.safetensors")}
    # resume to 3 epochs: the cache is reused untouched, training continues from the checkpoint
    assert main([*_train_args(setup, out, "--resume"), "--epochs", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 3
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.safetensors")} == stamps
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2, 3]

    assert main(["eval", "--run", str(out), "--data", str(setup / "test.tar"), "--cutoffs", "20,5", "--quiet",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"host", "host + logit adj.", "retrofitted", "retrofitted + logit adj."}
    full = json.loads((out / "eval" / "eval.json").read_text())
    assert full["retrofitted"]["n"] == 10 * PER_CLASS_TEST and len(full["retrofitted"]["per_class_acc"]) == 10
    assert (out / "eval" / "per_class.png").read_bytes()[:4] == b"\x89PNG"
    assert "| retrofitted |" in (out / "eval" / "eval.md").read_text()
    # what was evaluated is kept with the figures (the next eval replaces them)
    meta = full["meta"]
    assert meta["data"] == str(setup / "test.tar") and meta["samples"] == 10 * PER_CLASS_TEST
    assert meta["cutoffs"] == [20, 5] and meta["keep_self"] is False and meta["head"] and meta["kb"]
    assert f"- data: {setup / 'test.tar'}" in (out / "eval" / "eval.md").read_text()
    assert "replacing" not in capsys.readouterr().err
    assert main(["eval", "--run", str(out), "--data", str(setup / "test.tar"), "--quiet"]) == 0  # the same folder
    assert "replacing the results of an earlier eval" in capsys.readouterr().err

    img = tmp_path / "plane.jpg"
    with tarfile.open(setup / "test.tar") as tf:
        img.write_bytes(tf.extractfile(next(m for m in tf if m.name.endswith(".jpg"))).read())
    assert main(["predict", str(img), "--run", str(out), "--explain", "--top", "3", "--json"]) == 0
    (pred,) = json.loads(capsys.readouterr().out)
    probs = [t["prob"] for t in pred["top"]]
    assert len(probs) == 3 and all(0 <= p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
    assert sum(probs) <= 1.0 + 1e-6 and len({t["index"] for t in pred["top"]}) == 3
    assert len(pred["neighbors"]) == 6
    assert set(pred["neighbors"][0]) == {"id", "label", "caption", "similarity", "attention"}
    assert main(["predict", str(img), "--run", str(out), "--explain"]) == 0
    assert "attention" in capsys.readouterr().out
    # predict decodes as training does: a 16-bit PNG of the picture was clipped to white (another class, silently);
    # and images go through the backbone in --feature-batch batches
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(img).convert("L"), dtype=np.uint16)
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray(grey * 257).save(tmp_path / "g16.png")
    assert main(["predict", str(tmp_path / "g8.png"), str(tmp_path / "g16.png"), str(img), "--run", str(out),
                 "--json", "--feature-batch", "2"]) == 0
    g8, g16, again = json.loads(capsys.readouterr().out)
    assert g8["top"][0]["class"] == g16["top"][0]["class"]
    assert abs(g8["top"][0]["prob"] - g16["top"][0]["prob"]) < 0.02
    assert [t["class"] for t in again["top"][:3]] == [t["class"] for t in pred["top"]]  # batching: the same
    assert [t["prob"] for t in again["top"][:3]] == pytest.approx([t["prob"] for t in pred["top"]], abs=1e-6)
    # one unreadable file among several: the others are still predicted, it is named, and the status is 1
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", str(tmp_path / "broken.jpg"), str(img), "--run", str(out), "--json"]) == 1
    cap = capsys.readouterr()
    bad, good = json.loads(cap.out)
    assert bad["image"].endswith("broken.jpg") and "cannot read image" in bad["error"] and "broken.jpg" in cap.err
    assert [t["class"] for t in good["top"][:3]] == [t["class"] for t in pred["top"]]
    assert main(["predict", str(tmp_path / "broken.jpg"), "--run", str(out)]) == 1
    assert "no image could be read (1 given)" in capsys.readouterr().err
    # a missing file among others is an error record too (it stopped the whole batch), in the order given; decoding
    # in --workers processes gives the same predictions
    gone = str(tmp_path / "gone.jpg")
    assert main(["predict", gone, str(img), "--run", str(out), "--json", "--workers", "1", "--quiet"]) == 1
    cap = capsys.readouterr()
    miss, good = json.loads(cap.out)
    assert miss == {"image": gone, "error": f"image file not found: {gone!r}"} and "gone.jpg" in cap.err
    assert [t["prob"] for t in good["top"][:3]] == pytest.approx([t["prob"] for t in pred["top"]], abs=1e-6)


def test_errors_name_problem_and_fix(setup, trained, capsys, tmp_path):
    def err(argv) -> str:
        assert main(argv) == 1
        return capsys.readouterr().err

    assert "not found" in err(["train", "--model", "darknet-tiny", "--data", str(tmp_path / "nope.tar"),
                               "--kb", str(setup / "kb"), "--out", str(tmp_path / "o")])
    assert "retrofit kb build" in err(_train_args(setup, tmp_path / "o")[:5] + ["--kb", str(tmp_path / "nokb"),
                                                                               "--out", str(tmp_path / "o")])
    msg = err(["train", "--model", "nosuchfamily:net", "--data", str(setup / "train.tar"), "--kb", str(setup / "kb"),
               "--out", str(tmp_path / "o")])
    assert "nosuchfamily" in msg and "darknet-tiny" in msg and "put the module 'nosuchfamily' on the Python path" in msg
    (tmp_path / "mymodel.py").write_text("def make():\n    pass\n")
    msg = err(["train", "--model", f"{tmp_path / 'mymodel.py'}:make", "--data", str(setup / "train.tar"), "--kb",
               str(setup / "kb"), "--out", str(tmp_path / "o")])
    assert "MODULE is a module name, not a file: PYTHONPATH=" in msg and "--model mymodel:make" in msg
    msg = err(["train", "--model", "module:mymodel.make", "--data", str(setup / "train.tar"), "--kb",
               str(setup / "kb"), "--out", str(tmp_path / "o")])
    assert "MODULE:FUNCTION means your module's name, e.g. mymodel:make" in msg  # the literal word was typed
    msg = err([*_train_args(setup, tmp_path / "o"), "--host", "model"])
    assert "class-count mismatch" in msg and "1000" in msg and "--host probe" in msg
    out = tmp_path / "run"
    shutil.copytree(trained, out)  # a finished 2-epoch run; resuming it to 3 epochs reads the checkpoint
    w = out / "checkpoints" / "last" / "weights.safetensors"
    w.write_bytes(b"\0" * 64)
    msg = err([*_train_args(setup, out, "--resume"), "--epochs", "3", "--cache-dir", str(trained / "cache")])
    assert "corrupt" in msg and "delete" in msg
    assert "not found" in err(["predict", str(tmp_path / "missing.jpg"), "--run", str(out)])
    assert "run.json" in err(["eval", "--run", str(tmp_path), "--data", str(setup / "test.tar")])
    assert "expected two integers MANY,FEW" in err(["eval", "--run", str(out), "--data", str(setup / "test.tar"),
                                                    "--cutoffs", "1000"])

    # an output directory holding a run is never silently overwritten, and --resume must keep the settings
    done = tmp_path / "done"
    shutil.copytree(trained, done)
    before = (done / "head" / "model.safetensors").read_bytes()
    msg = err(_train_args(setup, done))
    assert "already holds a training run" in msg and "--resume" in msg and "--overwrite" in msg
    assert (done / "head" / "model.safetensors").read_bytes() == before  # refused before any work
    msg = err([*_train_args(setup, done, "--resume"), "--dim", "64", "--cache-dir", str(trained / "cache")])
    assert "other settings" in msg and "dim" in msg and "--overwrite" in msg
    assert "give one of them" in err(_train_args(setup, done, "--resume", "--overwrite"))
    assert "no such file" in err([*_train_args(setup, tmp_path / "o2"), "--classes", "classez.txt"])
    assert not (tmp_path / "o2").exists()
    # a refused --resume (another seed / probe setting) and an --overwrite that fails its checks change nothing
    probe = (done / "host_probe.safetensors").read_bytes()
    for extra in (["--seed", "1"], ["--probe-wd", "0.01"]):
        msg = err([*_train_args(setup, done, "--resume"), *extra, "--cache-dir", str(trained / "cache")])
        assert "other settings" in msg, extra
        assert (done / "host_probe.safetensors").read_bytes() == probe, extra
    assert "retrofit kb build" in err([*_train_args(setup, done, "--overwrite")[:5], "--kb", str(tmp_path / "typo"),
                                       "--out", str(done), "--overwrite"])
    assert (done / "head" / "model.safetensors").read_bytes() == before and (done / "checkpoints").is_dir()
    (done / "host_classifier.safetensors").write_bytes(b"from an older --train-host run")
    for d in ("eval", "eval-web", "eval-notes"):  # the old head's eval results; a user's own directory
        (done / d).mkdir(exist_ok=True)
    (done / "eval" / "eval.json").write_text("{}")
    (done / "eval-web" / "eval.json").write_text("{}")
    shutil.copytree(done / "head", done / "head-web")  # as `retrofit calibrate --save RUN/head-web` leaves one
    assert main([*_train_args(setup, done, "--overwrite"), "--epochs", "1", "--cache-dir", str(trained / "cache")]) == 0
    assert not (done / "host_classifier.safetensors").exists()  # eval / predict must not pick up the old layer
    assert not (done / "eval").exists() and not (done / "eval-web").exists()  # stale results looked current
    assert (done / "eval-notes").is_dir()  # not written by `retrofit eval`: kept
    cap = capsys.readouterr()
    assert json.loads(cap.out.strip().splitlines()[-1])["epochs"] == 1
    assert "removed the old head's evaluation results in" in cap.err and "eval, eval-web" in cap.err
    assert (done / "head-web" / "model.safetensors").read_bytes() == before  # the old head's only copy: kept, and said
    assert "kept heads saved from the old run" in cap.err and "head-web" in cap.err
    log = [json.loads(x) for x in (done / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1]  # the old log went with the old run


def test_feature_cache_key_does_not_depend_on_hash_seed(setup, tmp_path):
    """The data digest that keys the feature cache is the same in every process (it iterated a set of paths)."""
    import subprocess
    import sys

    folder = tmp_path / "folder"
    with tarfile.open(setup / "test.tar") as tf:
        jpgs = [m for m in tf if m.name.endswith(".jpg")][:12]
        for i, m in enumerate(jpgs):
            d = folder / f"class{i % 3}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"im{i}.jpg").write_bytes(tf.extractfile(m).read())
    code = ("import sys; from retrofit.sources import imagefolder_source; from retrofit.pipeline import _data_digest; "
            "print(_data_digest(imagefolder_source(sys.argv[1])))")
    digests = set()
    for seed in ("1", "2", "3", "4"):
        r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed})
        digests.add(r.stdout.strip())
    assert len(digests) == 1 and len(digests.pop()) == 20


def test_train_with_label_vote(setup, trained, capsys, tmp_path):
    """`--label-vote` trains the demo's kind of head: the vote is saved, balanced by the KB, and it learns."""
    from retrofit.head import RetrievalHead

    out = tmp_path / "vote"
    assert main([*_train_args(setup, out, "--label-vote", "--loss", "lace")]) == 0
    capsys.readouterr()
    cfg = json.loads((out / "head" / "config.json").read_text())["config"]
    assert cfg["label_vote"] is True and cfg["vote_balance"] is True
    head = RetrievalHead.load(out / "head")
    assert head.vote is not None and head.vote.effective_weight != 0.0  # zero-initialised, moved by training
    assert main(["eval", "--run", str(out), "--data", str(setup / "test.tar"), "--cutoffs", "20,5", "--quiet",
                 "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["retrofitted"]
    assert main(["eval", "--run", str(out), "--data", str(setup / "test.tar"), "--cutoffs", "20,5", "--quiet",
                 "--json", "--out", str(tmp_path / "eval3"), "--vote-scale", "3"]) == 0
    scaled = json.loads(capsys.readouterr().out)["retrofitted"]
    assert scaled["nll"] != base["nll"]  # the scale reaches the head's logits
    assert main(["eval", "--run", str(out), "--data", str(setup / "test.tar"), "--quiet", "--vote-scale", "-1"]) == 1
    assert "vote scale must be" in capsys.readouterr().err
    # a head without a vote cannot take a vote scale
    assert main(["eval", "--run", str(trained), "--data", str(setup / "test.tar"), "--quiet", "--vote-scale", "2"]) == 1
    assert "has no label vote" in capsys.readouterr().err
    assert main([*_train_args(setup, tmp_path / "bad", "--no-vote-balance")]) == 1
    assert "only applies with --label-vote" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any work

    # `retrofit calibrate`: the scale chosen on labelled data, saved with the head, and it is what eval then sees
    val = str(setup / "test.tar")  # stands in for a validation set here
    saved = tmp_path / "head-cal"
    assert main(["calibrate", "--run", str(out), "--data", val, "--scales", "0,1,3,9", "--quiet", "--json",
                 "--save", str(saved)]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert set(cal["scores"]) == {"0.0", "1.0", "3.0", "9.0"} and cal["n"] == 10 * PER_CLASS_TEST
    best = max(cal["scores"].values())
    assert cal["scores"][str(cal["scale"])] == best
    assert cal["weight"] == pytest.approx(cal["scale"] * cal["trained_weight"])
    again = RetrievalHead.load(saved)
    assert float(again.vote.scale) == cal["scale"]
    assert main(["eval", "--run", str(out), "--head", str(saved), "--data", val, "--cutoffs", "20,5", "--quiet",
                 "--json", "--out", str(tmp_path / "eval-cal")]) == 0
    via_head = json.loads(capsys.readouterr().out)["retrofitted"]
    assert via_head["top1"] == pytest.approx(best)  # the saved scale is the one scored
    assert main(["eval", "--run", str(out), "--data", val, "--cutoffs", "20,5", "--quiet", "--json",
                 "--out", str(tmp_path / "eval-s"), "--vote-scale", str(cal["scale"])]) == 0
    assert json.loads(capsys.readouterr().out)["retrofitted"]["nll"] == pytest.approx(via_head["nll"])
    # refused: a head without a vote, bad scales; nothing written
    assert main(["calibrate", "--run", str(trained), "--data", val, "--quiet", "--save", str(tmp_path / "x")]) == 1
    assert "has no label vote" in capsys.readouterr().err and not (tmp_path / "x").exists()
    before = (out / "head" / "model.safetensors").read_bytes()
    for save, says in ((out / "head", "is the head being calibrated"), (out, "exists and is not an empty directory")):
        assert main(["calibrate", "--run", str(out), "--data", val, "--quiet", "--save", str(save)]) == 1
        assert says in capsys.readouterr().err
    assert (out / "head" / "model.safetensors").read_bytes() == before and not (out / "model.safetensors").exists()
    for bad in ("1,-2", "a,b", ","):
        assert main(["calibrate", "--run", str(out), "--data", val, "--quiet", "--scales", bad]) == 1
        assert "--scales" in capsys.readouterr().err
    # --rule one_se: within a standard error of the best, nearest the trained vote; the best by score reported
    assert main(["calibrate", "--run", str(out), "--data", val, "--scales", "0,1,3,9", "--quiet", "--json",
                 "--rule", "one_se"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["rule"] == "one_se" and cal["rule"] == "best" and one["scores"] == cal["scores"]
    assert one["best_by_score"][1] == cal["scale"]
    assert one["scores"][str(one["scale"])] >= best - one["standard_error"] - 1e-12
    assert abs(math.log(one["scale"])) <= abs(math.log(cal["scale"])) if one["scale"] > 0 else cal["scale"] == 0
    # --metric balanced_nll: minus the class-balanced NLL (the classes are balanced here: eval's NLL), no percent
    assert main(["calibrate", "--run", str(out), "--data", val, "--scales", "0,3", "--quiet", "--json",
                 "--metric", "balanced_nll"]) == 0
    by_ll = json.loads(capsys.readouterr().out)
    assert by_ll["metric"] == "balanced_nll" and by_ll["scores"][str(by_ll["scale"])] == max(by_ll["scores"].values())
    assert main(["eval", "--run", str(out), "--data", val, "--cutoffs", "20,5", "--quiet", "--json",
                 "--out", str(tmp_path / "eval-3"), "--vote-scale", "3"]) == 0
    assert by_ll["scores"]["3.0"] == pytest.approx(-json.loads(capsys.readouterr().out)["retrofitted"]["nll"],
                                                   rel=1e-4)
    assert main(["calibrate", "--run", str(out), "--data", val, "--scales", "0,3", "--quiet",
                 "--metric", "balanced_nll"]) == 0
    shown = capsys.readouterr().out
    assert "balanced log-likelihood on" in shown and f"| {by_ll['scores']['3.0']:.4f}" in shown and "%" not in shown
    # --rule trained: the trained vote kept (scale 1), the scores shown, the best named
    assert main(["calibrate", "--run", str(out), "--data", val, "--scales", "0,1,3,9", "--quiet", "--rule",
                 "trained"]) == 0
    shown = capsys.readouterr().out
    row_1 = shown.split("| 1 |")[1].split("\n")[0]
    assert shown.count("**chosen**") == 1 and "**chosen**" in row_1
    assert (cal["scale"] == 1.0) != ("(trained: the trained vote is kept; the best score is at scale" in shown)
    with pytest.raises(SystemExit):
        main(["calibrate", "--run", str(out), "--data", val, "--quiet", "--rule", "widest"])
    err = capsys.readouterr().err
    assert "--rule" in err and "one_se" in err  # argparse names the allowed values
    # --temperatures: the (temperature, scale) pair chosen jointly, the temperature saved with the head
    saved_t = tmp_path / "head-cal-t"
    assert main(["calibrate", "--run", str(out), "--data", val, "--scales", "0,1,3", "--temperatures", "0.01,0.5",
                 "--quiet", "--json", "--save", str(saved_t)]) == 0
    cal_t = json.loads(capsys.readouterr().out)
    by_t = cal_t["scores_by_temperature"]
    assert len(by_t) == 3 and {"0.01", "0.5"} <= set(by_t)  # the trained one too
    best_t = max(v for sc in by_t.values() for v in sc.values())
    assert by_t[str(cal_t["temperature"])][str(cal_t["scale"])] == best_t
    assert RetrievalHead.load(saved_t).vote.temperature == pytest.approx(cal_t["temperature"], rel=1e-6)
    for bad in ("0,0.1", "-1", "x"):
        assert main(["calibrate", "--run", str(out), "--data", val, "--quiet", "--temperatures", bad]) == 1
        assert "--temperatures" in capsys.readouterr().err
    # calibrating on the head's own training data is allowed, with a warning
    assert main(["calibrate", "--run", str(out), "--data", str(setup / "train.tar"), "--quiet", "--scales",
                 "1,2"]) == 0
    assert "is the head's training data" in capsys.readouterr().err


def test_train_and_calibrate_a_mix_form_vote(setup, trained, capsys, tmp_path):
    """`--vote-form mix`: a probability-mixture vote, saved as such; calibrate scores its scales (odds multiples)
    and reports mixing weights; the saved calibrated head gives eval the chosen figure. A run recorded before the
    option (no vote_form in run.json) still resumes."""
    from retrofit.head import RetrievalHead

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    run = json.loads((old / "run.json").read_text())
    del run["head"]["vote_form"]
    (old / "run.json").write_text(json.dumps(run))
    assert main([*_train_args(setup, old, "--resume"), "--epochs", "3", "--cache-dir", str(trained / "cache")]) == 0
    capsys.readouterr()

    assert main([*_train_args(setup, tmp_path / "bad", "--vote-form", "mix")]) == 1
    assert "add --label-vote" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "mix"
    assert main([*_train_args(setup, out, "--label-vote", "--vote-form", "mix", "--loss", "lace")]) == 0
    capsys.readouterr()
    assert json.loads((out / "head" / "config.json").read_text())["config"]["vote_form"] == "mix"
    head = RetrievalHead.load(out / "head")
    a = head.vote.effective_weight
    assert head.vote.form == "mix" and 0.0 < a < 1.0 and a != 0.5  # starts at 0.5, moved by training
    val, saved = str(setup / "test.tar"), tmp_path / "mix-cal"
    assert main(["calibrate", "--run", str(out), "--data", val, "--scales", "0,1,3,9", "--quiet", "--json",
                 "--save", str(saved)]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert cal["vote_form"] == "mix" and cal["trained_weight"] == pytest.approx(a, rel=1e-5)
    odds = cal["scale"] * a / (1 - a)
    assert cal["weight"] == pytest.approx(odds / (1 + odds), rel=1e-5)
    assert RetrievalHead.load(saved).vote.effective_weight == pytest.approx(cal["weight"], rel=1e-5)
    assert main(["eval", "--run", str(out), "--head", str(saved), "--data", val, "--cutoffs", "20,5", "--quiet",
                 "--json", "--out", str(tmp_path / "eval-mix")]) == 0
    assert json.loads(capsys.readouterr().out)["retrofitted"]["top1"] == pytest.approx(cal["scores"][str(cal["scale"])])
    assert main(["calibrate", "--run", str(out), "--data", val, "--scales", "0,1,3", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| vote scale | mixing weight |" in table
    assert f"| 3 | {3 * a / (1 - a) / (1 + 3 * a / (1 - a)):.4g} |" in table  # the mixing weight at scale 3


def test_eval_predict_calibrate_refuse_a_kb_from_another_encoder_unless_allowed(setup, trained, capsys, tmp_path):
    """A KB whose keys come from another 512-d encoder (a random-weight ResNet-18) attaches only on request."""
    from retrofit.ingest import build_kb

    other = tmp_path / "kb_resnet"
    build_kb(str(setup / "train.tar"), other, image_encoder="torchvision:resnet18@random", text_encoder="minilm",
             progress=False, num_workers=0)
    img = tmp_path / "x.jpg"
    with tarfile.open(setup / "test.tar") as tf:
        img.write_bytes(tf.extractfile(next(m for m in tf if m.name.endswith(".jpg"))).read())
    base = ["--run", str(trained), "--kb", str(other)]
    commands = [["eval", "--data", str(setup / "test.tar"), "--out", str(tmp_path / "ev"), "--no-cache", *base],
                ["predict", str(img), *base]]
    for argv in commands:
        assert main([*argv, "--quiet"] if argv[0] == "eval" else argv) == 1
        msg = capsys.readouterr().err
        assert "resnet18" in msg and "darknet-tiny" in msg and "--allow-fingerprint-mismatch" in msg, argv
        assert "allow_fingerprint_mismatch=True" not in msg, msg  # the flag, not the Python keyword
        assert main([*argv, "--allow-fingerprint-mismatch", "--json"]) == 0, argv
        capsys.readouterr()
    calibrate = ["calibrate", "--data", str(setup / "test.tar"), "--no-cache", *base]
    assert main(calibrate) == 1 and "--allow-fingerprint-mismatch" in capsys.readouterr().err
    assert main([*calibrate, "--allow-fingerprint-mismatch"]) == 1  # attached; this head has no vote to calibrate
    assert "no label vote" in capsys.readouterr().err


def test_eval_and_predict_check_the_model_given_with_model_against_the_kb(setup, trained, capsys, tmp_path):
    """`--model` may name another host than the run's: its embeddings must match the KB's keys (a 96 px Tiny Darknet
    against a KB made at 64 px used to be scored silently)."""
    img = tmp_path / "x.jpg"
    with tarfile.open(setup / "test.tar") as tf:
        img.write_bytes(tf.extractfile(next(m for m in tf if m.name.endswith(".jpg"))).read())
    base = ["--run", str(trained), "--model", "darknet-tiny@96"]
    for argv in (["eval", "--data", str(setup / "test.tar"), "--out", str(tmp_path / "ev"), "--no-cache", "--quiet",
                  *base], ["predict", str(img), *base]):
        assert main(argv) == 1, argv
        msg = capsys.readouterr().err
        assert "darknet-tiny@96" in msg and "--allow-fingerprint-mismatch" in msg, (argv, msg)
        assert main([*argv, "--allow-fingerprint-mismatch", "--json"]) == 0, argv
        capsys.readouterr()


def test_bad_settings_and_paths_fail_before_any_work_and_keep_the_run(setup, trained, capsys, tmp_path):
    """An --overwrite with a bad setting deleted the old run (head, checkpoints), then refused; bad --device
    strings, unwritable --out paths, --top 0, demo errors and eval without --run were tracebacks or late errors."""
    def err(argv) -> str:
        assert main(argv) == 1
        return capsys.readouterr().err

    done = tmp_path / "done"
    shutil.copytree(trained, done)
    before = sorted(p.name for p in done.iterdir())
    names = json.loads((setup / "classes.json").read_text())["classes"]
    (tmp_path / "reversed.txt").write_text("\n".join(names[::-1]))  # the KB's classes in another order
    for extra, says in ((["--lr", "-1"], "--lr must be > 0"), (["--dim", "30"], "divisible by --heads 4"),
                        (["--classes", str(tmp_path / "reversed.txt"), "--label-vote"], "in another order"),
                        (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number, got nan"),
                        (["--seed", "-1"], "--seed must be an int in [0, 2**64)"),
                        (["--noise-rate", "0.5"], "--noise-rate is the fraction of labels --noise flips"),
                        (["--host", "none", "--train-host"], "--train-host trains the host classifier, but --host "
                                                             "none"),
                        (["--device", "bogus"], "'bogus' is not a device; allowed"),
                        (["--cross-fit", "1"], "--cross-fit must be 0 (in-sample probe logits) or a fold count >= 2"),
                        (["--probe-wd", "-1"], "--probe-wd must be a finite number >= 0"),  # (a traceback after
                        (["--probe-wd", "nan"], "--probe-wd must be a finite number >= 0")):  # the run was cleared)
        assert says in err([*_train_args(setup, done, "--overwrite"), *extra]), extra
        assert sorted(p.name for p in done.iterdir()) == before and (done / "head" / "model.safetensors").exists()
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
    for extra, says in ((["--noise", "symmetric", "--noise-rate", "2"], "--noise-rate must be in [0, 1]"),
                        (["--val", str(tmp_path / "nosuch")], "nosuch")):  # found after the features were computed
        assert says in err([*_train_args(setup, tmp_path / "fresh2"), *extra]), extra
        assert not (tmp_path / "fresh2" / "cache").exists()
    for argv in ([*_train_args(setup, tmp_path / "fresh"), "--batch-size", "0"], ["demo", "--seeds", "0"],
                 ["demo", "--workers", "-1"]):  # an integer under a flag's minimum: the usage, as --top 0 below
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "must be an integer >= " in capsys.readouterr().err, argv
    # the options the user typed, not the config classes' field names (HeadConfig.dim=32 ... heads=5)
    assert "--dim 32 must be divisible by --heads 5" in err([*_train_args(setup, tmp_path / "fresh"), "--heads", "5"])
    assert not (tmp_path / "fresh" / "run.json").exists()  # nothing written for a refused run
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    msg = err(["eval", "--run", str(done), "--data", str(setup / "test.tar"), "--out", str(a_file / "sub"),
               "--quiet"])
    assert f"{a_file} is a file, not a folder" in msg and "[Errno" not in msg  # (the OS's words before)
    assert f"--out {str(a_file)!r} is a file; give a directory" in err(_train_args(setup, a_file))  # was [Errno 17]
    assert "is not a device" in err(["eval", "--run", str(done), "--data", str(setup / "test.tar"),
                                     "--device", "cuda:x"])
    for argv in (["eval", "--model", "darknet-tiny", "--head", str(done / "head"), "--kb", str(setup / "kb"),
                  "--data", str(setup / "test.tar")], ["eval", "--data", str(setup / "test.tar")]):
        with pytest.raises(SystemExit) as e:  # --help shows --run as required too (it showed [--run DIR])
            main(argv)
        assert e.value.code == 2 and "the following arguments are required: --run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["predict", str(a_file), "--run", str(done), "--top", "0"])
    assert e.value.code == 2 and "must be an integer >= 1" in capsys.readouterr().err
    assert "unknown rows ['99']" in err(["demo", "--rows", "99"])


def test_noise_note_goes_to_stderr(setup, trained, capsys, tmp_path):
    """--json output must be JSON only: the label-noise note went to stdout."""
    out = tmp_path / "noisy"
    args = _train_args(setup, out, "--noise", "symmetric", "--epochs", "1", "--cache-dir", str(trained / "cache"))
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["epochs"] == 1 and "label noise" in captured.err


def test_source_features_refuses_class_name_labels_before_any_work(setup, monkeypatch):
    """The README's recipe passed a manifest's labels (class names) to source_features, which ran the backbone over
    every image and then failed in torch.tensor; refused first, naming map_labels. map_labels gives the indices."""
    from retrofit.pipeline import load_host_model, source_features
    from retrofit.sources import map_labels, open_source

    src = open_source(str(setup / "train.tar"))
    host = load_host_model("darknet-tiny")
    monkeypatch.setattr(host, "featurize", lambda *a: pytest.fail("the backbone ran before the labels were checked"))
    names = ["cat"] * len(src)
    with pytest.raises(ValueError, match=r"labels\[0\] is 'cat'.*retrofit.sources.map_labels"):
        source_features(host, src, names, k=0, progress=False)
    labels, classes = map_labels(src, None)
    assert all(isinstance(y, int) and 0 <= y < len(classes) for y in labels)
    # index labels in any container pass the check (a tensor's 0-d elements were refused by the first version)
    import torch

    from retrofit.errors import RetrofitError

    monkeypatch.setattr("retrofit.pipeline.image_batches", lambda *a, **kw: [])  # stop right after the check
    for given in (labels, torch.tensor(labels, dtype=torch.int32), torch.tensor(labels).double().numpy()):
        with pytest.raises(RetrofitError, match="no decodable image"):
            source_features(host, src, given, k=0, progress=False)


def test_a_run_stopped_before_its_last_epoch_is_named_by_predict(setup, trained, capsys, tmp_path):
    """RUN/head holds the latest weights, also after a Ctrl-C at epoch 48 of 400: `eval` / `predict` used such a
    half-trained head without a word."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("cache"))
    img = tmp_path / "x.jpg"
    with tarfile.open(setup / "test.tar") as tf:
        img.write_bytes(tf.extractfile(next(m for m in tf if m.name.endswith(".jpg"))).read())
    assert main(["predict", str(img), "--run", str(run), "--json"]) == 0
    assert "stopped" not in capsys.readouterr().err  # a finished run: nothing to say
    state = run / "checkpoints" / "last" / "state.json"
    doc = json.loads(state.read_text())
    doc["epoch"] = 1  # as a run interrupted in its second epoch leaves it
    state.write_text(json.dumps(doc))
    assert main(["predict", str(img), "--run", str(run), "--json"]) == 0
    assert "stopped after 1 of 2 epochs (interrupted)" in capsys.readouterr().err
    doc["step"] = 3  # a Ctrl-C 3 steps into the second epoch: the head holds those steps (it said "after 1")
    state.write_text(json.dumps(doc))
    assert main(["predict", str(img), "--run", str(run), "--json"]) == 0
    assert "stopped in epoch 2 (step 3) of 2 epochs (interrupted)" in capsys.readouterr().err


def test_undecodable_images_are_named_again_when_features_come_from_the_cache(setup, tmp_path, caplog):
    """Undecodable images were warned about when the features were computed, then silently missing on every
    rerun that read the cache (a new user's eval)."""
    import logging

    from retrofit.pipeline import load_host_model, source_features
    from retrofit.sources import imagefolder_source

    with tarfile.open(setup / "test.tar") as tf:
        jpgs = [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")][:2]
    for cls, data in (("cat", jpgs[0]), ("dog", jpgs[1])):
        (tmp_path / "data" / cls).mkdir(parents=True)
        (tmp_path / "data" / cls / "a.jpg").write_bytes(data)
    (tmp_path / "data" / "dog" / "zero.png").write_bytes(b"")
    src = imagefolder_source(tmp_path / "data")
    host = load_host_model("darknet-tiny")
    for run in ("computed", "cached"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="retrofit"):
            fs = source_features(host, src, [r.label for r in src.refs], progress=False, cache_dir=tmp_path / "c")
        assert len(fs) == 2, run
        assert "zero.png" in caplog.text, run
    assert "1 undecodable sample(s)" in caplog.text and "found when these cached features were computed" in caplog.text


def test_host_auto_keeps_the_models_classifier_only_for_the_datas_classes(tmp_path, monkeypatch, capsys):
    """--host auto compared class counts only: a model whose 10 outputs are other classes (or the data's in
    another order) gave the run its logits as the host's, silently."""
    from retrofit.commands.train import _host_mode
    from retrofit.errors import RetrofitError
    from retrofit.pipeline import load_host_model

    (tmp_path / "tinyhosts.py").write_text(
        "from torch import nn\n"
        "def _net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))\n"
        "def named():\n"
        "    m = _net()\n"
        "    m.class_names = ['cat', 'dog', 'fox', 'owl']\n"
        "    return m\n"
        "def unnamed():\n"
        "    return _net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    named, unnamed = load_host_model("tinyhosts:named"), load_host_model("tinyhosts:unnamed")
    assert named.class_names == ["cat", "dog", "fox", "owl"] and unnamed.class_names is None
    capsys.readouterr()
    assert _host_mode("auto", named, ["cat", "dog", "fox", "owl"]) == "model"
    assert _host_mode("auto", named, ["Cat", "dog", "Fox", "owl"]) == "model"  # matched as labels are: no case
    assert capsys.readouterr().err == ""
    assert _host_mode("auto", named, ["dog", "cat", "fox", "owl"]) == "probe"
    err = capsys.readouterr().err
    assert "names its output 0 'cat', the data's class 0 is 'dog' (the same classes in another order)" in err
    assert _host_mode("auto", named, ["ant", "bee", "cow", "elk"]) == "probe"
    assert "another order" not in capsys.readouterr().err
    assert _host_mode("auto", unnamed, ["ant", "bee", "cow", "elk"]) == "model"
    assert "without class names; its outputs are taken as the data's classes in order" in capsys.readouterr().err
    assert _host_mode("auto", named, ["a", "b", "c"]) == "probe"  # another class count: a probe, as before
    with pytest.raises(RetrofitError, match="class mismatch: model 'tinyhosts:named' names its output 0 'cat'"):
        _host_mode("model", named, ["dog", "cat", "fox", "owl"])
    assert _host_mode("probe", named, ["cat", "dog", "fox", "owl"]) == "probe"


def test_integer_labels_read_in_the_kbs_class_order_are_announced(setup, tmp_path, capsys):
    """A manifest of class numbers trained against a KB's class list read them as positions in that list without
    a word (the user's 1=car became bird)."""
    with tarfile.open(setup / "train.tar") as tf:
        jpgs = [m for m in tf if m.name.endswith(".jpg")][:3]
        for i, m in enumerate(jpgs):
            (tmp_path / f"{i}.jpg").write_bytes(tf.extractfile(m).read())
    (tmp_path / "m.csv").write_text("image,label\n0.jpg,0\n1.jpg,1\n2.jpg,2\n")
    argv = ["train", "--model", "darknet-tiny", "--data", str(tmp_path / "m.csv"), "--kb", str(setup / "kb"),
            "--out", str(tmp_path / "o"), "--lr", "-1"]  # refused right after the labels are read
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "labels are class numbers without names: they are read as positions in the knowledge base's class " \
           "list (0=airplane, 1=automobile, 2=bird, 3=cat, ...)" in err and "--lr must be > 0" in err
    (tmp_path / "c.txt").write_text("airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n")
    assert main([*argv, "--classes", str(tmp_path / "c.txt")]) == 1  # the user's own list: nothing to say
    assert "class numbers without names" not in capsys.readouterr().err
    # a manifest's own column names: train / eval / calibrate take --image-column / --label-column (the error
    # told the user to pass --image-column, which only `kb build` had); they read no captions, so two
    # caption-like columns are no reason to refuse the manifest
    (tmp_path / "m2.csv").write_text("pic,cls,title,description\n0.jpg,0,a,b\n1.jpg,1,a,b\n2.jpg,2,a,b\n")
    argv[4] = str(tmp_path / "m2.csv")
    assert main(argv) == 1
    assert "has no image path column" in capsys.readouterr().err
    assert main([*argv, "--image-column", "pic", "--label-column", "cls"]) == 1
    err = capsys.readouterr().err
    assert "read as positions in the knowledge base's class list" in err and "--lr must be > 0" in err
    for command in ("eval", "calibrate"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0 and "--image-column" in capsys.readouterr().out


def test_a_ctrl_c_while_the_commands_are_imported_is_no_traceback(monkeypatch, capsys):
    """A Ctrl-C within the first second (the parser imports the commands) gave a raw KeyboardInterrupt traceback."""
    import retrofit.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info"]) == 130 and "interrupted" in capsys.readouterr().err
