"""Training checkpoints as safetensors + JSON (no pickle), written atomically.

A checkpoint directory holds ``weights.safetensors`` (``head.*`` and ``host.*`` parameters),
``optimizer.safetensors`` (AdamW moments, flattened), ``rng.safetensors`` (CPU / CUDA generator states)
and ``state.json`` (epoch, step, history, config, optimizer hyper-parameters). It is written to a
temporary directory and renamed into place, so an interrupted write never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrofit.errors import RetrofitError

__all__ = ["rng_snapshot", "save_training_state", "load_training_state", "save_linear", "load_linear"]

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
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_weights(head, host), str(tmp / "weights.safetensors"))
    opt_t, opt_meta = _flatten_optimizer(opt)
    save_file(opt_t, str(tmp / "optimizer.safetensors"))
    save_file(rng if rng is not None else rng_snapshot(), str(tmp / "rng.safetensors"))
    doc = {"format": _FORMAT, **state, "optimizer": opt_meta, "has_host": host is not None,
           "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    with open(tmp / "state.json", "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# TrainConfig fields a resumed run may change: reporting, the device, and more epochs (a fine continuation)
RESUME_FREE = frozenset({"progress", "log_every", "eval_batch_size", "device", "epochs"})


def check_resume_config(path: str | Path, config: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Refuse to resume the checkpoint at ``path`` (if any) with training settings other than its own (except
    :data:`RESUME_FREE`): another batch size, schedule or loss would silently continue a different run (a larger
    batch size skipped the rest of the epoch). ``config``: ``TrainConfig.to_dict()``; ``defaults``: the
    ``TrainConfig()`` defaults, standing in for fields a checkpoint from an older version did not record."""
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")
    try:
        saved = json.loads((path / "state.json").read_text()).get("config")
    except (OSError, ValueError):  # no checkpoint, or a damaged one: load_training_state says which
        return
    if not isinstance(saved, dict):
        return
    now = json.loads(json.dumps(config))  # tuples as lists, as in the file
    saved = {**json.loads(json.dumps(defaults or {})), **saved}
    diff = sorted(k for k in now if k in saved and k not in RESUME_FREE and saved[k] != now[k])
    if diff:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in diff)
        new = ", ".join(f"{k}={now.get(k)!r}" for k in diff)
        raise RetrofitError(f"cannot resume the checkpoint {path}: it was trained with {was}, this run asks for "
                            f"{new}; resume with the checkpoint's TrainConfig (only {sorted(RESUME_FREE)} may "
                            "change), or train into another output directory")


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
    except (RuntimeError, ValueError, KeyError) as e:
        raise RetrofitError(f"checkpoint {path} does not fit this head (a different head configuration?): "
                            f"{str(e).splitlines()[0]}; {fix}") from e
    if scaler is not None and doc.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(doc["scaler"])
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return {n: doc[n] for n in ("epoch", "step", "global_step", "history")}


def save_linear(path: str | Path, layer: nn.Module) -> None:
    """A linear classifier's ``weight`` (C, D) and ``bias`` (C,) as safetensors."""
    from safetensors.torch import save_file

    save_file({n: t.detach().cpu().contiguous() for n, t in layer.state_dict().items()}, str(path))


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
