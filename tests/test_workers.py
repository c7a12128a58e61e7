"""Decoding workers (:mod:`retrofit.workers`) on real CIFAR-10 images: they ignore Ctrl-C (the parent shuts them
down) and die with a parent killed by SIGKILL, instead of running on."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from retrofit.sources import webdataset_source
from retrofit.workers import decode_loader

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")


class _Probe:
    """A picklable preprocess reporting, from inside the worker: SIGINT ignored?, parent-death signal, parent pid."""

    def __call__(self, im):
        sig = ctypes.c_int(-1)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        return torch.tensor([float(ignored), float(sig.value), float(os.getppid()), float(im.size[0])])


def _shard(data_dir: Path) -> str:
    return str(data_dir / "cifar10" / "test-000000.tar")


def test_workers_ignore_ctrl_c_and_ask_to_die_with_their_parent(data_dir):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN already when pytest runs in a background job (`make test &`)
    src = webdataset_source(_shard(data_dir))
    rows = torch.cat([b["images"] for b in decode_loader(src.refs[:8], _Probe(), batch_size=4, num_workers=2)])
    assert rows.shape == (8, 4)
    assert rows[:, 0].eq(1).all(), "a worker still takes Ctrl-C itself"
    assert rows[:, 2].eq(os.getpid()).all()
    assert rows[:, 3].eq(32).all()  # real 32 px CIFAR images were decoded
    if sys.platform.startswith("linux"):
        assert rows[:, 1].eq(signal.SIGKILL).all(), "workers do not ask to die with their parent"
    # the main process itself is untouched: no worker_init_fn runs there
    assert signal.getsignal(signal.SIGINT) is before
    rows0 = torch.cat([b["images"] for b in decode_loader(src.refs[:3], _Probe(), batch_size=4, num_workers=0)])
    assert rows0[:, 2].eq(os.getppid()).all()


_CHILD = textwrap.dedent("""
    import os, sys, time
    from retrofit.sources import webdataset_source
    from retrofit.workers import decode_loader

    class Slow:
        def __call__(self, im):
            import torch
            with open(os.path.join(sys.argv[2], str(os.getpid())), "w"):
                pass
            time.sleep(120)  # busy in a sample: torch's own watchdog cannot notice a dead parent meanwhile
            return torch.zeros(1)

    src = webdataset_source(sys.argv[1])
    try:
        for _ in decode_loader(src.refs, Slow(), batch_size=2, num_workers=2):
            pass
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _start_child(tmp_path: Path, data_dir: Path) -> tuple[subprocess.Popen, list[int]]:
    marks = tmp_path / "pids"
    marks.mkdir()
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    child = subprocess.Popen([sys.executable, str(script), _shard(data_dir), str(marks)], start_new_session=True,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(list(marks.iterdir())) < 2:  # both workers are decoding
        assert child.poll() is None, "the child process ended early"
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.1)
    workers = sorted(int(p.name) for p in marks.iterdir())
    assert all(_alive(w) for w in workers)
    return child, workers


def _wait_gone(pids: list[int], seconds: float = 40.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@linux_only
def test_kill_9_of_the_parent_takes_its_workers(tmp_path, data_dir):
    child, workers = _start_child(tmp_path, data_dir)
    try:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert _wait_gone(workers) == [], "workers outlived their killed parent"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


@linux_only
def test_ctrl_c_to_the_process_group_ends_parent_and_workers(tmp_path, data_dir):
    """Both workers are in the middle of a 120 s sample: the parent terminates them instead of joining each for
    torch's 5 s timeout (10 s here) or letting them take the KeyboardInterrupt themselves."""
    child, workers = _start_child(tmp_path, data_dir)
    try:
        t = time.monotonic()
        os.killpg(child.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, _ = child.communicate(timeout=60)
        took = time.monotonic() - t
        assert child.returncode == 130 and "interrupted" in out
        assert _wait_gone(workers) == []
        # a liveness bound, not a speed target: torch's own shutdown joins each busy worker for 5 s (>= 10 s here)
        assert took < 8.0, f"the parent took {took:.1f} s to stop its busy workers (torch's join: 5 s each)"
    finally:
        if child.poll() is None:
            child.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


_MODES = textwrap.dedent("""
    import multiprocessing, sys, threading
    from retrofit.sources import webdataset_source
    from retrofit.workers import decode_loader

    class Size:
        def __call__(self, im):
            import torch
            return torch.tensor([float(im.size[0])])

    def start(out):
        loader = decode_loader(webdataset_source(sys.argv[1]).refs[:64], Size(), batch_size=4, num_workers=2)
        it = iter(loader)  # the workers start here
        out.append((it, len(next(it)["index"])))  # and have run their init before this thread ends

    if __name__ == "__main__":
        its = []
        t = threading.Thread(target=start, args=(its,))  # workers started by a thread that then ends
        t.start(); t.join()
        got = [its[0][1] + sum(len(b["index"]) for b in its[0][0])]
        multiprocessing.set_start_method(sys.argv[2], force=True)
        start(its)
        got.append(its[1][1] + sum(len(b["index"]) for b in its[1][0]))
        print(got, flush=True)
""")


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_survive_other_start_methods_and_threads(tmp_path, data_dir, method):
    """A worker's OS parent is the forkserver under that start method (the default from Python 3.14), and
    PR_SET_PDEATHSIG follows the creating thread: neither may kill a healthy worker."""
    script = tmp_path / "modes.py"
    script.write_text(_MODES)
    run = subprocess.run([sys.executable, str(script), _shard(data_dir), method], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[64, 64]"
