"""The evaluator protocol and what it returns.

An evaluator scores a model that is already in memory (the resident candidate) and
returns :class:`Scores`: each task's metric, the scalar objective (a weighted mean of
the tasks' metrics), the per-task vector for multi-objective search, and timings.
Staged evaluation yields cumulative scores on growing fixed subsets, so a search can
prune a weak candidate after the first stage.

Example:
    >>> s = Scores.combine({"add": 0.5, "rev": 1.0}, {"add": 1.0, "rev": 3.0}, {"add": 10,
    ...                     "rev": 10})
    >>> s.objective, s.objectives
    (0.875, (0.5, 1.0))
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from search.errors import SoupError, one_line


class EvaluatorError(SoupError, ValueError):
    """A task, metric or document selection that cannot be used (user input)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task to score and how.

    Attributes:
        name: an lm-eval task name (built-in, or from an include path).
        metric: the result key to read, e.g. ``exact_match,none`` or ``acc_norm,none``;
            ``None`` takes the task's first metric with the ``none`` filter.
        weight: weight in the scalar objective.
        limit: score only this many documents (a subset fixed for every candidate).
        seed: pick the ``limit`` documents at random with this seed (default: the first).
        doc_ids: an explicit, fixed list of document indices (instead of ``limit``).
    """

    name: str
    metric: str | None = None
    weight: float = 1.0
    limit: int | None = None
    seed: int | None = None
    doc_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Scores:
    """What an evaluation of one candidate produced.

    Attributes:
        metrics: task name -> value of its metric.
        weights: task name -> weight in the objective.
        n_docs: task name -> documents scored.
        timings: seconds, with ``compute`` (model calls), ``overhead`` and ``total``.
        stage: index of the stage these cumulative scores cover.
        final: whether all stages are included.
        per_doc: task name -> each scored document's value, in a fixed document order
            (for intervals and paired comparisons); empty where an evaluator has none.
    """

    metrics: dict[str, float]
    weights: dict[str, float]
    n_docs: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    stage: int = 0
    final: bool = True
    per_doc: dict[str, list[float]] = field(default_factory=dict)

    @property
    def objective(self) -> float:
        """Weighted mean of the tasks' metrics."""
        total = sum(self.weights.values())
        return sum(self.metrics[t] * w for t, w in self.weights.items()) / total

    @property
    def objectives(self) -> tuple[float, ...]:
        """The tasks' metrics in task order, for multi-objective search."""
        return tuple(self.metrics[t] for t in self.weights)

    @classmethod
    def combine(cls, metrics: Mapping[str, float], weights: Mapping[str, float],
                n_docs: Mapping[str, int], **kw: Any) -> Scores:
        """Builds scores from plain mappings."""
        return cls(dict(metrics), dict(weights), dict(n_docs), **kw)


@runtime_checkable
class Evaluator(Protocol):
    """Scores an in-memory causal LM with its tokenizer.

    A search's evaluator is the class ``evaluator._target_`` names in the config
    (default :class:`evaluators.lm_eval.LmEvalEvaluator`). Each worker builds it once,
    with this constructor contract::

        cls(tasks: Sequence[TaskSpec], *, include_path: Sequence[str] = (),
            batch_size: int = 64, stages: Sequence[float] = (1.0,), **options)

    where ``options`` are the config's ``evaluator.options``. An evaluator that scores a
    recipe without a model (a simulation, a surrogate) sets the class attribute
    ``needs_model = False``: the worker then loads no parents and passes the candidate's
    :class:`~search.recipe.Recipe` as ``model`` and ``None`` as ``tokenizer``.
    """

    def evaluate(self, model: Any, tokenizer: Any) -> Scores:
        """All documents of every task."""
        ...

    def evaluate_stages(self, model: Any, tokenizer: Any) -> Iterator[Scores]:
        """Cumulative scores after each stage; stop iterating to prune."""
        ...


def evaluator_class(target: str) -> type:
    """The class a dotted path names, checked to have :meth:`Evaluator.evaluate_stages`.

    Raises:
        EvaluatorError: the module or class cannot be imported, or it is no evaluator.
    """
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise EvaluatorError(f"cannot import evaluator {target!r} ({one_line(exc)}); "
                             "give a class path like evaluators.lm_eval.LmEvalEvaluator, "
                             "importable where the workers run") from None
    if not isinstance(cls, type) or not callable(getattr(cls, "evaluate_stages", None)):
        raise EvaluatorError(f"{target!r} is not an evaluator class (it needs "
                             "evaluate(model, tokenizer) and evaluate_stages(model, tokenizer))")
    return cls


def needs_model(cls: type) -> bool:
    """Whether the worker must load the parents and pass the merged model (the default)."""
    return bool(getattr(cls, "needs_model", True))
