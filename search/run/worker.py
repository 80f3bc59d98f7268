"""A worker: the parents and one resident model on a device, plus an evaluator.

It is set up once (the expensive part: loading the parents and lm-eval's tasks) and
then turns recipes into scores. A trial is a short conversation: :meth:`Worker.start`
merges the recipe in place and scores the first stage; :meth:`Worker.advance` scores
the next stage (the driver asks for it only if the pruner lets the trial go on).
Results are plain dicts, so they cross process boundaries unchanged.

Example:
    >>> w = Worker(WorkerSetup(models=("./base", "./a", "./b"), tasks=(...)))  # doctest: +SKIP
    >>> w.start(recipe.to_dict())
    {'ok': True, 'metrics': {...}, 'stage': 0, 'final': True, 'timings': {...}}
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from search.config import TaskConfig
from search.errors import one_line


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker loads once.

    Attributes:
        models: the base first, then the experts (paths or hub ids).
        tasks: the lm-eval tasks to score.
        device, dtype, allow_pickle, trust_remote_code: as in the models config.
        include_path, batch_size, stages, quantize: as in the evaluator config.
        threads: torch threads.
        simulate_s: for benchmarks only: skip models and tasks and sleep this long per
            candidate, returning a score computed from the recipe's weights.
    """

    models: tuple[str, ...]
    tasks: tuple[TaskConfig, ...]
    device: str = "auto"
    dtype: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    include_path: tuple[str, ...] = ()
    batch_size: int = 64
    stages: tuple[float, ...] = (1.0,)
    threads: int = 1
    simulate_s: float | None = None
    quantize: str | None = None


def _error(kind: str, exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": one_line(exc, with_type=True), "kind": kind}


class Worker:
    """Holds the parents, one resident model and an evaluator; scores recipes."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.init_error: str | None = None
        self._stages: Iterator[Any] | None = None
        self._merge_s = 0.0
        try:
            self._load()
        except Exception as exc:  # reported by ready(), never raised across processes
            self.init_error = _error("setup", exc)["error"]

    def _load(self) -> None:
        import torch

        torch.set_num_threads(self.setup.threads)
        if self.setup.simulate_s is not None:
            return
        import contextlib
        import io
        import logging

        from transformers import AutoTokenizer

        from evaluators.base import TaskSpec
        from evaluators.lm_eval import LmEvalEvaluator
        from search.merge.resident import ResidentModel, ResidentParents

        logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
        s = self.setup
        self.parents = ResidentParents(list(s.models), device=s.device, dtype=s.dtype,
                                       allow_pickle=s.allow_pickle)
        self.resident = ResidentModel(self.parents, quantize=s.quantize)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.parents.folder, trust_remote_code=s.trust_remote_code)
        specs = [TaskSpec(t.name, t.metric, t.weight, t.limit, t.seed) for t in s.tasks]
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's per-task progress bars
            self.evaluator = LmEvalEvaluator(specs, include_path=s.include_path,
                                             batch_size=s.batch_size, stages=s.stages)

    def ready(self) -> dict[str, Any]:
        """``{"pid": ..., "error": None | str}`` once set-up has finished."""
        return {"pid": os.getpid(), "error": self.init_error}

    def start(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """Merges ``recipe`` into the resident model and scores the first stage."""
        from search.errors import SoupError
        from search.recipe import Recipe

        self._stages = None
        t0 = time.perf_counter()
        try:
            if self.setup.simulate_s is not None:
                self._stages = self._simulated(Recipe.from_dict(recipe))
            else:
                model = self.resident.materialize(Recipe.from_dict(recipe))
                self._stages = self.evaluator.evaluate_stages(model, self.tokenizer)
        except SoupError as exc:
            return _error("candidate", exc)
        except Exception as exc:
            traceback.print_exc()
            return _error("candidate", exc)
        self._merge_s = time.perf_counter() - t0
        return self.advance()

    def advance(self) -> dict[str, Any]:
        """Scores the next stage of the current candidate."""
        if self._stages is None:
            return {"ok": False, "error": "no candidate in progress", "kind": "protocol"}
        try:
            scores = next(self._stages)
        except Exception as exc:
            traceback.print_exc()
            self._stages = None
            return _error("candidate", exc)
        bad = [t for t, v in scores.metrics.items() if not math.isfinite(v)]
        if bad:
            self._stages = None
            return {"ok": False, "kind": "candidate",
                    "error": f"NonFiniteScore: task {bad[0]} scored {scores.metrics[bad[0]]}"}
        if scores.final:
            self._stages = None
        timings = {"merge": self._merge_s, **scores.timings}
        return {"ok": True, "metrics": scores.metrics, "weights": scores.weights,
                "n_docs": scores.n_docs, "stage": scores.stage, "final": scores.final,
                "objective": scores.objective, "timings": timings}

    def abandon(self) -> None:
        """Drops the current candidate (pruned)."""
        self._stages = None

    def _simulated(self, recipe: Any) -> Iterator[Any]:
        from evaluators.base import Scores

        n = len(self.setup.stages)
        step = float(self.setup.simulate_s or 0.0) / n
        weights = {t.name: t.weight for t in self.setup.tasks}
        for i in range(n):
            time.sleep(step)
            ws = [float(v) for m in recipe.models for k, v in m.parameters.items()
                  if k == "weight" and not isinstance(v, list)]
            value = 1.0 - sum((w - 0.5) ** 2 for w in ws) / max(1, len(ws))
            yield Scores({t: value for t in weights}, weights, {t: 1 for t in weights},
                         {"compute": step, "overhead": 0.0, "total": step},
                         stage=i, final=i == n - 1)
