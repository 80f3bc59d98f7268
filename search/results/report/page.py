"""``soup report``: an offline HTML report of a study, with its figures as PNG files.

A pure read of the study. The report folder holds ``index.html`` (self-contained: the
figures are embedded as base64 data URIs; no script, no external URL) and the same
figures as PNG files. It is built in a temporary sibling folder and renamed into place,
so a reader never sees half a report.

Example:
    >>> write_report(study, "runs/demo/report", storage_url=url)   # doctest: +SKIP
    PosixPath('runs/demo/report')
"""

from __future__ import annotations

import base64
import html
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search import __version__
from search.atomic import replace_folder
from search.errors import OutputExistsError
from search.names import folder_name
from search.results.leaderboard import Leaderboard
from search.results.report import data as rd
from search.results.report import figures as rf
from search.study import redact

TITLES = {
    "score_over_trials": "Best score over trials",
    "score_by_method": "Score by merge method",
    "param_importance": "Parameter importance",
    "parallel_coordinates": "Parameters of the top candidates",
    "pareto_front": "Pareto front",
}
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


@dataclass
class Report:
    """Everything the HTML shows, already computed; ``figures``: file stem → (caption, PNG)."""

    name: str
    storage: str
    facts: list[tuple[str, str]]
    table: list[list[str]]
    footer: str
    figures: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build_report(study: optuna.Study, storage_url: str, top: int = 10) -> Report:
    """Reads the study's trials and draws every figure that they allow."""
    board = Leaderboard.from_study(study)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    meta = study.user_attrs.get("search") or {}
    points = rd.points(board.rows, by_number)
    ylabel = f"objective ({meta.get('objective', 'score')})"
    report = Report(study.study_name, storage_url, _facts(study, storage_url, board, meta),
                    board.table(top), board.footer())
    if not points:
        report.notes.append("No trial has finished yet: no figure to draw. Run "
                            "`soup report` again when some have.")
        return report
    maximize = len(study.directions) > 1 \
        or study.direction == optuna.study.StudyDirection.MAXIMIZE
    caption = ("The objective of each scored candidate by trial number, the best so far, "
               "and the baselines (the base, each parent, the uniform and the greedy soup).")
    if len(study.directions) > 1:
        caption += (f" This study has {len(study.directions)} objectives; the plot shows their "
                    f"{meta.get('objective', 'aggregate')}, the leaderboard's objective.")
    report.figures["score_over_trials"] = (caption, rf.score_over_trials(
        points, rd.baselines(points), ylabel, maximize))
    report.figures["score_by_method"] = (
        "The objective of every scored candidate, by merge method (box: quartiles and "
        "median; baselines are linear soups).", rf.score_by_method(points, ylabel))
    _importance(report, board.rows, by_number)
    _parallel(report, board, by_number, meta, top, ylabel)
    _pareto(report, study, points, meta)
    return report


def _facts(study: optuna.Study, url: str, board: Leaderboard,
           meta: dict[str, Any]) -> list[tuple[str, str]]:
    dirs = [d.name.lower() for d in study.directions]
    directions = dirs[0] if len(dirs) == 1 else f"{len(dirs)} objectives, one per task: " + (
        f"{dirs[0]} each" if len(set(dirs)) == 1 else ", ".join(dirs))
    facts = [("study", study.study_name), ("storage", redact(url)),
             ("objective", f"{meta.get('objective', '?')} of "
                           f"{', '.join(meta.get('tasks', [])) or '?'}; {directions}"),
             ("trials", board.tally())]
    if board.failures:
        facts.append(("failures", ", ".join(f"{r} ×{k}" for r, k in board.failures)))
    for key, models in (("base", [meta["base"]] if meta.get("base") else []),
                        ("experts", meta.get("experts") or [])):
        if models:
            facts.append((key, ", ".join(_named(str(m), board.names) for m in models)))
    return facts


def _named(model: str, names: dict[str, str]) -> str:
    """A model's short name, with its reference where the name is not its folder's."""
    name = names.get(model, folder_name(model))
    return name if name == folder_name(model) else f"{name} ({model})"


def _importance(report: Report, rows: list[dict[str, Any]],
                by_number: dict[int, FrozenTrial]) -> None:
    result = rd.importances(rows, by_number)
    report.notes.extend(result.notes)
    if result.panels:
        title = "Parameter importance within each method (PED-ANOVA, shares sum to 1)"
        if result.method_eta2 is not None:
            title += (f"\nthe choice of method explains {result.method_eta2:.0%} of the "
                      "score variance (η²)")
        report.figures["param_importance"] = (
            "Parameter importance (Optuna's PED-ANOVA) within each of the most-tried methods: "
            "each method has its own parameters, so they are compared only among trials of "
            f"that method (at least {rd.MIN_TRIALS} scored trials). The method choice is "
            "measured by η², the share of the score's variance between methods.",
            rf.importance(result.panels, title))


def _parallel(report: Report, board: Leaderboard, by_number: dict[int, FrozenTrial],
              meta: dict[str, Any], top: int, ylabel: str) -> None:
    chosen = board.rows[:top] if top else board.rows
    axes = rd.parallel_axes(chosen, by_number, meta.get("experts") or [], board.names)
    if len(chosen) < 2 or len(axes) < 2:
        report.notes.append("Parallel coordinates: need two or more candidates with "
                            "parameters; none drawn.")
        return
    report.figures["parallel_coordinates"] = (
        f"Parameters of the top {len(chosen)} candidates (one line each, coloured by score, "
        "best drawn thickest). Each axis is scaled to the range of its values, printed on "
        "it; per-model parameters are named PARAM.MODEL, an expert left out of a soup has "
        "weight 0, and per-layer values are averaged.",
        rf.parallel(axes, [float(r["objective"]) for r in chosen], ylabel))


def _pareto(report: Report, study: optuna.Study, points: list[rf.Point],
            meta: dict[str, Any]) -> None:
    n = len(study.directions)
    if n < 2:
        return
    names = list(study.metric_names or meta.get("tasks") or [])
    if len(names) != n:
        names = [f"objective {i}" for i in range(n)]
    scored = [p for p in points if len(p.values) == n]
    if len(scored) < 2:
        report.notes.append("Pareto front: fewer than two scored candidates; none drawn.")
        return
    report.figures["pareto_front"] = (
        f"The {n} objectives of every scored candidate; red: the Pareto front (no other "
        "candidate is at least as good on every objective and better on one)"
        + (", found in all objectives at once and shown on each pair" if n > 2 else "")
        + "; the baselines have their own markers.",
        rf.pareto(scored, {t.number for t in study.best_trials}, names, rd.baselines(scored)))


_CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px}dt{color:#666}
img{max-width:100%;height:auto}figure{margin:0}figcaption{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:12.5px}th{background:#f3f3f3}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}code{background:#f3f3f3;padding:0 3px}
li.note{margin:.3em 0}p.small{color:#666;font-size:12.5px}
"""


def _table(rows: list[list[str]]) -> str:
    if len(rows) < 2:
        return "<p>No scored candidate yet.</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
    body = ["<tr>" + "".join(f'<td class="n">{html.escape(c)}</td>' if _NUMBER.match(c)
                             else f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in rows[1:]]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page: no script, no external reference."""
    e = html.escape
    facts = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in report.facts)
    url = redact(report.storage)
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>soup report: {e(report.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Merge search report: {e(report.name)}</h1><dl>{facts}</dl>",
             f"<p>Browse the same storage live with <code>optuna-dashboard {e(url)}</code>"
             + (" (put the password back in)" if "***" in url else "") + ".</p>"]
    parts.append(f"<h2 id=\"leaderboard\">Leaderboard (top {len(report.table) - 1})</h2>"
                 f"{_table(report.table)}"
                 f"<p class=\"small\">{e(report.footer).replace(chr(10), '<br>')}</p>")
    for name, (caption, png) in report.figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2 id=\"{name}\">{e(TITLES[name])}</h2><figure>"
                     f"<img src=\"data:image/png;base64,{data}\" alt=\"{e(TITLES[name])}\">"
                     f"<figcaption>{e(caption)} <a href=\"{name}.png\">PNG</a>"
                     "</figcaption></figure>")
    if report.notes:
        parts.append("<h2 id=\"notes\">Notes</h2><ul>"
                     + "".join(f"<li class=\"note\">{e(n)}</li>" for n in report.notes)
                     + "</ul>")
    parts.append(f"<p class=\"small\">Written by soupsearch {e(__version__)} on "
                 f"{datetime.now():%Y-%m-%d %H:%M}.</p></body></html>\n")
    return "\n".join(parts)


def _earlier_report(folder: Path, study_name: str) -> bool:
    """True if ``folder`` holds only what :func:`write_report` wrote for study
    ``study_name`` (its index.html and figures): ``soup report`` then brings it up to date
    without ``--force``. Any other file, or another study's report, needs ``--force``."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    try:
        head = (folder / "index.html").read_text(encoding="utf-8", errors="replace")[:600]
    except OSError:
        return False
    title = f"<title>soup report: {html.escape(study_name)}</title>"
    ours = {"index.html", *(f"{name}.png" for name in TITLES)}
    return title in head and all(p.is_file() and not p.is_symlink() and p.name in ours
                                 for p in folder.iterdir())


def write_report(study: optuna.Study, out_dir: str | Path, *, storage_url: str,
                 top: int = 10, force: bool = False) -> Path:
    """Writes ``index.html`` and the figures' PNG files into ``out_dir``, atomically, and
    returns that folder.

    Args:
        study: the study to report on (only read).
        out_dir: the report folder; it must not exist unless ``force`` or it holds an
            earlier report (index.html and figures only), which is replaced.
        storage_url: the study's storage (shown with its password redacted).
        top: leaderboard rows and parallel-coordinate lines (0 = all).
        force: replace an existing report folder.
    """
    out = Path(out_dir)
    earlier = out.exists() and not force  # this study's earlier report alone: brought up to date
    if earlier and not _earlier_report(out, study.study_name):
        raise OutputExistsError(f"report folder {str(out)!r} exists and is not an earlier "
                                f"report of study {study.study_name!r} alone; pass --force "
                                "to replace it, or --out DIR to write elsewhere")
    report = build_report(study, storage_url, top)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        for name, (_, png) in report.figures.items():
            (tmp / f"{name}.png").write_bytes(png)
        (tmp / "index.html").write_text(render_html(report), encoding="utf-8")
        if earlier and out.exists() and not _earlier_report(out, study.study_name):
            raise OutputExistsError(f"report folder {str(out)!r} changed while the report "
                                    "was written; pass --force to replace it")
        replace_folder(tmp, out, force or earlier, "report folder")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
