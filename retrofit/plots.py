"""PNG plots for long-tail evaluation (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrofit._env import require

__all__ = ["plot_per_class_accuracy"]


def plot_per_class_accuracy(results: dict[str, dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Per-class accuracy against the class's training count (log x), one series per named result
    (e.g. ``{"host": evaluate(...), "retrofitted": evaluate(...)}``), with the Many / Medium / Few cut-offs
    shaded and each series' group means drawn as steps. Writes a PNG; returns its path."""
    require("matplotlib", "plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("plot_per_class_accuracy needs at least one result")
    first = next(iter(results.values()))
    counts = [max(int(c), 1) for c in first["train_counts"]]
    lo, hi = first["cutoffs"]["few_below"], first["cutoffs"]["many_above"]
    # a Figure with its own Agg canvas, outside pyplot: the caller's backend and figures are left alone (switching
    # the process to Agg silenced a notebook's later plt.show())
    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xmin, xmax = min(counts) / 1.5, max(counts) * 1.5
    # the groups' x ranges, clipped to the axes (a cut-off outside the data's counts leaves its group empty)
    spans = {g: (max(a, xmin), min(b, xmax)) for g, (a, b) in
             (("few", (xmin, lo)), ("medium", (lo, hi)), ("many", (hi, xmax)))}
    spans = {g: ab for g, ab in spans.items() if ab[0] < ab[1]}
    for g, color in (("few", "tab:red"), ("many", "tab:green")):
        if g in spans:
            ax.axvspan(*spans[g], color=color, alpha=0.07, lw=0)
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, (name, r) in enumerate(results.items()):
        if [max(int(c), 1) for c in r["train_counts"]] != counts:
            raise ValueError(f"result {name!r} was computed with other training counts than {next(iter(results))!r}")
        acc = [100 * a if a is not None else float("nan") for a in r["per_class_acc"]]
        label = f"{name} (top-1 {100 * r['top1']:.1f}%, few {_pct(r['few'])})"
        ax.scatter(counts, acc, s=28, marker=markers[i % len(markers)], alpha=0.8, label=label, zorder=3)
        for g, (a, b) in spans.items():
            if r.get(g) is not None:
                ax.hlines(100 * r[g], a, b, colors=f"C{i}", linestyles="--", lw=1, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_title(title or "Per-class accuracy vs training count (dashed: group means)")
    if "few" in spans:
        ax.text(xmin * 1.05, 97, f"few < {lo}", fontsize=8, color="tab:red", va="top")
    if "many" in spans:
        ax.text(spans["many"][0] * 1.05, 97, f"many > {hi}", fontsize=8, color="tab:green", va="top")
    if len(results) >= 2:  # a thin line per class from the first series to the last: the change per class
        a_first = list(results.values())[0]["per_class_acc"]
        a_last = list(results.values())[-1]["per_class_acc"]
        for c, (a, b) in enumerate(zip(a_first, a_last)):
            if a is not None and b is not None:
                ax.plot([counts[c], counts[c]], [100 * a, 100 * b], color="0.5", lw=0.8, alpha=0.6, zorder=2)
    names = first.get("class_names")
    if names and len(names) <= 20:
        accs = first["per_class_acc"]
        for c, n in enumerate(names):
            if accs[c] is not None:
                ax.annotate(n, (counts[c], 100 * accs[c]), fontsize=7, alpha=0.7, xytext=(3, 3),
                            textcoords="offset points")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"
