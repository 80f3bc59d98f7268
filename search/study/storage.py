"""Storage URLs and studies: open a storage by URL, create or load a study, redact secrets.

Example:
    >>> redact("postgresql://soup:secret@db:5432/soup")
    'postgresql://soup:***@db:5432/soup'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from search.errors import SoupError, one_line

log = logging.getLogger(__name__)
# user:password@ after the scheme; the password runs to the last "@" (SQLAlchemy takes
# a raw "/" or "@" in it), so a password is never half shown
_SECRET = re.compile(r"(://[^/:@\s]*:)(.*)(@[^@]*)$", re.DOTALL)


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
        reason = redact(one_line(exc))
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
