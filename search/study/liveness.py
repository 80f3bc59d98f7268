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
from optuna.trial import FrozenTrial, TrialState

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


def leader(study_attrs: dict[str, Any], stale_after_s: float) -> str | None:
    """The live driver registered first: it alone seeds baselines and the greedy soup."""
    alive = [(v.get("start", 0.0), k[len("driver."):]) for k, v in study_attrs.items()
             if k.startswith("driver.") and isinstance(v, dict)
             and driver_alive(study_attrs, k[len("driver."):], stale_after_s)]
    return min(alive)[1] if alive else None


def others_alive(study_attrs: dict[str, Any], me: str, stale_after_s: float) -> bool:
    """Whether a live driver other than ``me`` is registered in ``study_attrs``."""
    return any(k.startswith("driver.") and k != f"driver.{me}"
               and driver_alive(study_attrs, k[len("driver."):], stale_after_s)
               for k in study_attrs)


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
        return True
    return True


def driver_alive(study_attrs: dict[str, Any], owner: str | None, stale_after_s: float,
                 now: float | None = None) -> bool:
    """Whether the driver ``owner`` of a RUNNING trial is still alive."""
    if not owner:
        return False
    now = time.time() if now is None else now
    beat = _beat_of(study_attrs.get(f"driver.{owner}"))
    host, pid, _ = [*owner.split(":"), "", "", ""][:3]
    if host == socket.gethostname() and pid.isdigit():
        return _pid_alive(int(pid)) and beat is not None
    return beat is not None and now - float(beat) < stale_after_s


def recover_stale(study: optuna.Study, stale_after_s: float, max_retries: int,
                  me: str | None = None) -> list[int]:
    """Finishes the RUNNING trials whose driver is gone; returns their numbers.

    A trial whose final scores were already stored is completed with them; any other is
    failed and its parameters re-enqueued (up to ``max_retries`` times).
    """
    attrs = study.user_attrs
    recovered = []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        owner = t.user_attrs.get(tr.ATTR_DRIVER)
        if owner == me:
            continue
        if owner is None:  # asked but not yet claimed: give its driver a moment
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            if time.time() - started < min(stale_after_s, 60.0):
                continue
        elif driver_alive(attrs, owner, stale_after_s):
            continue
        if finish_from_scores(study, t) or fail_and_requeue(
                study, t, f"driver {owner or '?'} stopped while the trial was running",
                max_retries):
            recovered.append(t.number)
    return recovered


def finish_from_scores(study: optuna.Study, t: FrozenTrial) -> bool:
    """Completes ``t`` with its stored final scores, if it has them."""
    scores = t.user_attrs.get(tr.ATTR_SCORES)
    if not scores or not scores.get("final"):
        return False
    values = scores["values"]
    try:
        study.tell(t.number, values)
    except (ValueError, RuntimeError) as exc:  # finished by another driver meanwhile
        log.info("trial %d: %s", t.number, exc)
        return False
    return True


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
