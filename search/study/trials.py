"""What a stored trial carries (attribute names), counting trials, held-out records.

Example:
    >>> counts([])["done"]
    0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

ATTR_DRIVER = "driver"
ATTR_RECIPE = "recipe"
ATTR_SCORES = "scores"
ATTR_PER_DOC = "per_doc"  # task -> each document's score, in a fixed order
ATTR_ERROR = "error"
ATTR_REQUEUED = "requeued"
ATTR_RETRIES = "retries"
ATTR_BASELINE = "baseline"
HELDOUT_PREFIX = "heldout."  # study attr "heldout.<trial number>": soup evaluate's scores
_OUTCOME = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
            TrialState.FAIL: "failed", TrialState.RUNNING: "running",
            TrialState.WAITING: "waiting"}


def counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials by outcome: ``done`` counts against the budget (failed-and-requeued do not)."""
    out = dict.fromkeys(("complete", "pruned", "failed", "running", "waiting", "done",
                         "requeued"), 0)
    for t in trials:
        key = _OUTCOME.get(t.state)
        if key == "failed" and (t.user_attrs.get(ATTR_REQUEUED) or t.user_attrs.get("surplus")):
            key = "requeued"
        if key is not None:
            out[key] += 1
    out["done"] = out["complete"] + out["pruned"] + out["failed"]
    return out


def started_at(t: FrozenTrial) -> float:
    """When ``t`` was asked (epoch seconds; 0 for a trial not started)."""
    return t.datetime_start.timestamp() if t.datetime_start else 0.0


def heldout_key(number: int) -> str:
    """The study user attribute that holds trial ``number``'s held-out scores.

    Finished trials are read-only in Optuna, so ``soup evaluate`` stores its scores on
    the study: ``{"metrics": {task: value}, "objective": mean, "tasks": [...],
    "n_docs": {task: n}, "time_s": s, "at": ISO time}``.
    """
    return f"{HELDOUT_PREFIX}{number}"


def heldout_scores(study_attrs: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Trial number -> its held-out record (see :func:`heldout_key`), from study attrs."""
    n = len(HELDOUT_PREFIX)
    return {int(key[n:]): value for key, value in study_attrs.items()
            if key.startswith(HELDOUT_PREFIX) and key[n:].isdigit()}
