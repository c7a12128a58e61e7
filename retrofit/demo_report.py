"""The CIFAR-10-LT demo's report (:mod:`retrofit.demo`): the rows' titles, the markdown table and the files a run
writes (``results_dir/<stem>.md``, ``.json`` and the per-class plot ``.png``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from retrofit.demo_data import DemoData
from retrofit.demo_rules import floors_markdown

if TYPE_CHECKING:
    from retrofit.demo import DemoConfig

__all__ = ["GUARDS", "ROWS", "TRAINED", "format_table", "row_titles", "write_report"]

ROWS = {
    "1": "host (CE)",
    "2": "host + logit adjustment",
    "3": "kNN vote over KB_in",
    "4": "retrofit: head on KB_in (LACE)",
    "5": "retrofit: row 4 + KB_ext swapped in",
    "6": "retrofit: head trained with KB_ext",
    "7i": "ablation: row 4 image-only (no texts, no label vote)",
    "7t": "ablation: row 4 text-only",
    "8h": "noisy 40%: host + logit adjustment",
    "8r": "noisy 40%: retrofit head on KB_in",
}
GUARDS = {"g_in": "fixed 50/50 fusion of row 2 and kNN on KB_in",
          "g_ext": "fixed 50/50 fusion of row 2 and kNN on KB_ext"}
TRAINED = {"4", "5", "6", "7i", "7t", "8r"}
_EXT_LABELS = {"dataset": "CIFAR-10's own", "captions": "read from the captions (CaptionLabeller)"}



def _exact(x: float) -> str:
    """``x`` in a file name, every digit kept (100.0000001 is not 100): ``10``, ``0.2``, ``1234567``."""
    r = repr(float(x))
    return r[:-2] if r.endswith(".0") else r


def row_titles(noise_rate: float = 0.4) -> dict[str, str]:
    """The rows' and references' titles, row 8's with its noise rate."""
    rate = f"noisy {_exact(round(100 * noise_rate, 10))}%:"
    return {n: t.replace("noisy 40%:", rate) for n, t in {**ROWS, **GUARDS}.items()}


def format_table(results: dict[str, dict[str, Any]], seeds: int = 1, titles: dict[str, str] | None = None) -> str:
    """The markdown table of the report (accuracies in %; ``titles``: :func:`row_titles`, default 40% noise)."""
    titles = titles or row_titles()
    lines = ["| row | model | Many | Medium | Few | Overall |", "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        label = titles.get(name, name)
        cells = []
        for key in ("many", "medium", "few", "top1"):
            v = r.get(key)
            s = "–" if v is None else f"{100 * v:.1f}"
            if seeds > 1 and name in TRAINED and r.get(key + "_std") is not None:
                s += f" ± {100 * r[key + '_std']:.1f}"
            cells.append(s)
        row = name if name in ROWS else "ref"
        lines.append(f"| {row} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(cfg: DemoConfig, doc: dict[str, Any], results: dict[str, dict[str, Any]],
                 floors: dict[str, Any], data: DemoData, seconds: float) -> str:
    """Write ``doc`` (the JSON document), the markdown report and, with ``cfg.plot``, the plot of rows 1, 2, 4 and 5
    to ``cfg.results_dir``; returns the markdown table."""
    titles = row_titles(cfg.noise_rate)
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results, cfg.seeds, titles)
    extras = (", learned label vote" * cfg.label_vote + " (KB-prior balanced)" * (cfg.label_vote and cfg.balance_vote)
              + " mixed in as probabilities" * (cfg.label_vote and cfg.vote_form == "mix")
              + ", fed the row-2 host logits" * cfg.adjust_host
              + "".join(f"; {n} searched with whitened keys (shrinkage {w:g})"
                        for n, w in (("KB_in", cfg.whiten_in), ("KB_ext", cfg.whiten_ext)) if w))
    from retrofit.demo_train import head_epochs

    ext_epochs = (f" ({head_epochs(cfg, 'ext')} for the head trained with KB_ext)"
                  if head_epochs(cfg, "ext") != cfg.epochs else "")
    md = (f"# CIFAR-10-LT (IF={cfg.imbalance_factor:g}), frozen Tiny Darknet host, retrofit head "
          f"(d={cfg.dim}, L={cfg.depth}, k={cfg.k}, {cfg.epochs} epochs{ext_epochs}{extras})\n\n{table}\n"
          f"Top-1 (%) on the {_test_set(data.test_labels, data.num_classes)} test set; seeds: {cfg.seeds}. "
          f"Post-hoc adjustments chosen on the {len(data.split.val)}-image validation set"
          + (" (rows 4-7's: on the long-tail training images)" if cfg.posthoc_on == "train" else "")
          + (", the trained vote scales kept" if cfg.vote_rule == "trained" and cfg.vote_scale_on == "train"
             else ", vote scales on "
             + ("the validation set" if cfg.vote_scale_on == "val"
                else "the long-tail training images (own entries excluded)")
             + (" by the one-standard-error rule" if cfg.vote_rule == "one_se" else ""))
          + f". KB_ext's pool labels: {_EXT_LABELS[cfg.ext_labels]}. Run time {seconds:.0f} s.\n"
          + floors_markdown(floors))
    (out / f"{cfg.results_stem}.md").write_text(md)
    (out / f"{cfg.results_stem}.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    if cfg.plot:
        from retrofit.plots import plot_per_class_accuracy

        series = {f"{n}: {titles[n]}": results[n] for n in ("1", "2", "4", "5") if n in results}
        if series:
            plot_per_class_accuracy(series, out / f"{cfg.results_stem}.png",
                                    title="CIFAR-10-LT: per-class test accuracy vs training count")
    return table


def _test_set(labels: np.ndarray, num_classes: int) -> str:
    """``balanced 10,000-image`` (CIFAR-10's test set), or what a smaller / other test set is."""
    if len(labels) == 0:
        return "empty"
    counts = np.bincount(labels, minlength=num_classes)
    return ("balanced " if counts.min() == counts.max() else "") + f"{len(labels):,}-image"


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)

