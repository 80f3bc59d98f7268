"""The leaderboard: a pure read of the study, as a table, CSV, JSON or Markdown.

Search scores (the fitness data the sampler saw) and held-out scores (``soup evaluate``,
stored in the study's user attributes ``heldout.<trial>``) are separate columns, never
mixed: held-out columns carry a ``test:`` prefix, and ``test:objective`` is the held-out
weighted mean. The footer (and the JSON's ``columns``) says which columns are which.

Example:
    >>> board = Leaderboard.from_study(study)                  # doctest: +SKIP
    >>> print(board.render("table", top=10))                  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import study as st
from search.names import name_map
from search.recipe import Recipe

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
    """``w=0.52/0.31 d=0.50/0.70 λ=1.12``: per-model values joined by ``/``, by the specs'
    symbols; a lone model's weight is left out where normalizing cancels it (a parent)."""
    from search.merge.methods import REGISTRY, param_spec  # torch: not at module import

    method = REGISTRY.get(recipe.merge_method)
    cancels = len(recipe.models) == 1 and method is not None \
        and method.normalizes(recipe.parameters)
    parts = []
    per_model: dict[str, list[str]] = {}
    for m in recipe.models:
        for k, v in m.parameters.items():
            per_model.setdefault(k, []).append(_fmt(v))
    for k, vals in per_model.items():
        spec = param_spec(recipe.merge_method, k)
        if cancels and spec is not None and spec.left_out is not None:
            continue
        parts.append(f"{spec.label if spec else k}={'/'.join(vals)}")
    for k, v in recipe.parameters.items():
        spec = param_spec(recipe.merge_method, k)
        parts.append(f"{spec.label if spec else k}={_fmt(v)}")
    return " ".join(parts)


TEST = "test:"  # prefix of the held-out columns
HELDOUT_MEAN = "objective"  # test:objective, the held-out weighted mean


@dataclass
class Leaderboard:
    """Rows of finished candidates plus counts of the rest.

    Attributes:
        rows: one dict per completed, non-duplicate trial, best first.
        tasks: the search's tasks (their scores are the sampler's fitness data).
        heldout: the held-out tasks that ``soup evaluate`` scored, in first-seen order.
        counts: trials by outcome (see :func:`search.study.counts`), plus ``duplicates``.
        failures: the most common failure reasons of failed trials, with counts.
        names: each model's short name, as the ``models`` column shows it.
    """

    rows: list[dict[str, Any]]
    tasks: list[str]
    heldout: list[str]
    counts: dict[str, int]
    failures: list[tuple[str, int]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_study(cls, study: optuna.Study, sort: str | None = None) -> Leaderboard:
        """Reads every trial once; ``sort`` is a task, ``test:<task>`` or ``test:objective``
        (default: the search objective)."""
        trials = study.get_trials(deepcopy=False)
        attrs = study.user_attrs
        tasks = list(attrs.get("search", {}).get("tasks", []))
        greedy = (attrs.get("baselines.greedy") or {}).get("trial")
        held = st.heldout_scores(attrs)
        done = [(t, Recipe.from_dict(t.user_attrs[st.ATTR_RECIPE])) for t in trials
                if t.state == TrialState.COMPLETE and t.user_attrs.get("duplicate_of") is None]
        meta = attrs.get("search") or {}  # experts first: they keep the space's names
        others = [str(meta.get("base") or ""), *(m for _, r in done for m in r.model_names)]
        names = name_map([str(e) for e in meta.get("experts") or []], filter(None, others))
        rows = [_row(t, r, names, greedy, held.get(t.number)) for t, r in done]
        heldout: list[str] = []
        for r in rows:
            for name in r["heldout_tasks"]:
                if name not in heldout:
                    heldout.append(name)
        rows.sort(key=_order(sort, tasks, heldout))
        for i, r in enumerate(rows, 1):
            r["rank"] = i
        reasons = Counter(str(t.user_attrs.get(st.ATTR_ERROR, "?")).split(":")[0]
                          for t in trials if t.state == TrialState.FAIL
                          and not t.user_attrs.get(st.ATTR_REQUEUED)
                          and not t.user_attrs.get("surplus"))
        counts = st.counts(trials)
        counts["duplicates"] = sum(1 for t in trials if t.user_attrs.get("duplicate_of")
                                   is not None)
        return cls(rows, tasks, heldout, counts, reasons.most_common(3), names)

    def columns(self) -> dict[str, list[str]]:
        """Which columns hold search scores and which hold held-out scores."""
        test = [f"{TEST}{h}" for h in self.heldout]
        return {"search": ["objective", *self.tasks],
                "heldout": [*test, f"{TEST}{HELDOUT_MEAN}"] if test else []}

    def render(self, fmt: str = "table", top: int | None = 10) -> str:
        """The leaderboard in ``fmt`` (one of :data:`FORMATS`); ``top`` 0/None = all rows."""
        rows = self.rows[:top] if top else self.rows
        if fmt == "json":
            return json.dumps({"rows": rows, "tasks": self.tasks, "heldout": self.heldout,
                               "columns": self.columns(), "counts": self.counts,
                               "failures": [{"reason": r, "count": n}
                                            for r, n in self.failures]}, indent=2)
        cols = self.columns()
        header = ["rank", "trial", "baseline", "method", "models", "params",
                  *cols["search"], *cols["heldout"], "time_s"]
        table = [self._cells(r) for r in rows]
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
        return _aligned(header, table) + "\n" + self.footer() + "\n"

    def _cells(self, r: dict[str, Any]) -> list[str]:
        held = [_opt(r["heldout"].get(h)) for h in self.heldout]
        if self.heldout:
            held.append("error" if r["heldout_error"] else _opt(r["heldout_objective"]))
        return [str(r["rank"]), str(r["trial"]), r["baseline"], r["method"], r["models"],
                r["params"], f"{r['objective']:.4f}",
                *(f"{r['metrics'].get(t, float('nan')):.4f}" for t in self.tasks),
                *held, f"{r['time_s']:.2f}"]

    def footer(self) -> str:
        """Counts of the trials not in the table, failure reasons, and a column legend."""
        c = self.counts
        text = (f"{c['complete']} complete ({c.get('duplicates', 0)} reused), "
                f"{c['running']} running, {c['pruned']} pruned, {c['failed']} failed, "
                f"{c['waiting']} waiting, {c['requeued']} retried")
        if self.failures:
            text += "; failures: " + ", ".join(f"{r} ×{n}" for r, n in self.failures)
        search = ", ".join(self.columns()["search"])
        if not self.heldout:
            return text + (f"\ncolumns: {search} = search scores; no held-out scores yet "
                           "(soup evaluate RUN_DIR)")
        done = sum(1 for r in self.rows if r["heldout_objective"] is not None)
        text += (f"\ncolumns: {search} = search scores (the sampler's fitness data); "
                 f"{TEST}* = held-out scores from `soup evaluate` ({done} scored), "
                 "never seen by the search")
        failed = [r for r in self.rows if r["heldout_error"]]
        if failed:
            text += (f"\nheld-out evaluation failed for trial "
                     f"{', '.join(str(r['trial']) for r in failed)}: {failed[0]['heldout_error']}")
        return text


def _order(sort: str | None, tasks: list[str], heldout: list[str]) -> Any:
    """The row sort key for ``sort``; rows without that value come last."""
    key = sort or "objective"
    held = [f"{TEST}{h}" for h in heldout] + ([f"{TEST}{HELDOUT_MEAN}"] if heldout else [])
    if key != "objective" and key not in tasks and key not in held:
        raise ValueError(f"--sort {key!r}: not a column of this study; use objective, a task "
                         f"({', '.join(tasks) or 'none'}) or a held-out column "
                         f"({', '.join(held) or 'none yet: run soup evaluate'})")

    def value(r: dict[str, Any]) -> float | None:
        if key == "objective":
            return float(r["objective"])
        if key == f"{TEST}{HELDOUT_MEAN}":
            return r["heldout_objective"]
        if key.startswith(TEST) and key not in tasks:
            return r["heldout"].get(key[len(TEST):])
        return r["metrics"].get(key)

    def order(r: dict[str, Any]) -> tuple[bool, float, int]:
        v = value(r)
        return (v is None, -float(v) if v is not None else 0.0, r["trial"])

    return order


def _aligned(header: list[str], table: list[list[str]]) -> str:
    """A plain-text table; the params column is capped at 48 characters."""
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h)
              for i, h in enumerate(header)]
    widths[5] = min(widths[5], 48)
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    for row in table:
        cells = [c if len(c) <= w else c[: w - 1] + "…" for c, w in
                 zip(row, widths, strict=True)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def _opt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _row(t: FrozenTrial, recipe: Recipe, names: dict[str, str], greedy: int | None,
         held: dict[str, Any] | None) -> dict[str, Any]:
    scores = t.user_attrs.get(st.ATTR_SCORES) or {}
    tags = []
    tag = t.user_attrs.get(st.ATTR_BASELINE)
    if tag and tag != "greedy_step":
        tags.append(tag)
    if t.number == greedy:
        tags.append("greedy_soup")
    held = held or {}
    metrics = {k: float(v) for k, v in (held.get("metrics") or {}).items()}
    objective = held.get("objective")
    timings = scores.get("timings") or {}
    return {
        "rank": 0, "trial": t.number,
        "baseline": ",".join(tags),
        "method": recipe.merge_method, "models": "+".join(names[m] for m in recipe.model_names),
        "params": short_params(recipe),
        "objective": float(scores.get("objective", t.values[0] if t.values else float("nan"))),
        "metrics": dict(scores.get("metrics", {})),
        "heldout": metrics,
        "heldout_objective": None if objective is None or held.get("error") else float(objective),
        "heldout_error": held.get("error"),
        "heldout_tasks": list(held.get("tasks") or metrics),
        "time_s": float(timings.get("total", 0.0)) + float(timings.get("merge", 0.0)),
        "recipe_hash": recipe.hash(),
    }
