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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from search.errors import SoupError


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
    """

    metrics: dict[str, float]
    weights: dict[str, float]
    n_docs: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    stage: int = 0
    final: bool = True

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
    """Scores an in-memory causal LM with its tokenizer."""

    def evaluate(self, model: Any, tokenizer: Any) -> Scores:
        """All documents of every task."""
        ...

    def evaluate_stages(self, model: Any, tokenizer: Any) -> Iterator[Scores]:
        """Cumulative scores after each stage; stop iterating to prune."""
        ...
