"""Property test: random add / delete / compact / reopen / search sequences against a brute-force model (raw and
whitened keys)."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrofit.kb_whiten import apply_whitening
from retrofit.knowledge_base import KnowledgeBase

D = 8
SCALES = torch.tensor(np.geomspace(4.0, 0.1, D), dtype=torch.float32)

op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(0, 10_000)),
    st.tuples(st.just("delete"), st.integers(1, 6), st.integers(0, 10_000)),
    st.tuples(st.just("compact")),
    st.tuples(st.just("reopen"), st.booleans()),
    st.tuples(st.just("search"), st.integers(1, 60), st.integers(0, 10_000), st.integers(0, 3)),
)


@pytest.mark.parametrize("whiten", [0.0, 0.1])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=14))
def test_kb_matches_brute_force_model(whiten, ops):
    d = tempfile.mkdtemp(prefix="kbprop")
    model: dict[int, np.ndarray] = {}  # live id -> stored key (float16-rounded, as the KB keeps it)
    nxt = 0
    kb = KnowledgeBase.create(f"{d}/kb", D, 2, 1, index="flat", whiten=whiten)
    reader = None
    tol = 1e-4 if whiten else 1e-5  # whitened keys: (D, D) products in float32, batched differently
    try:
        for o in ops:
            if o[0] == "add":
                g = torch.Generator().manual_seed(o[2])
                keys = torch.randn(o[1], D, generator=g) * SCALES + 1.0  # anisotropic, off-centre: whitening matters
                ids = kb.add(keys, torch.zeros(o[1], 2), torch.zeros(o[1], 1))
                assert ids.tolist() == list(range(nxt, nxt + o[1]))
                stored = torch.nn.functional.normalize(keys, dim=1).numpy().astype(np.float16).astype(np.float32)
                model.update(zip(ids.tolist(), stored))
                nxt += o[1]
            elif o[0] == "delete" and model:
                rng = np.random.default_rng(o[2])
                dead = rng.choice(sorted(model), size=min(o[1], len(model)), replace=False).tolist()
                kb.delete(dead)
                for i in dead:
                    del model[i]
            elif o[0] == "compact":
                kb.compact()
            elif o[0] == "reopen":
                kb.close()
                kb = KnowledgeBase.open(f"{d}/kb", readonly=False)
                if o[1]:  # also a read-only handle in the same process, checked below
                    if reader is not None:
                        reader.close()
                    reader = KnowledgeBase.open(f"{d}/kb")
            elif o[0] == "search":
                _, k, seed, m = o
                g = torch.Generator().manual_seed(seed)
                q = torch.randn(3, D, generator=g) * SCALES + 1.0
                live = np.array(sorted(model), dtype=np.int64)
                exclude = None
                if m and len(live):
                    exclude = torch.from_numpy(np.random.default_rng(seed).choice(live, size=(3, m)))
                for handle in [kb] + ([reader] if reader is not None else []):
                    if handle is reader:
                        handle.refresh()
                    nb = handle.search(q, k, exclude=exclude)
                    got = nb.ids.numpy()
                    assert not np.isin(got[got >= 0], list(set(range(nxt)) - set(model))).any(), "deleted id"
                    if exclude is not None:
                        assert not (got[:, :, None] == exclude.numpy()[:, None, :]).any(), "excluded id"
                    # exact backend == brute force over the model (in the handle's whitened space, if any)
                    qn = torch.nn.functional.normalize(q, dim=1).numpy()
                    key = model.get
                    if whiten:
                        assert handle._whiten is not None
                        qn = apply_whitening(qn, handle._whiten)
                        wk = dict(zip(model, apply_whitening(np.stack(list(model.values())), handle._whiten))) \
                            if model else {}
                        key = wk.get
                    for b in range(3):
                        cand = [i for i in live if exclude is None or i not in exclude[b].tolist()]
                        sims = np.array([qn[b] @ key(i) for i in cand], dtype=np.float32)
                        want = np.array(cand, dtype=np.int64)[np.argsort(-sims, kind="stable")][:k]
                        n_valid = int(nb.mask[b].sum())
                        assert n_valid == min(k, len(cand))
                        ids_b, scores_b = got[b, :n_valid], nb.scores[b, :n_valid].numpy()
                        if set(ids_b.tolist()) != set(want.tolist()):  # only ties may pick other ids: check each
                            assert len(set(ids_b.tolist())) == n_valid, "an id returned twice"
                            assert all(i in model for i in ids_b.tolist()), "an id that is not live"
                            true = np.array([qn[b] @ key(i) for i in ids_b], dtype=np.float32)
                            assert np.allclose(scores_b, true, atol=tol), "scores are not those ids' similarities"
                            assert scores_b.min() >= np.sort(-np.sort(-sims)[:k]).min() - tol, "not the top k"
                        assert (got[b, n_valid:] == -1).all()
        assert len(kb) == len(model)
        report = kb.verify()
        assert report["ok"] and report["chunks_without_checksum"] == 0  # every chunk's CRC kept in step
    finally:
        if reader is not None:
            reader.close()
        kb.close()
        shutil.rmtree(d, ignore_errors=True)
