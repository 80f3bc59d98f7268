"""Storage URLs: the race on a new SQLite schema, redacted driver messages, plain
``postgresql://``, malformed URLs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from search.study import StorageError, open_storage, open_study
from search.study.storage import check_storage, redact_text, sqlite_file

ROOT = Path(__file__).resolve().parents[3]
DRIVERS = 4
ROUNDS = 10
# each process opens (and creates) a new study in each folder, all at the same moment
OPEN = """
import sys, time
from search.study import open_study
start, rounds = float(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):
    time.sleep(max(0.0, start + 0.4 * r - time.time()))
    open_study(f"sqlite:///{sys.argv[1]}/{r}/study.db", "race", ["maximize"])
"""


def test_drivers_racing_on_a_new_sqlite_study_all_succeed(tmp_path: Path) -> None:
    """Four processes create the same new SQLite schema and study at the same moment, ten
    times over: none dies in the schema creation ("table studies already exists")."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.time() + 4.0  # after every interpreter has imported optuna
    procs = [subprocess.Popen([sys.executable, "-c", OPEN, str(tmp_path), str(start),
                               str(ROUNDS)], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                              text=True)
             for _ in range(DRIVERS)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * DRIVERS, errors
    for round_ in range(ROUNDS):
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / str(round_)}/study.db")
        assert [s.study_name for s in storage.get_all_studies()] == ["race"]


PASSWORD_URL = "postgresql+psycopg2://soup:p@ss/w0rd@127.0.0.1:9/soup"


def test_driver_message_hides_every_piece_of_the_password() -> None:
    """The parser splits ``p@ss/w0rd`` and the driver echoes ``ss`` as a host name."""
    with pytest.raises(StorageError) as err:
        open_storage(PASSWORD_URL)
    message = str(err.value)
    prefix = ("storage postgresql+psycopg2://soup:***@127.0.0.1:9/soup cannot be opened: "
              '(psycopg2.OperationalError) could not translate host name "***" to address: ')
    assert message.startswith(prefix), message
    assert message.endswith("; write '@' in the password as %40 and '/' as %2F")
    assert '"ss"' not in message and "w0rd" not in message and "p@ss" not in message


def test_redact_text_exact() -> None:
    text = ('connection to "ss" failed for database "w0rd@127.0.0.1:9/soup" at '
            f"{PASSWORD_URL} (address unknown)")
    assert redact_text(text, PASSWORD_URL) == (
        'connection to "***" failed for database "***@127.0.0.1:9/soup" at '
        "postgresql+psycopg2://soup:***@127.0.0.1:9/soup (address unknown)")
    encoded = "postgresql://soup:p%40ss%2Fw0rd@db/soup"
    assert redact_text("bad password 'p@ss/w0rd' for soup", encoded) == \
        "bad password '***' for soup"


def test_plain_postgresql_url_uses_psycopg2() -> None:
    """Without psycopg (3), ``postgresql://`` connects through psycopg2: the error is the
    server's, not a missing driver."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg (3) is installed: SQLAlchemy's default driver is used")
    with pytest.raises(StorageError) as err:
        open_storage("postgresql://soup:pw@127.0.0.1:9/soup")
    assert str(err.value) == (
        "storage postgresql://soup:***@127.0.0.1:9/soup cannot be opened: "
        '(psycopg2.OperationalError) connection to server at "127.0.0.1", port 9 failed: '
        "Connection refused")


def test_plain_postgresql_url_opens_a_real_server(postgres_url: str) -> None:
    plain = "postgresql://" + postgres_url.split("://", 1)[1]
    study = open_study(plain, "plain_url", ["maximize"])
    assert study.study_name == "plain_url"


def test_malformed_url_is_one_line() -> None:
    with pytest.raises(StorageError) as err:
        check_storage("postgresql://soup:pw@db:notaport/soup")
    assert str(err.value).startswith(
        "storage.url 'postgresql://soup:***@db:notaport/soup' is not a valid URL (")
    assert "\n" not in str(err.value)


def test_sqlite_file_of_uri_form() -> None:
    assert sqlite_file("sqlite:///file:/data/run/study.db?mode=ro&uri=true") == \
        Path("/data/run/study.db")
    assert sqlite_file("sqlite:////data/run/study.db") == Path("/data/run/study.db")


def test_new_study_in_a_read_only_storage_is_one_line(tmp_path: Path) -> None:
    open_study(f"sqlite:///{tmp_path}/study.db", "old", ["maximize"])
    url = f"sqlite:///file:{tmp_path}/study.db?mode=ro&uri=true"
    with pytest.raises(StorageError) as err:
        open_study(url, "new", ["maximize"])
    assert str(err.value) == (
        f"storage {url} cannot be written (attempt to write a readonly database); make the "
        "study file and its folder writable, or copy the run folder to a writable place and "
        "resume the copy")
