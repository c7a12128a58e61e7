"""Training the CIFAR-10-LT demo's heads (:mod:`retrofit.demo`) with the library's trainer, and the cache of
trained heads.

A trained head is saved under ``<cache>/heads/<key>``: the key covers the data setting, the KB, every training
setting, the seed, the host-logit shift and a digest of the source of the modules that training runs (this one
included, the demo's post-hoc choices in :mod:`retrofit.demo_heads` not: editing those keeps the cached heads), so
a cached head is the head a retrain gives (CPU training is deterministic).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retrofit.demo_data import DemoData

if TYPE_CHECKING:
    from retrofit.demo import DemoConfig

__all__ = ["head_cache_dir", "head_epochs", "new_head", "one_thread", "shifted", "train_config", "train_head"]

log = logging.getLogger(__name__)


def shifted(fs: Any, shift: torch.Tensor | None) -> Any:
    """``fs`` with host logits ``host - shift`` (the post-hoc logit adjustment of row 2), or ``fs`` itself."""
    from dataclasses import replace

    return fs if shift is None else replace(fs, host_logits=fs.host_logits - shift)


def train_head(cfg: DemoConfig, data: DemoData, kb: str, seed: int, *, modalities: str = "image+text",
                noisy: bool = False, shift: torch.Tensor | None = None,
                vote: bool | None = None, fresh: Collection[str] = ()) -> tuple[Any, dict[str, Any]]:
    """Train a RetrievalHead with the library's trainer on the long-tail features with neighbours from ``kb``
    (``vote``: give it the label vote; None = ``cfg.label_vote``), with one intra-op thread (:func:`one_thread`),
    or load it from the cache (``cfg.reuse_heads``, or its cache directory is in ``fresh``: trained in this run,
    e.g. by :func:`retrofit.demo_pool.train_heads`; reported as not reused)."""
    from retrofit.head import RetrievalHead
    from retrofit.training import train

    store = data.kb(kb)
    fs = shifted(data.train_features(kb, noisy=noisy), shift)
    use_vote = cfg.label_vote if vote is None else vote
    cached = head_cache_dir(cfg, data, kb, seed, modalities, noisy, shift, use_vote)
    if (cfg.reuse_heads or str(cached) in fresh) and (cached / "info.json").is_file():
        head = RetrievalHead.load(cached, store=store)  # attaching rebalances the vote (HeadConfig.vote_balance)
        info = json.loads((cached / "info.json").read_text())
        log.info("head for kb %s (%s, seed %d) loaded from %s (trained in %.1f s)", kb, modalities, seed, cached,
                 info["train_s"])
        return head, {**info, "reused": str(cached) not in fresh}
    head = new_head(cfg, data, kb, seed, modalities, use_vote)
    tc = train_config(cfg, kb, seed)
    t0 = time.perf_counter()
    with one_thread():
        result = train(head, fs, tc, store=store)
    info = {"train_s": time.perf_counter() - t0, "kb": kb, "modalities": modalities, "noisy": noisy,
            "epochs": tc.epochs, "final_loss": result.history[-1]["train_loss"] if result.history else None}
    result.head.save(cached)  # the trained vote (scale 1); the post-hoc scale is chosen per row afterwards
    (cached / "info.json").write_text(json.dumps(info))  # written last: marks a complete entry
    return result.head, {**info, "reused": False}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one intra-op torch thread (the previous count restored after). The demo trains every head
    so: the thread count changes how float sums are split, so a head trained with two threads differs (in the last
    bits, then in a few predictions) from one trained with one or eight. With one thread the training gives the
    same head in a worker process or not (:mod:`retrofit.demo_pool`; its inputs, the neighbours' similarities, still
    follow the thread count the KBs are searched with), and on 2 cores the small head trains about as fast with
    one thread as with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def head_epochs(cfg: DemoConfig, kb: str) -> int:
    """Training epochs of a head trained with neighbours from ``kb``: ``cfg.epochs_ext`` for KB_ext (when set),
    else ``cfg.epochs``."""
    return cfg.epochs_ext if kb == "ext" and cfg.epochs_ext is not None else cfg.epochs


def new_head(cfg: DemoConfig, data: DemoData, kb: str, seed: int, modalities: str = "image+text",
             vote: bool = True) -> Any:
    """An untrained demo head over ``kb`` (parameters drawn with ``seed``): what :func:`train_head` trains."""
    from retrofit.head import HeadConfig, RetrievalHead

    store = data.kb(kb)
    hc = HeadConfig(query_dim=data.tensors["z_lt"].shape[1], image_dim=store.image_dim, text_dim=store.text_dim,
                    num_classes=data.num_classes, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, k=cfg.k,
                    modalities=modalities, label_vote=vote, vote_balance=vote and cfg.balance_vote,
                    vote_form=cfg.vote_form if vote else "log",
                    mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, class_names=data.class_names,
                    query_fingerprint=store.fingerprint.key,
                    image_fingerprint=store.fingerprint.image, text_fingerprint=store.fingerprint.text)
    torch.manual_seed(seed)
    return RetrievalHead(hc, store)  # with vote_balance, attaching divides the vote by the KB's class counts


def train_config(cfg: DemoConfig, kb: str, seed: int, epochs: int | None = None) -> Any:
    """The demo's :class:`retrofit.training.TrainConfig` for a head over ``kb`` (``epochs``: instead of
    :func:`head_epochs`)."""
    from retrofit.training import TrainConfig

    return TrainConfig(epochs=head_epochs(cfg, kb) if epochs is None else epochs, lr=cfg.lr,
                       batch_size=cfg.batch_size, loss="lace", tau_la=cfg.tau_la, class_balance=cfg.class_balance,
                       mixup_alpha=cfg.mixup_alpha, label_smoothing=cfg.label_smoothing, seed=seed, device="cpu",
                       progress=cfg.progress)


# modules whose source keys the cache of trained heads: the head, its training, and this module. The DemoConfig
# fields training reads are in the key themselves (``settings``), so demo.py / demo_heads.py are not.
_TRAINING_CODE = ("head", "head_config", "head_checks", "fusion", "functional", "training", "prediction",
                  "feature_cache", "neighbors", "linear_probe", "demo_train")
# (linear_probe: the cross-fitted host logits heads train against)


def head_cache_dir(cfg: DemoConfig, data: DemoData, kb: str, seed: int, modalities: str, noisy: bool,
                    shift: torch.Tensor | None, vote: bool) -> Path:
    """Where the head trained from exactly these inputs lives: the key covers the data setting, the KB (its name
    and a digest of its labels, so a relabelled KB gets new heads), a digest of the training features it reads
    (neighbours, self-exclusions, host logits: :meth:`DemoData.features_digest`, so that a change to the retrieval
    or the exclusion, code outside the modules below, trains anew), every training setting, the seed, the
    host-logit shift and the source of the modules that training runs."""
    import hashlib
    import importlib

    from retrofit import __version__
    from retrofit.feature_cache import cache_key

    code = hashlib.sha256()
    for name in _TRAINING_CODE:
        code.update(Path(importlib.import_module(f"retrofit.{name}").__file__).read_bytes())
    settings = {n: getattr(cfg, n) for n in ("k", "dim", "depth", "heads", "mlp_ratio", "dropout", "balance_vote",
                                             "epochs", "lr", "batch_size", "tau_la", "class_balance", "mixup_alpha",
                                             "label_smoothing", "host_weight_decay", "vote_form")}
    settings["epochs"] = head_epochs(cfg, kb)  # (the epochs this head trains for)
    whiten = cfg.whiten_ext if kb == "ext" else cfg.whiten_in  # of the KB it trains on
    if whiten:  # (absent at 0: heads cached before the option keep their keys)
        settings["whiten"] = whiten
    key = cache_key({"settings": settings, "kb": kb, "kb_labels": data.kb_digest(kb), "seed": seed,
                     "inputs": data.features_digest(kb, noisy),  # the features and neighbours it trains on
                     "modalities": modalities, "noisy": noisy,
                     "vote": vote, "shift": None if shift is None else [round(float(x), 6) for x in shift],
                     "version": __version__, "code": code.hexdigest()})
    return data.root / "heads" / key
