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
ATTR_ERROR = "error"
ATTR_REQUEUED = "requeued"
ATTR_RETRIES = "retries"
ATTR_BASELINE = "baseline"
HELDOUT_PREFIX = "heldout."  # study attr "heldout.<trial number>": soup evaluate's scores


def counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials by outcome: ``done`` counts against the budget (failed-and-requeued do not)."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "done": 0,
           "requeued": 0}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            out["complete"] += 1
        elif t.state == TrialState.PRUNED:
            out["pruned"] += 1
        elif t.state == TrialState.FAIL:
            if t.user_attrs.get(ATTR_REQUEUED) or t.user_attrs.get("surplus"):
                out["requeued"] += 1
            else:
                out["failed"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
    out["done"] = out["complete"] + out["pruned"] + out["failed"]
    return out


def heldout_key(number: int) -> str:
    """The study user attribute that holds trial ``number``'s held-out scores.

    Finished trials are read-only in Optuna, so ``soup evaluate`` stores its scores on
    the study: ``{"metrics": {task: value}, "objective": mean, "tasks": [...],
    "n_docs": {task: n}, "time_s": s, "at": ISO time}``.
    """
    return f"{HELDOUT_PREFIX}{number}"


def heldout_scores(study_attrs: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Trial number -> its held-out record (see :func:`heldout_key`), from study attrs."""
    out = {}
    for key, value in study_attrs.items():
        if key.startswith(HELDOUT_PREFIX) and key[len(HELDOUT_PREFIX):].isdigit():
            out[int(key[len(HELDOUT_PREFIX):])] = value
    return out
