"""The driver's trial writes, applied in order by a process beside it.

A relational storage (SQLite, PostgreSQL) spends 10-30 ms creating one trial through
Optuna's ORM (a trial row, one row per parameter after a compatibility query, the
attributes) and a few more ms storing its outcome; a journal file about 2 ms, plus the
garbage its in-process replay leaves for the sampler's collections. On the driver's path
that is time no worker is given a new candidate. :class:`ProcessWriter` moves those
writes into a child process that opens the same storage URL and applies them in the
order they were sent, so the driver only pickles a message. :class:`InlineWriter`
applies them at once, in the caller's process (a study without a URL, tests).

Nothing is lost or reordered: messages go through a socket pair (a send returns once the
bytes are in the kernel's buffer), the child applies each in turn, and it drains
everything it received before it exits, also when the driver was killed (the socket
reads end-of-file once the driver is gone). The driver waits for the child
(:meth:`ProcessWriter.sync`) only where it needs exact counts (no trial of its own
running, the end of the search) or a trial's storage id; its periodic re-reads count
the trials the child may not have created yet as asked (:meth:`ProcessWriter.unwritten`).
A write that fails stops the search with the storage's message (password redacted).

Example:
    >>> w = InlineWriter(study._storage)                         # doctest: +SKIP
    >>> w.create(1, study._study_id, template); w.trial_id(1)    # doctest: +SKIP
    0
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
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

    def unwritten(self) -> set[int]:
        """Keys of the trials sent for creation whose id is not known: none."""
        return set()

    def known_id(self, key: int) -> int | None:
        return self._ids.get(key)

    def sync(self, force: bool = False) -> list[int]:
        """Storage ids created since the last call (every write is already applied)."""
        new, self._new = self._new, []
        return new

    ids = sync

    def close(self) -> None:
        pass


class ProcessWriter:
    """Applies the writes in a child process, in the order they were sent.

    The child is a fresh interpreter (``python -m search.study.writer FD``) joined to the driver
    by a socket pair: it imports nothing of the caller's script, so a script that runs a
    search needs no ``if __name__ == "__main__"`` guard, and nothing is forked from a
    driver that runs Ray threads. It starts in the folder that holds this package (so a
    ``search`` module in the user's folder cannot shadow it) and in its own session
    (Ctrl-C or a signal to the driver's process group does not cut it off mid-write);
    it then moves to the driver's folder, so relative storage paths mean the same. The
    URL (it may hold a password) is the first message, never a command-line argument.
    The child imports Optuna (about a second) while the driver starts; messages sent
    meanwhile wait in the socket. It exits at ``close`` or once the driver is gone.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        mine, theirs = socket.socketpair()
        package = str(Path(__file__).resolve().parents[1])  # the folder holding search/
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "search.study.writer", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd=package,
                start_new_session=True)
        except OSError as exc:
            raise StorageError(f"the storage writer process cannot start: {exc}") from None
        finally:
            theirs.close()
        self._conn = Connection(mine.detach())
        self._ids: dict[int, int] = {}
        self._new: list[int] = []
        self._unacked: set[int] = set()  # creations sent whose id has not come back
        self._sent = 0  # writes sent since the last sync
        self._asked = 0  # sync requests sent
        self._answered = 0  # sync requests answered
        self.stats: dict[str, list[float]] = {}
        self._errors: list[str] = []  # the child's error replies, raised after a send
        self._send(("open", url, os.getcwd()))

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def create(self, key: int, study_id: int, template: FrozenTrial) -> None:
        self._send(("create", key, study_id, template))
        self._sent += 1
        self._unacked.add(key)

    def finish(self, key: int, trial_id: int | None, user_attrs: dict[str, Any],
               state: TrialState, values: Sequence[float] | None) -> None:
        vals = list(values) if values is not None else None
        self._send(("finish", key, trial_id, user_attrs, state, vals))
        self._sent += 1

    def trial_id(self, key: int) -> int:
        """The storage id of trial ``key`` (waits until the child has created it)."""
        while key not in self._ids:
            self._receive(block=True)
            self._raise_errors()
        return self._ids[key]

    def unwritten(self) -> set[int]:
        """Keys of the trials sent for creation whose id has not come back yet (those
        not yet in storage are among them: the child replies right after each)."""
        self._receive(block=False)
        return set(self._unacked)

    def known_id(self, key: int) -> int | None:
        """The storage id of trial ``key`` if it has come back (no waiting)."""
        return self._ids.get(key)

    def ids(self) -> list[int]:
        """The ids of the trials created since the last call, without waiting."""
        self._receive(block=False)
        self._raise_errors()
        new, self._new = self._new, []
        return new

    def sync(self, force: bool = False) -> list[int]:
        """Waits until every write sent so far is applied; returns the ids created since
        the last call. Without writes since the last call it returns at once, unless
        ``force`` (then it also waits for a child that is still starting)."""
        if not self._sent and not force:
            return self.ids()
        self._sent = 0
        self._asked += 1
        self._send(("sync", self._asked))
        while self._answered < self._asked:
            self._receive(block=True)
            self._raise_errors()
        new, self._new = self._new, []
        return new

    def close(self) -> None:
        """Applies what is left and stops the child; raises the first write error."""
        error: StorageError | None = None
        if self.alive():
            try:
                self.sync()
            except StorageError as exc:
                error = exc
            with contextlib.suppress(OSError):
                self._conn.send(("close",))
        self._conn.close()  # end-of-file: the child applies what it has, then exits
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a storage that hangs
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if error is not None:
            raise error

    # -- the pipe ----------------------------------------------------------------------

    def _send(self, msg: tuple[Any, ...]) -> None:
        self._receive(block=False)  # keep the child's replies from filling the pipe
        try:
            self._conn.send(msg)
        except OSError:
            self._gone()
        self._raise_errors()  # after the send: a reported error never drops this write

    def _raise_errors(self) -> None:
        if self._errors:
            url, reason = redact(self._url), self._errors.pop(0)
            self._errors.clear()
            raise StorageError(f"storage {url}: {reason}")

    def _receive(self, block: bool) -> None:
        while True:
            try:
                ready = self._conn.poll(_POLL_S if block else 0)
            except OSError:
                self._gone()
            if not ready:
                if block and not self.alive():
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
            self._unacked.discard(reply[1])
        elif kind == "synced":
            self._answered = max(self._answered, reply[1])
            self.stats = reply[2]
        elif kind == "error":
            self._errors.append(reply[1])

    def _gone(self) -> Any:
        """Raises the child's last error if it sent one before it ended, else says it
        exited."""
        with contextlib.suppress(EOFError, OSError):
            while self._conn.poll(0):
                self._take(self._conn.recv())
        self._raise_errors()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=1)
        url, code = redact(self._url), self._proc.returncode
        raise StorageError(f"the storage writer process for {url} exited (exit code {code}); "
                           "the trials it had not written are re-run on `soup resume`")


def open_writer(url: str | None, storage: Any) -> InlineWriter | ProcessWriter:
    """A child-process writer for a storage URL soupsearch opens, else an inline one."""
    if url and url.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql",
                                                          "journal"):
        return ProcessWriter(url)
    return InlineWriter(storage)


# -- the child ---------------------------------------------------------------------------

def _serve(conn: Connection) -> None:
    """The writer's loop: opens the storage named by the first message, then applies each
    message in order until ``close`` or end-of-file.

    Ctrl-C reaches the whole process group; the child ignores it so that the driver's
    last writes (sent while it shuts down) are still applied.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _, url, cwd = conn.recv()
        os.chdir(cwd)  # relative storage paths are the driver's
    except (EOFError, OSError):
        return
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
        except Exception as exc:  # a message cut off (the driver interrupted mid-send)
            log.warning("a message from the driver could not be read (%s); the writes "
                        "after it are lost and `soup resume` re-runs those trials",
                        type(exc).__name__)
            return
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
            text = redact(f"writing a trial failed: {type(exc).__name__}: {first}")
            if not _reply(conn, ("error", text)):
                log.warning("%s (the driver is gone)", text)


def _reply(conn: Connection, msg: tuple[Any, ...]) -> bool:
    """Sends ``msg``; False if the driver is gone (the child keeps applying what it sent)."""
    try:
        conn.send(msg)
    except OSError:
        return False
    return True


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


if __name__ == "__main__":  # the child: python -m search.study.writer FD
    _serve(Connection(int(sys.argv[1])))
