"""Reading a knowledge base: search, record access, iteration, ``info`` and ``verify``.

A mixin of :class:`retrofit.knowledge_base.KnowledgeBase`; it relies on the attributes that class sets
(``_rec`` records, ``_main`` / ``_delta`` faiss indexes, ``_deleted`` tombstones, ``_sel`` selector, ``_meta``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from retrofit.errors import CorruptKnowledgeBaseError
from retrofit.kb_index import IndexState, full_hash, search_index
from retrofit.kb_whiten import apply_whitening_torch
from retrofit.neighbors import Neighbors
from retrofit.store import _check_exclude, as_queries, check_query_norms, check_search_args

__all__ = ["KBSearchMixin"]

log = logging.getLogger(__name__)

_WHICH = ("key", "image", "text")
_GPU_LOCK = threading.Lock()


class KBSearchMixin:
    """Read-side methods of ``KnowledgeBase``."""

    # ------------------------------------------------------------------ search
    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> Neighbors:
        """The ``k`` nearest live records of each query (inner product of L2-normalised keys).

        ``exclude`` (B, m) lists ids never to return for each query (-1 pads). Fewer than ``k`` hits leave
        masked slots. Tensors come back on ``queries.device``; image / text vectors as float32.
        """
        self._check_process()  # before any faiss / OpenMP work: that deadlocks in a forked child
        queries = as_queries(queries)
        if queries.is_cuda:
            exclude = check_search_args(queries, k, self.key_dim, exclude)
        else:  # numpy for the small CPU ops: torch's thread pool wakes slowly next to faiss's OpenMP threads
            check_search_args(queries, k, self.key_dim, None, values=False)  # values are checked below
            exclude = _check_exclude(exclude, queries.shape[0])
        B, device, k = queries.shape[0], queries.device, int(k)  # k: any integer type (numpy's too)
        m = 0 if exclude is None else exclude.shape[1]
        kq = k + m  # over-fetch so that k results survive the per-query exclusions
        if B == 0:
            return Neighbors.empty(0, k, self.image_dim, self.text_dim, device=device)
        if queries.is_cuda and self._kind() == "flat":
            q = torch.nn.functional.normalize(queries.detach().double(), dim=1).float()  # (B, Dk); float64 norm
            if self._whiten is not None:
                q = apply_whitening_torch(q, self._whiten_on(q.device))
            D, ids_ = self._search_exact_gpu(q, kq)  # (B, kq)
        else:
            qn = queries.detach().float().cpu().numpy()  # (B, Dk)
            if not np.isfinite(qn).all():
                raise ValueError("queries contain NaN or inf")
            q64 = qn.astype(np.float64)  # float64: the norm of a large finite query overflows float32
            norms = np.linalg.norm(q64, axis=1, keepdims=True)  # (B, 1)
            check_query_norms(norms[:, 0])
            qn = self._index_keys(np.ascontiguousarray(q64 / norms, dtype=np.float32))  # as the index holds keys
            parts = []
            for index in (self._main, self._delta):
                if index is not None and index.ntotal:
                    ef = max(self.ef_search, kq)
                    if index is self._main and self._deleted.size:
                        ef = self._ef_past_tombstones(ef)
                    parts.append(search_index(index, qn, min(kq, int(index.ntotal)), ef, self._sel))
            if not parts:
                return Neighbors.empty(B, k, self.image_dim, self.text_dim, device=device)
            D = np.concatenate([p[0] for p in parts], axis=1)  # (B, <=2kq)
            ids_ = np.concatenate([p[1] for p in parts], axis=1)
        invalid = ids_ < 0
        if self._deleted.size:  # belt and braces: the selector already skips them
            invalid |= np.isin(ids_, self._deleted)
        if exclude is not None:
            ex = exclude.cpu().numpy()  # (B, m)
            invalid |= (ids_[:, :, None] == ex[:, None, :]).any(-1)
        D = np.where(invalid, -np.inf, D).astype(np.float32)
        order = np.argsort(-D, axis=1, kind="stable")[:, :k]  # (B, <=k)
        D = np.take_along_axis(D, order, 1)
        ids_ = np.take_along_axis(ids_, order, 1)
        if D.shape[1] < k:
            pad = k - D.shape[1]
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids_ = np.pad(ids_, ((0, 0), (0, pad)), constant_values=-1)
        mask = np.isfinite(D)  # (B, k)
        ids_ = np.where(mask, ids_, -1)
        flat_ids, flat_ok = ids_.reshape(-1), mask.reshape(-1)  # (B*k,)
        if not flat_ok.any():
            return Neighbors.empty(B, k, self.image_dim, self.text_dim, device=device)
        partial = not flat_ok.all()
        if partial:  # masked slots read a valid record and are zeroed below: no per-slot branching
            flat_ids = np.where(flat_ok, flat_ids, flat_ids[flat_ok][0])
        Di, Dt = self.image_dim, self.text_dim
        image, text, lab = self._gather_float(flat_ids)
        image, text = image.view(B, k, Di), text.view(B, k, Dt)  # (B, k, Di), (B, k, Dt) float32
        labels = torch.from_numpy(lab).reshape(B, k)  # (B, k)
        mask_t = torch.from_numpy(mask)
        if partial:
            image[~mask_t] = 0
            text[~mask_t] = 0
            labels = labels.masked_fill(~mask_t, -1)
        res = Neighbors(ids=torch.from_numpy(ids_.astype(np.int64)), scores=torch.from_numpy(D), mask=mask_t,
                        image=image, text=text, labels=labels)
        return res if device.type == "cpu" else res.to(device)

    def _ef_past_tombstones(self, ef: int) -> int:
        """efSearch widened by the share of deleted records still in the HNSW graph: the selector skips them, but
        they take the search's candidate slots (at 90 % deleted, k = 32 found 10-16 live neighbours and recall
        0.44 with the tuned efSearch). Scaled by all / live vectors of the index, up to its size; a warning once
        per handle suggests compacting when most of the index is deleted records."""
        import faiss

        index = self._main
        if self._kind() != "hnsw":  # exact search: the selector costs no candidate slots
            return ef
        # recounted when the index object or the tombstones change, not on adds (new ids are live): O(N) per delete
        if getattr(self, "_dead_index", None) is not index or self._dead_key != int(self._deleted.size):
            ids = faiss.vector_to_array(index.id_map)
            self._dead_in_main = int(np.isin(ids, self._deleted, assume_unique=True).sum())
            self._dead_index, self._dead_key = index, int(self._deleted.size)
        dead, n = self._dead_in_main, int(index.ntotal)
        if not dead:
            return ef
        if dead * 2 > n and not getattr(self, "_dead_warned", False):
            self._dead_warned = True
            log.warning("%s: %d of the index's %d vectors are deleted records: searches widen efSearch to find live "
                        "neighbours and get slower; `retrofit kb compact %s` rebuilds the index without them",
                        self.path, dead, n, self.path)
        return min(n, -(-ef * n // max(n - dead, 1)))

    def _gpu_keys(self, dev: torch.device) -> dict[str, Any]:
        """Every indexed key on ``dev`` (a faiss GPU flat index when faiss-gpu is there, else a torch tensor), with
        ids and liveness, for exact search of CUDA queries."""
        import faiss

        keys, ids = [], []
        for index in (self._main, self._delta):
            if index is not None and index.ntotal:
                keys.append(faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal))
                ids.append(faiss.vector_to_array(index.id_map).astype(np.int64))
        x = np.concatenate(keys) if keys else np.zeros((0, self.key_dim), np.float32)  # (N, Dk)
        idv = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        out: dict[str, Any] = dict(ids=idv, alive=torch.from_numpy(~np.isin(idv, self._deleted)).to(dev))
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            out["res"] = faiss.StandardGpuResources()
            flat = faiss.IndexFlatIP(self.key_dim)
            flat.add(x)
            out["gpu"] = faiss.index_cpu_to_gpu(out["res"], dev.index or 0, flat)
        else:
            out["keys"] = torch.from_numpy(x).to(dev)
        out["device"] = dev
        return out

    def _whiten_on(self, dev: torch.device) -> torch.Tensor:
        """The key-whitening transform as a tensor on ``dev`` (cached with the GPU keys)."""
        cache = self._gpu_cache
        t = cache.get("whiten")
        if t is None or t.device != dev:
            t = torch.from_numpy(self._whiten).to(dev)
            with _GPU_LOCK:
                cache["whiten"] = t
        return t

    def _search_exact_gpu(self, q: torch.Tensor, kq: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-kq on the queries' GPU: faiss-GPU when available, else torch matmul; (scores, ids) numpy."""

        cache, dev = self._gpu_cache, q.device
        if cache.get("device") != dev:
            with _GPU_LOCK:  # threads searching one handle: one builds, the others wait and use it
                if cache.get("device") != dev:
                    cache.clear()
                    cache.update(self._gpu_keys(dev))  # "device" comes last: seen only with the rest in place
        n = len(cache["ids"])
        if n == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        if "gpu" in cache:  # faiss GPU: over-fetch past tombstones, then drop them below
            kk = min(n, kq + int((~cache["alive"]).sum()), 2048)
            with _GPU_LOCK:  # a faiss GPU index and its resources serve one search at a time
                D, pos = cache["gpu"].search(q.cpu().numpy(), kk)
            pos_t = torch.from_numpy(pos)
            ok = pos_t >= 0
            ids_ = torch.where(ok, torch.from_numpy(cache["ids"])[pos_t.clamp(min=0)], torch.full_like(pos_t, -1))
            return D, ids_.numpy()
        sims = (q @ cache["keys"].T).masked_fill(~cache["alive"][None, :], float("-inf"))  # (B, N)
        D, pos = sims.topk(min(kq, n), dim=1)
        ids_ = torch.from_numpy(cache["ids"]).to(q.device)[pos].masked_fill(~torch.isfinite(D), -1)
        return D.cpu().numpy(), ids_.cpu().numpy()

    # ------------------------------------------------------------------ records
    def get(self, ids: Any, vectors: bool = False) -> list[dict[str, Any]]:
        """Records ``ids`` as dicts (id, label, caption, source; key/image/text float32 tensors if ``vectors``)."""
        a = self._check_ids(ids)
        rows, lab = self._gather_rows(a, slice(0, self._rec.row_dim))
        with self._txn() as txn:
            texts = self._rec.texts(txn, a)
        out = []
        Dk, Di = self.key_dim, self.image_dim
        for j, i in enumerate(a.tolist()):
            d: dict[str, Any] = {"id": i, "label": int(lab[j]), "caption": texts[j][0], "source": texts[j][1]}
            if vectors:
                r = torch.from_numpy(rows[j].astype(np.float32))
                d.update(key=r[:Dk], image=r[Dk:Dk + Di], text=r[Dk + Di:])
            out.append(d)
        return out

    def vectors(self, ids: Any, which: str = "image") -> torch.Tensor:
        """The stored ``which`` ("key", "image" or "text") vectors of ``ids`` as a float32 (N, D) tensor."""
        if which not in _WHICH:
            raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
        a = self._check_ids(ids)
        Dk, Di, Dt = self.key_dim, self.image_dim, self.text_dim
        cols = {"key": slice(0, Dk), "image": slice(Dk, Dk + Di), "text": slice(Dk + Di, Dk + Di + Dt)}[which]
        rows, _ = self._gather_rows(a, cols)
        return torch.from_numpy(rows.astype(np.float32))

    def gather(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image (M, Di) and text (M, Dt) float32 vectors and labels (M,) of live ``ids`` (M,), in one read."""
        image, text, lab = self._gather_float(self._check_ids(ids))
        return image, text, torch.from_numpy(lab)

    def _gather_float(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Contiguous float32 image (M, Di) and text (M, Dt) vectors and the labels (M,) of ``ids``: gathered by
        torch straight out of a reader's snapshot map, else read as :meth:`_gather_rows` reads them."""
        Dk, Di, Dt = self.key_dim, self.image_dim, self.text_dim
        if view := self._snapshot_view():
            (image, text), lab = self._rec.gather_view_float(view, ids, [slice(Dk, Dk + Di),
                                                                         slice(Dk + Di, Dk + Di + Dt)])
            return image, text, lab
        rows, lab = self._gather_rows(ids, slice(Dk, Dk + Di + Dt))  # (M, Di+Dt) storage dtype
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :Di].float().contiguous(), rows_t[:, Di:].float().contiguous(), lab

    def _snapshot_view(self) -> Any:
        """A reader's zero-copy views of its snapshot's record chunks, made on first use; None for a writer or
        when the chunks are not aligned for them (reads then go through a transaction)."""
        if self._snap is None:
            return None
        if self._view is None:
            self._view = self._rec.snapshot_view(self._snap) or False
        return self._view or None

    def _gather_rows(self, ids: np.ndarray, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``ids`` (columns ``cols``) and labels: vectorised over the snapshot's map views for readers."""
        if view := self._snapshot_view():
            return self._rec.gather_view(view, ids, cols)
        with self._txn() as txn:
            return self._rec.gather(txn, ids, cols)

    def labels(self) -> torch.Tensor:
        """Labels of all live records in id order (N,) int64."""
        parts = [lab for _, lab in self._iter_live(with_vectors=False)]
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.int64)

    def _iter_live(self, with_vectors: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cols = slice(0, self._rec.row_dim if with_vectors else 0)
        with self._txn() as txn:
            for first, _rows, lab in self._rec.iter_chunks(txn, cols, upto=self._meta["next_id"]):
                ids = np.arange(first, first + len(lab), dtype=np.int64)
                live = ~np.isin(ids, self._deleted)
                yield ids[live], lab[live]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Live records in id order, as :meth:`get` returns them (with vectors)."""
        for ids, _ in self._iter_live(with_vectors=False):
            for s in range(0, len(ids), 1024):
                yield from self.get(ids[s:s + 1024], vectors=True)

    # ------------------------------------------------------------------ reports
    def info(self) -> dict[str, Any]:
        """Counts, dims, dtype, fingerprints, index kind and parameters, bytes on disk."""
        self._check_process()  # also: not closed
        m, st, wh = self._meta, self._state, getattr(self, "_wh", None)
        d = self.key_dim + self.image_dim + self.text_dim
        raw = len(self) * d * self._rec.np_dtype.itemsize  # the live records' vectors (not deleted ids')
        rec_bytes = self._rec.disk_bytes()
        idx_bytes = 0
        for f in self.path.glob("index-*.faiss"):
            try:
                idx_bytes += f.stat().st_size
            except FileNotFoundError:  # a writer replaced it since the listing
                pass
        return {
            "path": str(self.path), "schema_version": m["schema_version"], "uuid": m["uuid"],
            "records": len(self), "deleted": m["deleted"], "next_id": m["next_id"], "generation": m["generation"],
            "key_dim": self.key_dim, "image_dim": self.image_dim, "text_dim": self.text_dim, "dtype": m["dtype"],
            "chunk_records": m["chunk_records"], "class_names": m.get("class_names"),
            "fingerprint": m["fingerprint"], "user_meta": m["user_meta"],
            "index": {"kind": self._kind(), "storage": self._storage(), "config": self._cfg.to_dict(),
                      "ef_search": self.ef_search, "ef_construction_built": self._built_ef_construction(),
                      "tuned_recall": getattr(self, "_tuned_recall", None), "ntotal": int(self._main.ntotal),
                      "file": st.file if st else None, "file_generation": st.generation if st else None,
                      "covers_ids_below": st.next_id if st else None,
                      "memory_mapped": bool(self._mapped),
                      "whitened": wh is not None,
                      "whiten_fitted_on": None if wh is None else wh.fit_n,
                      "whiten_shrinkage": None if wh is None else wh.shrinkage,  # the index's (config: the setting)
                      "pending_in_memory": int(self._delta.ntotal) if self._delta is not None else 0,
                      "unindexed_records": self._unindexed(exact=True)},
            "bytes": {"records": rec_bytes, "records_free": self._rec.free_bytes(), "index": idx_bytes,
                      "raw_vectors": raw,
                      "records_over_raw": round(rec_bytes / raw, 4) if raw else None},
        }

    def _index_problems(self, st: IndexState | None, meta: dict[str, Any], nxt: int
                        ) -> tuple[list[str], dict[str, Any]]:
        """What is wrong with the index ``st`` (index.json as read) for the records of ``meta``, and its summary."""
        if st is None:
            return ["index.json is missing"], {}
        index = {"file": st.file, "generation": st.generation, "covers_ids_below": st.next_id,
                 "behind_by_ids": nxt - st.next_id}
        p = self.path / st.file
        fix = f"rebuild it with: retrofit kb compact {self.path}"
        if not p.is_file() or full_hash(p) != st.sha256:
            return [f"index file {st.file} is missing or its checksum does not match; {fix}"], index
        if st.whiten_file is not None and (not (self.path / st.whiten_file).is_file()
                                           or full_hash(self.path / st.whiten_file) != st.whiten_sha256):
            return [f"whitening file {st.whiten_file} of the index is missing or its checksum does not match; "
                    f"rebuild the index with: retrofit kb compact {self.path}"], index
        if st.kb_uuid == meta["uuid"] and st.next_id > nxt:  # saved after the records checked here were read?
            with self._rec.begin() as txn:
                nxt = self._rec.read_meta(txn)["next_id"]  # the records as committed now
            index["behind_by_ids"] = nxt - st.next_id
        if st.kb_uuid != meta["uuid"] or st.next_id > nxt:
            return [f"index file {st.file} does not belong to these records; {fix}"], index
        return [], index

    def verify(self, progress: bool = False) -> dict[str, Any]:
        """Check metadata, every record chunk (checksum, sizes, finite values, unit keys), tombstones and the index
        file. ``progress``: a tqdm bar over the records (a million-record KB takes a while).

        Never raises for damage it finds: returns ``{"ok": bool, "problems": [...], ...}``.
        """
        problems: list[str] = []
        try:
            with self._txn() as txn:
                meta = self._rec.read_meta(txn)
        except CorruptKnowledgeBaseError as e:
            return {"ok": False, "problems": [str(e)], "records_checked": 0}
        C, nxt = self._rec.chunk, meta["next_id"]
        Dk, D, dt = meta["key_dim"], self._rec.row_dim, self._rec.np_dtype
        deleted = self._deleted
        if deleted.size and (deleted[-1] >= nxt or deleted[0] < 0):
            problems.append(f"tombstones outside 0..{nxt - 1}")
        if meta["count"] != nxt - deleted.size:
            problems.append(f"count {meta['count']} != next_id {nxt} - deleted {deleted.size}")
        checked = unsummed = 0
        from retrofit.kb_records import chunk_sum, ckey

        db_sum = self._rec.sum_db()  # a writer may have upgraded the KB since this handle opened
        from tqdm.auto import tqdm

        bar = tqdm(total=nxt, desc="verify records", unit="rec", unit_scale=True, disable=not progress, leave=False)
        with self._txn() as txn, bar:
            for c in range((nxt + C - 1) // C):
                want = min(C, nxt - c * C)
                bar.update(want)
                ids = np.arange(c * C, c * C + want)
                live = ~np.isin(ids, deleted)
                buf, lbuf = txn.get(ckey(c), db=self._rec.db_vec), txn.get(ckey(c), db=self._rec.db_lab)
                if buf is None or lbuf is None:
                    if live.any():
                        problems.append(f"chunk {c} is missing but holds live records")
                    continue
                if len(buf) != want * D * dt.itemsize or len(lbuf) != want * 8:
                    problems.append(f"chunk {c} has {len(buf)} bytes, expected {want * D * dt.itemsize}")
                    continue
                crc = txn.get(ckey(c), db=db_sum) if db_sum is not None else None
                if crc is None:
                    unsummed += 1  # written by schema 1: nothing to compare with
                elif bytes(crc) != chunk_sum(bytes(buf), bytes(lbuf)):
                    problems.append(f"chunk {c} (records {c * C}..{c * C + want - 1}): its bytes do not match their "
                                    "checksum (damaged on disk); restore the KB from a copy or rebuild it")
                    continue
                rows = np.frombuffer(buf, dtype=dt).reshape(want, D)[live].astype(np.float32)
                if not np.isfinite(rows).all():
                    problems.append(f"chunk {c} holds non-finite values")
                norms = np.linalg.norm(rows[:, :Dk], axis=1)
                if rows.shape[0] and np.abs(norms - 1).max() > 1e-2:
                    problems.append(f"chunk {c} holds keys that are not unit length")
                checked += int(live.sum())
        index: dict[str, Any] = {}
        for _ in range(5):  # a writer may save a new index while it is checked: check the one index.json names then
            try:
                st = IndexState.read(self.path)
                found, index = self._index_problems(st, meta, nxt)
            except CorruptKnowledgeBaseError as e:
                st, found = None, [str(e)]
            try:
                if not found or IndexState.read(self.path) == st:
                    break  # nothing wrong, or the same index.json as checked: what was found stands
            except CorruptKnowledgeBaseError:
                break
        problems += found
        return {"ok": not problems, "problems": problems, "records_checked": checked,
                "chunks_without_checksum": unsummed, "generation": meta["generation"],
                "index": index}
