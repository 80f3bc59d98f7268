"""A simulated evaluator for search tests and benchmarks: no models, a score from the recipe.

It follows the evaluator constructor contract (:class:`evaluators.base.Evaluator`) and
sets ``needs_model = False``, so a worker loads no parents and hands it the recipe:
whole searches with fake model paths take a second or two. Select it through the
evaluator's ``_target_``, in a composed config (:data:`OVERRIDES`) or in a worker set-up
(:func:`simulated`). Ray workers import it by name: they have the driver's current
folder on their path (pytest runs from the repository root); subprocesses need
``PYTHONPATH`` set to the root.

Example:
    >>> from search.run.worker import Worker, WorkerSetup
    >>> from search.config import EvaluatorConfig, ModelsConfig, TaskConfig
    >>> setup = WorkerSetup(ModelsConfig("/m/base", ("/m/a",)), EvaluatorConfig((TaskConfig("t"),)))
    >>> w = Worker(simulated(setup))
    >>> w.start({"merge_method": "linear", "models": [
    ...     {"model": "/m/a", "parameters": {"weight": 0.5}}]}).objective
    1.0
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

from evaluators.base import Scores, TaskSpec
from search.run.worker import WorkerSetup

TARGET = "tests.search.simulated.SimulatedEvaluator"
OVERRIDES = [f"evaluator._target_={TARGET}"]


def score(recipe: Any) -> float:
    """1 minus the mean squared distance of the recipe's scalar weights from 0.5."""
    ws = [float(v) for m in recipe.models for k, v in m.parameters.items()
          if k == "weight" and not isinstance(v, list)]
    return 1.0 - sum((w - 0.5) ** 2 for w in ws) / max(1, len(ws))


class SimulatedEvaluator:
    """Sleeps ``sleep_s`` per stage and scores every task with :func:`score`.

    Args:
        tasks: the tasks; each gets the same score.
        include_path, batch_size: accepted (the contract) and unused.
        stages: cumulative fractions; one score per stage.
        sleep_s: seconds each stage takes.
    """

    needs_model = False

    def __init__(self, tasks: Sequence[TaskSpec], *, include_path: Sequence[str] = (),
                 batch_size: int = 64, stages: Sequence[float] = (1.0,),
                 sleep_s: float = 0.0) -> None:
        self.weights = {t.name: t.weight for t in tasks}
        self.stages = tuple(stages)
        self.sleep_s = float(sleep_s)

    def evaluate_stages(self, model: Any, tokenizer: Any) -> Iterator[Scores]:
        """``model`` is the candidate's Recipe (``needs_model = False``)."""
        value = score(model)
        n = len(self.stages)
        for i in range(n):
            time.sleep(self.sleep_s)
            yield Scores({t: value for t in self.weights}, dict(self.weights),
                         {t: 1 for t in self.weights},
                         {"compute": self.sleep_s, "overhead": 0.0, "total": self.sleep_s},
                         stage=i, final=i == n - 1)

    def evaluate(self, model: Any, tokenizer: Any) -> Scores:
        """The last stage's scores."""
        *_, last = self.evaluate_stages(model, tokenizer)
        return last


def simulated(setup: WorkerSetup, sleep_s: float = 0.0, target: str = TARGET) -> WorkerSetup:
    """``setup`` with the simulated evaluator (``target`` names where it is imported from)."""
    evaluator = dataclasses.replace(setup.evaluator, target=target, options={"sleep_s": sleep_s})
    return dataclasses.replace(setup, evaluator=evaluator)
