"""The study in storage: URLs, create/load, driver heartbeats, and recovery of stale trials.

Storage is the single source of truth. A driver registers itself in the study's user
attributes with a heartbeat; a trial carries the id of the driver that runs it. On
start (and from time to time) a driver fails the RUNNING trials of drivers that are
gone (same host: the PID is not alive; other hosts: no heartbeat for
``stale_after_s``) and re-enqueues their parameters, so nothing is lost and nothing
finished is re-run.

Example:
    >>> redact("postgresql://soup:secret@db:5432/soup")
    'postgresql://soup:***@db:5432/soup'
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.errors import SoupError

log = logging.getLogger(__name__)
# user:password@ after the scheme; the password runs to the last "@" (SQLAlchemy takes
# a raw "/" or "@" in it), so a password is never half shown
_SECRET = re.compile(r"(://[^/:@\s]*:)(.*)(@[^@]*)$", re.DOTALL)
HEARTBEAT_S = 10.0
ATTR_DRIVER = "driver"
ATTR_RECIPE = "recipe"
ATTR_SCORES = "scores"
ATTR_ERROR = "error"
ATTR_REQUEUED = "requeued"
ATTR_RETRIES = "retries"
ATTR_BASELINE = "baseline"
HELDOUT_PREFIX = "heldout."  # study attr "heldout.<trial number>": soup evaluate's scores


class StorageError(SoupError):
    """The storage URL cannot be opened, or the study there does not match the config."""


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print)."""
    return _SECRET.sub(r"\1***\3", url)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    import sqlite3

    if isinstance(dbapi_conn, sqlite3.Connection):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


def _enable_sqlite_wal() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _sqlite_pragmas):
        event.listen(Engine, "connect", _sqlite_pragmas)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``sqlite:///``, ``postgresql://``, ``mysql://`` or ``journal:///``.

    SQLite runs in WAL mode (readers never block the driver; a commit is not an fsync)
    and waits up to 60 s for a lock;
    the journal backend is Optuna's file journal with its lock file beside it.
    """
    try:
        if url.startswith("journal:///"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal:///"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 60}
            _enable_sqlite_wal()
        else:
            kwargs["pool_pre_ping"] = True
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs,
                                          heartbeat_interval=None)
    except ImportError as exc:
        raise StorageError(f"storage {redact(url)}: a database driver is missing ({exc.name}); "
                           "pip install 'soupsearch[postgres]'") from None
    except Exception as exc:
        reason = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else repr(exc)
        raise StorageError(f"storage {redact(url)} cannot be opened: {reason}") from None


def open_study(url: str, name: str, directions: Sequence[str], sampler: Any = None,
               pruner: Any = None, create: bool = True) -> optuna.Study:
    """Creates or loads study ``name``; a mismatch of objectives is an error."""
    storage = open_storage(url)
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        if not create:
            raise StorageError(f"no study {name!r} in {redact(url)}; studies there: {names}")
        try:
            return optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                       pruner=pruner, directions=list(directions))  # type: ignore[arg-type]
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another driver created it a moment ago
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    if create and len(study.directions) != len(directions):
        raise StorageError(f"study {name!r} in {redact(url)} has {len(study.directions)} "
                           f"objective(s), the config asks for {len(directions)}; use a new "
                           "study_name or the original objective setting")
    return study


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
        owner = t.user_attrs.get(ATTR_DRIVER)
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
    scores = t.user_attrs.get(ATTR_SCORES)
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
        storage.set_trial_user_attr(t._trial_id, ATTR_ERROR, reason)
        retries = int(t.user_attrs.get(ATTR_RETRIES, 0))
        again = retries < max_retries
        storage.set_trial_user_attr(t._trial_id, ATTR_REQUEUED, again)
        if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            return False
    except (RuntimeError, ValueError) as exc:  # finished by another driver meanwhile
        log.info("trial %d: %s", t.number, exc)
        return False
    if again:
        keep = {k: v for k, v in t.user_attrs.items()
                if k in (ATTR_RECIPE, ATTR_BASELINE, "seed_file")}
        params = dict(t.params) or dict(t.system_attrs.get("fixed_params") or {})
        study.enqueue_trial(params, user_attrs={
            **keep, ATTR_RETRIES: retries + 1, "retry_of": t.number}, skip_if_exists=False)
    return True


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
