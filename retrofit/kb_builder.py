"""One run of a knowledge-base build: filter, encode and commit decoded batches into an open KB.

:class:`_Builder` is the loop behind :func:`retrofit.ingest.build_kb` and :func:`retrofit.ingest.add_to_kb`:
it restores its duplicate sets and report from the committed progress, drops bad samples and (near)
duplicates, encodes the rest and commits records and progress together every ``commit_every`` records.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from retrofit._interrupts import interrupt_after
from retrofit.encoders import ImageEncoder, TextEncoder
from retrofit.ingest import _META_PREFIX, BuildConfig, BuildSummary, _fresh_state, _hash_of_source
from retrofit.sources import Source

__all__ = ["_Builder"]

log = logging.getLogger(__name__)


class _Builder:
    """One run over (part of) a source into an open, writable KB."""

    def __init__(self, kb: Any, source: Source, labels: list[int], cfg: BuildConfig, image: ImageEncoder,
                 text: TextEncoder, key: ImageEncoder | None, build_id: str, report: Path, labeller: Any = None):
        self.kb, self.source, self.labels, self.cfg = kb, source, labels, cfg
        self.labeller = labeller  # CaptionLabeller: labels read from captions for samples without one
        self.image, self.text, self.key = image, text, key
        self.meta_key = _META_PREFIX + build_id
        self.report = report
        self.encode_s = 0.0
        self.encode_split: dict[str, float] = {}  # seconds per encoder ("image", "key", "text")
        self._text_cache: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()
        self._near = None  # faiss IndexFlatIP over written keys (near-duplicate removal)
        self.state = dict(kb.user_meta.get(self.meta_key) or _fresh_state())

    # ------------------------------------------------------------------ resume state
    def restore(self) -> None:
        """Rebuild the duplicate sets from the KB and trim the report to the committed position."""
        start = self.state["next"]
        kept = []
        if self.report.exists():
            for line in self.report.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if e.get("build") != self.meta_key or e.get("index", -1) < start:
                    kept.append(line)
        self.report.write_text("".join(x + "\n" for x in kept))
        keys = []
        if (self.cfg.dedup or self.cfg.near_dup is not None) and len(self.kb):
            for r in self.kb:  # live records in id order
                if self.cfg.dedup and (h := _hash_of_source(r.get("source"))):
                    self._seen.add(h)
                if self.cfg.near_dup is not None:
                    keys.append(r["key"])
        if self.cfg.near_dup is not None:
            import faiss

            self._near = faiss.IndexFlatIP(self.kb.key_dim)
            if keys:
                self._near.add(torch.stack(keys).float().numpy())

    # ------------------------------------------------------------------ encoding
    def _timed(self, fn: Any, x: Any, which: str) -> torch.Tensor:
        t = time.perf_counter()
        out = fn(x)
        dt = time.perf_counter() - t
        self.encode_s += dt
        self.encode_split[which] = self.encode_split.get(which, 0.0) + dt
        return out.float().cpu()

    def _encode_text(self, captions: list[str | None]) -> torch.Tensor:
        todo = sorted({c for c in captions if c and c not in self._text_cache})
        if todo:
            vecs = self._timed(self.text.encode, todo, "text")  # (n, Dt)
            if len(self._text_cache) + len(todo) > self.cfg.text_cache:
                self._text_cache.clear()
            self._text_cache.update(zip(todo, vecs))
        zero = torch.zeros(self.text.dim)
        return torch.stack([self._text_cache[c] if c else zero for c in captions])  # (B, Dt)

    # ------------------------------------------------------------------ the loop
    def run(self, batches: Any) -> BuildSummary:
        """Consume decoded ``batches`` (a DataLoader iterator starting at ``state["next"]``)."""
        from tqdm.auto import tqdm

        cfg, refs = self.cfg, self.source.refs
        start = self.state["next"]
        t0 = time.perf_counter()
        pending: dict[str, list] = {k: [] for k in ("key", "image", "text", "label", "caption", "source")}
        bar = tqdm(total=len(refs), initial=start, unit="img", desc="kb build", disable=not cfg.progress,
                   dynamic_ncols=True, smoothing=0.1)
        self._pos = start  # the source position up to which ``pending`` and the counters hold every sample
        try:
            with open(self.report, "a") as report:
                for batch in batches:
                    self._take(batch, pending, report)
                    pos = self._pos
                    bar.update(len(batch["index"]))
                    n_pending = sum(pending.get("_n", []))
                    bar.set_postfix(written=self.state["written"] + n_pending, skipped=self.state["skipped"],
                                    refresh=False)
                    if n_pending >= cfg.commit_every:
                        report.flush()
                        self._commit(pending, pos)
                report.flush()
                self._commit(pending, pos, force=True)
        except KeyboardInterrupt:
            log.warning("interrupted: committing what was encoded (up to source position %d); re-run to resume",
                        self._pos)
            self._commit(pending, self._pos, force=True)
            raise
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        st = self.state
        return BuildSummary(str(self.kb.path), len(refs), st["written"], st["skipped"], st["duplicates"],
                            st["near_duplicates"], seconds, self.encode_s, (len(refs) - start) / max(seconds, 1e-9),
                            start, str(self.report), kb_size=len(self.kb),
                            extra={"encode_split_s": self.encode_split, "unique_captions": len(self._text_cache),
                                   **({"labels_from_captions": st.get("caption_labelled", 0)} if self.labeller
                                      else {})})

    def _take(self, batch: dict[str, Any], pending: dict[str, list], report: Any) -> None:
        """Filter one decoded batch (bad data, duplicates), encode what is left, append it to ``pending``.

        The counters move only once the whole batch is done, so that an interrupted batch counts nothing.
        """
        counts = {"skipped": 0, "duplicates": 0, "near_duplicates": 0}
        if self.labeller is not None:
            counts["caption_labelled"] = 0
        new: dict[str, list] = {k: [] for k in pending}
        self._filter_encode(batch, new, report, counts)
        # the batch's records, its counters and the position move together: a Ctrl-C waits for them (one landing
        # between them committed records past the recorded position, or lists of different lengths)
        with interrupt_after():
            for k, v in new.items():
                pending.setdefault(k, []).extend(v)
            for k, v in counts.items():
                self.state[k] = self.state.get(k, 0) + v  # caption_labelled: absent from builds made before it
            self._pos = batch["index"][-1] + 1

    def _filter_encode(self, batch: dict[str, Any], pending: dict[str, list], report: Any,
                       counts: dict[str, int]) -> None:
        keep_rows, keep_idx = [], []
        for row, i in enumerate(batch["index"]):
            ref = self.source.refs[i]
            err = batch["error"][row]
            cap = ref.caption.strip() if isinstance(ref.caption, str) else None
            if err is None and not cap and self.cfg.require_caption:
                err = ("no caption" if ref.caption is None else "empty caption" if isinstance(ref.caption, str)
                       else f"caption is not text ({type(ref.caption).__name__})")
            if err is not None:
                counts["skipped"] += 1
                report.write(json.dumps({"build": self.meta_key, "index": i, "key": ref.key, "reason": err}) + "\n")
                continue
            h = batch["hash"][row][:16]
            if self.cfg.dedup:
                if h in self._seen:
                    counts["duplicates"] += 1
                    continue
                self._seen.add(h)
            keep_rows.append(row)
            keep_idx.append(i)
        if not keep_rows:
            return
        where = {r: n for n, r in enumerate(batch["ok"])}
        sel = [where[r] for r in keep_rows]
        images = batch["images"]
        img_in = images[0] if isinstance(images, tuple) else images
        img = self._timed(self.image.encode, img_in[sel], "image")  # (n, Di)
        keys = self._timed(self.key.encode, images[1][sel], "key") if self.key is not None else img  # (n, Dk)
        if self._near is not None:
            keep = self._near_filter(keys)
            counts["near_duplicates"] += keep.count(False)
            keep_rows = [r for r, k in zip(keep_rows, keep) if k]
            keep_idx = [i for i, k in zip(keep_idx, keep) if k]
            img, keys = img[keep], keys[keep]
            if not keep_rows:
                return
        caps = [c.strip() if isinstance(c := self.source.refs[i].caption, str) and c else None  # not text: none
                for i in keep_idx]
        txt = self._encode_text(caps)  # (n, Dt)
        pending["key"].append(keys)
        pending["image"].append(img)
        pending["text"].append(txt)
        labels = [self.labels[i] for i in keep_idx]
        if self.labeller is not None and any(lab < 0 for lab in labels):
            read = self.labeller.label_vectors(txt).tolist()  # (n,) from the caption vectors just encoded
            labels = [r if lab < 0 else lab for lab, r in zip(labels, read)]
            counts["caption_labelled"] += sum(1 for lab, i in zip(labels, keep_idx) if self.labels[i] < 0 and lab >= 0)
        pending["label"].extend(labels)
        pending["caption"].extend(caps)
        pending["source"].extend(f"{self.source.refs[i].key}|sha1:{batch['hash'][r][:16]}"
                                 for r, i in zip(keep_rows, keep_idx))
        pending.setdefault("_n", []).append(len(keep_idx))

    def _near_filter(self, keys: torch.Tensor) -> list[bool]:
        """True for keys with no earlier key (written or in this batch) at cosine >= near_dup."""
        import numpy as np

        q = torch.nn.functional.normalize(keys, dim=-1).numpy().astype(np.float32)  # (n, Dk)
        keep = np.ones(len(q), dtype=bool)
        if self._near.ntotal:
            d, _ = self._near.search(q, 1)
            keep &= d[:, 0] < self.cfg.near_dup
        sim = q @ q.T  # (n, n)
        for a in range(len(q)):
            if keep[a] and a + 1 < len(q):
                keep[a + 1:] &= sim[a, a + 1:] < self.cfg.near_dup
        self._near.add(q[keep])
        return keep.tolist()

    def _commit(self, pending: dict[str, list], pos: int, force: bool = False) -> None:
        """Write ``pending`` and the progress up to source position ``pos`` in one transaction."""
        n = sum(pending.get("_n", []))
        if n == 0 and not force:
            return
        state = dict(self.state, next=pos, written=self.state["written"] + n,
                     done=pos >= len(self.source.refs), updated=time.time())
        try:
            if n:
                lab = torch.tensor(pending["label"], dtype=torch.int64)
                self.kb.add(torch.cat(pending["key"]), torch.cat(pending["image"]), torch.cat(pending["text"]),
                            labels=lab, captions=pending["caption"], sources=pending["source"],
                            meta={self.meta_key: state})
            else:
                self.kb.update_meta({self.meta_key: state})
        except BaseException:
            # interrupted after the commit (add() updates the index after it): the records are in, so the
            # interrupt handler must not write them a second time
            if (self.kb.user_meta.get(self.meta_key) or {}).get("updated") == state["updated"]:
                self._committed(state, pending)
            raise
        self._committed(state, pending)
        log.info("committed %d records; source position %d/%d", n, pos, len(self.source.refs))

    def _committed(self, state: dict[str, Any], pending: dict[str, list]) -> None:
        self.state = state
        for v in pending.values():
            v.clear()
