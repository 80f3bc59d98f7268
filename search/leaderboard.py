"""The leaderboard: a pure read of the study, as a table, CSV, JSON or Markdown.

Search scores (the fitness data the sampler saw) and held-out scores (``soup evaluate``)
are separate columns, never mixed: held-out columns carry a ``test:`` prefix.

Example:
    >>> board = Leaderboard.from_study(study)                  # doctest: +SKIP
    >>> print(board.render("table", top=10))
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import study as st
from search.recipe import Recipe

SYMBOL = {"lambda": "λ", "weight": "w", "density": "d", "epsilon": "ε", "gamma": "γ", "t": "t"}
FORMATS = ("table", "csv", "json", "markdown")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:.2f}"
    if isinstance(value, list) and value and not isinstance(value[0], dict):
        return "→".join(f"{v:.2f}" for v in value)
    return "…"


def short_params(recipe: Recipe) -> str:
    """``w=0.52/0.31 d=0.50/0.70 λ=1.12``: per-model values joined by ``/``."""
    parts = []
    per_model: dict[str, list[str]] = {}
    for m in recipe.models:
        for k, v in m.parameters.items():
            per_model.setdefault(k, []).append(_fmt(v))
    n = len(recipe.models)
    for k, vals in per_model.items():
        if n == 1 and k == "weight":
            continue
        parts.append(f"{SYMBOL.get(k, k)}={'/'.join(vals)}")
    for k, v in recipe.parameters.items():
        parts.append(f"{SYMBOL.get(k, k)}={_fmt(v)}")
    return " ".join(parts)


def _models_text(recipe: Recipe) -> str:
    return "+".join(os.path.basename(m.model.rstrip("/")) for m in recipe.models)


@dataclass
class Leaderboard:
    """Rows of finished candidates plus counts of the rest."""

    rows: list[dict[str, Any]]
    tasks: list[str]
    heldout: list[str]
    counts: dict[str, int]
    failures: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def from_study(cls, study: optuna.Study, sort: str | None = None) -> Leaderboard:
        """Reads every trial once; ``sort`` is a task name (default: the objective)."""
        trials = study.get_trials(deepcopy=False)
        meta = study.user_attrs.get("search", {})
        tasks = list(meta.get("tasks", []))
        greedy = (study.user_attrs.get("baselines.greedy") or {}).get("trial")
        heldout: list[str] = []
        rows = []
        for t in trials:
            if t.state != TrialState.COMPLETE or t.user_attrs.get("duplicate_of") is not None:
                continue
            row = _row(t, greedy)
            for name in row["heldout"]:
                if name not in heldout:
                    heldout.append(name)
            rows.append(row)
        key = sort or "objective"
        if sort and sort not in tasks:
            raise ValueError(f"--sort {sort!r}: not a task of this study; tasks: {tasks}")

        def order(r: dict[str, Any]) -> tuple[float, int]:
            value = r["objective"] if key == "objective" else r["metrics"].get(key, -1.0)
            return (-float(value), r["trial"])

        rows.sort(key=order)
        for i, r in enumerate(rows, 1):
            r["rank"] = i
        reasons = Counter(str(t.user_attrs.get(st.ATTR_ERROR, "?")).split(":")[0]
                          for t in trials if t.state == TrialState.FAIL
                          and not t.user_attrs.get(st.ATTR_REQUEUED)
                          and not t.user_attrs.get("surplus"))
        counts = st.counts(trials)
        counts["duplicates"] = sum(1 for t in trials if t.user_attrs.get("duplicate_of")
                                   is not None)
        return cls(rows, tasks, heldout, counts, reasons.most_common(3))

    def render(self, fmt: str = "table", top: int | None = 10) -> str:
        """The leaderboard in ``fmt`` (one of :data:`FORMATS`)."""
        rows = self.rows[:top] if top else self.rows
        if fmt == "json":
            return json.dumps({"rows": rows, "tasks": self.tasks, "heldout": self.heldout,
                               "counts": self.counts,
                               "failures": [{"reason": r, "count": n}
                                            for r, n in self.failures]}, indent=2)
        header = ["rank", "trial", "baseline", "method", "models", "params", "objective",
                  *self.tasks, *(f"test:{h}" for h in self.heldout), "time_s"]
        table = [[str(r["rank"]), str(r["trial"]), r["baseline"], r["method"], r["models"],
                  r["params"], f"{r['objective']:.4f}",
                  *(f"{r['metrics'].get(t, float('nan')):.4f}" for t in self.tasks),
                  *(_opt(r["heldout"].get(h)) for h in self.heldout),
                  f"{r['time_s']:.2f}"] for r in rows]
        if fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(header)
            writer.writerows(table)
            return buf.getvalue()
        if fmt == "markdown":
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                      for row in table]
            return "\n".join(lines) + "\n\n" + self.footer() + "\n"
        if fmt != "table":
            raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
        widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h)
                  for i, h in enumerate(header)]
        widths[5] = min(widths[5], 48)
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        for row in table:
            cells = [c if len(c) <= w else c[: w - 1] + "…" for c, w in
                     zip(row, widths, strict=True)]
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
        return "\n".join(lines) + "\n" + self.footer() + "\n"

    def footer(self) -> str:
        """Counts of the trials not in the table, and the common failure reasons."""
        c = self.counts
        text = (f"{c['complete']} complete ({c.get('duplicates', 0)} reused), "
                f"{c['running']} running, {c['pruned']} pruned, {c['failed']} failed, "
                f"{c['waiting']} waiting, {c['requeued']} retried")
        if self.failures:
            text += "; failures: " + ", ".join(f"{r} ×{n}" for r, n in self.failures)
        if self.heldout:
            text += "\nobjective and task columns: search (val) scores; test:* columns: " \
                    "held-out scores from `soup evaluate`"
        return text


def _opt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _row(t: FrozenTrial, greedy: int | None) -> dict[str, Any]:
    recipe = Recipe.from_dict(t.user_attrs[st.ATTR_RECIPE])
    scores = t.user_attrs.get(st.ATTR_SCORES) or {}
    tags = []
    tag = t.user_attrs.get(st.ATTR_BASELINE)
    if tag and tag != "greedy_step":
        tags.append(tag)
    if t.number == greedy:
        tags.append("greedy_soup")
    held = t.user_attrs.get("heldout") or {}
    return {
        "rank": 0, "trial": t.number,
        "baseline": ",".join(tags),
        "method": recipe.merge_method, "models": _models_text(recipe),
        "params": short_params(recipe),
        "objective": float(scores.get("objective", t.values[0] if t.values else float("nan"))),
        "metrics": dict(scores.get("metrics", {})),
        "heldout": {k: float(v) for k, v in (held.get("metrics") or {}).items()},
        "time_s": float((scores.get("timings") or {}).get("total", 0.0))
        + float((scores.get("timings") or {}).get("merge", 0.0)),
        "recipe_hash": recipe.hash(),
    }
