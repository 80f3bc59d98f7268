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
from search.results import stats

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
    values: dict[str, list[str]] = {}
    for m in recipe.models:
        for k, v in m.parameters.items():
            values.setdefault(k, []).append(_fmt(v))
    parts = []  # only a per-model spec has a left-out value
    for k, vals in [*values.items(), *((k, [_fmt(v)]) for k, v in recipe.parameters.items())]:
        spec = param_spec(recipe.merge_method, k)
        if not (cancels and spec is not None and spec.left_out is not None):
            parts.append(f"{spec.label if spec else k}={'/'.join(vals)}")
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
        per_doc: trial number -> its per-document search scores (trials that stored them),
            for the 95% intervals and the winner's paired comparisons.
    """

    rows: list[dict[str, Any]]
    tasks: list[str]
    heldout: list[str]
    counts: dict[str, int]
    failures: list[tuple[str, int]]
    names: dict[str, str]
    per_doc: dict[int, dict[str, list[float]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_study(cls, study: optuna.Study, sort: str | None = None) -> Leaderboard:
        """Reads every trial once; ``sort`` is a task, ``test:<task>`` or ``test:objective``
        (default: the search objective)."""
        trials = study.get_trials(deepcopy=False)
        attrs = study.user_attrs
        meta = attrs.get("search") or {}
        greedy = (attrs.get("baselines.greedy") or {}).get("trial")
        held = st.heldout_scores(attrs)
        done = [(t, Recipe.from_dict(t.user_attrs[st.ATTR_RECIPE])) for t in trials
                if t.state == TrialState.COMPLETE and t.user_attrs.get("duplicate_of") is None]
        # experts first: they keep the space's names
        others = [str(meta.get("base") or ""), *(m for _, r in done for m in r.model_names)]
        names = name_map([str(e) for e in meta.get("experts") or []], filter(None, others))
        rows = [_row(t, r, names, greedy, held.get(t.number)) for t, r in done]
        reasons = Counter(str(t.user_attrs.get(st.ATTR_ERROR, "?")).split(":")[0]
                          for t in trials if t.state == TrialState.FAIL
                          and not t.user_attrs.get(st.ATTR_REQUEUED)
                          and not t.user_attrs.get("surplus"))
        counts = st.counts(trials)
        counts["duplicates"] = sum(t.user_attrs.get("duplicate_of") is not None for t in trials)
        per_doc = {t.number: t.user_attrs[st.ATTR_PER_DOC] for t, _ in done
                   if st.ATTR_PER_DOC in t.user_attrs}
        board = cls(rows, list(meta.get("tasks", [])),
                    list(dict.fromkeys(h for r in rows for h in r["heldout_tasks"])),
                    counts, reasons.most_common(3), names, per_doc)
        rows.sort(key=_order(sort, board.columns()))
        for i, r in enumerate(rows, 1):
            r["rank"] = i
        return board

    def columns(self) -> dict[str, list[str]]:
        """Which columns hold search scores and which hold held-out scores."""
        test = [f"{TEST}{h}" for h in self.heldout]
        return {"search": ["objective", *self.tasks],
                "heldout": [*test, f"{TEST}{HELDOUT_MEAN}"] if test else []}

    def table(self, top: int | None = 10) -> list[list[str]]:
        """The header and the cells of the ``top`` rows (0/None = all), as text shows them."""
        cols = self.columns()
        header = ["rank", "trial", "baseline", "method", "models", "params",
                  cols["search"][0], "ci95", *cols["search"][1:], *cols["heldout"],
                  "time_s"]
        return [header, *(self._cells(r) for r in (self.rows[:top] if top else self.rows))]

    def render(self, fmt: str = "table", top: int | None = 10) -> str:
        """The leaderboard in ``fmt`` (one of :data:`FORMATS`); ``top`` 0/None = all rows."""
        if fmt == "json":
            return json.dumps({"rows": self.rows[:top] if top else self.rows,
                               "tasks": self.tasks, "heldout": self.heldout,
                               "columns": self.columns(), "counts": self.counts,
                               "failures": [{"reason": r, "count": n}
                                            for r, n in self.failures]}, indent=2)
        table = self.table(top)
        if fmt == "csv":
            buf = io.StringIO()
            csv.writer(buf).writerows(table)
            return buf.getvalue()
        if fmt == "markdown":
            lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table]
            lines.insert(1, "|" + "---|" * len(table[0]))
            return "\n".join(lines) + "\n\n" + self.footer() + "\n"
        if fmt != "table":
            raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
        return _aligned(table) + "\n" + self.footer() + "\n"

    def _cells(self, r: dict[str, Any]) -> list[str]:
        held = [_opt(r["heldout"].get(h)) for h in self.heldout]
        if self.heldout:
            held.append("error" if r["heldout_error"] else _opt(r["heldout_objective"]))
        return [str(r["rank"]), str(r["trial"]), r["baseline"], r["method"], r["models"],
                r["params"], f"{r['objective']:.4f}", self._interval(r),
                *(f"{r['metrics'].get(t, float('nan')):.4f}" for t in self.tasks),
                *held, f"{r['time_s']:.2f}"]

    def _weights(self, number: int) -> dict[str, float] | None:
        """The objective's task weights over ``number``'s per-document scores, if stored."""
        per_doc = self.per_doc.get(number)
        row = next((r for r in self.rows if r["trial"] == number), None)
        if per_doc is None or row is None or not set(self.tasks) <= set(per_doc):
            return None
        return {t: float(row["weights"].get(t, 1.0)) for t in self.tasks}

    def _interval(self, r: dict[str, Any]) -> str:
        weights = self._weights(r["trial"])
        if weights is None:
            return ""
        lo, hi = stats.interval(self.per_doc[r["trial"]], weights, n=1000)
        return f"{lo:.4f}-{hi:.4f}"

    def verdicts(self) -> list[str]:
        """Whether the winner beats the greedy soup and the best parent on the same
        documents (a paired bootstrap), in words; empty without per-document scores."""
        if not self.rows or self._weights(self.rows[0]["trial"]) is None:
            return []
        win = self.rows[0]
        out = []
        for tag, label in (("greedy_soup", "the greedy soup"), ("parent", "the best parent")):
            other = next((r for r in self.rows if tag in r["baseline"].split(",")), None)
            if other is win:
                out.append(f"the winner (trial {win['trial']}) is {label} itself: no "
                           "searched candidate scored higher")
            if other is None or other is win or other["trial"] not in self.per_doc:
                continue
            c = stats.compare(self.per_doc[win["trial"]], self.per_doc[other["trial"]],
                              self._weights(win["trial"]) or {})
            out.append(c.words(f"the winner (trial {win['trial']})",
                               f"{label} (trial {other['trial']})"))
        return out

    def tally(self) -> str:
        """The trials by outcome, as the footer and the report's facts say it."""
        c = self.counts
        return (f"{c['complete']} complete ({c.get('duplicates', 0)} reused), "
                f"{c['running']} running, {c['pruned']} pruned, {c['failed']} failed, "
                f"{c['waiting']} waiting, {c['requeued']} retried")

    def footer(self) -> str:
        """Counts of the trials not in the table, failure reasons, and a column legend."""
        text = self.tally()
        if self.failures:
            text += "; failures: " + ", ".join(f"{r} ×{n}" for r, n in self.failures)
        text += "".join(f"\n{v} (search scores, paired bootstrap)" for v in self.verdicts())
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


def _order(sort: str | None, columns: dict[str, list[str]]) -> Any:
    """The row sort key for ``sort`` (a column of :meth:`Leaderboard.columns`); rows without
    that value come last."""
    key = sort or "objective"
    tasks, held = columns["search"][1:], columns["heldout"]
    if key not in columns["search"] and key not in held:
        raise ValueError(f"--sort {key!r}: not a column of this study; use objective, a task "
                         f"({', '.join(tasks) or 'none'}) or a held-out column "
                         f"({', '.join(held) or 'none yet: run soup evaluate'})")

    def order(r: dict[str, Any]) -> tuple[bool, float, int]:
        if key == "objective":
            v = r["objective"]
        elif key == f"{TEST}{HELDOUT_MEAN}":
            v = r["heldout_objective"]
        elif key.startswith(TEST) and key not in tasks:
            v = r["heldout"].get(key[len(TEST):])
        else:
            v = r["metrics"].get(key)
        return (v is None, -float(v) if v is not None else 0.0, r["trial"])

    return order


def _aligned(table: list[list[str]]) -> str:
    """A plain-text table (header first); the params column is capped at 48 characters."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    widths[5] = min(widths[5], 48)
    lines = []
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
    tag = t.user_attrs.get(st.ATTR_BASELINE)
    tags = [tag] if tag and tag != "greedy_step" else []
    tags += ["greedy_soup"] if t.number == greedy else []
    held = held or {}
    metrics = {k: float(v) for k, v in (held.get("metrics") or {}).items()}
    objective = held.get("objective")
    timings = scores.get("timings") or {}
    return {
        "rank": 0, "trial": t.number, "baseline": ",".join(tags),
        "method": recipe.merge_method, "models": "+".join(names[m] for m in recipe.model_names),
        "params": short_params(recipe),
        "objective": float(scores.get("objective", t.values[0] if t.values else float("nan"))),
        "metrics": dict(scores.get("metrics", {})),
        "weights": dict(scores.get("weights", {})),
        "heldout": metrics,
        "heldout_objective": None if objective is None or held.get("error") else float(objective),
        "heldout_error": held.get("error"),
        "heldout_tasks": list(held.get("tasks") or metrics),
        "time_s": float(timings.get("total", 0.0)) + float(timings.get("merge", 0.0)),
        "recipe_hash": recipe.hash(),
    }
