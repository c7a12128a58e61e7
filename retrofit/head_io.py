"""Saving and loading a :class:`~retrofit.head.RetrievalHead`: a folder of ``model.safetensors`` (weights, with
their checksum) and ``config.json`` (dims, classes, fingerprints, versions), written so that a kill leaves either
the old save or the new one, and read without unpickling anything."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from retrofit._files import save_tensors
from retrofit._version import __version__
from retrofit.errors import RetrofitError
from retrofit.fingerprint import file_sha256, tensors_sha256
from retrofit.head_config import HeadConfig
from retrofit.store import Store

if TYPE_CHECKING:
    from retrofit.head import RetrievalHead

FORMAT_NAME = "retrofit-head"
FORMAT_VERSION = 1  # on-disk format of save(); load() refuses newer ones
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_head(head: RetrievalHead, path: str | os.PathLike) -> Path:
    """:meth:`RetrievalHead.save`: the JSON is written last, atomically; it marks a complete save."""
    path = Path(path)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "retrofit_version": __version__,
            "dtype": str(head.readout.fc.weight.dtype).removeprefix("torch."), "config": head.config.to_dict()}
    text = json.dumps(meta, indent=2)  # before any file is written: a config JSON cannot hold fails here
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    # the tensors' checksum travels inside the weights file (one atomic rename: a kill before the config is
    # written cannot pair new weights with an old checksum); load checks it (a flipped byte loaded silently)
    save_tensors(state, tmp, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                                         "tensors_sha256": tensors_sha256(state)})
    os.replace(tmp, path / WEIGHTS_FILE)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path / CONFIG_FILE)
    return path


def load_head(cls: type[RetrievalHead], path: str | os.PathLike, map_location: str | torch.device | None = None,
              store: Store | None = None, allow_fingerprint_mismatch: bool = False) -> RetrievalHead:
    """:meth:`RetrievalHead.load`: the checks of the format, the version, the config and the weights' checksum."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist: {path} is not a saved RetrievalHead "
                                    f"(expected {CONFIG_FILE} and {WEIGHTS_FILE}, written by head.save)")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RetrofitError(f"{cfg_file} is corrupt (not valid JSON: {e}); re-save the head") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise RetrofitError(f"{cfg_file} is not a {FORMAT_NAME!r} config (format {got!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RetrofitError(f"{path} has head format version {version!r} (written by retrofit "
                            f"{meta.get('retrofit_version')}); this retrofit {__version__} reads versions "
                            f"up to {FORMAT_VERSION}: upgrade retrofit")
    try:
        config = HeadConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise RetrofitError(f"{cfg_file} holds an invalid head config: {e}") from e
    device = "cpu" if map_location is None else str(torch.device(map_location))
    try:
        with safe_open(str(w_file), "pt") as f:
            want = (f.metadata() or {}).get("tensors_sha256")  # (heads saved before checksums have none)
        if want is None and meta.get("weights_sha256") is not None:  # (a short-lived format kept it in the config)
            if file_sha256(w_file) != meta["weights_sha256"]:
                raise ValueError("the file does not match the checksum in config.json")
        state = load_file(str(w_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise RetrofitError(f"{w_file} is corrupt or truncated ({e}); re-save the head") from e
    if want is not None and tensors_sha256(state) != want:
        raise RetrofitError(f"{w_file} does not match its checksum: its tensors were damaged after the head was "
                            "saved; restore the file, or re-save the head")
    state = {n: t.to(device) for n, t in state.items()}
    head = cls(config)
    if config.label_vote and "vote.scale" not in state:  # heads saved before the vote scale existed
        state["vote.scale"] = torch.ones((), device=device)
    try:
        head.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise RetrofitError(f"{w_file} does not match the config in {cfg_file}: {e}") from e
    if store is not None:
        head.attach(store, allow_fingerprint_mismatch=allow_fingerprint_mismatch)
    return head.eval()  # ready to serve (dropout off); retrofit.train switches it to training itself
