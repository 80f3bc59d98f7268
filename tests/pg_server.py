"""A real, throwaway PostgreSQL server for tests.

``start_postgres(root)`` runs ``initdb`` into a fresh data directory, starts the
server with ``pg_ctl`` on a free port of 127.0.0.1 (its unix socket lives inside
the data directory, so it never clashes with a system server), creates the role
``soup`` (password ``soup``) and the database ``soup``, and returns a
:class:`PgServer` whose ``url`` SQLAlchemy and Optuna accept.

``initdb`` refuses to run as root, so when the tests run as root the server
binaries are run as the ``postgres`` system user (created by the Debian package
``postgresql``) through ``runuser`` (or ``su``), and the data directory is handed
to that user.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PgServer", "find_bin_dir", "start_postgres"]

MISSING_MESSAGE = (
    "PostgreSQL server binaries not found; install the Debian package 'postgresql' "
    "(apt-get install -y postgresql)"
)
SERVER_USER = "postgres"
SUPERUSER = "postgres"
ROLE = DATABASE = PASSWORD = "soup"
# sockaddr_un.sun_path holds 108 bytes, NUL included.
_MAX_SOCKET_PATH = 100


@dataclass
class PgServer:
    """A running throwaway server; ``stop()`` shuts it down (idempotent)."""

    url: str
    port: int
    data_dir: Path
    log_file: Path
    _pg_ctl: str = field(repr=False)
    _run_as: str | None = field(default=None, repr=False)
    _cleanup_dir: Path | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def stop(self) -> None:
        """Stop the server with ``pg_ctl stop -m immediate``; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        _run(
            [self._pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
            self._run_as,
            cwd=self.data_dir.parent,
            check=False,
        )
        if self._cleanup_dir is not None:
            shutil.rmtree(self._cleanup_dir, ignore_errors=True)


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin``: numeric version."""
    version = Path(path).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None if there is none.

    PATH is tried first (symlinks resolved, so ``psql`` and ``postgres`` next to the
    real binaries are found too), then ``/usr/lib/postgresql/*/bin``, newest first.
    """
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
        candidates.append(Path(on_path).parent)
    for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        candidates.append(Path(path))
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "pg_ctl")):
            return directory
    return None


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(
    cmd: list[str],
    run_as: str | None,
    *,
    cwd: Path,
    check: bool = True,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (as ``run_as`` when given), capturing output."""
    if run_as is not None:
        if shutil.which("runuser"):
            cmd = ["runuser", "-u", run_as, "--", *cmd]
        else:
            cmd = ["su", run_as, "-s", "/bin/sh", "-c", shlex.join(cmd)]
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}"
        )
    return proc


def _log_tail(log_file: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no server log: {exc})"


def _accessible_by(user: str, path: Path, cwd: Path) -> bool:
    """Whether ``user`` can enter ``path`` (every parent must be searchable)."""
    proc = _run(["test", "-x", str(path), "-a", "-w", str(path)], user, cwd=cwd, check=False)
    return proc.returncode == 0


def _work_dir(root: Path, run_as: str | None) -> tuple[Path, Path | None]:
    """A fresh directory for data and log, and the directory to delete on stop (if any).

    ``root/postgres`` is used when the server user can reach it and the socket path
    stays short; otherwise (e.g. pytest's 0700 ``/tmp/pytest-of-root``) a private
    directory under the system temp dir is used and removed again by ``stop()``.
    """
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    candidate = root / "postgres"
    socket_path = candidate / "data" / ".s.PGSQL.65535"
    usable = len(str(socket_path)) <= _MAX_SOCKET_PATH
    if usable and run_as is not None:
        candidate.mkdir(exist_ok=True)
        shutil.chown(candidate, run_as, run_as)
        usable = _accessible_by(run_as, candidate, cwd=Path("/"))
    if usable:
        candidate.mkdir(exist_ok=True)
        return candidate, None
    with contextlib.suppress(OSError):
        candidate.rmdir()
    work = Path(tempfile.mkdtemp(prefix="soup-pg-"))
    if run_as is not None:
        shutil.chown(work, run_as, run_as)
    return work, work


def _connect_superuser(data_dir: Path, port: int, timeout: float) -> Any:
    """Open a psycopg2 connection as the superuser over the unix socket."""
    import psycopg2

    return psycopg2.connect(
        host=str(data_dir),
        port=port,
        user=SUPERUSER,
        dbname="postgres",
        connect_timeout=max(1, int(timeout)),
    )


def _wait_ready(server: PgServer, deadline: float) -> None:
    """Poll until ``soup`` can log in over TCP, or raise with the log tail."""
    import psycopg2

    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            conn = psycopg2.connect(
                host="127.0.0.1",
                port=server.port,
                user=ROLE,
                password=PASSWORD,
                dbname=DATABASE,
                connect_timeout=2,
            )
        except psycopg2.OperationalError as exc:
            last = exc
            time.sleep(0.1)
            continue
        conn.close()
        return
    raise RuntimeError(
        f"PostgreSQL on port {server.port} did not accept connections in time: {last}\n"
        f"--- {server.log_file} (tail) ---\n{_log_tail(server.log_file)}"
    )


def start_postgres(root: Path, *, timeout: float = 30.0) -> PgServer:
    """Start a throwaway PostgreSQL server with data under ``root``.

    Returns a :class:`PgServer` whose ``url`` is
    ``postgresql+psycopg2://soup:soup@127.0.0.1:PORT/soup``. Raises ``RuntimeError``
    if the binaries are missing or the server does not come up within ``timeout``
    seconds (the message then carries the tail of the server log).
    """
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise RuntimeError(MISSING_MESSAGE)
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root, but there is no '{SERVER_USER}' system user to run the "
                "PostgreSQL server as (initdb refuses root); install the Debian package "
                f"'postgresql' or create it: useradd --system {SERVER_USER}"
            ) from None
        run_as = SERVER_USER

    deadline = time.monotonic() + timeout
    work, cleanup = _work_dir(Path(root), run_as)
    data_dir = work / "data"
    log_file = work / "server.log"
    try:
        _run(
            [
                str(bin_dir / "initdb"),
                "-D", str(data_dir),
                "-U", SUPERUSER,
                "-E", "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
            run_as,
            cwd=work,
        )
        # Settings go into postgresql.conf (appending keeps the file's owner), so no
        # option string has to survive pg_ctl's shell quoting.
        base_conf = (data_dir / "postgresql.conf").read_text()
        pg_ctl = str(bin_dir / "pg_ctl")
        for _attempt in range(3):
            port = _free_port()
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(port),
                "unix_socket_directories": "'" + str(data_dir).replace("'", "''") + "'",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "100",
            }
            extra = "".join(f"{key} = {value}\n" for key, value in settings.items())
            (data_dir / "postgresql.conf").write_text(
                base_conf + "\n# throwaway test server (tests/pg_server.py)\n" + extra
            )
            wait_s = max(1, int(deadline - time.monotonic()))
            proc = _run(
                [pg_ctl, "-D", str(data_dir), "-l", str(log_file), "-w", "-t", str(wait_s),
                 "start"],
                run_as,
                cwd=work,
                check=False,
                timeout=wait_s + 10,
            )
            if proc.returncode == 0:
                break
            if "already in use" not in _log_tail(log_file) or time.monotonic() > deadline:
                raise RuntimeError(
                    f"pg_ctl start failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n"
                    f"--- {log_file} (tail) ---\n{_log_tail(log_file)}"
                )
        else:
            raise RuntimeError(f"no free port after 3 tries\n{_log_tail(log_file)}")

        server = PgServer(
            url=f"postgresql+psycopg2://{ROLE}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}",
            port=port,
            data_dir=data_dir,
            log_file=log_file,
            _pg_ctl=pg_ctl,
            _run_as=run_as,
            _cleanup_dir=cleanup,
        )
        atexit.register(server.stop)
        try:
            conn = _connect_superuser(data_dir, port, deadline - time.monotonic())
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD %s", (PASSWORD,))
                cur.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
            conn.close()
            _wait_ready(server, deadline)
        except BaseException:
            server.stop()
            raise
        return server
    except BaseException:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
