"""The figures of ``soup report``: matplotlib (Agg), one function a figure, PNG bytes out.

Pure drawing: every function takes plain data prepared by :mod:`search.results.report` and
returns the PNG. Figures are built with :class:`matplotlib.figure.Figure` on an Agg
canvas, never through pyplot, so no global state or display is touched. This is the
only module that imports matplotlib.

Example:
    >>> png = score_by_method([Point(0, 0.5, "linear"), Point(1, 0.7, "ties")], "mean")
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patheffects import withStroke

DPI = 100
# (color, line style, marker) of each kind of baseline; parents take _PARENT_COLORS in turn
_BASELINE_STYLE = {"base": ("#555555", "--", "X"), "uniform soup": ("#1b9e77", "-.", "s"),
                   "greedy soup": ("#d95f02", "-", "*")}
_PARENT_COLORS = ("#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#1f78b4")


@dataclass(frozen=True)
class Point:
    """One scored candidate: its trial, objective, method, baseline tags (their labels) and
    its values (one per objective)."""

    trial: int
    objective: float
    method: str
    tags: tuple[str, ...] = ()
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class Axis:
    """One parallel-coordinates axis: values of the top candidates, scaled to [0, 1].

    ``ticks`` are (position, text) pairs drawn on the axis (the range or the categories).
    """

    name: str
    scaled: tuple[float, ...]
    ticks: tuple[tuple[float, str], ...]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _spread(ys: Sequence[float], gap: float) -> list[float]:
    """Positions near ``ys`` (sorted input order kept) at least ``gap`` apart."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = list(ys)
    for prev, cur in itertools.pairwise(order):
        out[cur] = max(out[cur], out[prev] + gap)
    return out


def _label(p: Point) -> str:
    return " = ".join(p.tags)


def _styles(baselines: Sequence[Point]) -> list[tuple[str, str, str]]:
    """(color, line style, marker) of each baseline, the same in every figure."""
    parents = iter(_PARENT_COLORS)
    out = []
    for p in baselines:
        kind = next((k for k in _BASELINE_STYLE if _label(p).startswith(k)), "")
        out.append(_BASELINE_STYLE.get(kind) or (next(parents, "#333333"), ":", "^"))
    return out


def score_over_trials(points: Sequence[Point], baselines: Sequence[Point], ylabel: str,
                      maximize: bool = True) -> bytes:
    """Objective of each candidate, the best so far, and the baselines as labelled lines."""
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    ax = fig.add_subplot()
    pts = sorted(points, key=lambda p: p.trial)
    searched = [p for p in pts if not p.tags]
    fixed = [p for p in pts if p.tags]
    ax.scatter([p.trial for p in searched], [p.objective for p in searched], s=18,
               color="#4c72b0", alpha=0.7, label="searched candidate")
    ax.scatter([p.trial for p in fixed], [p.objective for p in fixed], s=22, marker="D",
               color="#999999", alpha=0.9, label="baseline trial")
    best = itertools.accumulate((p.objective for p in pts), max if maximize else min)
    ax.step([p.trial for p in pts], list(best), where="post", color="#c44e52", lw=2,
            label="best so far")
    for p, (color, style, _) in zip(baselines, _styles(baselines), strict=True):
        ax.axhline(p.objective, color=color, ls=style, lw=1.3, alpha=0.9)
    lo, hi = ax.get_ylim()
    placed = _spread([p.objective for p in baselines], (hi - lo) * 0.045)
    for p, y in zip(baselines, placed, strict=True):
        ax.annotate(f"{_label(p)}  {p.objective:.3f}", xy=(1.0, p.objective),
                    xycoords=("axes fraction", "data"), xytext=(1.01, y),
                    textcoords=("axes fraction", "data"), fontsize=8.5, va="center",
                    arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6})
    ax.set(ylim=(lo, max([hi, *placed])), xlabel="trial", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8.5, framealpha=0.9)
    return _png(fig)


def score_by_method(points: Sequence[Point], ylabel: str) -> bytes:
    """Box and strip plot of the objective per merge method, best method on top."""
    groups: dict[str, list[float]] = {}
    for p in points:
        groups.setdefault(p.method, []).append(p.objective)
    names = sorted(groups, key=lambda m: (max(groups[m]), m))
    fig = Figure(figsize=(9, 1.2 + 0.5 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    data = [groups[m] for m in names]
    ax.boxplot(data, orientation="horizontal", widths=0.55, showfliers=False,
               medianprops={"color": "#c44e52"}, boxprops={"color": "#666666"})
    for i, vals in enumerate(data, 1):
        jitter = [((k * 0.618) % 1.0 - 0.5) * 0.35 for k in range(len(vals))]
        ax.scatter(vals, [i + j for j in jitter], s=14, alpha=0.65, color="#4c72b0", zorder=3)
    ax.set_yticks(range(1, len(names) + 1), [f"{m} (n={len(groups[m])})" for m in names])
    ax.set_xlabel(ylabel)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def importance(panels: Sequence[tuple[str, dict[str, float]]], title: str,
               top: int = 10) -> bytes:
    """Horizontal bars of parameter importances, one panel per method."""
    fig = Figure(figsize=(max(7.0, 5 * len(panels) + 0.5), 1.8 + 0.38 * top),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, values) in zip(axes, panels, strict=True):
        items = sorted(values.items(), key=lambda kv: kv[1])[-top:]
        ax.barh([k for k, _ in items], [v for _, v in items], color="#4c72b0")
        ax.set_title(name, fontsize=10)
        ax.set(xlabel="importance (share)", xlim=(0, max(1e-9, max(v for _, v in items)) * 1.15))
        ax.tick_params(axis="y", labelsize=8.5)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10.5)
    return _png(fig)


def parallel(axes: Sequence[Axis], scores: Sequence[float], ylabel: str) -> bytes:
    """Parallel coordinates of the top candidates, coloured by score (best drawn last)."""
    fig = Figure(figsize=(max(7.0, 1.05 * len(axes) + 2.5), 5.6), layout="constrained")
    ax = fig.add_subplot()
    norm = Normalize(min(scores), max(scores) if max(scores) > min(scores) else min(scores) + 1)
    cmap = fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=ylabel,
                        pad=0.01).cmap
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    for rank, i in enumerate(order):
        ys = [a.scaled[i] for a in axes]
        best = rank == len(order) - 1
        ax.plot(range(len(axes)), ys, color=cmap(norm(scores[i])), lw=2.6 if best else 1.3,
                alpha=1.0 if best else 0.75, marker="o", ms=3, zorder=2 + rank,
                path_effects=[withStroke(linewidth=4.2, foreground="black")] if best else [])
    for x, a in enumerate(axes):
        ax.axvline(x, color="#444444", lw=0.8, zorder=1)
        for pos, text in a.ticks:
            ax.text(x + 0.04, pos, text, fontsize=7.5, va="center", ha="left",
                    color="#333333", zorder=50,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none",
                          "alpha": 0.7})
    ax.set_xticks(range(len(axes)), [a.name.replace(".", "\n", 1) for a in axes], fontsize=8.5)
    ax.set(yticks=[], xlim=(-0.3, len(axes) - 0.4), ylim=(-0.06, 1.06))
    ax.spines[["top", "right", "left"]].set_visible(False)
    return _png(fig)


def pareto(points: Sequence[Point], front: set[int], names: Sequence[str],
           baselines: Sequence[Point] = ()) -> bytes:
    """The Pareto front: one scatter for two objectives, every pair for more."""
    pairs = list(itertools.combinations(range(len(names)), 2))
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    size = (7.5, 6.0) if len(pairs) == 1 else (4.6 * cols + 0.6, 4.3 * rows + 0.8)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    on = [p for p in points if p.trial in front]
    off = [p for p in points if p.trial not in front]
    for ax, (i, j) in zip(axes, pairs, strict=False):
        ax.scatter([p.values[i] for p in off], [p.values[j] for p in off], s=16,
                   color="#9aa7b8", alpha=0.7, label="dominated")
        ax.scatter([p.values[i] for p in on], [p.values[j] for p in on], s=34,
                   color="#c44e52", edgecolor="black", lw=0.5, zorder=3, label="Pareto front")
        if len(names) == 2:
            line = sorted((p.values[i], p.values[j]) for p in on)
            ax.plot([a for a, _ in line], [b for _, b in line], color="#c44e52", lw=1,
                    zorder=2)
        for p, (color, _, marker) in zip(baselines, _styles(baselines), strict=True):
            ax.scatter([p.values[i]], [p.values[j]], s=110, marker=marker, color=color,
                       edgecolor="black", lw=0.6, zorder=4, label=_label(p))
        ax.set(xlabel=names[i], ylabel=names[j])
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)),
               fontsize=8.5, frameon=False)
    return _png(fig)
