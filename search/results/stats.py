"""Uncertainty of a candidate's score, from its per-document scores.

A candidate's objective is the weighted mean, over tasks, of each task's mean per-document
score. Resampling each task's documents with replacement (a stratified bootstrap) gives a
95% interval for it; applying the same resample to two candidates scored on the same
documents gives a paired comparison, whose interval for the difference says whether one
really beats the other or the gap is within the noise of the documents drawn.

Example:
    >>> a = {"t": [1.0] * 60 + [0.0] * 40}
    >>> lo, hi = interval(a, {"t": 1.0})
    >>> 0.49 < lo < 0.6 < hi < 0.71
    True
    >>> b = {"t": [1.0] * 40 + [0.0] * 60}
    >>> compare(a, b, {"t": 1.0}).verdict
    'better'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

PerDoc = Mapping[str, Sequence[float]]
N_RESAMPLES = 2000


def _resampled(per_doc: Sequence[PerDoc], weights: Mapping[str, float], n: int,
               seed: int) -> np.ndarray:
    """The objective of each of ``per_doc``'s candidates under ``n`` shared resamples:
    an array of shape (candidates, n)."""
    rng = np.random.default_rng(seed)
    tasks = sorted(weights)
    total = sum(weights[t] for t in tasks)
    out = np.zeros((len(per_doc), n))
    for t in tasks:
        values = np.asarray([list(p[t]) for p in per_doc], dtype=float)
        if values.shape[1] == 0:
            raise ValueError(f"task {t}: no per-document scores")
        idx = rng.integers(0, values.shape[1], size=(n, values.shape[1]))
        out += weights[t] / total * values[:, idx].mean(axis=2)
    return out


def objective(per_doc: PerDoc, weights: Mapping[str, float]) -> float:
    """The weighted mean over tasks of each task's mean per-document score."""
    total = sum(weights.values())
    return sum(w / total * float(np.mean(per_doc[t])) for t, w in weights.items())


def interval(per_doc: PerDoc, weights: Mapping[str, float], level: float = 0.95,
             n: int = N_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """A ``level`` bootstrap interval (percentile) for the objective."""
    draws = _resampled([per_doc], weights, n, seed)[0]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` on the same documents.

    Attributes:
        diff: objective of ``a`` minus that of ``b``.
        low, high: the 95% paired-bootstrap interval of ``diff``.
        p_not_better: the share of resamples where ``a`` does not beat ``b``.
        verdict: ``better`` (the interval is above 0), ``worse`` (below) or ``tie``.
    """

    diff: float
    low: float
    high: float
    p_not_better: float

    @property
    def verdict(self) -> str:
        return "better" if self.low > 0 else "worse" if self.high < 0 else "tie"

    def words(self, a: str, b: str) -> str:
        """One sentence a user reads: does ``a`` beat ``b``, and by how much."""
        gap = f"{self.diff:+.3f} (95% interval {self.low:+.3f} to {self.high:+.3f})"
        if self.verdict == "better":
            return f"{a} beats {b} by {gap}, more than the documents' noise"
        if self.verdict == "worse":
            return f"{a} is below {b} by {gap}"
        return (f"{a} and {b} are within the documents' noise of each other: {gap}; score "
                "more documents to tell them apart")


def compare(a: PerDoc, b: PerDoc, weights: Mapping[str, float], n: int = N_RESAMPLES,
            seed: int = 0) -> Comparison:
    """Paired bootstrap of ``a`` against ``b`` (each task's documents in the same order)."""
    for t in weights:
        if len(a[t]) != len(b[t]):
            raise ValueError(f"task {t}: {len(a[t])} and {len(b[t])} documents; a paired "
                             "comparison needs the same documents")
    draws = _resampled([a, b], weights, n, seed)
    d = draws[0] - draws[1]
    return Comparison(objective(a, weights) - objective(b, weights),
                      float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5)),
                      float(np.mean(d <= 0)))
