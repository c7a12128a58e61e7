"""Packaging, import hygiene and the `retrofit` console script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import retrofit

HEAVY = ["faiss", "lmdb", "triton", "timm", "torchvision", "open_clip", "sentence_transformers", "webdataset"]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_is_light():
    code = "import sys, retrofit; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY + ["torch"],)
    assert _run(code).strip() == ""  # not even torch (~1.3 s): the CLI's --help and `retrofit info` start fast


def test_python_dash_m_retrofit_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "retrofit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and retrofit.__version__ in out.stdout + out.stderr


def test_public_api_resolves_lazily():
    # names whose modules exist must resolve; every name in __all__ must be declared in _LAZY or eager
    code = (
        "import sys, retrofit; retrofit.Neighbors; retrofit.InMemoryStore; "
        "print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    )
    assert _run(code).strip() == ""
    assert set(retrofit.__all__) >= {"RetrievalHead", "KnowledgeBase", "wrap", "Neighbors", "EncoderFingerprint"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        retrofit.nope  # noqa: B018
    # the docs write retrofit.models.darknet_tiny() after a bare `import retrofit`
    assert _run("import sys, retrofit; print('retrofit.models' in sys.modules, "
                "callable(retrofit.models.darknet_tiny))").split() == ["False", "True"]
    # ... and every other submodule they name the same way (retrofit.encoders.host_encoder, retrofit.noise...)
    code = ("import retrofit; print(retrofit.encoders.host_encoder.__name__, "
            "retrofit.noise.symmetric_noise.__name__, retrofit.caption_labels.CaptionLabeller.__name__)")
    assert _run(code).split() == ["host_encoder", "symmetric_noise", "CaptionLabeller"]
    assert getattr(retrofit, "commands.train", None) is None and not hasattr(retrofit, "no_such_module")
    # dir() lists the API, not the helpers __init__ imports for itself (tab completion showed Any, importlib, ...)
    names = set(dir(retrofit))
    assert names >= set(retrofit.__all__) and not names & {"Any", "TYPE_CHECKING", "importlib", "annotations"}


@pytest.mark.parametrize("name", ["adapters", "kernels"])
def test_source_folders_are_not_top_level_packages(name):
    code = (
        "import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
        f"print(importlib.util.find_spec({name!r}) is None, importlib.util.find_spec('retrofit.{name}') is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/").stdout
    assert out.split() == ["True", "True"]


def test_cli_version():
    cmd = [sys.executable, "-m", "retrofit.cli", "--version"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == f"retrofit {retrofit.__version__}"


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_the_cli_keeps_openmp_from_spinning_unless_told_otherwise(given):
    """torch's and faiss's OpenMP runtimes spinning on 2 cores slowed CLI training 10x: the command sets
    OMP_WAIT_POLICY=PASSIVE before it imports torch, and keeps a value the user set."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys, contextlib, io, retrofit.cli as c\nassert 'torch' not in sys.modules\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    rc = c.main(['info', '--json'])\n"
            "print(rc, os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    assert out.split() == ["0", given or "PASSIVE", "True"]


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "retrofit.cli", "info", "--json"], check=True, capture_output=True,
                         text=True).stdout
    info = json.loads(out)
    for key in ("torch", "faiss", "triton", "lmdb", "cuda_available", "faiss_gpus", "fused_kernel", "data_dir"):
        assert key in info
    assert info["faiss"] is not None and info["lmdb"] is not None
    assert isinstance(info["fused_kernel"], bool) and info["fused_kernel_reason"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the forced kernel can run on CUDA")
def test_cli_info_says_what_a_forced_or_bad_retrofit_fused_does():
    """RETROFIT_FUSED=1 on a CPU said 'no' with a reason suggesting RETROFIT_FUSED=1 (every forward then raises);
    an unknown value was a traceback."""
    import os

    def info(value: str) -> dict:
        env = {**os.environ, "RETROFIT_FUSED": value, "TRITON_INTERPRET": "0"}
        p = subprocess.run([sys.executable, "-m", "retrofit.cli", "info", "--json"], capture_output=True, text=True,
                           env=env)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    forced = info("1")
    assert forced["fused_kernel"] is False and "every head forward will raise" in forced["fused_kernel_reason"]
    bad = info("maybe")
    assert bad["fused_kernel"] is False and "'maybe' is not understood" in bad["fused_kernel_reason"]


def test_cli_without_command_shows_help():
    p = subprocess.run([sys.executable, "-m", "retrofit.cli"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage: retrofit" in p.stdout


def test_missing_dependency_message():
    from retrofit._env import require
    from retrofit.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="pip install"):
        require("surely_not_a_module_xyz", "testing")


def test_fused_flag_values(monkeypatch):
    from retrofit._env import fused_flag

    for v, want in (("0", False), ("1", True), ("", None), ("auto", None)):
        monkeypatch.setenv("RETROFIT_FUSED", v)
        assert fused_flag() is want
    monkeypatch.setenv("RETROFIT_FUSED", "maybe")
    with pytest.raises(ValueError, match="RETROFIT_FUSED='maybe'"):
        fused_flag()


def test_type_checkers_see_every_lazy_name_where_it_lives():
    """py.typed: the lazy names resolve through __getattr__ (typed Any); the TYPE_CHECKING imports give type checkers
    the real ones. They must list exactly the lazy names, each from the module that defines it."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(retrofit.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {a.name: imp.module for imp in block.body if isinstance(imp, ast.ImportFrom) for a in imp.names}
    assert seen == retrofit._LAZY
    assert (Path(retrofit.__file__).parent / "py.typed").is_file()
