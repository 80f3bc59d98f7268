"""The driver's trial writes, applied in order by a process beside it.

A relational storage (SQLite, PostgreSQL) spends 10-30 ms creating one trial through
Optuna's ORM (a trial row, one row per parameter after a compatibility query, the
attributes) and a few more ms storing its outcome; a journal file about 2 ms, plus the
garbage its in-process replay leaves for the sampler's collections. On the driver's path
that is time no worker is given a new candidate. :class:`ProcessWriter` moves those
writes into a child process that opens the same storage URL and applies them in the
order they were sent, so the driver only pickles a message. :class:`InlineWriter`
applies them at once, in the caller's process (a study without a URL, tests).

Nothing is lost or reordered: messages go through a pipe (a send returns once the bytes
are in the kernel's buffer), the child applies each in turn, and it drains everything it
received before it exits, also when the driver was killed (the pipe reads end-of-file
once the driver is gone). The driver waits for the child (:meth:`ProcessWriter.sync`)
before it reads the study, so its counts include its own trials. A write that fails
stops the search with the storage's message (password redacted).

Example:
    >>> w = InlineWriter(study._storage)                         # doctest: +SKIP
    >>> w.create(1, study._study_id, template); w.trial_id(1)    # doctest: +SKIP
    0
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from search.study import StorageError, open_storage, redact

log = logging.getLogger(__name__)
_POLL_S = 1.0  # how often a waiting driver checks that the writer is alive


class InlineWriter:
    """Applies each write at once, in this process."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self._ids: dict[int, int] = {}
        self._new: list[int] = []
        self.stats: dict[str, list[float]] = {}

    def create(self, key: int, study_id: int, template: FrozenTrial) -> None:
        """Creates the trial ``template`` describes; its id is then ``trial_id(key)``."""
        self._ids[key] = _create(self._storage, study_id, template, self.stats)
        self._new.append(self._ids[key])

    def finish(self, key: int, trial_id: int | None, user_attrs: dict[str, Any],
               state: TrialState, values: Sequence[float] | None) -> None:
        """Stores attributes, then the state and values, of a trial (by id, else key)."""
        tid = trial_id if trial_id is not None else self._ids[key]
        _finish(self._storage, tid, user_attrs, state, values, self.stats)

    def trial_id(self, key: int) -> int:
        return self._ids[key]

    def sync(self) -> list[int]:
        """Storage ids created since the last call (every write is already applied)."""
        new, self._new = self._new, []
        return new

    def close(self) -> None:
        pass


class ProcessWriter:
    """Applies the writes in a child process, in the order they were sent."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # children fork with Optuna imported
        self._url = url
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_serve, args=(child, url), daemon=True,
                                 name="soup-storage-writer")
        self._proc.start()
        child.close()
        self._ids: dict[int, int] = {}
        self._new: list[int] = []
        self._asked = 0  # sync requests sent
        self._answered = 0  # sync requests answered
        self.stats: dict[str, list[float]] = {}

    def create(self, key: int, study_id: int, template: FrozenTrial) -> None:
        self._send(("create", key, study_id, template))

    def finish(self, key: int, trial_id: int | None, user_attrs: dict[str, Any],
               state: TrialState, values: Sequence[float] | None) -> None:
        vals = list(values) if values is not None else None
        self._send(("finish", key, trial_id, user_attrs, state, vals))

    def trial_id(self, key: int) -> int:
        """The storage id of trial ``key`` (waits until the child has created it)."""
        while key not in self._ids:
            self._receive(block=True)
        return self._ids[key]

    def sync(self) -> list[int]:
        """Waits until every write sent so far is applied; returns the ids created since
        the last call."""
        self._asked += 1
        self._send(("sync", self._asked))
        while self._answered < self._asked:
            self._receive(block=True)
        new, self._new = self._new, []
        return new

    def close(self) -> None:
        """Applies what is left and stops the child."""
        if not self._proc.is_alive():
            return
        try:
            self.sync()
            self._conn.send(("close",))
        finally:
            self._proc.join(timeout=30)
            self._conn.close()
            if self._proc.is_alive():  # pragma: no cover - a storage that hangs
                self._proc.terminate()

    # -- the pipe ----------------------------------------------------------------------

    def _send(self, msg: tuple[Any, ...]) -> None:
        self._receive(block=False)  # keep the child's replies from filling the pipe
        try:
            self._conn.send(msg)
        except OSError:
            self._gone()

    def _receive(self, block: bool) -> None:
        while True:
            try:
                ready = self._conn.poll(_POLL_S if block else 0)
            except OSError:
                self._gone()
            if not ready:
                if block and not self._proc.is_alive():
                    self._gone()
                if block:
                    continue
                return
            try:
                reply = self._conn.recv()
            except (EOFError, OSError):
                self._gone()
            self._take(reply)
            if block:
                return

    def _take(self, reply: tuple[Any, ...]) -> None:
        kind = reply[0]
        if kind == "id":
            self._ids[reply[1]] = reply[2]
            self._new.append(reply[2])
        elif kind == "synced":
            self._answered = max(self._answered, reply[1])
            self.stats = reply[2]
        elif kind == "error":
            url, reason = redact(self._url), reply[1]
            raise StorageError(f"storage {url}: {reason}")

    def _gone(self) -> Any:
        """Raises the child's last error if it sent one before it ended, else says it
        exited."""
        with contextlib.suppress(EOFError, OSError):
            while self._conn.poll(0):
                self._take(self._conn.recv())
        self._proc.join(timeout=1)
        url, code = redact(self._url), self._proc.exitcode
        raise StorageError(f"the storage writer process for {url} exited (exit code {code}); "
                           "the trials it had not written are re-run on `soup resume`")


def open_writer(url: str | None, storage: Any) -> InlineWriter | ProcessWriter:
    """A child-process writer for a storage URL soupsearch opens, else an inline one."""
    if url and url.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql",
                                                          "journal"):
        return ProcessWriter(url)
    return InlineWriter(storage)


# -- the child ---------------------------------------------------------------------------

def _serve(conn: Connection, url: str) -> None:
    """The writer's loop: applies each message in order until ``close`` or end-of-file.

    Ctrl-C reaches the whole process group; the child ignores it so that the driver's
    last writes (sent while it shuts down) are still applied.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        storage = open_storage(url)
    except StorageError as exc:
        _reply(conn, ("error", str(exc)))
        return
    ids: dict[int, int] = {}
    stats: dict[str, list[float]] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the driver is gone; everything it sent has been applied
        kind = msg[0]
        if kind == "close":
            return
        if kind == "sync":
            _reply(conn, ("synced", msg[1], stats))
            continue
        try:
            if kind == "create":
                _, key, study_id, template = msg
                ids[key] = _create(storage, study_id, template, stats)
                _reply(conn, ("id", key, ids[key]))
            elif kind == "finish":
                _, key, tid, attrs, state, values = msg
                _finish(storage, tid if tid is not None else ids.pop(key), attrs, state,
                        values, stats)
        except Exception as exc:  # reported to the driver, which stops
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            text = f"writing a trial failed: {type(exc).__name__}: {first}"
            log.warning("%s", redact(text))
            _reply(conn, ("error", redact(text)))


def _reply(conn: Connection, msg: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError):  # the driver is gone: keep applying what it sent
        conn.send(msg)


def _create(storage: Any, study_id: int, template: FrozenTrial,
            stats: dict[str, list[float]]) -> int:
    t0 = time.perf_counter()
    tid = int(storage.create_new_trial(study_id, template_trial=template))
    _count(stats, "create", t0)
    return tid


def _finish(storage: Any, tid: int, user_attrs: dict[str, Any], state: TrialState,
            values: Sequence[float] | None, stats: dict[str, list[float]]) -> None:
    t0 = time.perf_counter()
    try:
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(tid, key, value)
        storage.set_trial_state_values(tid, state, values)
    except UpdateFinishedTrialError:
        # another driver judged this one gone (no heartbeat for stale_after_s) and failed
        # and re-enqueued the trial meanwhile: its retry stands, this outcome is dropped
        log.warning("trial id %d was finished by another driver meanwhile; its %s outcome "
                    "here is dropped", tid, state.name)
    _count(stats, "finish", t0)


def _count(stats: dict[str, list[float]], op: str, t0: float) -> None:
    entry = stats.setdefault(op, [0, 0.0])
    entry[0] += 1
    entry[1] += time.perf_counter() - t0
