"""KnowledgeBase durability with real processes: SIGKILL during ingestion, a reader searching while a writer adds."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from retrofit.errors import CorruptKnowledgeBaseError, KnowledgeBaseError
from retrofit.knowledge_base import KnowledgeBase

DK, DI, DT = 16, 8, 4
BATCH, BATCHES = 64, 40

# Deterministic resumable ingestion: batch b holds records b*BATCH .. with image[:, 0] = id and label = id % 5.
# Progress ("done") is recorded in the same LMDB transaction as the records, so a resumed run never duplicates.
# The writer starts each batch on a "go" line from stdin: the test paces it, so that on a fast machine it cannot
# finish all batches before the test has killed it the planned number of times.
WRITER = textwrap.dedent(f"""
    import sys, torch
    from retrofit.knowledge_base import KnowledgeBase
    path = sys.argv[1]
    try:
        kb = KnowledgeBase.open(path, readonly=False)
    except Exception:
        kb = KnowledgeBase.create(path, {DK}, {DI}, {DT}, flat_threshold=1000, ef_construction=16, hnsw_m=8)
    print("start", kb.user_meta.get("done", 0), flush=True)
    for b in range(kb.user_meta.get("done", 0), {BATCHES}):
        sys.stdin.readline()  # "go" (end of input: run freely)
        ids = torch.arange(b * {BATCH}, (b + 1) * {BATCH})
        g = torch.Generator().manual_seed(b)
        image = torch.zeros({BATCH}, {DI}); image[:, 0] = (ids % 1024).float(); image[:, 1] = (ids // 1024).float()
        kb.add(torch.randn({BATCH}, {DK}, generator=g), image, torch.randn({BATCH}, {DT}, generator=g),
               labels=ids % 5, captions=[f"c{{i}}" for i in ids.tolist()], meta={{"done": b + 1}})
        if b % 3 == 0:
            kb.flush()  # write the index often, so kills also land inside index replacement
        print("did", b + 1, flush=True)
    kb.close()
    print("finished", flush=True)
""")


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _go(p: subprocess.Popen) -> None:
    """Let the writer start its next batch."""
    p.stdin.write("go\n")
    p.stdin.flush()


def _expected_key(b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(b)
    return torch.nn.functional.normalize(torch.randn(BATCH, DK, generator=g), dim=1).half().float()


def _check_committed(path) -> int:
    """Open read-only (the index may be behind: it is caught up in memory), verify every committed record."""
    with KnowledgeBase.open(path) as kb:
        report = kb.verify()
        assert report["ok"], report
        done = kb.user_meta.get("done", 0)
        assert len(kb) == done * BATCH == kb.info()["next_id"]  # nothing half-written is visible
        if done:
            ids = torch.arange(done * BATCH)
            im = kb.vectors(ids, "image")
            assert torch.equal(im[:, 0] + 1024 * im[:, 1], ids.float())
            assert torch.allclose(kb.vectors(ids[-BATCH:], "key"), _expected_key(done - 1), atol=1e-3)
            assert kb.get([done * BATCH - 1])[0]["caption"] == f"c{done * BATCH - 1}"
            nb = kb.search(kb.vectors(ids[:5], "key"), 1)
            assert torch.equal(nb.ids[:, 0], ids[:5])  # every committed record is searchable
        return done


def test_sigkill_during_ingestion_then_resume_without_duplicates(tmp_path):
    path = str(tmp_path / "kb")
    rng = random.Random(7)
    kills, progress = 0, []
    while kills < 5:
        p = _spawn(WRITER, path)
        line = p.stdout.readline()
        assert line.startswith("start"), p.stderr.read()
        if int(line.split()[1]) >= BATCHES:
            p.wait(timeout=60)
            break
        for _ in range(rng.randint(1, 4)):  # kill after a random number of committed batches ...
            _go(p)
            if not p.stdout.readline():
                break
        _go(p)
        time.sleep(rng.uniform(0.0, 0.01))  # ... at a random point of the next add / flush
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        kills += 1
        progress.append(_check_committed(path))
    assert kills >= 5, f"the writer finished before 5 kills (progress {progress}); make the ingestion longer"
    p = _spawn(WRITER, path)  # resume to the end
    out, err = p.communicate(input="go\n" * BATCHES, timeout=300)
    assert p.returncode == 0 and "finished" in out, err
    assert _check_committed(path) == BATCHES
    with KnowledgeBase.open(path) as kb:
        assert len(kb) == BATCHES * BATCH and kb.info()["index"]["pending_in_memory"] == 0
        ids = [r["id"] for r in kb]
        assert ids == list(range(BATCHES * BATCH))  # no duplicates, no gaps
        assert kb.info()["index"]["kind"] == "hnsw"
    assert not list((tmp_path / "kb").glob("*.tmp"))


READER = textwrap.dedent("""
    import sys, time, os, torch
    from retrofit.knowledge_base import KnowledgeBase
    path, stop = sys.argv[1], sys.argv[2]
    kb = KnowledgeBase.open(path)
    print("ready", flush=True)
    it, gens, g = 0, set(), torch.Generator().manual_seed(0)
    while not os.path.exists(stop) or it < 5:
        n = len(kb)
        nb = kb.search(torch.randn(8, 16, generator=g), 10)
        ok = nb.mask
        assert (nb.ids[ok] < n).all() and (nb.ids[ok] >= 0).all(), "id beyond the snapshot"
        assert ok[:, :min(n, 10)].all(), "missing neighbours"
        got = nb.image[..., 0] + 1024 * nb.image[..., 1]
        assert torch.equal(got[ok], nb.ids[ok].float()), "vectors of another record"
        assert torch.equal(nb.labels[ok], nb.ids[ok] % 5), "wrong label"
        assert (nb.scores[:, :-1] >= nb.scores[:, 1:]).all()
        gens.add(kb.generation)
        kb.refresh()
        it += 1
    print("ok", it, len(gens), flush=True)
""")


def test_reader_process_searches_while_writer_adds(tmp_path):
    path = tmp_path / "kb"
    # mmap_bytes=1: the reader maps every index generation it refreshes to (retrofit's mapped HNSW reader)
    kb = KnowledgeBase.create(path, DK, DI, DT, flat_threshold=600, ef_construction=16, hnsw_m=8, mmap_bytes=1)

    def add(b: int) -> None:
        ids = torch.arange(b * BATCH, (b + 1) * BATCH)
        image = torch.zeros(BATCH, DI)
        image[:, 0], image[:, 1] = (ids % 1024).float(), (ids // 1024).float()
        kb.add(torch.randn(BATCH, DK), image, torch.randn(BATCH, DT), labels=ids % 5)

    add(0)
    kb.flush()
    stop = tmp_path / "stop"
    reader = _spawn(READER, str(path), str(stop))
    assert reader.stdout.readline().strip() == "ready", reader.stderr.read()
    for b in range(1, 20):  # crosses flat_threshold: the writer switches to HNSW while the reader reads
        add(b)
        if b % 4 == 0:
            kb.flush()
        time.sleep(0.1)
    kb.close()
    stop.touch()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    _, iters, gens = out.split()
    assert int(iters) >= 5 and int(gens) >= 2, out
    with KnowledgeBase.open(path) as r:
        assert len(r) == 20 * BATCH and r.verify()["ok"] and r.info()["index"]["memory_mapped"]
        assert np.array_equal(r.labels().numpy(), np.arange(20 * BATCH) % 5)


THREADS = textwrap.dedent("""
    import sys, threading, time, torch
    from retrofit.knowledge_base import KnowledgeBase
    path, mode = sys.argv[1], sys.argv[2]
    kb = KnowledgeBase.open(path, readonly=mode == "refresh")
    stop, errors, n = time.time() + 3.0, [], [0, 0]
    def searcher():
        while time.time() < stop:
            try:
                nb = kb.search(torch.randn(8, 16), 5)
                m = nb.mask
                assert torch.equal(nb.image[..., 0][m], (nb.ids[m] % 1024).float()), "vectors of another record"
                n[0] += 1
            except Exception as e:
                errors.append(repr(e))
    def changer():
        b = 1000
        while time.time() < stop:
            if mode == "refresh":
                kb.refresh()
                time.sleep(0.002)  # a server refreshes now and then (back to back, refresh() would starve searches)
            else:
                ids = torch.arange(b, b + 16)
                image = torch.zeros(16, 8); image[:, 0] = (ids % 1024).float()
                kb.add(torch.randn(16, 16), image, torch.randn(16, 4), labels=ids % 5)
                kb.delete([b - 5]); b += 16
            n[1] += 1
    ts = [threading.Thread(target=searcher) for _ in range(3)] + [threading.Thread(target=changer)]
    [t.start() for t in ts]; [t.join() for t in ts]
    kb.close()
    print(n[0], n[1], len(errors), errors[:3])
""")


@pytest.mark.parametrize("mode", ["refresh", "write"])
def test_threads_search_one_handle_while_another_refreshes_or_writes_it(tmp_path, mode):
    """Found by a stress test: refresh() while other threads searched one read-only handle crashed the process
    (SIGSEGV: the snapshot was aborted under their cursors); a writable handle adding in one thread while others
    searched corrupted the heap (faiss add during search). A crash kills the child, not the test run."""
    path = tmp_path / "kb"
    with KnowledgeBase.create(path, 16, 8, 4, flat_threshold=100, ef_construction=16, hnsw_m=8,
                              chunk_records=64) as kb:
        ids = torch.arange(1000)
        image = torch.zeros(1000, 8)
        image[:, 0] = ids.float()
        kb.add(torch.randn(1000, 16), image, torch.randn(1000, 4), labels=ids % 5)
    run = subprocess.run([sys.executable, "-c", THREADS, str(path), mode], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"rc {run.returncode}: {run.stderr[-2000:]}"
    searches, changes, n_errors, _ = run.stdout.split(maxsplit=3)
    assert int(searches) > 10 and int(changes) > 2 and int(n_errors) == 0, run.stdout


def test_handle_used_after_fork_fails_clearly_and_parent_is_unharmed(tmp_path):
    """A handle inherited through fork() refuses to work in the child (LMDB forbids it), and whatever the
    child does with it (use, close, garbage collection) leaves the parent's snapshot and writer lock intact."""
    import multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(64, 8, generator=g)
    with KnowledgeBase.create(tmp_path / "kb", 8, 4, 3) as kb:
        kb.add(keys, torch.randn(64, 4, generator=g), torch.randn(64, 3, generator=g))
    writer = KnowledgeBase.open(tmp_path / "kb", readonly=False)
    reader = KnowledgeBase.open(tmp_path / "kb")
    before = reader.search(keys[:4], 5)

    def child(q: mp.Queue) -> None:
        msgs = []
        for name, call in (("search", lambda: reader.search(keys[:4], 5)), ("refresh", reader.refresh),
                           ("add", lambda: writer.add(keys[:1], torch.zeros(1, 4), torch.zeros(1, 3)))):
            try:
                call()
                msgs.append(f"{name}: no error")
            except Exception as e:
                msgs.append(f"{name}: {type(e).__name__}: {e}")
        reader.close()
        writer.close()
        q.put(msgs)

    import threading

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    held, release = threading.Event(), threading.Event()

    def hold_locks() -> None:  # another parent thread inside a write / refresh at the fork: the child inherits the
        with writer._rw.write(), reader._rw.write():  # locks held, and used to hang on them instead of raising
            held.set()
            release.wait(120)

    holder = threading.Thread(target=hold_locks)
    holder.start()
    held.wait(10)
    p.start()
    try:
        msgs = q.get(timeout=60)
    finally:
        release.set()
        holder.join(10)
    p.join(60)
    assert p.exitcode == 0
    for m in msgs:
        assert "KnowledgeBaseError" in m and "after fork()" in m and "inside each worker" in m, m
    after = reader.search(keys[:4], 5)  # the parent's handles still work
    assert torch.equal(before.ids, after.ids) and torch.equal(before.image, after.image)
    writer.add(keys[:2], torch.zeros(2, 4), torch.zeros(2, 3))  # and the writer still holds its lock
    assert len(writer) == 66
    writer.close()
    reader.close()


def _kb_with_pattern(path, n=40, chunk=16):
    """A float16 KB whose record 21 has a distinctive image vector (0.3 everywhere) to find on disk."""
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
    image = torch.randn(n, 12, generator=g)
    image[21] = 0.3
    with KnowledgeBase.create(path, 8, 12, 4, chunk_records=chunk, index="flat") as kb:
        kb.add(keys, image, torch.randn(n, 4, generator=g), labels=torch.arange(n) % 3)
    return image


def test_verify_sees_bit_rot_inside_a_chunk(tmp_path):
    """One flipped low bit inside a stored vector: still finite, still a plausible value, so only the chunk
    checksum can tell; verify reports the chunk, the rest of the KB stays readable."""
    path = tmp_path / "kb"
    image = _kb_with_pattern(path)
    with KnowledgeBase.open(path) as kb:
        assert kb.verify()["ok"] and kb.verify()["chunks_without_checksum"] == 0
    f = path / "records" / "data.mdb"
    raw = bytearray(f.read_bytes())
    pattern = np.full(12, 0.3, dtype=np.float16).tobytes()
    at = raw.find(pattern)
    assert at >= 0 and raw.find(pattern, at + 1) == -1  # exactly one copy on disk
    raw[at + 6] ^= 0x01  # the lowest mantissa bit of one float16 of record 21
    f.write_bytes(bytes(raw))
    with KnowledgeBase.open(path) as kb:
        got = kb.vectors(torch.tensor([21]), "image")[0]
        assert torch.isfinite(got).all() and 0 < (got - image[21]).abs().max() < 1e-3  # the damage is subtle
        report = kb.verify()
        assert not report["ok"]
        (problem,) = report["problems"]
        assert problem.startswith("chunk 1 (records 16..31): its bytes do not match their checksum")
        assert kb.vectors(torch.tensor([0]), "image")[0].tolist() == image[0].half().float().tolist()  # chunk 0 fine


def test_verify_checks_the_records_when_the_index_is_damaged_too(tmp_path, capsys):
    """A damaged index makes open() refuse the KB; `kb verify` (KnowledgeBase.verify_path) still checks every
    record chunk and reports both problems (it used to stop at the open with the index error alone)."""
    import json

    from retrofit.cli import main

    path = tmp_path / "kb"
    _kb_with_pattern(path)
    f = path / "records" / "data.mdb"
    raw = bytearray(f.read_bytes())
    at = raw.find(np.full(12, 0.3, dtype=np.float16).tobytes())
    raw[at + 6] ^= 0x01  # record 21, chunk 1
    f.write_bytes(bytes(raw))
    index = path / json.loads((path / "index.json").read_text())["file"]
    index.write_bytes(index.read_bytes()[:-100])  # truncated
    with pytest.raises(CorruptKnowledgeBaseError, match="retrofit kb compact"):
        KnowledgeBase.open(path)
    report = KnowledgeBase.verify_path(path)
    assert not report["ok"] and report["records_checked"] == 40 - 16  # every live record but chunk 1's
    chunk, idx = report["problems"]
    assert chunk.startswith("chunk 1 (records 16..31): its bytes do not match their checksum")
    assert f"{index.name} is missing or its checksum does not match" in idx
    assert main(["kb", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DAMAGED: 24 records checked") and "chunk 1 (records 16..31)" in out and index.name in out
    data = path / "records" / "data.mdb"
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) // 2])  # truncated: reading past the end used to kill the process (SIGBUS)
    run = subprocess.run([sys.executable, "-c", "import json, sys; from retrofit.knowledge_base import "
                          "KnowledgeBase; print(json.dumps(KnowledgeBase.verify_path(sys.argv[1])))", str(path)],
                         capture_output=True, text=True, timeout=120)  # a regression must fail, not crash pytest
    assert run.returncode == 0, (run.returncode, run.stderr[-1000:])
    report = json.loads(run.stdout)
    assert not report["ok"] and "truncated" in report["problems"][0]
    data.write_bytes(b"")  # empty: a reader used to re-initialise the file and then say "not a knowledge base"
    report = KnowledgeBase.verify_path(path)
    assert not report["ok"] and "0 bytes" in report["problems"][0] and data.stat().st_size == 0
    data.write_bytes(b"\0" * 4096 * 3)  # the records themselves are gone
    report = KnowledgeBase.verify_path(path)
    assert not report["ok"] and report["records_checked"] == 0
    assert "is not a readable LMDB environment" in report["problems"][0]
    assert main(["kb", "info", str(path)]) == 1
    assert "restore the knowledge base from a copy or rebuild it" in capsys.readouterr().err


def test_index_rebuild_leaves_a_damaged_chunk_out_and_says_how_to_repair(tmp_path, caplog):
    """A writer rebuilding the index (here: the index file is gone) checks every chunk's checksum: the damaged
    chunk's records stay out of the index with a warning naming the ids and the fix; deleting them and compacting
    leaves a KB that verifies clean (it used to index the damaged keys without a word)."""
    import json
    import logging

    path = tmp_path / "kb"
    image = _kb_with_pattern(path)
    with KnowledgeBase.open(path, readonly=False) as kb:
        keys = kb.vectors(torch.arange(40), "key")
        kb.delete([20])  # already deleted: the repair's ranges leave it out (`kb delete` refuses deleted ids)
    f = path / "records" / "data.mdb"
    raw = bytearray(f.read_bytes())
    at = raw.find(np.full(12, 0.3, dtype=np.float16).tobytes())
    raw[at + 6] ^= 0x01  # record 21, chunk 1
    f.write_bytes(bytes(raw))
    (path / json.loads((path / "index.json").read_text())["file"]).unlink()
    with caplog.at_level(logging.WARNING, logger="retrofit"), KnowledgeBase.open(path, readonly=False) as kb:
        assert len(kb) == 39  # the live records are all still there
        found = kb.search(keys, 1).ids[:, 0]
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "record chunk 1 does not match its checksum (damaged on disk): its live records 16-19 21-31" in warning
    assert f"retrofit kb delete {path} 16-19 21-31` and `retrofit kb compact {path}`" in warning
    assert torch.equal(found[:16], torch.arange(16)) and torch.equal(found[32:], torch.arange(32, 40))
    assert not ((found >= 16) & (found < 32)).any()  # no damaged record is ever returned
    from retrofit.cli import main

    assert main(["kb", "delete", str(path), "16-19", "21-31"]) == 0
    caplog.clear()
    assert main(["kb", "compact", str(path)]) == 0
    assert "checksum" not in caplog.text  # the chunk is gone, and it held no live record any more
    with KnowledgeBase.open(path) as kb:
        report = kb.verify()
        assert report["ok"] and report["records_checked"] == 24, report
        assert torch.equal(kb.vectors(torch.tensor([33]), "image")[0], image[33].half().float())


def test_records_left_out_of_the_index_are_reported_everywhere(tmp_path, caplog, capsys):
    """After a compaction left a damaged chunk's records out of the index, `kb compact` exited 0, `kb info` showed
    them as live, and every later search, eval or predict ran without them, silently (a new user's walkthrough)."""
    import json
    import logging

    from retrofit.cli import main

    path = tmp_path / "kb"
    _kb_with_pattern(path)
    with KnowledgeBase.open(path, readonly=False) as kb:
        kb.delete([20, 35])  # one tombstone inside the damaged chunk, one outside: the count stays exact
    f = path / "records" / "data.mdb"
    raw = bytearray(f.read_bytes())
    raw[raw.find(np.full(12, 0.3, dtype=np.float16).tobytes()) + 6] ^= 0x01  # record 21, chunk 1 (ids 16..31)
    f.write_bytes(bytes(raw))
    with KnowledgeBase.open(path) as kb:  # the index predates the damage: every live record is still in it
        assert kb.info()["index"]["unindexed_records"] == 0
    assert main(["kb", "compact", str(path)]) == 1
    assert "error: 15 live records were left out of the index" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrofit"), KnowledgeBase.open(path) as kb:
        assert len(kb) == 38 and kb.info()["index"]["unindexed_records"] == 15
    assert "15 of its 38 live records are not in the index" in caplog.text
    assert main(["kb", "info", str(path)]) == 0
    assert re.search(r"NOT INDEXED +15 live records are in no index", capsys.readouterr().out)
    assert main(["kb", "info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["index"]["unindexed_records"] == 15


def test_records_are_never_appended_to_a_damaged_chunk(tmp_path):
    """Extending the damaged last chunk would checksum its damaged bytes afresh (verify then said OK): refused,
    nothing written."""
    path = tmp_path / "kb"
    _kb_with_pattern(path, n=24)  # chunk 1 (records 16..23) is the partial last chunk, record 21 in it
    f = path / "records" / "data.mdb"
    raw = bytearray(f.read_bytes())
    raw[raw.find(np.full(12, 0.3, dtype=np.float16).tobytes()) + 6] ^= 0x01
    f.write_bytes(bytes(raw))
    g = torch.Generator().manual_seed(1)
    with KnowledgeBase.open(path, readonly=False) as kb:
        with pytest.raises(CorruptKnowledgeBaseError, match=r"chunk 1 \(records 16..23\).*nothing was written"):
            kb.add(torch.randn(2, 8, generator=g), torch.randn(2, 12, generator=g), torch.randn(2, 4, generator=g))
        assert len(kb) == 24
    report = KnowledgeBase.verify_path(path)
    assert not report["ok"] and report["problems"][0].startswith("chunk 1 (records 16..23)")
    from retrofit.cli import main  # the repair the warnings give: delete the chunk's records, compact, add again

    assert main(["kb", "delete", str(path), "16-23"]) == 0 and main(["kb", "compact", str(path)]) == 0
    assert KnowledgeBase.verify_path(path)["ok"]
    with KnowledgeBase.open(path, readonly=False) as kb:
        kb.add(torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=1), torch.randn(2, 12, generator=g),
               torch.randn(2, 4, generator=g))
        assert len(kb) == 16 + 2 and kb.verify()["ok"]


def test_schema_1_kb_is_read_then_upgraded_by_a_writer(tmp_path):
    """A KB written before chunk checksums (schema 1: no ``sum`` database) opens, verifies (its chunks counted as
    unchecked), and a writer's first write upgrades it to schema 2 with checksums for the chunks it writes."""
    import json

    import lmdb

    from retrofit.kb_records import meta_checksum

    path = tmp_path / "kb"
    _kb_with_pattern(path)
    env = lmdb.open(str(path / "records"), max_dbs=8)  # make it what schema 1 wrote
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"sum", txn=txn), delete=True)
        db_meta = env.open_db(b"meta", txn=txn)
        meta = json.loads(bytes(txn.get(b"meta", db=db_meta)))
        meta["schema_version"] = 1
        meta["checksum"] = meta_checksum(meta)
        txn.put(b"meta", json.dumps(meta, sort_keys=True).encode(), db=db_meta)
    env.close()
    before = (path / "records" / "data.mdb").read_bytes()
    with KnowledgeBase.open(path) as kb:  # a reader: reads it, writes nothing
        report = kb.verify()
        assert report["ok"] and report["chunks_without_checksum"] == 3 and report["records_checked"] == 40
        assert kb.info()["schema_version"] == 1
    assert (path / "records" / "data.mdb").read_bytes() == before
    reader = KnowledgeBase.open(path)  # open across the upgrade
    with KnowledgeBase.open(path, readonly=False) as kb:
        kb.add(torch.nn.functional.normalize(torch.randn(10, 8), dim=1), torch.randn(10, 12), torch.randn(10, 4))
    with KnowledgeBase.open(path) as kb:
        report = kb.verify()
        assert kb.info()["schema_version"] == 2
        # chunks 0 and 1 untouched (no checksum), chunk 2 rewritten with its new rows, chunk 3 new
        assert report["ok"] and report["chunks_without_checksum"] == 2 and report["records_checked"] == 50
    reader.refresh()  # the reader opened before the upgrade checks the new checksums too
    report = reader.verify()
    assert report["ok"] and report["chunks_without_checksum"] == 2 and report["records_checked"] == 50
    reader.close()


def test_damage_inside_a_loaded_index_is_never_saved_under_a_new_checksum(tmp_path):
    """Bytes flipped in the middle of an index file (outside the first / last MiB the quick checksum reads): a
    writer used to load it, add, and save it with a fresh sha256, after which `verify` said OK. Now loading it
    into memory checks the whole file: readers refuse it, a writer rebuilds it from the records."""
    path = tmp_path / "kb"
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(40_000, 16, generator=g)
    with KnowledgeBase.create(path, 16, 2, 2, index="flat") as kb:
        kb.add(keys, torch.zeros(40_000, 2), torch.zeros(40_000, 2))
    p = next(path.glob("index-*.faiss"))
    assert p.stat().st_size > 2 << 20
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size // 2)
        f.write(b"\x7f" * 64)
    with pytest.raises(CorruptKnowledgeBaseError, match="sha256 does not match.*retrofit kb compact"):
        KnowledgeBase.open(path)
    with KnowledgeBase.open(path, readonly=False) as w:  # rebuilds from the records, then adds
        w.add(torch.randn(10, 16, generator=g), torch.zeros(10, 2), torch.zeros(10, 2))
    with KnowledgeBase.open(path) as r:
        assert r.verify()["ok"]
        assert torch.equal(r.search(keys[:50], 1).ids[:, 0], torch.arange(50))
        assert (r.search(keys[:50], 1).scores <= 1.001).all()  # unit keys (the damage gave scores of 64)


def test_compact_repairs_a_damaged_index_json(tmp_path):
    path = tmp_path / "kb"
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(300, 16, generator=g)
    with KnowledgeBase.create(path, 16, 2, 2, index="flat") as kb:
        kb.add(keys, torch.zeros(300, 2), torch.zeros(300, 2))
    for junk in ("not json", "{}", "[1, 2]"):
        (path / "index.json").write_text(junk)
        with pytest.raises(CorruptKnowledgeBaseError, match="index.json"):
            KnowledgeBase.open(path)
        with KnowledgeBase.open(path, readonly=False) as w:
            w.compact()
        with KnowledgeBase.open(path) as r:
            assert r.verify()["ok"] and torch.equal(r.search(keys[:5], 1).ids[:, 0], torch.arange(5))
        assert len(list(path.glob("index-*.faiss"))) == 1  # the old file went with the damaged index.json


def test_merge_refuses_an_input_with_a_damaged_chunk(tmp_path):
    """merge_kbs read the damaged records and stored them in the output under fresh, valid checksums."""
    from retrofit.ingest import merge_kbs

    a, b = tmp_path / "a", tmp_path / "b"
    _kb_with_pattern(a)
    with KnowledgeBase.create(b, 8, 12, 4, index="flat") as kb:
        g = torch.Generator().manual_seed(2)
        kb.add(torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1), torch.randn(5, 12, generator=g),
               torch.randn(5, 4, generator=g))
    f = a / "records" / "data.mdb"
    raw = bytearray(f.read_bytes())
    raw[raw.find(np.full(12, 0.3, dtype=np.float16).tobytes()) + 6] ^= 0x01  # record 21, chunk 1
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptKnowledgeBaseError, match=r"record chunks \[1\] are damaged.*live records 16-31"):
        merge_kbs([a, b], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with KnowledgeBase.open(a, readonly=False) as kb:
        kb.delete(list(range(16, 32)))
    with KnowledgeBase.open(a, readonly=False) as kb:
        kb.compact()
    summary = merge_kbs([a, b], tmp_path / "out", progress=False)
    assert summary.written == 24 + 5 and KnowledgeBase.verify_path(tmp_path / "out")["ok"]


@pytest.mark.parametrize("edit", [{"image_dim": 10}, {"dtype": "float32"}, {"chunk_records": 20},
                                  {"key_dim": "8"}, {"next_id": 41}])
def test_metadata_that_does_not_match_the_records_is_refused(tmp_path, edit):
    """Hand-edited metadata with a recomputed checksum: dims / dtype / chunk size that do not describe the stored
    chunks used to crash queries (or make compact build a short index); now refused at open, and reported by
    `kb verify`, with nothing written."""
    import json

    import lmdb

    from retrofit.kb_records import meta_checksum

    path = tmp_path / "kb"
    _kb_with_pattern(path)
    env = lmdb.open(str(path / "records"), max_dbs=8)
    with env.begin(write=True) as txn:
        db_meta = env.open_db(b"meta", txn=txn)
        meta = json.loads(bytes(txn.get(b"meta", db=db_meta)))
        meta.update(edit)
        meta["checksum"] = meta_checksum(meta)
        txn.put(b"meta", json.dumps(meta, sort_keys=True).encode(), db=db_meta)
    env.close()
    before = (path / "records" / "data.mdb").read_bytes()
    for readonly in (True, False):
        with pytest.raises(CorruptKnowledgeBaseError, match="metadata of .* (does not match its records|invalid)"):
            KnowledgeBase.open(path, readonly=readonly)
    report = KnowledgeBase.verify_path(path)
    assert not report["ok"] and "metadata of" in report["problems"][0]
    assert (path / "records" / "data.mdb").read_bytes() == before


def test_rwlock_readers_share_writers_wait_and_nesting_never_deadlocks():
    import threading

    from retrofit._rwlock import RWLock

    lock, order = RWLock(), []
    with lock.read():
        writer = threading.Thread(target=lambda: lock.write().__enter__() or order.append("w"))
        writer.start()
        time.sleep(0.2)
        assert order == []  # the writer waits for the reader
        with lock.read():  # a reader re-entering while a writer waits goes on (else: deadlock)
            order.append("r2")
        with pytest.raises(RuntimeError, match="cannot take its write lock"):
            with lock.write():
                pass
    writer.join(5)
    assert order == ["r2", "w"]  # the writer ran once the reader left
    lock2 = RWLock()
    with lock2.write(), lock2.read(), lock2.write():  # the writer reads and writes again: re-entrant
        order.append("nested")
    with lock2.read():
        assert lock2._readers == 1



def test_rwlock_an_interrupt_as_it_is_taken_leaves_no_hold():
    """A Ctrl-C handled right after the lock was taken: Python handles a pending signal when a Python function
    starts, and the first one after the taking was Condition.__exit__, before the release was armed (a review
    interrupted kb.get at random times: close() then raised 'cannot take its write lock', once it hung). A tracer
    raises KeyboardInterrupt at the first Python call after the lock's state changed; nothing may stay held."""
    import sys

    from retrofit._rwlock import RWLock

    for mode in ("read", "write"):
        lock, hits = RWLock(), []

        def tracer(frame, event, arg, lock=lock, hits=hits):
            if event == "call" and not hits and (lock._readers or lock._writer is not None):
                hits.append(frame.f_code.co_name)
                raise KeyboardInterrupt
            return None

        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                with getattr(lock, mode)():
                    pass
        finally:
            sys.settrace(None)
        assert hits, mode
        assert (lock._readers, lock._writer, lock._depth, getattr(lock._mine, "n", 0)) == (0, None, 0, 0), (mode, hits)
        with lock.write():  # usable: nothing left held
            pass



def test_rwlock_a_ctrl_c_as_a_waiting_writer_wakes_keeps_the_lock_sound():
    """A review: with a plain Lock under the condition, Condition.wait re-took it in Python code, where a second
    Ctrl-C could skip the re-take; the release after then freed a lock not held (RuntimeError, or another thread's
    lock). A tracer raises KeyboardInterrupt at any Python call made while the woken writer re-takes the lock."""
    import sys
    import threading

    from retrofit._rwlock import RWLock

    lock, hits, inside = RWLock(), [], threading.Event()
    release = threading.Event()

    def reader():
        with lock.read():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=reader)
    t.start()
    inside.wait(5)

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name in ("_acquire_restore", "_is_owned") and not hits:
            hits.append(frame.f_code.co_name)
            raise KeyboardInterrupt
        return None

    threading.Timer(0.2, release.set).start()
    sys.settrace(tracer)
    try:
        try:
            with lock.write():
                got = True
        except KeyboardInterrupt:
            got = False
    finally:
        sys.settrace(None)
    t.join(5)
    assert got and not hits  # (the re-take is C code now: nothing there for a signal to interrupt)
    assert (lock._readers, lock._writer, lock._depth, lock._waiting) == (0, None, 0, 0)
    with lock.write():
        pass

FORK_WORKERS = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import DataLoader, Dataset
    from retrofit.knowledge_base import KnowledgeBase
    path = sys.argv[1]
    parent = KnowledgeBase.open(path)  # open while the workers fork, as in training
    class Searches(Dataset):
        kb = None
        def __len__(self):
            return 8
        def __getitem__(self, i):
            if Searches.kb is None:
                Searches.kb = KnowledgeBase.open(path)  # each worker its own handle (what the README advises)
            return Searches.kb.search(torch.randn(1, 16), 3).ids[0]
    for epoch in range(3):
        ids = torch.cat(list(DataLoader(Searches(), batch_size=4, num_workers=2, multiprocessing_context="fork")))
        assert ids.shape == (8, 3) and (ids >= 0).all()
    rows = [r.split() for r in parent._rec.env.readers().splitlines()[1:] if r.strip()]
    print(sum(r[2] != "-" for r in rows))  # reader slots holding a snapshot: the parent's own only
""")


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_dataloader_workers_leave_no_snapshot_behind(tmp_path):
    """Found by a stress test: a forked worker's handle (it reads through the parent's LMDB environment, under the
    parent's pid) was never closed (workers end with os._exit), so each worker left a reader slot holding its
    snapshot: pages pinned for the parent's life, and after ~500 workers MDB_READERS_FULL for every process."""
    path = tmp_path / "kb"
    with KnowledgeBase.create(path, 16, 8, 4) as kb:
        kb.add(torch.randn(50, 16), torch.randn(50, 8), torch.randn(50, 4), labels=torch.arange(50) % 5)
    run = subprocess.run([sys.executable, "-c", FORK_WORKERS, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "1", run.stdout


@pytest.mark.parametrize("read_only", [False, True])
def test_a_full_reader_table_says_why_and_closing_frees_it(tmp_path, read_only):
    """Each forked worker that opens the KB while its parent holds it open leaves an LMDB reader slot listed under
    the parent (py-lmdb reads through the parent's environment there and never frees it). Once the table was full
    (after 4,095 worker lifetimes, a serving soak found), the parent's refresh() and open failed with a raw
    lmdb.ReadersFullError; it is a KnowledgeBaseError naming the cause and the fix, and closing the parent's
    handles frees the slots (a table of 4 here; 32,768 by default)."""
    script = textwrap.dedent(f"""
        import multiprocessing as mp, torch
        import retrofit.kb_env as ke
        ke._MAX_READERS = 4
        from retrofit.errors import KnowledgeBaseError
        from retrofit.knowledge_base import KnowledgeBase
        P = {str(tmp_path / "kb")!r}
        with KnowledgeBase.create(P, 8, 4, 4) as kb:
            kb.add(torch.nn.functional.normalize(torch.randn(20, 8), dim=1), torch.randn(20, 4), torch.randn(20, 4))
        if {read_only!r}:  # a KB on a read-only volume: a read-only environment, whose databases take reader slots
            import os
            real_access = os.access
            os.access = lambda p, m, **kw: False if m == os.W_OK else real_access(p, m, **kw)
        held = KnowledgeBase.open(P)
        def worker():
            with KnowledgeBase.open(P) as kb:
                kb.search(torch.nn.functional.normalize(torch.randn(2, 8), dim=1), 3)
        for _ in range(4):
            p = mp.get_context("fork").Process(target=worker)
            p.start()
            p.join()
        try:
            KnowledgeBase.open(P)
            print("OPENED")
        except KnowledgeBaseError as e:
            print("REFUSED", e)
        held.close()
        with KnowledgeBase.open(P) as kb:
            print("REOPENED", len(kb))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED" in run.stdout and "LMDB's reader table is full (4 slots)" in run.stdout, run.stdout
    assert "close every handle of it here (kb.close(), which frees them)" in run.stdout
    assert "REOPENED 20" in run.stdout, run.stdout


def _clustered(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(50, d, generator=g)
    return c[torch.randint(0, 50, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def _index_ids(kb) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(kb._main.id_map)


def test_an_interrupted_index_update_leaves_a_handle_that_keeps_working(tmp_path, monkeypatch):
    """Found by a crash soak: Ctrl-C inside add()'s index update, caught (a notebook, the kb-add builder), left the
    writer's in-memory index wrong, and close() saved it: interrupted while efSearch was tuned after the switch
    to HNSW, ~250 held-out records were in no index (verify said ok); interrupted after the first chunk of a
    catch-up, those records went in twice (the same id twice in one result row)."""
    import retrofit.kb_maint as km

    D = 8
    kb = KnowledgeBase.create(tmp_path / "a", D, 2, 2, flat_threshold=2000, ef_construction=40)
    kb.add(_clustered(1500, D, 0), torch.zeros(1500, 2), torch.zeros(1500, 2))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(km, "tune_ef_search", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kb.add(_clustered(1500, D, 1), torch.zeros(1500, 2), torch.zeros(1500, 2))  # 3,000: flat -> HNSW
    monkeypatch.undo()
    kb.add(_clustered(10, D, 2), torch.zeros(10, 2), torch.zeros(10, 2))  # the handle is used on
    kb.close()
    with KnowledgeBase.open(tmp_path / "a") as r:
        assert r.info()["index"]["kind"] == "hnsw" and r.info()["index"]["unindexed_records"] == 0
        assert np.array_equal(np.sort(_index_ids(r)), np.arange(3010))

    kb = KnowledgeBase.create(tmp_path / "b", D, 2, 2, index="flat")
    kb.add(_clustered(100, D, 3), torch.zeros(100, 2), torch.zeros(100, 2))
    live = km.KBIndexMixin._live_keys

    def first_chunk_then_interrupt(self, start, upto):
        chunks = live(self, start, upto)
        yield next(chunks)
        raise KeyboardInterrupt

    monkeypatch.setattr(km.KBIndexMixin, "_live_keys", first_chunk_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        kb.add(_clustered(3000, D, 4), torch.zeros(3000, 2), torch.zeros(3000, 2))  # several record chunks
    monkeypatch.undo()
    kb.add(_clustered(10, D, 5), torch.zeros(10, 2), torch.zeros(10, 2))
    ids = _index_ids(kb)
    assert len(ids) == len(np.unique(ids)) == 3110
    q = kb.vectors(torch.tensor([100, 101]), "key")
    rows = kb.search(q, 4).ids
    assert all(len(set(r.tolist())) == 4 for r in rows) and rows[:, 0].tolist() == [100, 101]
    kb.close()


def test_a_kb_this_user_may_only_read_is_readable(tmp_path):
    """Found by a crash soak: a KB whose files the user cannot write (another user's; docs/knowledge_bases.md: open it
    read-only) could not even be read: every read command died with lmdb.ReadonlyError (LMDB writes its lock file)."""
    import shutil
    import tempfile

    as_root = os.geteuid() == 0
    if as_root and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no way to be a user who cannot write")
    where = tempfile.mkdtemp(prefix="retrofit-ro-")  # (pytest's tmp_path is private to its user)
    try:
        os.chmod(where, 0o755)
        kb = KnowledgeBase.create(os.path.join(where, "kb"), DK, DI, DT, index="flat")
        kb.add(torch.randn(20, DK), torch.zeros(20, DI), torch.zeros(20, DT), labels=torch.arange(20) % 3)
        kb.close()
        code = textwrap.dedent("""
            import sys
            from retrofit.errors import KnowledgeBaseError
            from retrofit.knowledge_base import KnowledgeBase
            with KnowledgeBase.open(sys.argv[1]) as kb:
                print("read", len(kb), kb.search(kb.vectors([3], "key"), 1).ids.tolist(), kb.verify()["ok"])
            try:
                KnowledgeBase.open(sys.argv[1], readonly=False)
            except KnowledgeBaseError as e:
                print("write refused:", e)
        """)
        if as_root:  # nobody cannot write root's files
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code]
        else:
            for dirpath, _, files in os.walk(where):
                os.chmod(dirpath, 0o555)
                for f in files:
                    os.chmod(os.path.join(dirpath, f), 0o444)
            argv = [sys.executable, "-c", code]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.run([*argv, os.path.join(where, "kb")], capture_output=True, text=True, timeout=120,
                           env=env, cwd=where)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "read 20 [[3]] True" in p.stdout and "opened without LMDB's reader lock" in p.stderr
        assert "write refused:" in p.stdout and "open it read-only" in p.stdout
    finally:
        for dirpath, _, _ in os.walk(where):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(where, ignore_errors=True)


def test_a_write_the_disk_refuses_is_a_clear_error_and_commits_nothing(tmp_path):
    """Found by a crash soak (a file-size limit standing in for a full disk): the write failed with a raw
    lmdb.Error 'mdb_txn_commit: Input/output error' (LMDB's word for a short write) and the CLI's traceback."""
    code = textwrap.dedent("""
        import resource, signal, sys, torch
        from retrofit.errors import KnowledgeBaseError
        from retrofit.knowledge_base import KnowledgeBase
        kb = KnowledgeBase.create(sys.argv[1], 64, 64, 64, index="flat")
        kb.add(torch.randn(100, 64), torch.randn(100, 64), torch.randn(100, 64))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
        try:
            kb.add(torch.randn(40000, 64), torch.randn(40000, 64), torch.randn(40000, 64))  # ~15 MB of records
        except KnowledgeBaseError as e:
            print("refused:", e)
        print("records", len(kb))
    """)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "kb")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "refused: writing to" in p.stdout and "Nothing of this write was committed" in p.stdout, p.stdout
    assert "records 100" in p.stdout
    with KnowledgeBase.open(tmp_path / "kb", readonly=False) as kb:  # as it was, and writable again
        assert len(kb) == 100 and kb.verify()["ok"]
        kb.add(torch.randn(10, 64), torch.randn(10, 64), torch.randn(10, 64))
        assert len(kb) == 110


def test_a_catch_up_over_a_chunk_whose_records_are_all_deleted(tmp_path):
    """Found by a review: the interrupt-safe catch-up took the last id of each chunk it added, and a chunk with no
    live record left (added and deleted before the index caught up) made every open of the KB fail (IndexError),
    kb compact included."""
    kb = KnowledgeBase.create(tmp_path / "kb", DK, DI, DT, index="flat", chunk_records=16)
    kb.add(torch.randn(32, DK), torch.zeros(32, DI), torch.zeros(32, DT))
    with kb.bulk():  # index updates deferred to the end of the block
        kb.add(torch.randn(32, DK), torch.zeros(32, DI), torch.zeros(32, DT))  # ids 32..63: chunks 2 and 3
        kb.delete(list(range(32, 48)))  # chunk 2 has no live record now
    assert len(kb) == 48 and kb.search(kb.vectors([50], "key"), 1).ids.tolist() == [[50]]
    kb.close()
    with KnowledgeBase.open(tmp_path / "kb") as r:
        assert len(r) == 48 and r.search(r.vectors([60], "key"), 1).ids.tolist() == [[60]]


@pytest.mark.parametrize("where", ["records", "index"])
def test_a_create_killed_half_way_leaves_nothing_to_repair(tmp_path, where):
    """`kb build` killed while it created the KB (LMDB opened, metadata or empty index not yet written) left a
    directory that every command, the re-run included, refused ("no metadata record", "index.json is missing").
    The KB is now created beside its path and moved into place complete. Killed here: a forked child exits
    (os._exit, as a SIGKILL: no cleanup) inside the creation."""
    import retrofit.kb_maint as kb_maint
    import retrofit.kb_records as kb_records

    path = tmp_path / "kb"
    pid = os.fork()
    if pid == 0:  # the child: dies inside create()
        try:
            if where == "records":
                kb_records.RecordStore.write_meta = lambda *a, **k: os._exit(9)
            else:
                kb_maint.save_index = lambda *a, **k: os._exit(9)
            KnowledgeBase.create(path, DK, DI, DT)
        finally:
            os._exit(3)  # (not reached when the kill point is)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    assert not path.exists()  # nothing half-made where the KB goes
    assert [p.name for p in tmp_path.iterdir()] == [f".kb.creating.{pid}"]  # the dead creation's leftover
    kb = KnowledgeBase.create(path, DK, DI, DT)  # the re-run creates it (and removes the dead one's leftover)
    kb.add(torch.nn.functional.normalize(torch.randn(5, DK), dim=1), torch.zeros(5, DI), torch.zeros(5, DT))
    kb.close()
    assert [p.name for p in tmp_path.iterdir()] == ["kb"]
    assert KnowledgeBase.verify_path(path)["ok"]


def test_create_into_an_existing_empty_directory_keeps_its_mode(tmp_path):
    path = tmp_path / "kb"
    path.mkdir()
    os.chmod(path, 0o750)
    KnowledgeBase.create(path, DK, DI, DT).close()
    assert (path.stat().st_mode & 0o777) == 0o750 and (path / "records" / "data.mdb").is_file()
    with pytest.raises(KnowledgeBaseError, match="not an empty directory"):
        KnowledgeBase.create(path, DK, DI, DT)
    assert [p.name for p in tmp_path.iterdir()] == ["kb"]


def test_create_under_a_file_names_the_file(tmp_path):
    """A path under a file named the create's own working directory (".kb.creating.PID/records")."""
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(KnowledgeBaseError, match=r"photo.jpg is a file, not a directory"):
        KnowledgeBase.create(tmp_path / "photo.jpg" / "sub" / "kb", DK, DI, DT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]


def test_closing_a_writer_releases_its_lock_while_a_forked_child_lives(tmp_path):
    """flock locks belong to the open file, which a forked child (a DataLoader worker) shares: close() only closed
    this process's descriptor, and the KB stayed locked for writing ("open for writing in this process" here, "in
    another process" elsewhere) until the child exited."""
    kb = KnowledgeBase.create(tmp_path / "kb", DK, DI, DT)
    pid = os.fork()
    if pid == 0:
        time.sleep(30)  # a worker that outlives the parent's handle
        os._exit(0)
    try:
        kb.close()
        again = KnowledgeBase.open(tmp_path / "kb", readonly=False)
        again.close()
        other = subprocess.run([sys.executable, "-c", "import sys; from retrofit.knowledge_base import "
                                "KnowledgeBase; KnowledgeBase.open(sys.argv[1], readonly=False).close()",
                                str(tmp_path / "kb")], capture_output=True, text=True, timeout=120)
        assert other.returncode == 0, other.stderr[-2000:]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _interrupt_after_commit(fn_name: str):
    """A tracer that raises KeyboardInterrupt (Ctrl-C) at the first line after the write transaction of
    ``KBWriteMixin.<fn_name>`` committed, where the handle takes the committed metadata."""
    import inspect

    import retrofit.kb_write as kw

    fn = getattr(kw.KBWriteMixin, fn_name)
    lines, first = inspect.getsourcelines(fn)
    target = first + next(i for i, t in enumerate(lines) if "self._meta = self._rec.meta = m" in t)

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != kw.__file__:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == target:
                raise KeyboardInterrupt
            return local
        return local
    return tracer


def test_an_interrupt_just_after_a_deletes_commit_leaves_the_handle_knowing_it(tmp_path):
    """A Ctrl-C right after delete()'s commit (a notebook, a server that goes on) left the handle with the old count
    and tombstones: it searched and returned the deleted record, and its compact() indexed it again."""
    kb = KnowledgeBase.create(tmp_path / "kb", DK, DI, DT)
    keys = torch.nn.functional.normalize(torch.randn(20, DK, generator=torch.Generator().manual_seed(0)), dim=1)
    kb.add(keys, torch.zeros(20, DI), torch.zeros(20, DT))
    sys.settrace(_interrupt_after_commit("delete"))
    try:
        with pytest.raises(KeyboardInterrupt):
            kb.delete([3])
    finally:
        sys.settrace(None)
    assert len(kb) == 19 and 3 not in kb.search(keys[3:4], 5).ids.tolist()[0]
    with pytest.raises(KeyError):
        kb.get([3])
    kb.compact()
    assert 3 not in kb.search(keys[3:4], 5).ids.tolist()[0]
    kb.close()
    with KnowledgeBase.open(tmp_path / "kb") as r:
        assert len(r) == 19 and r.verify()["ok"] and 3 not in r.search(keys[3:4], 5).ids.tolist()[0]


def test_a_path_filled_while_the_kb_was_created_is_left_as_it_is(tmp_path):
    """The move into place found the target filled by another process (a race between two creates): refused, the
    other's files untouched (a fallback to creating in place would have written into them)."""
    from retrofit.kb_create import move_into_place

    made = tmp_path / ".kb.creating.1"
    KnowledgeBase.create(made, DK, DI, DT).close()
    target = tmp_path / "kb"
    target.mkdir()
    (target / "theirs.txt").write_text("another process's file")
    with pytest.raises(KnowledgeBaseError, match="was filled by something else"):
        move_into_place(made, target)
    assert [p.name for p in target.iterdir()] == ["theirs.txt"] and (made / "records" / "data.mdb").is_file()
