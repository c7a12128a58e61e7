"""Training checkpoints as safetensors + JSON (no pickle), written atomically.

A checkpoint directory holds ``weights.safetensors`` (``head.*`` and ``host.*`` parameters),
``optimizer.safetensors`` (AdamW moments, flattened), ``rng.safetensors`` (CPU / CUDA generator states)
and ``state.json`` (epoch, step, history, config, optimizer hyper-parameters). It is written to a
temporary directory and renamed into place, so an interrupted write never leaves a half checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.fingerprint import file_sha256

__all__ = ["run_signature", "rng_snapshot", "trim_log", "save_training_state", "load_training_state", "save_linear",
           "load_linear"]

_FORMAT = 1


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _weights(head: nn.Module, host: nn.Module | None) -> dict[str, torch.Tensor]:
    w = {f"head.{n}": t.detach().cpu().clone().contiguous() for n, t in head.state_dict().items()}
    if host is not None:
        w.update({f"host.{n}": t.detach().cpu().clone().contiguous() for n, t in host.state_dict().items()})
    return w


_FILES = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors")




def _check_state(doc: Any, path: Path) -> None:
    """``state.json`` as this module writes it, or ValueError saying what is not (the caller names the file)."""
    if not isinstance(doc, dict):
        raise ValueError(f"state.json holds a {type(doc).__name__}, not an object")
    for n in ("epoch", "step", "global_step"):
        v = doc.get(n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{n} is {v!r}, not a count")
    if not isinstance(doc.get("history"), list):
        raise ValueError("history is missing")
    opt = doc.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) or "scalars" not in opt:
        raise ValueError("the optimizer's settings are missing")
    for f, want in (doc.get("sha256") or {}).items():  # (checkpoints written before checksums have none)
        if f in _FILES and file_sha256(path / f) != want:
            raise ValueError(f"{f} does not match its checksum (damaged on disk)")


def _check_moments(opt: torch.optim.Optimizer) -> None:
    """Every loaded optimizer moment has its parameter's shape (load_state_dict does not check; a wrong one failed
    at the first step, or broadcast)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for name, t in opt.state.get(p, {}).items():
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != p.shape:
                    raise ValueError(f"optimizer moment {name} has shape {tuple(t.shape)} for a parameter of shape "
                                     f"{tuple(p.shape)}")


def rng_snapshot() -> dict[str, torch.Tensor]:
    """The CPU and CUDA generator states, to store with a checkpoint."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save_training_state(path: str | Path, head: nn.Module, host: nn.Module | None, opt: torch.optim.Optimizer,
                        scaler: Any, state: dict[str, Any], rng: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint directory at ``path`` atomically (see the module docstring). ``rng``: generator
    states to restore on resume (default: the current ones)."""
    from retrofit._files import save_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(_weights(head, host), tmp / "weights.safetensors")
    opt_t, opt_meta = _flatten_optimizer(opt)
    save_tensors(opt_t, tmp / "optimizer.safetensors")
    save_tensors(rng if rng is not None else rng_snapshot(), tmp / "rng.safetensors")
    doc = {"format": _FORMAT, **state, "optimizer": opt_meta, "has_host": host is not None,
           "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
           "sha256": {f: file_sha256(tmp / f) for f in _FILES}}  # checked on load: a flipped byte loaded silently
    with open(tmp / "state.json", "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# HeadConfig fields a resumed run must share with its checkpoint (the weights' shapes catch only some of them; tau is
# a buffer the checkpoint would overwrite, leaving a config that says otherwise); fingerprints / class names are not:
# attaching the KB fills them in
_RESUME_HEAD_FIELDS = ("query_dim", "image_dim", "text_dim", "num_classes", "dim", "depth", "heads", "k", "dropout",
                       "modalities", "tau", "learnable_tau", "mlp_ratio", "label_vote", "vote_balance", "vote_form",
                       "key_dim")


def run_signature(features: Any, head: nn.Module) -> dict[str, Any]:
    """What a checkpoint's run depends on besides its TrainConfig: the training data (size, a digest of the
    labels, whether host logits / cached neighbours come with it) and the head's settings."""
    sig: dict[str, Any] = {"n": len(features),
                           "labels_sha1": hashlib.sha1(features.labels.cpu().numpy().tobytes()).hexdigest()[:16],
                           "host_logits": features.host_logits is not None,
                           "cached_neighbors": features.has_neighbors}
    hc = getattr(head, "config", None)
    if hasattr(hc, "to_dict"):
        d = hc.to_dict()
        sig.update({f"head.{f}": d[f] for f in _RESUME_HEAD_FIELDS if f in d})
    return sig


# TrainConfig fields a resumed run may change: reporting, the device, and more epochs (a fine continuation)
RESUME_FREE = frozenset({"progress", "log_every", "eval_batch_size", "device", "epochs"})


def check_resume_config(path: str | Path, config: dict[str, Any], defaults: dict[str, Any] | None = None,
                        run: dict[str, Any] | None = None) -> None:
    """Refuse to resume the checkpoint at ``path`` (if any) with training settings other than its own (except
    :data:`RESUME_FREE`): another batch size, schedule or loss would silently continue a different run (a larger
    batch size skipped the rest of the epoch). ``config``: ``TrainConfig.to_dict()``; ``defaults``: the
    ``TrainConfig()`` defaults, standing in for fields a checkpoint from an older version did not record.
    ``run``: what else the run depends on (the training data's size and labels, the head's settings), compared
    with the checkpoint's when it recorded them: a smaller data set left the saved step past the epoch's end (an
    epoch of no steps, then lr 0)."""
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")
    try:
        doc = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):  # no checkpoint, or a damaged one: load_training_state says which
        return
    if not isinstance(doc, dict):
        return
    if run is not None and isinstance(doc.get("run"), dict):
        saved_run = dict(doc["run"])
        if "head.label_vote" in saved_run:  # recorded before the vote had a form: the log form, the only one then
            saved_run.setdefault("head.vote_form", "log")
        _refuse_changes(path, saved_run, run, frozenset(), "has", "resume with the same training data and head")
    if isinstance(doc.get("config"), dict):
        saved = {**json.loads(json.dumps(defaults or {})), **doc["config"]}
        _refuse_changes(path, saved, config, RESUME_FREE, "asks for",
                        f"resume with the checkpoint's TrainConfig (only {sorted(RESUME_FREE)} may change)")


def _refuse_changes(path: Path, saved: dict[str, Any], now: dict[str, Any], free: frozenset, verb: str,
                    fix: str) -> None:
    """RetrofitError naming every key (not in ``free``) whose value differs between ``saved`` and ``now``."""
    now = json.loads(json.dumps(now))  # tuples as lists, as in the file
    diff = sorted(k for k in now if k in saved and k not in free and saved[k] != now[k])
    if diff:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in diff)
        new = ", ".join(f"{k}={now.get(k)!r}" for k in diff)
        raise RetrofitError(f"cannot resume the checkpoint {path}: it was trained with {was}, this run {verb} {new}; "
                            f"{fix}, or train into another output directory")


def load_training_state(path: str | Path, head: nn.Module, host: nn.Module | None, opt: torch.optim.Optimizer,
                        scaler: Any) -> dict[str, Any] | None:
    """Restore a checkpoint into ``head`` / ``host`` / ``opt`` / ``scaler``; returns its state dict, or None
    when there is no checkpoint at ``path``. Raises ``RetrofitError`` naming the file when it is damaged or
    was made for a different head."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # a crash between the two renames
    if not path.exists():
        return None
    fix = (f"delete {path} to start over, or point the run at another output directory")
    try:
        doc = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "weights.safetensors"))
        opt_t = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
        _check_state(doc, path)
        if not isinstance(rng.get("cpu"), torch.Tensor):
            raise ValueError("rng.safetensors lacks the CPU generator state")
    except Exception as e:
        raise RetrofitError(f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: {e}); {fix}") from e
    if doc.get("format") != _FORMAT:
        raise RetrofitError(f"checkpoint {path} has format {doc.get('format')!r}, expected {_FORMAT}; {fix}")
    if bool(doc.get("has_host")) != (host is not None):
        raise RetrofitError(f"checkpoint {path} was {'' if doc.get('has_host') else 'not '}made with a jointly "
                            f"trained host classifier, but this run {'does' if host is not None else 'does not'} "
                            f"train one; use the same train_host setting, or {fix}")
    try:
        head.load_state_dict({n[5:]: t for n, t in weights.items() if n.startswith("head.")})
        if host is not None:
            host.load_state_dict({n[5:]: t for n, t in weights.items() if n.startswith("host.")})
        opt.load_state_dict(_unflatten_optimizer(opt_t, doc["optimizer"]))
        _check_moments(opt)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RetrofitError(f"checkpoint {path} does not fit this head (a different head configuration?): "
                            f"{str(e).splitlines()[0]}; {fix}") from e
    if scaler is not None and doc.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(doc["scaler"])
    try:
        torch.set_rng_state(rng["cpu"])
    except (RuntimeError, TypeError) as e:
        raise RetrofitError(f"checkpoint {path}: rng.safetensors holds no usable CPU generator state ({e}); "
                            f"{fix}") from e
    if torch.cuda.is_available():
        states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    partial = doc.get("partial")
    ok = isinstance(partial, list) and len(partial) == 2 and all(isinstance(x, (int, float)) for x in partial)
    epochs = (doc.get("config") or {}).get("epochs") if isinstance(doc.get("config"), dict) else None
    run_id = doc.get("run_id") if isinstance(doc.get("run_id"), str) else None  # (none before 23 Nov 2026)
    return {**{n: doc[n] for n in ("epoch", "step", "global_step", "history")}, "partial": partial if ok else None,
            "epochs": epochs, "run_id": run_id}


def saved_run_id(path: str | Path) -> str | None:
    """The ``run_id`` of the checkpoint at ``path`` (None: none, unreadable, or saved before run ids)."""
    try:
        doc = json.loads((Path(path) / "state.json").read_text())
        return doc.get("run_id") if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def trim_log(path: str | Path, epoch: int, global_step: int) -> int:
    """Drop the records of ``train_log.jsonl`` at ``path`` that a resume from a checkpoint at (``epoch`` done,
    ``global_step``) will write again (a kill between an epoch's log record and its checkpoint left duplicates);
    returns how many. The file is replaced atomically; unreadable lines are kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_bytes().splitlines():  # bytes: a damaged line (not UTF-8) is kept as it is
        try:
            rec = json.loads(line)
            ahead = ((rec.get("event") == "epoch" and rec.get("epoch", 0) > epoch)
                     or (rec.get("event") == "step" and rec.get("global_step", 0) > global_step))
        except (ValueError, AttributeError, TypeError):
            ahead = False
        if ahead:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in keep))
        os.replace(tmp, path)
    return dropped


def save_linear(path: str | Path, layer: nn.Module) -> None:
    """A linear classifier's ``weight`` (C, D) and ``bias`` (C,) as safetensors."""
    from retrofit._files import save_tensors

    save_tensors({n: t.detach().cpu().contiguous() for n, t in layer.state_dict().items()}, path)


def load_linear(path: str | Path) -> nn.Linear:
    """The ``nn.Linear`` saved by :func:`save_linear`."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
        w = sd["weight"]
    except Exception as e:
        raise RetrofitError(f"host classifier file {path} is missing or corrupt ({e}); re-run training with "
                            "train_host, or drop the option that reads it") from e
    layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in sd)
    layer.load_state_dict(sd)
    return layer
