"""Held-out evaluation: the best candidates and the baselines, scored on the test splits.

The search's tasks are its fitness data. ``soup evaluate`` scores the top distinct
candidates of the leaderboard and the baselines (base, parents, uniform soup, greedy
soup) on other tasks, the run's ``evaluator.heldout`` or ``--tasks``, with one worker
that loads the parents once and merges each recipe in place. Finished Optuna trials are
read-only, so each result is a study user attribute ``heldout.<trial>`` (see
:func:`search.study.heldout_key`); a candidate that fails gets its error stored there,
never a score. The leaderboard shows the results as ``test:`` columns.

Example:
    >>> outcomes = evaluate_run("runs/demo", EvaluateOptions(top=3))   # doctest: +SKIP
    >>> [(o.candidate.trial, o.status) for o in outcomes]               # doctest: +SKIP
    [(41, 'evaluated'), (17, 'evaluated'), (0, 'skipped'), ...]
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from search import study as st
from search.config import EvaluatorConfig, SearchConfig, TaskConfig
from search.errors import SoupError
from search.recipe import Recipe
from search.results.leaderboard import Leaderboard
from search.run import baselines as bl
from search.run.worker import Worker, WorkerSetup

BASELINE_TAGS = (bl.BASE, bl.PARENT, bl.UNIFORM, bl.GREEDY)


@dataclass(frozen=True)
class EvaluateOptions:
    """What ``soup evaluate`` scores and how.

    Attributes:
        top: the leaderboard's best K distinct candidates (baselines count as rows).
        tasks: task names (default: the run's ``evaluator.heldout``).
        baselines: also score the baselines that are not in the top K.
        force: re-score trials already evaluated on the same tasks.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (default: the run's).
        progress: show a progress bar on stderr.
    """

    top: int = 5
    tasks: tuple[str, ...] = ()
    baselines: bool = True
    force: bool = False
    device: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class Candidate:
    """One recipe to score: its trial, leaderboard rank, baseline tags and recipe."""

    trial: int
    rank: int
    tags: str
    recipe: Recipe


@dataclass(frozen=True)
class Outcome:
    """What happened to a candidate: ``evaluated``, ``skipped`` or ``failed``."""

    candidate: Candidate
    status: str
    record: dict[str, Any]


def open_run(run_dir: str | Path | None, storage: str | None = None,
             study_name: str | None = None) -> tuple[optuna.Study, SearchConfig | None]:
    """The study of a run folder (with its config), or of ``storage`` + ``study_name``.

    A run folder's SQLite or journal storage is looked up in that folder, so a copied or
    moved run folder reads its own study.
    """
    from search import config

    if storage and run_dir:
        raise SoupError("give RUN_DIR, or --storage URL --study NAME, not both")
    if storage:
        if not study_name:
            raise SoupError("--storage needs --study NAME")
        return st.open_study(storage, study_name, [], create=False), None
    if not run_dir:
        raise SoupError("give RUN_DIR, or --storage URL --study NAME")
    _, cfg = config.load_saved(run_dir, [f"run_dir={Path(run_dir).absolute()}"])
    return st.open_study(cfg.storage.url, cfg.study_name, [], create=False), cfg


def resolve_tasks(cfg: SearchConfig | None, names: Sequence[str]) -> tuple[TaskConfig, ...]:
    """The held-out tasks: ``names`` (with the run's settings for known ones) or the run's."""
    if not names:
        if cfg is None:
            raise SoupError("--storage has no run config to read held-out tasks from; "
                            "give --tasks NAME[,NAME...]")
        if not cfg.evaluator.heldout:
            raise SoupError("the run has no held-out tasks (evaluator.heldout is empty); "
                            "give --tasks NAME[,NAME...]")
        return cfg.evaluator.heldout
    if len(set(names)) != len(names):
        raise SoupError(f"--tasks {','.join(names)}: a task is listed twice; list each once")
    known = {t.name: t for t in cfg.evaluator.heldout} if cfg else {}
    return tuple(known.get(n, TaskConfig(n)) for n in names)


def check_apart(study: optuna.Study, tasks: Sequence[TaskConfig]) -> None:
    """Refuses a search task: its scores are the fitness data, not held-out scores."""
    searched = set(study.user_attrs.get("search", {}).get("tasks", []))
    mixed = [t.name for t in tasks if t.name in searched]
    if mixed:
        raise SoupError(f"task {mixed[0]}: the search scored candidates on it, so it is "
                        "not held out; give --tasks the search did not use (e.g. the test "
                        "splits)")


def check_tasks(tasks: Sequence[TaskConfig], include_path: Sequence[str] = ()) -> None:
    """Fails at once (before loading any model) on a task lm-eval does not know."""
    from evaluators.lm_eval import EvaluatorError, task_manager

    try:
        task_manager([t.name for t in tasks], include_path)
    except EvaluatorError as exc:
        raise SoupError(f"--tasks: {exc}") from None


def _check_top(top: int) -> None:
    if top < 1:
        raise SoupError(f"--top {top}: must be at least 1 (how many of the best candidates "
                        "to evaluate)")


def select(study: optuna.Study, top: int, baselines: bool = True) -> list[Candidate]:
    """The top ``top`` rows of the leaderboard plus the baselines, one per recipe."""
    _check_top(top)
    board = Leaderboard.from_study(study)
    recipes = {t.number: t.user_attrs[st.ATTR_RECIPE] for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    chosen, seen = [], set()
    for row in board.rows:
        is_baseline = any(tag in BASELINE_TAGS for tag in row["baseline"].split(","))
        if row["rank"] > top and not (baselines and is_baseline):
            continue
        if row["recipe_hash"] in seen:
            continue
        seen.add(row["recipe_hash"])
        chosen.append(Candidate(row["trial"], row["rank"], row["baseline"],
                                Recipe.from_dict(recipes[row["trial"]])))
    return chosen


def worker_setup_for(study: optuna.Study, cfg: SearchConfig | None,
                     tasks: tuple[TaskConfig, ...], candidates: Sequence[Candidate],
                     device: str | None = None) -> WorkerSetup:
    """The worker for ``tasks``: the run's parents, plus any other model a recipe names."""
    from search.results.export import run_models

    named = [m for c in candidates for m in (c.recipe.base_model, *c.recipe.model_names) if m]
    models = run_models(study, cfg, named, device)
    extra = [m for m in dict.fromkeys(named) if m not in models.paths]
    models = dataclasses.replace(models, experts=(*models.experts, *extra))
    if cfg is None:
        return WorkerSetup(models, EvaluatorConfig(tasks))
    evaluator = dataclasses.replace(cfg.evaluator, tasks=tasks, stages=(1.0,))
    return WorkerSetup(models, evaluator, cfg.parallel.threads_per_worker)


def _done(record: dict[str, Any] | None, names: list[str]) -> bool:
    """Whether ``record`` already holds scores (not an error) for exactly ``names``."""
    if not record or record.get("error"):
        return False
    return sorted(record.get("tasks") or []) == sorted(names)


def _score(worker: Any, c: Candidate, names: list[str]) -> dict[str, Any]:
    """Evaluates one candidate; the record to store (scores, or the error)."""
    t0 = time.perf_counter()
    result = worker.start(c.recipe.to_dict())
    while result.ok and not result.final:
        result = worker.advance()
    record: dict[str, Any] = {"tasks": names, "time_s": round(time.perf_counter() - t0, 4),
                              "at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                  timespec="seconds")}
    if not result.ok:
        return {"error": str(result.error), **record}
    return {"metrics": {k: float(v) for k, v in result.metrics.items()},
            "objective": float(result.objective), "n_docs": dict(result.n_docs),
            **record}


def evaluate_study(study: optuna.Study, setup: WorkerSetup, candidates: Sequence[Candidate],
                   opts: EvaluateOptions,
                   make_worker: Callable[[WorkerSetup], Any] = Worker) -> list[Outcome]:
    """Scores ``candidates`` one after another and stores each record in the study."""
    from tqdm.auto import tqdm

    names = [t.name for t in setup.evaluator.tasks]
    stored = st.heldout_scores(study.user_attrs)
    outcomes = {c.trial: Outcome(c, "skipped", stored[c.trial]) for c in candidates
                if not opts.force and _done(stored.get(c.trial), names)}
    todo = [c for c in candidates if c.trial not in outcomes]
    if todo:
        bar = tqdm(total=len(todo), desc="held-out", unit="model", file=sys.stderr,
                   disable=not opts.progress, dynamic_ncols=True)
        bar.set_postfix_str("loading the parents")
        try:
            worker = make_worker(setup)
            error = worker.ready().error
            if error:
                raise SoupError(f"evaluation set-up failed: {error}; check the parents the "
                                "recipes name and the tasks")
            for c in todo:
                bar.set_postfix_str(f"trial {c.trial}")
                record = _score(worker, c, names)
                study.set_user_attr(st.heldout_key(c.trial), record)
                status = "failed" if "error" in record else "evaluated"
                outcomes[c.trial] = Outcome(c, status, record)
                bar.update(1)
        finally:
            bar.close()
    return [outcomes[c.trial] for c in candidates]


def evaluate_run(run_dir: str | Path | None, opts: EvaluateOptions, storage: str | None = None,
                 study_name: str | None = None) -> list[Outcome]:
    """``soup evaluate``: checks the inputs, then scores and stores the held-out records.

    Example:
        >>> outcomes = evaluate_run("runs/demo", EvaluateOptions(top=2))  # doctest: +SKIP
        >>> outcomes[0].record["metrics"]                                  # doctest: +SKIP
        {'soup_add_test': 0.81, 'soup_dup_test': 0.62}
    """
    _check_top(opts.top)
    study, cfg = open_run(run_dir, storage, study_name)
    tasks = resolve_tasks(cfg, opts.tasks)
    check_apart(study, tasks)
    candidates = select(study, opts.top, opts.baselines)
    if not candidates:
        raise SoupError("the study has no completed trials to evaluate yet; run or resume "
                        "the search first")
    setup = worker_setup_for(study, cfg, tasks, candidates, opts.device)
    names = [t.name for t in tasks]
    stored = st.heldout_scores(study.user_attrs)
    if opts.force or not all(_done(stored.get(c.trial), names) for c in candidates):
        check_tasks(tasks, setup.evaluator.include_path)
    return evaluate_study(study, setup, candidates, opts)


def describe(outcome: Outcome) -> str:
    """One line per candidate for the terminal."""
    c, rec = outcome.candidate, outcome.record
    label = f"trial {c.trial} (rank {c.rank}{', ' + c.tags if c.tags else ''})"
    if outcome.status == "failed":
        return f"{label}: failed: {rec['error']}"
    scores = " ".join(f"{k}={v:.4f}" for k, v in rec["metrics"].items())
    note = "  (already evaluated; --force to redo)" if outcome.status == "skipped" else \
        f"  [{rec['time_s']:.1f} s]"
    return f"{label}: {scores} mean={rec['objective']:.4f}{note}"
