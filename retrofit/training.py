"""Head-only training from frozen-backbone features: ``TrainConfig`` and ``train``.

``train(head, features, config, store=...)`` runs the RetFormer recipe (AdamW, 1 warm-up epoch then cosine,
label smoothing, mixup on the head's inputs, CE or logit-adjusted CE) over a :class:`FeatureSet`: in-memory
tensors in, a trained head out. Neighbour ids come from the feature cache (vectors gathered from the KB by
id) or, when the feature set has none, are retrieved live each step. With ``out_dir`` it writes JSON-lines
logs and a checkpoint every epoch (safetensors + JSON, no pickle); ``resume=True`` continues from it; a
KeyboardInterrupt writes a last checkpoint first. Bit-for-bit deterministic for a given seed on the CPU (two runs,
and an interrupted run resumed, give the same head); on CUDA the fused kernel's autotuned tile sizes and atomic
adds (the label vote's scatter_add) can change the last bits from one process to the next.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.feature_cache import FeatureSet
from retrofit.objectives import class_balance_weights, log_prior, lr_at, soft_cross_entropy
from retrofit.prediction import _Batcher, _device, _head_dims, _resolve_store, _vector_table, predict_logits
from retrofit.train_checks import _num_classes, check_features, check_finite_features, check_train_inputs  # noqa: F401
from retrofit.train_config import _U64, TrainConfig, TrainResult
from retrofit.train_log import TrainLog, interrupt_after

__all__ = ["TrainConfig", "TrainResult", "train", "predict_logits", "lr_at", "soft_cross_entropy", "log_prior",
           "class_balance_weights"]

log = logging.getLogger(__name__)


def train(
    head: nn.Module,
    features: FeatureSet,
    config: TrainConfig | None = None,
    *,
    store: Any = None,
    val_features: FeatureSet | None = None,
    host_classifier: nn.Module | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``head`` (and, with ``config.train_host``, ``host_classifier``) on frozen-backbone ``features``.

    ``host_classifier`` (a linear layer on ``z``) supplies the host logits: trained jointly with
    ``config.train_host``, applied frozen when ``features`` carry no host logits, unused otherwise.
    ``store`` is the knowledge base (default: the head's attached one) — used to read the vectors of cached
    neighbour ids, or searched live when ``features`` has no neighbour ids; a :class:`RetrievalHead` not attached
    to it is attached first (``head.attach(store)``: encoders checked, a balanced vote takes its class prior).
    ``val_features`` are evaluated after every epoch (top-1, NLL). With ``out_dir``: ``train_log.jsonl``,
    ``checkpoints/last/`` each epoch and ``head/`` (``RetrievalHead.save``) after every epoch and on interrupt;
    ``resume=True`` continues from ``checkpoints/last`` (bit-for-bit the same weights as an uninterrupted run on the
    same device).
    """
    from tqdm.auto import tqdm

    from retrofit import train_checkpoint as ckpt

    cfg = config or TrainConfig()
    cfg.validate()
    dev = _device(cfg.device)
    C = _num_classes(head)
    k = cfg.k if cfg.k is not None else getattr(getattr(head, "config", None), "k", 32)  # (any nn.Module head: 32)
    if cfg.k is not None and cfg.k != getattr(getattr(head, "config", None), "k", cfg.k):
        log.warning("TrainConfig.k=%d differs from the head's k=%d: the head trains with %d neighbours but retrieves "
                    "%d after training (head(z), predict_logits, the saved config); build the head with "
                    "HeadConfig(k=%d) to train and predict alike", cfg.k, head.config.k, cfg.k, head.config.k, cfg.k)
    check_train_inputs(head, features, val_features, host_classifier, cfg, C)
    store = _resolve_store(head, store)
    if not features.has_neighbors and store is None and k:
        raise RetrofitError("features have no cached neighbours and no knowledge base was given: pass store=...")
    if store is not None and hasattr(head, "attach") and head.store is not store:
        # the head trains with this KB, so it is attached to it: the encoders are checked and a balanced vote
        # trains with this KB's class prior (it trained with none, then was served with the KB's prior on load)
        head.attach(store, allow_fingerprint_mismatch=head.__dict__.get("_allow_mismatch", False))
    torch.manual_seed(cfg.seed)
    head.to(dev)
    host = host_classifier.to(dev) if host_classifier is not None else None
    table = _vector_table(store, [features, val_features], k, dev) if k else None
    batcher = _Batcher(features, k, dev, store, table, _head_dims(head), trim=True)
    prior = log_prior(features.labels, C).to(dev)  # (C,)
    cw = class_balance_weights(features.labels, C, cfg.class_balance).to(dev) if cfg.class_balance else None

    decay, no_decay = [], []
    for p in head.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    host_lr_scale = (cfg.host_lr if cfg.host_lr is not None else cfg.lr) / cfg.lr
    thawed: list[torch.nn.Parameter] = []  # host parameters frozen by the caller (retrofit.wrap freezes the host)
    if cfg.train_host:
        thawed = [p for p in host.parameters() if not p.requires_grad]  # unfrozen while the loop runs
        for decays in (True, False):  # as in the head: the weight decays, the bias does not
            ps = [p for p in host.parameters() if (p.dim() >= 2) == decays]
            if ps:
                groups.append({"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0,
                               "lr_scale": host_lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    use_amp = cfg.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    N, B = len(features), cfg.batch_size
    spe = math.ceil(N / B)
    total = cfg.epochs * spe
    warm = int(round(cfg.warmup_epochs * spe))
    out = Path(out_dir) if out_dir is not None else None
    state = {"epoch": 0, "step": 0, "global_step": 0, "history": []}
    if out is not None:
        for path, what in ((out, "out_dir"), (out / "head", "out_dir/head (where the trained head is saved)")):
            if path.exists() and not path.is_dir():  # said before training, not when the first epoch is saved
                raise RetrofitError(f"{what} {path} is a file, not a directory: give another out_dir")
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            ckpt.check_resume_config(out / "checkpoints" / "last", cfg.to_dict(), TrainConfig().to_dict(),
                                     ckpt.run_signature(features, head))
            loaded = ckpt.load_training_state(out / "checkpoints" / "last", head, host if cfg.train_host else None,
                                              opt, scaler)
            if loaded is not None:
                state = loaded
                log.info("resuming from epoch %d step %d", state["epoch"], state["step"])
                _check_resumed_epochs(state, cfg, spe, warm)
    elif resume:
        raise ValueError("resume=True needs out_dir (where the checkpoint is)")
    resumed = state["epoch"] or state["step"] or state["history"]  # (a checkpoint at its very start: from scratch)
    last = out / "checkpoints" / "last" if out is not None else None
    tlog = TrainLog(out, state if resumed else None, ckpt.saved_run_id(last) if last is not None else None,
                    has_checkpoint=last is not None and (last / "state.json").is_file())
    state["run_id"] = tlog.run_id
    write_log = tlog.write

    def save(epoch: int, step: int, rng: dict[str, torch.Tensor] | None = None) -> None:
        if out is not None:
            # the head (and host layer) first, the checkpoint last: a kill between them leaves the checkpoint one
            # epoch behind, which the resume redoes and saves again (the other order left a finished run's head/
            # one epoch stale for good: a resume with nothing left to train never wrote it)
            save_weights()  # the latest weights, loadable by RetrievalHead.load / `retrofit predict`
            ckpt.save_training_state(out / "checkpoints" / "last", head, host if cfg.train_host else None, opt,
                                     scaler, {**state, "epoch": epoch, "step": step, "config": cfg.to_dict(),
                                              "run": ckpt.run_signature(features, head)}, rng)
            tlog.checkpointed()

    def save_weights() -> None:  # the head (and host layer) files only
        if hasattr(head, "save"):
            head.save(out / "head")
        if cfg.train_host:
            ckpt.save_linear(out / "host_classifier.safetensors", host)

    result = TrainResult(head=head, host_classifier=host, history=state["history"], out_dir=out)
    if not resumed:
        write_log({"event": "start", "run_id": tlog.run_id, "n": N, "steps_per_epoch": spe, "k": k,
                   "device": str(dev), "cached_neighbors": features.has_neighbors, "config": cfg.to_dict()})
    epoch, step = state["epoch"], state["step"]
    step_rng = None
    unlogged = None  # (loss, epoch, step, lr) of a counted step whose records are not written yet

    def record_step(loss_t: torch.Tensor, ep: int, st: int, lr_: float, rate: float | None) -> float:
        nonlocal unlogged
        lv_ = float(loss_t)  # (waits for the GPU: where a Ctrl-C lands)
        line = None
        if state["global_step"] % cfg.log_every == 0:
            line = json.dumps({"event": "step", "epoch": ep + 1, "step": st, "global_step": state["global_step"],
                               "loss": lv_, "lr": lr_, "samples_per_s": rate})
        with interrupt_after():  # written once: a Ctrl-C here waits (between the two lines it lost the record)
            unlogged = None  # from here the handler does not redo the records
            result.step_losses.append(lv_)
            if line is not None:
                write_log(line)
        return lv_

    ep_sum, ep_n = (state.get("partial") or (0.0, 0)) if step > 0 else (0.0, 0)  # (an interrupt before the loop
    # reloads them keeps them: a second Ctrl-C right after a resume saved an empty partial loss)
    head.train()
    host_was_training = host is not None and host.training
    if host is not None:
        host.train(cfg.train_host)
    for p in thawed:  # train_host asks to train them: unfrozen for this run, frozen again at its end (finally)
        p.requires_grad_(True)
    try:
        if out is not None and epoch >= cfg.epochs:  # resumed with nothing left to train: the checkpoint's weights
            save_weights()  # are the run's; a kill before a checkpoint (a run started over it) left other ones
        while epoch < cfg.epochs:
            gen = torch.Generator().manual_seed((cfg.seed * 100_003 + epoch) % _U64)
            perm = torch.randperm(N, generator=gen)
            bar = tqdm(total=spe, initial=step, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                       leave=False)
            t0, seen = time.perf_counter(), 0
            # this epoch's summed loss (a tensor: adding to it never waits for the GPU) and sample count; resumed
            # mid-epoch (or during its validation): those of the steps run before the interrupt
            ep_sum, ep_n = (state.get("partial") or (0.0, 0)) if step > 0 else (0.0, 0)
            ep_sum = torch.tensor(float(ep_sum), dtype=torch.float64, device=dev)
            while step < spe:
                step_rng = ckpt.rng_snapshot()  # an interrupted step is redone from this state on resume
                g = state["global_step"]
                lr = lr_at(g, total, warm, cfg.lr, cfg.min_lr_ratio)
                for grp in opt.param_groups:
                    grp["lr"] = lr * grp.get("lr_scale", 1.0)
                idx = perm[step * B:(step + 1) * B]
                z, host_in, nb = batcher(idx)  # (b, Dq), (b, C) | None, Neighbors
                y = features.labels[idx].to(dev)  # (b,)
                tgt = torch.full((len(idx), C), cfg.label_smoothing / C, device=dev)  # (b, C)
                tgt.scatter_add_(1, y[:, None], torch.full_like(tgt[:, :1], 1.0 - cfg.label_smoothing))
                if cfg.mixup_alpha > 0 and len(idx) > 1:
                    lam = float(np.random.default_rng((cfg.seed, g)).beta(cfg.mixup_alpha, cfg.mixup_alpha))
                    gen = torch.Generator().manual_seed((cfg.seed * 7_919 + g) % _U64)
                    j = torch.randperm(len(idx), generator=gen)
                    ex = features.exclude[idx].to(dev) if features.exclude is not None else None
                    z, host_in, nb, tgt = _mix(lam, j.to(dev), z, host_in, nb, tgt, ex)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                    if cfg.train_host:
                        host_in = host(z)
                    elif host is not None and host_in is None:  # a frozen host layer on features without logits
                        with torch.no_grad():
                            host_in = host(z)
                    o = head(z, host_logits=host_in, neighbors=nb)
                logits = o.logits.float()  # (b, C)
                if cfg.loss == "lace":
                    logits = logits + cfg.tau_la * prior
                loss = soft_cross_entropy(logits, tgt, cw)
                if not torch.isfinite(loss):
                    raise RetrofitError(f"training loss became {loss.item()} at epoch {epoch + 1} step {step}; "
                                        "lower the learning rate (--lr)"
                                        + (" or disable AMP (--no-amp)" if use_amp else ""))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_([p for gr in opt.param_groups for p in gr["params"]],
                                                   cfg.grad_clip)
                with interrupt_after():  # a Ctrl-C waits for the step to be applied AND counted: on CPU AdamW
                    # updates the parameters one by one, and one landing midway was saved as "before the step",
                    # which the resume then applied a second time
                    scaler.step(opt)
                    # counted before anything that can wait (float(loss) waits for the GPU, where a Ctrl-C lands)
                    step += 1
                    state["global_step"] = g + 1
                    step_rng = None
                    ep_sum, ep_n = ep_sum + loss.detach().double() * len(idx), ep_n + len(idx)
                    unlogged = (loss.detach(), epoch, step, lr)  # the step's records, written even if interrupted
                    scaler.update()
                seen += len(idx)
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                lv = record_step(*unlogged, rate)
                bar.set_postfix(loss=f"{lv:.4f}", sps=f"{rate:.0f}")
                bar.update(1)
            bar.close()
            rec = {"event": "epoch", "epoch": epoch + 1, "train_loss": float(ep_sum) / max(ep_n, 1),
                   "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9), "lr": lr_at(
                       state["global_step"] - 1, total, warm, cfg.lr, cfg.min_lr_ratio)}
            if val_features is not None:
                rec.update(_validate(head, val_features, store, host, k, cfg, table))
                head.train()
            log.info("epoch %d: %s", epoch + 1, {k_: round(v, 4) for k_, v in rec.items() if isinstance(v, float)})
            with interrupt_after():  # the epoch's record and the move to the next epoch go together (an interrupt
                # between them saved the record with the epoch still to finish: the resume recorded it twice)
                state["history"].append(rec)
                write_log(rec)
                epoch, step = epoch + 1, 0
                state["partial"] = None
            save(epoch, 0)
    except KeyboardInterrupt:
        with interrupt_after():  # a second Ctrl-C waits for the last checkpoint (it stopped the save before)
            if unlogged is not None:  # a step applied and counted, interrupted before its records were written
                record_step(*unlogged, None)
            state["partial"] = [float(ep_sum), ep_n] if step > 0 else None  # this epoch's loss so far, for resume
            log.warning("interrupted at epoch %d step %d; saving the last checkpoint (continue with resume=True, "
                        "`retrofit train ... --resume`)", epoch + 1, step)
            save(epoch, step, step_rng)
            write_log({"event": "interrupted", "epoch": epoch + 1, "step": step})
        raise
    finally:
        tlog.close()
        for p in thawed:
            p.requires_grad_(False)
        head.eval()  # trained or interrupted: the head comes back ready to serve
        if host is not None:
            host.train(host_was_training)  # the caller's host layer: in the mode it came in
    return result


def _mix(lam: float, j: torch.Tensor, z, host, nb, tgt, exclude: torch.Tensor | None = None):
    """Mixup of the head's inputs: z, host logits, neighbour vectors (slot-wise) and targets. ``exclude`` (b, m):
    each sample's own KB ids. A mixed sample is part sample i, part partner j: a neighbour of either that is the
    other's own entry is left out (it would show the mix an entry of its own, which the exclusion prevents)."""
    from retrofit.neighbors import Neighbors

    keep_i = keep_j = None  # (b, k): own / partner slots that may enter the mix
    if exclude is not None and exclude.numel():
        keep_i = ~(nb.ids[:, :, None] == exclude[j][:, None, :]).any(-1) | (nb.ids < 0)
        keep_j = ~(nb.ids[j][:, :, None] == exclude[:, None, :]).any(-1) | (nb.ids[j] < 0)

    def m(t: torch.Tensor, slots: bool = False) -> torch.Tensor:
        ti, tj = t, t[j]
        if slots and keep_i is not None:
            ti, tj = ti * keep_i[..., None], tj * keep_j[..., None]
        return lam * ti + (1.0 - lam) * tj

    mask_i = nb.mask if keep_i is None else nb.mask & keep_i
    mask_j = nb.mask[j] if keep_j is None else nb.mask[j] & keep_j
    mask = mask_i | mask_j
    lead = slice(None) if lam >= 0.5 else j  # ids / labels follow the dominant sample (the label vote reads them)
    labels = nb.labels[lead].masked_fill(~mask, -1)
    if keep_i is not None:  # never the label of an excluded entry
        labels = labels.masked_fill(~(keep_i if lam >= 0.5 else keep_j), -1)
    nb = Neighbors(ids=nb.ids[lead], scores=torch.maximum(nb.scores, nb.scores[j]), mask=mask,
                   image=m(nb.image, True), text=m(nb.text, True), labels=labels)
    return m(z), (m(host) if host is not None else None), nb, m(tgt)


def _check_resumed_epochs(state: dict[str, Any], cfg: TrainConfig, spe: int, warm: int) -> None:
    """A resume may ask for more epochs (the cosine schedule is stretched: said, with the lr jump), never for fewer
    than the checkpoint has run (it returned the checkpoint's head as the result of a shorter run, silently)."""
    done, step, was = state["epoch"], state["step"], state.pop("epochs", None)
    if cfg.epochs < done or (cfg.epochs == done and step > 0):
        raise RetrofitError(f"cannot resume with epochs={cfg.epochs}: the checkpoint has run {done} epoch(s)"
                            + (f" and {step} step(s) of the next" if step else "") + "; resume with epochs >= "
                            f"{done + (step > 0)}, or train into another output directory")
    if isinstance(was, int) and was != cfg.epochs and state["global_step"] > 0:
        g = state["global_step"]
        old, new = (lr_at(g, e * spe, warm, cfg.lr, cfg.min_lr_ratio) for e in (was, cfg.epochs))
        log.warning("resuming a %d-epoch run as a %d-epoch one: the cosine schedule is stretched, the lr goes from "
                    "%.3g to %.3g at this step (not the run a straight %d-epoch training gives)", was, cfg.epochs, old,
                    new, cfg.epochs)


def _validate(head, fs, store, host, k, cfg, table) -> dict[str, float]:
    use_host = host is not None and (cfg.train_host or fs.host_logits is None)
    pred = predict_logits(head, fs, store, host_classifier=host if use_host else None, k=k,
                          batch_size=cfg.eval_batch_size, device=str(next(head.parameters()).device), table=table)
    logits, y = pred["logits"], fs.labels
    ok = y >= 0
    nll = torch.nn.functional.cross_entropy(logits[ok], y[ok]).item() if ok.any() else float("nan")
    top1 = (logits[ok].argmax(1) == y[ok]).float().mean().item() if ok.any() else float("nan")
    return {"val_top1": top1, "val_nll": nll}
