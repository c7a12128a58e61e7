"""``retrofit kb info|verify|query|delete|compact`` on a real knowledge base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrofit.cli import main
from retrofit.knowledge_base import KnowledgeBase


def _kb(path):
    kb = KnowledgeBase.create(path, 8, 4, 2, class_names=["cat", "dog"])
    g = torch.Generator().manual_seed(0)
    kb.add(torch.randn(40, 8, generator=g), torch.randn(40, 4, generator=g), torch.randn(40, 2, generator=g),
           labels=torch.arange(40) % 2, captions=[f"a photo number {i}" for i in range(40)])
    kb.close()


def test_kb_cli_round_trip(tmp_path, capsys):
    path = str(tmp_path / "kb")
    _kb(path)
    assert main(["kb", "info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 40 and info["class_names"] == ["cat", "dog"]
    assert main(["kb", "verify", path]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("OK: 40 records") and "verify records" in cap.err  # a progress bar (none before)
    assert main(["kb", "verify", path, "--quiet"]) == 0 and "verify records" not in capsys.readouterr().err
    assert main(["kb", "query", path, "--ids", "3", "-k", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)[0]["neighbours"]
    assert len(res) == 4 and all(r["id"] != 3 for r in res) and res[0]["caption"].startswith("a photo number")
    np.save(tmp_path / "q.npy", np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32))
    assert main(["kb", "query", path, "--vectors", str(tmp_path / "q.npy"), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "query 1: 2 neighbours" in out and "class " in out
    assert main(["kb", "delete", path, "3", "4,5"]) == 0
    assert main(["kb", "compact", path]) == 0
    assert "37 live records" in capsys.readouterr().out
    assert main(["kb", "delete", path, "3"]) == 1  # already deleted
    assert "unknown or deleted ids [3]" in capsys.readouterr().err
    assert main(["kb", "delete", path, "7,x"]) == 1
    assert "ids: 'x' is not a record id" in capsys.readouterr().err
    assert main(["kb", "query", path, "--ids", "a"]) == 1
    assert "--ids: 'a' is not a record id" in capsys.readouterr().err
    assert main(["kb", "delete", path, "10-12,20"]) == 0  # ranges are inclusive
    assert "deleted 4 records; 33 live" in capsys.readouterr().out
    assert main(["kb", "delete", path, "30-25"]) == 1
    assert "ids: range 30-25 is reversed (an inclusive range goes low-high, e.g. 25-30)" in capsys.readouterr().err
    assert main(["kb", "info", str(tmp_path / "nope")]) == 1
    assert "nope does not exist; build one with `retrofit kb build SOURCE" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    assert main(["kb", "info", str(tmp_path / "other")]) == 1
    assert "not a retrofit knowledge base" in capsys.readouterr().err
    # kb build: a missing source, and a KB given where the source goes (arguments swapped); nothing created
    assert main(["kb", "build", str(tmp_path / "nothere"), str(tmp_path / "new")]) == 1
    assert "data source" in capsys.readouterr().err
    assert main(["kb", "build", path, str(tmp_path / "new")]) == 1
    assert "is a knowledge base, not a data source" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # -v after the command works; an unknown option gets the command's own usage; a bad query names its shape
    assert main(["kb", "info", path, "-v", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 33
    with pytest.raises(SystemExit) as e:
        main(["kb", "info", path, "--jsn"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "retrofit kb info" in err and "unrecognized arguments: --jsn" in err
    np.save(tmp_path / "bad.npy", np.zeros((2, 5), dtype=np.float32))
    assert main(["kb", "query", path, "--vectors", str(tmp_path / "bad.npy")]) == 1
    assert "queries must be (B, 8), got shape (2, 5)" in capsys.readouterr().err


def test_kb_cli_verify_reports_damage_and_compact_repairs(tmp_path, capsys):
    path = tmp_path / "kb"
    _kb(path)
    state = json.loads((path / "index.json").read_text())
    f = path / state["file"]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: same size, other content
    f.write_bytes(bytes(raw))
    assert main(["kb", "info", str(path)]) == 1
    err = capsys.readouterr().err
    assert "checksum does not match" in err and f"retrofit kb compact {path}" in err
    f.write_bytes(b"garbage")
    assert main(["kb", "info", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{len(b'garbage')} bytes, index.json says" in err and f"retrofit kb compact {path}" in err
    assert main(["kb", "compact", str(path)]) == 0
    assert main(["kb", "verify", str(path)]) == 0


def test_cli_error_text_is_not_cut():
    """Messages ending in a quote keep it; only a KeyError's quoted repr loses its quotes."""
    from retrofit.commands import _message

    assert _message(ValueError("cannot identify image file 'x.txt'")) == "cannot identify image file 'x.txt'"
    assert _message(KeyError("name")) == "name"
    assert _message(FileNotFoundError("'a' and 'b'")) == "'a' and 'b'"


def test_path_errors_say_what_is_wrong_with_the_path(tmp_path, capsys):
    """`kb copy KB cat.jpg/x` printed "[Errno 20] Not a directory: ..." (and merge / eval "[Errno 17] File exists:
    'cat.jpg'"): the OS's words, not what to do. The same errors, from the real file system, now say it."""
    from retrofit.commands import _message

    _kb(str(tmp_path / "kb"))
    (tmp_path / "cat.jpg").write_bytes(b"")
    assert main(["kb", "copy", str(tmp_path / "kb"), "-o", str(tmp_path / "cat.jpg" / "x")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'cat.jpg'} is a file, not a folder" in err and "[Errno" not in err, err
    with pytest.raises(FileExistsError) as e:
        (tmp_path / "cat.jpg").mkdir()
    assert _message(e.value) == f"cannot create {tmp_path / 'cat.jpg'}: a file of that name already exists; give a " \
                                "new path"
    with pytest.raises(IsADirectoryError) as e:
        open(tmp_path / "kb", "w")
    assert _message(e.value).startswith(f"{tmp_path / 'kb'} is a folder, where a file is needed")
    assert main(["kb", "query", str(tmp_path / "kb"), "--vectors", str(tmp_path)]) == 1
    assert "is a folder; give a .npy, .pt or .json file" in capsys.readouterr().err


def test_options_that_cannot_apply_are_said(tmp_path, capsys, data_dir):
    """--template on webdataset shards was ignored silently (the records got the shards' captions), and so was
    compact --hnsw-storage on a flat index."""
    out = tmp_path / "kb_tpl"
    assert main(["kb", "build", str(data_dir / "cifar10" / "test-000000.tar"), str(out), "--template",
                 "no placeholder"]) == 1
    assert "--template makes the captions of an ImageFolder source" in capsys.readouterr().err
    assert not out.exists()  # refused before any work
    path = str(tmp_path / "kb")
    _kb(path)  # 40 records: a flat (exact) index
    assert main(["kb", "compact", path, "--hnsw-storage", "float32"]) == 0
    assert "--hnsw-storage float32 is kept in the settings but has no effect on this flat" in capsys.readouterr().err


def test_every_command_has_help_with_an_example(capsys):
    """README: every command has --help with an example; -v works after the command too."""
    from retrofit.cli import build_parser

    parser = build_parser()
    sub, kb_sub = parser.get_default("_subparsers")
    commands = [[c] for c in sub.choices if c != "kb"] + [["kb", c] for c in kb_sub.choices]
    assert len(commands) >= 14
    for cmd in commands:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text.lower() and f"retrofit {' '.join(cmd)} " in text, cmd
        assert "-v, --verbose" in text, cmd


def test_a_full_disk_is_one_clear_error(tmp_path, capsys):
    """ENOSPC from a real write (to /dev/full), and the same error wrapped in another (as faiss / LMDB chain them),
    print what to do instead of a traceback; other errors still raise."""
    import errno

    from retrofit.commands import guarded

    def write_to_full_disk(args):
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"x" * 4096)

    def chained(args):
        try:
            write_to_full_disk(args)
        except OSError as e:
            raise RuntimeError("Error in faiss::FileIOWriter: write error") from e

    if not __import__("os").path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    for fn in (write_to_full_disk, chained):
        assert guarded(fn)(None) == 1
        err = capsys.readouterr().err
        assert "the disk refused a write" in err and "run the same command again" in err
    with pytest.raises(OSError) as e:  # a fault of the machine is not the user's to fix: it propagates
        guarded(lambda args: (_ for _ in ()).throw(OSError(errno.EIO, "input/output error")))(None)
    assert e.value.errno == errno.EIO
    # a path that cannot be written (a file where a folder is needed, no permission) is: one clear line
    assert guarded(lambda args: (_ for _ in ()).throw(OSError(errno.EACCES, "denied", "out/x")))(None) == 1
    assert "denied" in capsys.readouterr().err


def test_a_kb_built_without_a_class_list_can_be_given_one(tmp_path, capsys):
    """A KB built from numbered labels without names could only be rebuilt (hours for a large one) to get a class
    list, which `retrofit train`, `kb merge` with a named KB and the label vote's order check need."""
    from retrofit.errors import KnowledgeBaseError
    from retrofit.kb_merge import merge_kbs

    path = tmp_path / "unnamed"
    kb = KnowledgeBase.create(path, 8, 4, 2)
    g = torch.Generator().manual_seed(0)
    kb.add(torch.randn(30, 8, generator=g), torch.randn(30, 4, generator=g), torch.randn(30, 2, generator=g),
           labels=torch.arange(30) % 3)
    with pytest.raises(ValueError, match="has label 2, but 2 class names name labels 0..1; give at least 3 names"):
        kb.set_class_names(["cat", "dog"])
    for bad, says in ((["cat", "cat", "owl"], r"must be distinct, got \['cat'\]"), ("cat", "non-empty list"),
                      (["cat", "", "owl"], "non-empty strings"), ([], "non-empty list")):
        with pytest.raises(ValueError, match=says):
            kb.set_class_names(bad)
    assert kb.class_names is None
    gen = kb.generation
    kb.close()
    with KnowledgeBase.open(path) as ro, pytest.raises(KnowledgeBaseError, match="read-only"):
        ro.set_class_names(["cat", "dog", "owl"])
    assert main(["kb", "classes", str(path)]) == 0
    assert "keeps no class list" in capsys.readouterr().out
    assert main(["kb", "classes", str(path), "--set", str(tmp_path / "nosuch.json")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["kb", "classes", str(path), "--set", "cat,dog,owl"]) == 0
    assert capsys.readouterr().out.strip() == "3 classes (recorded now): 0=cat, 1=dog, 2=owl"
    with KnowledgeBase.open(path, readonly=False) as kb:
        assert kb.class_names == ["cat", "dog", "owl"] and kb.generation == gen + 1 and len(kb) == 30
        kb.set_class_names(["cat", "dog", "owl"])  # the same list again: nothing to do
        assert kb.generation == gen + 1
        with pytest.raises(ValueError, match="already has a class list"):
            kb.set_class_names(["owl", "dog", "cat"])
        with pytest.raises(ValueError):  # labels are now checked against the list
            kb.add(torch.randn(1, 8), torch.randn(1, 4), torch.randn(1, 2), labels=torch.tensor([3]))
        assert len(kb) == 30 and kb.class_names == ["cat", "dog", "owl"]
    assert main(["kb", "classes", str(path), "--set", "owl,dog,cat"]) == 1
    assert "already has a class list" in capsys.readouterr().err
    assert main(["kb", "classes", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"class_names": ["cat", "dog", "owl"]}
    named = tmp_path / "named"  # now it merges with a KB named the same way
    other = KnowledgeBase.create(named, 8, 4, 2, class_names=["cat", "dog", "owl"])
    other.add(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g),
              labels=torch.tensor([0, 1, 2, 0, 1]))
    other.close()
    merge_kbs([path, named], tmp_path / "both")
    with KnowledgeBase.open(tmp_path / "both") as both:
        assert len(both) == 35 and both.class_names == ["cat", "dog", "owl"]
