"""Training the CIFAR-10-LT demo's heads (:mod:`retrofit.demo`) before the rows are evaluated, several at a time.

The demo's head is small (d = 64, k = 16): a training step is many small matrix products, and on this project's
2-core machines a second intra-op thread bought little (8.9 s against 9.1-10.1 s for 2 epochs of the row-4 head,
23 Nov), while two single-threaded trainings side by side took 10.6 s each: two heads in the time of ~1.2. So
every head is trained with one intra-op thread (:func:`retrofit.demo_train.one_thread`), and the heads a run needs
and has not cached are trained by up to ``workers`` processes at once (``DemoConfig.workers``, default one per
usable core, as many as the available memory holds at ~1.5 GB each; ``retrofit demo --workers N``). The parent
retrieves the training neighbours of every head once and hands each worker a copy of its data with them (the
workers neither re-read the cache nor search); the costliest heads start first. Each worker writes its heads to the
cache of trained heads (:func:`retrofit.demo_train.head_cache_dir`), where the rows then load them: the same
heads, bit for bit, as training them one at a time in the parent (tests/test_demo_pool.py). On the full demo
(23 Nov, cold cache, 2 cores, the same hour) the run after the data preparation took 127 s instead of 174 s (five
heads trained one after the other: 137 s), and the table did not move; with the neighbours retrieved once and the
costliest heads first (24 Nov), 112 s (the pool 73 s instead of 90 s), the same table again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from retrofit.demo_data import DemoData

if TYPE_CHECKING:
    from retrofit.demo import DemoConfig

__all__ = ["HEAD_OF_ROW", "FoldJob", "HeadSpec", "available_memory", "default_workers", "host_shifts",
           "train_fold_heads", "train_heads", "usable_cores"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadSpec:
    """The head a trained row uses: trained with neighbours from ``kb`` on the ``modalities``, on the noisy labels
    or not, with the label vote (``vote``; None = ``DemoConfig.label_vote``)."""

    kb: str
    modalities: str = "image+text"
    noisy: bool = False
    vote: bool | None = None


# The label vote reads the neighbours' labels, which is what KB_in's texts say: the image-only ablation goes
# without it, the text-only one keeps it. Row 5 is row 4's head moved to KB_ext (no head of its own).
HEAD_OF_ROW = {
    "4": HeadSpec("in"),
    "5": HeadSpec("in"),
    "6": HeadSpec("ext"),
    "7i": HeadSpec("in", "image", vote=False),
    "7t": HeadSpec("in", "text"),
    "8r": HeadSpec("in_noisy", noisy=True),
}


def host_shifts(cfg: DemoConfig, data: DemoData) -> dict[bool, torch.Tensor | None]:
    """noisy -> what is subtracted from the host logits the heads see: row 2's (8h's) post-hoc adjustment
    ``a * log prior``, ``a`` chosen on validation; None without ``cfg.adjust_host``."""
    from retrofit.demo_rules import choose_adjustment

    shift: dict[bool, torch.Tensor | None] = {False: None, True: None}
    if cfg.adjust_host:
        yv = data.labels("val")
        for noisy in (False, True):
            lp = data.log_prior(noisy=noisy)
            a = choose_adjustment(data.host_logits("val", noisy), yv, lp, tuple(x for x in cfg.posthoc if x >= 0))
            shift[noisy] = a * lp
    return shift


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (not on Linux)
        return max(1, os.cpu_count() or 1)


WORKER_MEMORY = 1.5 * 2**30  # bytes a worker may take: ~0.9-1.2 GB resident measured on the full demo (23 Nov)


def available_memory() -> int | None:
    """Bytes of memory available to new processes now: Linux's MemAvailable (free memory plus the page cache it
    can reclaim), else the free pages; None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def default_workers(jobs: int) -> int:
    """How many heads to train at once by default: one per usable core, no more than ``jobs``, and no more than
    the available memory holds at :data:`WORKER_MEMORY` each (where it can be read; else the cores decide)."""
    n = min(usable_cores(), jobs)
    free = available_memory()
    return max(1, n if free is None else min(n, int(free // WORKER_MEMORY)))


def _jobs(cfg: DemoConfig, seeds: Iterable[int], rows: Iterable[str]) -> list[tuple[int, HeadSpec]]:
    """(seed, spec) of every head the rows need, each once, in the order the rows use them."""
    specs = list(dict.fromkeys(HEAD_OF_ROW[r] for r in HEAD_OF_ROW if r in set(rows)))
    return [(seed, s) for seed in seeds for s in specs]


def train_heads(cfg: DemoConfig, data: DemoData, seeds: Iterable[int], rows: Iterable[str],
                shifts: dict[bool, torch.Tensor | None]) -> dict[str, dict[str, Any]]:
    """Train the heads that ``rows`` need for ``seeds`` and the cache does not hold (all of them with
    ``cfg.reuse_heads=False``), up to ``cfg.workers`` at a time (0: :func:`default_workers`). Returns the cache
    directory -> training info of every head trained here (what the rows then load, as trained in this run)."""
    from retrofit.demo_train import head_cache_dir, train_head

    todo = []
    for seed, spec in _jobs(cfg, seeds, rows):
        path = head_cache_dir(cfg, data, spec.kb, seed, spec.modalities, spec.noisy, shifts[spec.noisy],
                              _vote(cfg, spec))
        if not (cfg.reuse_heads and (path / "info.json").is_file()):
            todo.append((seed, spec, str(path)))
    workers = min(cfg.workers, len(todo)) if cfg.workers else default_workers(len(todo))
    if workers <= 1:  # here, one at a time (each with one intra-op thread: the head a worker would give)
        return {path: train_head(replace(cfg, reuse_heads=False), data, spec.kb, seed, modalities=spec.modalities,
                                 noisy=spec.noisy, shift=shifts[spec.noisy], vote=spec.vote)[1]
                for seed, spec, path in todo}
    n_lt = len(data.split.lt)
    _retrieve_here(data, [spec for _, spec, _ in todo])
    infos = _in_workers(cfg, data, _train_one, [(seed, spec, shifts[spec.noisy]) for seed, spec, _ in todo],
                        [_cost(cfg, spec, n_lt) for _, spec, _ in todo], workers, "training heads", cached=True)
    return {path: info for (_, _, path), info in zip(todo, infos)}


def _retrieve_here(data: DemoData, specs: list[HeadSpec]) -> None:
    """The training features of the heads ``specs`` retrieved in this process, once, before the workers start:
    they get them with the data (and the rows read them here afterwards)."""
    for spec in dict.fromkeys(specs):
        data.train_features(spec.kb, noisy=spec.noisy)


def _cost(cfg: DemoConfig, spec: HeadSpec, samples: int, epochs: int | None = None) -> float:
    """A head's training time, roughly (for the order the workers take the heads in): epochs x samples, a little
    more with both modalities (row-4-like heads took 36 s, the image-only 27 s and the text-only 32 s, 24 Nov)."""
    from retrofit.demo_train import head_epochs

    epochs = head_epochs(cfg, spec.kb) if epochs is None else epochs
    return epochs * samples * (1.0 if spec.modalities == "image+text" else 0.85)


@dataclass(frozen=True)
class FoldJob:
    """A cross-validation head (:mod:`retrofit.demo_cv`): ``spec``'s head for ``seed``, trained for ``epochs`` on
    the long-tail images ``fit`` (indices) with host logits minus ``shift``: the data's cross-fitted ones, or
    ``host`` ((N, C), all the long-tail images: :func:`retrofit.demo_cv.nested_host_logits`' entry for the fold
    held out)."""

    spec: HeadSpec
    seed: int
    epochs: int
    fit: torch.Tensor
    shift: torch.Tensor | None = None
    host: torch.Tensor | None = None


def train_fold_heads(cfg: DemoConfig, data: DemoData, jobs: list[FoldJob]) -> list[Any]:
    """The trained heads of ``jobs``, in order, up to ``cfg.workers`` trained at a time (0: :func:`default_workers`),
    each on one intra-op thread as the demo's heads (the same head in a worker or here); attached to their KB."""
    workers = min(cfg.workers, len(jobs)) if cfg.workers else default_workers(len(jobs))
    if workers <= 1:
        return [_fold_head(cfg, data, job) for job in jobs]
    from retrofit.demo_train import new_head

    _retrieve_here(data, [job.spec for job in jobs])
    states = _in_workers(cfg, data, _train_fold, [(job,) for job in jobs],
                         [_cost(cfg, job.spec, len(job.fit), job.epochs) for job in jobs], workers,
                         "training fold heads")
    heads = []
    for job, state in zip(jobs, states):
        head = new_head(cfg, data, job.spec.kb, job.seed, job.spec.modalities, _vote(cfg, job.spec))
        head.load_state_dict(state)
        heads.append(head.eval())
    return heads


def _vote(cfg: DemoConfig, spec: HeadSpec) -> bool:
    return cfg.label_vote if spec.vote is None else spec.vote


def _fold_head(cfg: DemoConfig, data: DemoData, job: FoldJob) -> Any:
    from retrofit.demo_cv import _features_for
    from retrofit.demo_train import new_head, one_thread, train_config
    from retrofit.training import train

    spec = job.spec
    fs = _features_for(data, spec.kb, spec.noisy, job.host, job.shift).subset(job.fit)
    head = new_head(cfg, data, spec.kb, job.seed, spec.modalities, _vote(cfg, spec))
    with one_thread():
        return train(head, fs, train_config(cfg, spec.kb, job.seed, job.epochs), store=data.kb(spec.kb)).head


def _in_workers(cfg: DemoConfig, data: DemoData, fn: Any, args: list[tuple[Any, ...]], costs: list[float],
                workers: int, what: str, cached: bool = False) -> list[Any]:
    """``[fn(*a) for a in args]``, run by ``workers`` spawned processes that each get a copy of ``data`` (with the
    features retrieved so far). The costliest jobs (``costs``) start first, so that no worker is left alone with a
    long head at the end. ``cached``: ``fn`` writes its heads to the head cache, which the error of a dead worker
    then says."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    log.info("%s: %d, %d at a time (one thread each)", what, len(args), workers)
    done: dict[int, Any] = {}
    # spawn, not fork: the parent has run OpenMP-threaded torch and opened LMDB environments, neither of which
    # survives a fork reliably
    start = (replace(cfg, progress=False, reuse_heads=False), torch.get_num_threads(), data.portable())
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker, initargs=start)
    try:  # (submitted costliest first: the pool starts them in that order)
        order = sorted(range(len(args)), key=lambda i: -costs[i])
        futures = {pool.submit(fn, *args[i]): i for i in order}
        with tqdm(total=len(futures), desc=what, unit="head", disable=not cfg.progress) as bar:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    done[futures[f]] = f.result()  # a worker's error is raised here
                    bar.update()
    except BrokenProcessPool as e:
        raise RuntimeError(
            "a head-training worker process died before it finished (killed, out of memory, or it could not start: "
            "a script that calls run_demo must do so under `if __name__ == \"__main__\":`, since the workers are "
            "spawned and import it)." + (" The heads trained so far are cached;" if cached else "")
            + " run again, or with workers=1 (`retrofit demo --workers 1`) to train in this process") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # (on an error or Ctrl-C: the queued heads are not started)
    return [done[i] for i in range(len(args))]


_WORKER: dict[str, Any] = {}  # in a worker process: its config and prepared data


def _start_worker(cfg: DemoConfig, threads: int, data: DemoData) -> None:
    """A worker's start: the parent's data, with the training features the parent retrieved. Should the worker
    search a KB itself, it does so with the parent's thread count (``threads``), as the parent would: the
    similarities faiss returns move in the last bits with it (up to 7e-7 on KB_in), and the heads with them;
    :func:`retrofit.demo_train.train_head` then trains with one thread."""
    torch.set_num_threads(threads)
    _WORKER.update(cfg=cfg, data=data)


def _train_one(seed: int, spec: HeadSpec, shift: torch.Tensor | None) -> dict[str, Any]:
    from retrofit.demo_train import train_head

    _, info = train_head(_WORKER["cfg"], _WORKER["data"], spec.kb, seed, modalities=spec.modalities,
                         noisy=spec.noisy, shift=shift, vote=spec.vote)
    return info


def _train_fold(job: FoldJob) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _fold_head(_WORKER["cfg"], _WORKER["data"], job).state_dict().items()}
