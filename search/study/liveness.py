"""Driver liveness: heartbeats, the leader, and recovery of a dead driver's trials.

A driver registers itself in the study's user attributes with a heartbeat; a trial
carries the id of the driver that runs it. On start (and from time to time) a driver
fails the RUNNING trials of drivers that are gone (same host: the PID is not alive;
other hosts: no heartbeat for ``stale_after_s``) and re-enqueues their parameters, so
nothing is lost and nothing finished is re-run.

Example:
    >>> driver_alive({}, None, 60.0)
    False
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from search.errors import one_line
from search.study import trials as tr

log = logging.getLogger(__name__)
HEARTBEAT_S = 10.0


def driver_id() -> str:
    """``host:pid:random``: unique per driver process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def heartbeat(study: optuna.Study, me: str, start: float) -> None:
    """Records that driver ``me`` (registered at ``start``) is alive now."""
    study.set_user_attr(f"driver.{me}", {"start": start, "beat": time.time()})


def _beat_of(value: Any) -> float | None:
    if isinstance(value, dict):
        return float(value["beat"])
    return None if value is None else float(value)


def _live_drivers(study_attrs: dict[str, Any], stale_after_s: float) -> dict[str, Any]:
    """The live registered drivers: id -> what :func:`heartbeat` stored for it."""
    ids = [k[len("driver."):] for k in study_attrs if k.startswith("driver.")]
    return {d: study_attrs[f"driver.{d}"] for d in ids
            if driver_alive(study_attrs, d, stale_after_s)}


def leader(study_attrs: dict[str, Any], stale_after_s: float) -> str | None:
    """The live driver registered first: it alone seeds baselines and the greedy soup."""
    alive = [(v.get("start", 0.0), d) for d, v in _live_drivers(study_attrs, stale_after_s).items()
             if isinstance(v, dict)]
    return min(alive)[1] if alive else None


def others_alive(study_attrs: dict[str, Any], me: str, stale_after_s: float) -> bool:
    return any(d != me for d in _live_drivers(study_attrs, stale_after_s))


def reseed_if_shared(study: optuna.Study, me: str, stale_after_s: float) -> None:
    """Reseeds the sampler at random when another driver is live on this study or the
    study already has trials. Drivers built from the same config share ``seed``, so
    their samplers would otherwise propose the same candidates at the same time, and a
    resumed driver would replay its first proposals. A fresh study with one driver keeps
    the seed, so that search is reproducible. Call it after the driver's first
    heartbeat: of two drivers starting together, at least the later one sees the other."""
    others = others_alive(study.user_attrs, me, stale_after_s)
    if others or study.get_trials(deepcopy=False):
        study.sampler.reseed_rng()
        log.info("sampler reseeded: %s", "another driver is live on this study"
                 if others else "the study already has trials")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def driver_alive(study_attrs: dict[str, Any], owner: str | None, stale_after_s: float,
                 now: float | None = None) -> bool:
    """Whether the driver ``owner`` of a RUNNING trial is still alive."""
    beat = _beat_of(study_attrs.get(f"driver.{owner}")) if owner else None
    if beat is None:
        return False
    host, pid, _ = [*str(owner).split(":"), "", "", ""][:3]
    if host == socket.gethostname() and pid.isdigit():
        return _pid_alive(int(pid))
    return (time.time() if now is None else now) - beat < stale_after_s


def recover_stale(study: optuna.Study, stale_after_s: float, max_retries: int,
                  me: str | None = None) -> list[int]:
    """Finishes the RUNNING trials whose driver is gone; returns their numbers.

    A trial whose final scores were already stored is completed with them; any other is
    failed and its parameters re-enqueued (up to ``max_retries`` times).
    """
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(tr.ATTR_DRIVER)
        if owner == me:
            continue
        if owner is None:  # asked but not yet claimed: give its driver a moment
            if time.time() - tr.started_at(t) < min(stale_after_s, 60.0):
                continue
        elif driver_alive(study.user_attrs, owner, stale_after_s):
            continue
        if finish_from_scores(study, t) or fail_and_requeue(
                study, t, f"driver {owner or '?'} stopped while the trial was running",
                max_retries):
            recovered.append(t.number)
    return recovered


def tell(study: optuna.Study, trial: Trial | int, values: list[float] | None,
         state: TrialState | None = None) -> bool:
    """``study.tell``; a trial another driver finished meanwhile (it took this driver
    for dead, or recovered the trial too) is left as it is, with a warning (False)."""
    try:
        study.tell(trial, values, state=state)
    except (ValueError, RuntimeError) as exc:
        log.warning("trial %s: %s", getattr(trial, "number", trial), one_line(exc))
        return False
    return True


def finish_from_scores(study: optuna.Study, t: FrozenTrial) -> bool:
    """Completes ``t`` with its stored final scores, if it has them."""
    scores = t.user_attrs.get(tr.ATTR_SCORES) or {}
    return bool(scores.get("final")) and tell(study, t.number, scores["values"])


def fail_and_requeue(study: optuna.Study, t: FrozenTrial, reason: str, max_retries: int) -> bool:
    """Fails ``t`` with ``reason`` and re-enqueues its parameters (bounded retries)."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(t._trial_id, tr.ATTR_ERROR, reason)
        retries = int(t.user_attrs.get(tr.ATTR_RETRIES, 0))
        again = retries < max_retries
        storage.set_trial_user_attr(t._trial_id, tr.ATTR_REQUEUED, again)
        if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            return False
    except (RuntimeError, ValueError) as exc:  # finished by another driver meanwhile
        log.info("trial %d: %s", t.number, exc)
        return False
    if again:
        keep = {k: v for k, v in t.user_attrs.items()
                if k in (tr.ATTR_RECIPE, tr.ATTR_BASELINE, "seed_file")}
        params = dict(t.params) or dict(t.system_attrs.get("fixed_params") or {})
        study.enqueue_trial(params, user_attrs={
            **keep, tr.ATTR_RETRIES: retries + 1, "retry_of": t.number}, skip_if_exists=False)
    return True
