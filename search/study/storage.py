"""Storage URLs and studies: open a storage by URL, create or load a study, redact secrets.

Example:
    >>> redact("postgresql://soup:secret@db:5432/soup")
    'postgresql://soup:***@db:5432/soup'
"""

from __future__ import annotations

import importlib.util
import logging
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import optuna

from search.errors import SoupError, one_line

log = logging.getLogger(__name__)
# user:password@ after the scheme; the password runs to the last "@" (SQLAlchemy takes
# a raw "/" in it), so a password is never half shown
_SECRET = re.compile(r"(://[^/:@\s]*:)(.*)(@[^@]*)$", re.DOTALL)
# what two drivers creating the same new schema at once see; the loser tries again
_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key value",
         "database is locked")
_ATTEMPTS = 8
_PG_URL = "postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB"


class StorageError(SoupError):
    """The storage URL cannot be opened, or the study there does not match the config."""


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print)."""
    return _SECRET.sub(r"\1***\3", url)


def redact_text(text: str, url: str) -> str:
    """``text`` (a driver's message about ``url``) with every piece of the password hidden.

    A password with a raw ``@`` or ``/`` is split by the URL parser, and the driver then
    echoes a piece of it as a host or database name; each piece is replaced as a word.

    Example:
        >>> redact_text('host name "ss/w0rd" unknown', "postgresql://u:p@ss/w0rd@h/db")
        'host name "***" unknown'
    """
    text = text.replace(url, redact(url))
    m = _SECRET.search(url)
    if not m or not m.group(2):
        return text
    pieces: set[str] = set()
    for secret in {m.group(2), unquote(m.group(2))}:  # every run of its parts, e.g. "ss/w0rd"
        spans = [w.span() for w in re.finditer(r"[^@/:?#]+", secret)]
        pieces |= {secret[a:z] for i, (a, _) in enumerate(spans) for _, z in spans[i:]}
    for piece in sorted(pieces, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(piece)}(?![A-Za-z0-9])", "***", text)
    return text


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    import sqlite3

    if isinstance(dbapi_conn, sqlite3.Connection):
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")


def _enable_sqlite_wal() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _sqlite_pragmas):
        event.listen(Engine, "connect", _sqlite_pragmas)


def sqlite_file(url: str) -> Path:
    """The database file of a ``sqlite:///PATH`` or ``sqlite:///file:PATH?mode=ro&uri=true``
    URL."""
    path = url[len("sqlite:///"):]
    if path.startswith("file:"):
        path = path[len("file:"):].split("?", 1)[0]
    return Path(path)


def _postgres_driver(url: str) -> str:
    """A plain ``postgresql://`` URL uses psycopg2 when psycopg (3) is not installed."""
    if not url.startswith("postgresql://") or importlib.util.find_spec("psycopg"):
        return url
    if importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    raise StorageError(f"storage {redact(url)}: no PostgreSQL driver is installed; "
                       f"pip install 'soupsearch[postgres]' (psycopg2) and use {_PG_URL}")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (or while handling), root last."""
    out = [exc]
    while out[-1].__cause__ is not None or out[-1].__context__ is not None:
        out.append(out[-1].__cause__ or out[-1].__context__)  # type: ignore[arg-type]
    return out


def _retrying(what: Any) -> Any:
    """``what()``, tried again when another driver was creating the same schema or study."""
    for attempt in range(_ATTEMPTS):
        try:
            return what()
        except Exception as exc:
            raced = any(m in str(e) for e in _chain(exc) for m in _RACE)
            if attempt == _ATTEMPTS - 1 or not raced:
                raise
            log.info("storage busy (%s); trying again", one_line(exc))
            time.sleep(0.05 + random.random() * 0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``sqlite:///``, ``postgresql://``, ``mysql://`` or ``journal:///``.

    SQLite runs in WAL mode (readers never block the driver; a commit is not an fsync)
    and waits up to 60 s for a lock; the journal backend is Optuna's file journal with its
    lock file beside it. Two drivers creating the same new schema at once both succeed.
    """
    try:
        if url.startswith("journal:///"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal:///"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        kwargs: dict[str, Any] = {}
        target = _postgres_driver(url)
        if url.startswith("sqlite:///"):
            if "mode=ro" not in url:
                sqlite_file(url).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 60}
            _enable_sqlite_wal()
        else:
            kwargs["pool_pre_ping"] = True
        return _retrying(lambda: optuna.storages.RDBStorage(
            target, engine_kwargs=kwargs, heartbeat_interval=None))
    except SoupError:
        raise
    except ImportError as exc:
        raise StorageError(f"storage {redact(url)}: its database driver {exc.name or ''} is "
                           "not installed; pip install 'soupsearch[postgres]' and use "
                           f"{_PG_URL}") from None
    except Exception as exc:
        reason = redact_text(one_line(exc), url)
        m = _SECRET.search(url)
        hint = ("; write '@' in the password as %40 and '/' as %2F"
                if m and re.search(r"[@/]", m.group(2)) else "")
        raise StorageError(f"storage {redact(url)} cannot be opened: {reason}{hint}") from None


def check_storage(url: str) -> None:
    """Checks a storage URL before anything is written: its form, and that a database
    server answers (SQLite and journal files are created later, in the run folder).

    Raises:
        StorageError: a malformed URL, a missing driver or an unreachable server.
    """
    if url.startswith("journal:///"):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError) as exc:
        reason = redact_text(one_line(exc), url)
        raise StorageError(f"storage.url {redact(url)!r} is not a valid URL ({reason}); "
                           f"use sqlite:///PATH, {_PG_URL} or journal:///PATH") from None
    if not url.startswith("sqlite:"):
        open_storage(url)


def check_writable(study: optuna.Study, url: str) -> None:
    """Writes the study attribute ``search.opened`` (when a driver last opened it): a
    storage that cannot be written (a read-only file or mount, a full disk) fails here,
    in one line, before any worker starts."""
    try:
        study.set_user_attr("search.opened", time.time())
    except Exception as exc:
        raise _unwritable(url, exc) from None


def _unwritable(url: str, exc: BaseException) -> StorageError:
    reason = redact_text(one_line(_chain(exc)[-1]), url)
    return StorageError(f"storage {redact(url)} cannot be written ({reason}); make the "
                        "study file and its folder writable, or copy the run folder to a "
                        "writable place and resume the copy")


def open_study(url: str, name: str, directions: Sequence[str], sampler: Any = None,
               pruner: Any = None, create: bool = True) -> optuna.Study:
    """Creates or loads study ``name``; a mismatch of objectives is an error."""
    storage = open_storage(url)
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        if not create:
            raise StorageError(f"no study {name!r} in {redact(url)}; studies there: {names}")
        try:
            return _retrying(lambda: optuna.create_study(
                storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                directions=list(directions)))  # type: ignore[arg-type]
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another driver created it a moment ago
        except optuna.exceptions.StorageInternalError as exc:
            raise _unwritable(url, exc) from None
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    if create and len(study.directions) != len(directions):
        raise StorageError(f"study {name!r} in {redact(url)} has {len(study.directions)} "
                           f"objective(s), the config asks for {len(directions)}; use a new "
                           "study_name or the original objective setting")
    return study
