"""A worker: the parents and one resident model on a device, plus an evaluator.

It is set up once (the expensive part: loading the parents and the evaluator's tasks)
and then turns recipes into scores. A trial is a short conversation: :meth:`Worker.start`
merges the recipe in place and scores the first stage; :meth:`Worker.advance` scores
the next stage (the driver asks for it only if the pruner lets the trial go on).
Each call returns a :class:`WorkerResult`, a frozen dataclass that pickles across
processes (Ray) unchanged.

The evaluator is the class ``evaluator._target_`` names, built with the contract of
:class:`evaluators.base.Evaluator`.

Example:
    >>> w = Worker(WorkerSetup(ModelsConfig("./base", ("./a", "./b")), evaluator))  # doctest: +SKIP
    >>> w.start(recipe.to_dict())                                             # doctest: +SKIP
    WorkerResult(error=None, kind='', metrics={...}, stage=0, final=True, ...)
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from search.errors import one_line
from search.settings import EvaluatorConfig, ModelsConfig


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker loads once: the parents, how candidates are scored (the tasks,
    stages and the evaluator class with its options), and its torch threads."""

    models: ModelsConfig
    evaluator: EvaluatorConfig
    threads: int = 1


@dataclass(frozen=True)
class WorkerInfo:
    """What :meth:`Worker.ready` reports: the process id and a set-up error, if any."""

    pid: int
    error: str | None = None


@dataclass(frozen=True)
class WorkerResult:
    """One stage of one candidate, or why it failed.

    Attributes:
        error: ``None`` when the stage was scored; else one line, ``Type: message``.
        kind: for an error, ``candidate`` (the recipe's fault) or ``protocol``.
        metrics, weights, n_docs, per_doc: per task, as in :class:`evaluators.base.Scores`.
        objective: the weighted mean of the metrics.
        stage: index of the stage these cumulative scores cover.
        final: whether all stages are included (no :meth:`Worker.advance` follows).
        timings: seconds: ``merge`` plus the evaluator's ``compute``/``overhead``/``total``.
    """

    error: str | None = None
    kind: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    n_docs: dict[str, int] = field(default_factory=dict)
    per_doc: dict[str, list[float]] = field(default_factory=dict)
    objective: float = math.nan
    stage: int = 0
    final: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the stage was scored."""
        return self.error is None

    @classmethod
    def failed(cls, kind: str, error: str | BaseException) -> WorkerResult:
        """A failed call; an exception becomes one line with its type."""
        text = error if isinstance(error, str) else one_line(error, with_type=True)
        return cls(error=text, kind=kind)


class Worker:
    """Holds the parents, one resident model and an evaluator; scores recipes."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.init_error: str | None = None
        self.resident: Any = None
        self.tokenizer: Any = None
        self.evaluator: Any = None
        self._stages: Iterator[Any] | None = None
        self._merge_s = 0.0
        try:
            self._load()
        except Exception as exc:  # reported by ready(), never raised across processes
            self.init_error = one_line(exc, with_type=True)

    def _load(self) -> None:
        import contextlib
        import io

        import torch

        from evaluators.base import TaskSpec, evaluator_class, needs_model

        torch.set_num_threads(self.setup.threads)
        ev = self.setup.evaluator
        cls = evaluator_class(ev.target)
        if needs_model(cls):
            self._load_parents()
        specs = [TaskSpec(t.name, t.metric, t.weight, t.limit, t.seed) for t in ev.tasks]
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's per-task progress bars
            self.evaluator = cls(specs, include_path=ev.include_path, batch_size=ev.batch_size,
                                 stages=ev.stages, **ev.options)

    def _load_parents(self) -> None:
        import logging

        from transformers import AutoTokenizer

        from search.merge.resident import ResidentModel, ResidentParents

        logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
        m = self.setup.models
        parents = ResidentParents(list(m.paths), device=m.device, dtype=m.dtype,
                                  allow_pickle=m.allow_pickle)
        self.resident = ResidentModel(parents, quantize=self.setup.evaluator.quantize)
        self.tokenizer = AutoTokenizer.from_pretrained(
            parents.folder, trust_remote_code=m.trust_remote_code)

    def ready(self) -> WorkerInfo:
        """The process id and the set-up error (``None`` when set-up succeeded)."""
        return WorkerInfo(os.getpid(), self.init_error)

    def start(self, recipe: dict[str, Any]) -> WorkerResult:
        """Merges ``recipe`` into the resident model and scores the first stage.

        An evaluator that needs no model (``needs_model = False``) gets the
        :class:`~search.recipe.Recipe` itself and no tokenizer.
        """
        from search.errors import SoupError
        from search.recipe import Recipe

        self._stages = None
        t0 = time.perf_counter()
        try:
            candidate = Recipe.from_dict(recipe)
            if self.resident is None:
                self._stages = self.evaluator.evaluate_stages(candidate, None)
            else:
                model = self.resident.materialize(candidate)
                self._stages = self.evaluator.evaluate_stages(model, self.tokenizer)
        except SoupError as exc:
            return WorkerResult.failed("candidate", exc)
        except Exception as exc:
            traceback.print_exc()
            return WorkerResult.failed("candidate", exc)
        self._merge_s = time.perf_counter() - t0
        return self.advance()

    def advance(self) -> WorkerResult:
        """Scores the next stage of the current candidate."""
        if self._stages is None:
            return WorkerResult.failed("protocol", "no candidate in progress")
        try:
            scores = next(self._stages)
        except Exception as exc:
            traceback.print_exc()
            self._stages = None
            return WorkerResult.failed("candidate", exc)
        bad = [t for t, v in scores.metrics.items() if not math.isfinite(v)]
        if bad:
            self._stages = None
            return WorkerResult.failed(
                "candidate", f"NonFiniteScore: task {bad[0]} scored {scores.metrics[bad[0]]}")
        if scores.final:
            self._stages = None
        return WorkerResult(
            metrics=dict(scores.metrics), weights=dict(scores.weights),
            n_docs=dict(scores.n_docs), per_doc=dict(scores.per_doc),
            objective=float(scores.objective),
            stage=scores.stage, final=scores.final,
            timings={"merge": self._merge_s, **scores.timings})

    def abandon(self) -> None:
        """Drops the current candidate (pruned)."""
        self._stages = None
