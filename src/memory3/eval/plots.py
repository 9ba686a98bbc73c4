"""PNG figures of the evaluation results (matplotlib, Agg backend: no display needed).

Each function takes the JSON a benchmark wrote (the same dicts that go into BENCHMARKS.md), so
figures can be redrawn without rerunning anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODE_COLORS = {"none": "#9e9e9e", "memory": "#1f77b4", "rag": "#ff7f0e"}
MODE_LABELS = {"none": "no memory", "memory": "explicit memory", "rag": "RAG"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib: pip install 'memory3[plot]' (or pip install matplotlib)"
        ) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_accuracy(qa: dict[str, Any], path: str | Path, metric: str = "contained") -> Path:
    """Accuracy by mode, one group of bars per question set; retrieval hit rate in the labels.

    qa: {"sets": {name: {"summary": …}}} as `memory3 eval qa` writes it.
    """
    plt = _pyplot()
    sets = list(qa["sets"])
    modes = [
        m for m in ("none", "memory", "rag") if any(m in qa["sets"][s]["summary"]["modes"] for s in sets)
    ]
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(sets), 3.6))
    width = 0.8 / max(len(modes), 1)
    for j, mode in enumerate(modes):
        xs, ys = [], []
        for i, s in enumerate(sets):
            m = qa["sets"][s]["summary"]["modes"].get(mode)
            if m is not None and m.get(metric) is not None:
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(100 * m[metric])
        bars = ax.bar(xs, ys, width, label=MODE_LABELS.get(mode, mode), color=MODE_COLORS.get(mode))
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    labels = []
    for s in sets:
        summ = qa["sets"][s]["summary"]
        hr = summ.get("hit_rate")
        labels.append(
            f"{s}\n(n={summ['n']}" + (f", hit@{summ['k']} {100 * hr:.0f}%)" if hr is not None else ")")
        )
    ax.set_xticks(range(len(sets)), labels)
    ax.set_ylabel("answer contained (%)" if metric == "contained" else f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.set_title("QA accuracy by mode")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _setting(row: dict[str, Any]) -> str:
    label = MODE_LABELS.get(row["mode"], row["mode"])
    return f"{label} ({row['cache']} cache)" if row["mode"] == "memory" else label


def plot_throughput(speed: dict[str, Any], path: str | Path) -> Path:
    """Throughput (batch × generated / wall time) by setting and batch size, with min–max bars."""
    plt = _pyplot()
    rows = speed["rows"]
    batches = sorted({r["batch"] for r in rows})
    settings = list(dict.fromkeys(_setting(r) for r in rows))
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(batches), 3.6))
    width = 0.8 / max(len(settings), 1)
    for j, name in enumerate(settings):
        xs, ys, lo, hi = [], [], [], []
        first = next(r for r in rows if _setting(r) == name)
        color = "#aec7e8" if first["cache"] == "cold" else MODE_COLORS.get(first["mode"])
        for i, B in enumerate(batches):
            r = next((r for r in rows if r["batch"] == B and _setting(r) == name), None)
            if r is None:
                continue
            t = r["throughput"]
            xs.append(i + (j - (len(settings) - 1) / 2) * width)
            ys.append(t["median"])
            lo.append(t["median"] - t["min"])
            hi.append(t["max"] - t["median"])
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name, color=color)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    cfg = speed["config"]
    ax.set_ylabel("tokens/s (batch × generated / wall)")
    ax.set_title(f"Throughput, {cfg['prompt_tokens']} prompt + {cfg['new_tokens']} generated tokens")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy_vs_speed(
    qa: dict[str, Any],
    speed: dict[str, Any],
    path: str | Path,
    batch: int | None = None,
    metric: str = "contained",
) -> Path:
    """Accuracy (mean over question sets) against decode speed, one point per mode: the shape of
    the paper's Fig. 2. Speed: throughput at `batch` (default: the largest measured), warm cache."""
    plt = _pyplot()
    rows = speed["rows"]
    batch = batch or max(r["batch"] for r in rows)
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for mode in ("none", "memory", "rag"):
        r = next(
            (r for r in rows if r["batch"] == batch and r["mode"] == mode and r["cache"] in ("warm", "-")),
            None,
        )
        accs = [
            s["summary"]["modes"][mode][metric]
            for s in qa["sets"].values()
            if mode in s["summary"]["modes"] and s["summary"]["modes"][mode][metric] is not None
        ]
        if r is None or not accs:
            continue
        x, y = r["throughput"]["median"], 100 * sum(accs) / len(accs)
        ax.scatter([x], [y], s=80, color=MODE_COLORS[mode], zorder=3)
        left = mode == "memory"  # memory and no memory often sit close together: label one to the left
        ax.annotate(
            MODE_LABELS[mode],
            (x, y),
            textcoords="offset points",
            xytext=(-8, 8) if left else (8, 8),
            ha="right" if left else "left",
            fontsize=9,
        )
    ax.set_xlabel(f"throughput at batch {batch} (tokens/s)")
    ax.set_ylabel("answer contained (%, mean over sets)")
    ax.set_title("Accuracy vs speed")
    ax.grid(alpha=0.3)
    ax.margins(x=0.3)
    ax.set_ylim(-8, 108)
    return _save(fig, path)


def write_figures(
    out_dir: str | Path, qa: dict[str, Any] | None = None, speed: dict[str, Any] | None = None
) -> list[Path]:
    """Every figure the given results allow, under out_dir; returns the paths written."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    if qa is not None and qa.get("sets"):
        written.append(plot_accuracy(qa, out_dir / "qa_accuracy.png"))
    if speed is not None and speed.get("rows"):
        written.append(plot_throughput(speed, out_dir / "throughput.png"))
    if qa is not None and qa.get("sets") and speed is not None and speed.get("rows"):
        written.append(plot_accuracy_vs_speed(qa, speed, out_dir / "accuracy_vs_speed.png"))
    return written


def figure_links(paths: Sequence[Path], relative_to: str | Path) -> str:
    """Markdown image links to `paths`, relative to the directory of a Markdown file."""
    import os

    base = Path(relative_to).resolve().parent
    return "\n\n".join(f"![{p.stem}]({Path(os.path.relpath(p.resolve(), base)).as_posix()})" for p in paths)
