"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temporary data directory.

:func:`start_postgres` runs ``initdb`` and ``postgres`` (as the ``postgres`` system user when
the tests run as root: ``initdb`` refuses root), listening on 127.0.0.1 only, on a free port,
with its unix sockets in the temporary directory and ``fsync`` on. One generated superuser is
trusted from the loopback address and the sockets, nobody else. :meth:`PostgresServer.stop`
shuts it down and removes the directory (in the background). :func:`create_database` gives a
test a database of its own, so tests never see each other's rows.

``tests/conftest.py`` wraps this as the session fixture ``postgres_url``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

POSTGRES_ROOT = Path("/usr/lib/postgresql")
SYSTEM_USER = "postgres"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
MISSING_MESSAGE = (
    "PostgreSQL is not installed (no {root}/<version>/bin/initdb): the order book's tests run "
    "a real server. `make test` installs it (apt-get install postgresql), or run "
    "'sudo apt-get install postgresql'."
)
_PR_SET_PDEATHSIG = 1


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's binaries are missing, or the server could not be started."""


def find_postgres_bin(root: Path = POSTGRES_ROOT) -> Path:
    """The ``bin`` directory of the newest PostgreSQL under ``root`` (Debian's layout)."""
    versions = []
    for candidate in root.glob("*/bin/initdb") if root.is_dir() else ():
        with contextlib.suppress(ValueError):
            versions.append((float(candidate.parent.parent.name), candidate.parent))
    if not versions:
        raise PostgresUnavailable(MISSING_MESSAGE.format(root=root))
    return max(versions)[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class _RunAs:
    """Who runs the server: the ``postgres`` system user under root, else the caller."""

    uid: int
    gid: int

    @classmethod
    def for_this_process(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls(os.geteuid(), os.getegid())
        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresUnavailable(
                f"the tests run as root and initdb refuses root, but there is no "
                f"'{SYSTEM_USER}' user (Debian's postgresql package creates it): "
                "`make test` installs it"
            ) from None
        return cls(entry.pw_uid, entry.pw_gid)

    def preexec(self, die_with_parent: bool) -> None:
        """In the child, before exec: drop root; the server dies if the test process does."""
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)
        if die_with_parent:
            # After setuid, which clears it. SIGINT is PostgreSQL's fast shutdown. The parent
            # is the starting thread: start servers from the main thread (fixtures do).
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


@dataclass
class PostgresServer:
    """A running server; ``url`` is its superuser's maintenance database."""

    directory: Path
    port: int
    user: str
    database: str
    process: subprocess.Popen[bytes]

    host = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        """Immediate shutdown, then remove the directory.

        No checkpoint (a fast shutdown's costs seconds with fsync on): the data is thrown away.
        The directory is renamed at once and unlinked in the background: a session's databases
        are hundreds of megabytes, seconds of unlinking on a busy disk.
        """
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGQUIT)
                try:
                    self.process.wait(STOP_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(STOP_TIMEOUT_SECONDS)
        finally:
            _remove_in_background(self.directory)


def _remove_in_background(directory: Path) -> None:
    trash = directory.with_name(f"{directory.name}-removing")
    try:
        directory.rename(trash)
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
        return
    # sh starts rm and exits: nothing is left for this process to wait for.
    subprocess.run(  # noqa: S603 (a fixed command line)
        ["sh", "-c", 'rm -rf -- "$0" &', str(trash)],  # noqa: S607 (sh from PATH)
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def _connect(url: str, timeout: float = 5.0) -> psycopg.Connection:
    return psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True)


def _wait_ready(server: PostgresServer, deadline: float) -> None:
    while True:
        if server.process.poll() is not None:
            raise PostgresUnavailable(
                f"postgres exited with {server.process.returncode} while starting:\n"
                f"{server.log_tail()}"
            )
        try:
            with _connect(server.url, timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise PostgresUnavailable(
                    f"postgres did not accept connections within {START_TIMEOUT_SECONDS:.0f} s:"
                    f"\n{server.log_tail()}"
                ) from None
            time.sleep(0.05)


def start_postgres(attempts: int = 3) -> PostgresServer:
    """A fresh server in a new temporary directory, ready for connections; stop it yourself.

    Raises :class:`PostgresUnavailable` (with :data:`MISSING_MESSAGE` if not installed).
    """
    bin_dir = find_postgres_bin()
    run_as = _RunAs.for_this_process()
    # Not under pytest's tmp_path: its parents are private to root, the server's user needs in.
    directory = Path(tempfile.mkdtemp(prefix="cancel-risk-pg-"))
    try:
        os.chown(directory, run_as.uid, run_as.gid)
        user = f"book_{secrets.token_hex(4)}"
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        env.pop("PGDATA", None)
        initdb = subprocess.run(  # noqa: S603 (PostgreSQL's own initdb)
            [
                str(bin_dir / "initdb"),
                "--pgdata",
                str(directory / "data"),
                "--username",
                user,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
            ],
            cwd=directory,
            env=env,
            preexec_fn=lambda: run_as.preexec(die_with_parent=False),
            capture_output=True,
            check=False,
        )
        if initdb.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed ({initdb.returncode}): {initdb.stderr.decode(errors='replace')}"
            )
        # Only the generated user, only over loopback and the private sockets.
        hba = directory / "data" / "pg_hba.conf"
        hba.write_text(f"local all {user} trust\nhost all {user} 127.0.0.1/32 trust\n")
        for _ in range(attempts):
            server = _launch(bin_dir, directory, user, free_port(), run_as, env)
            try:
                _wait_ready(server, time.monotonic() + START_TIMEOUT_SECONDS)
            except PostgresUnavailable:
                if server.process.poll() is None:
                    server.process.kill()
                    server.process.wait()
                if "could not bind" not in server.log_tail() and "in use" not in server.log_tail():
                    raise
                continue  # another process took the port in between: try another one
            return server
        raise PostgresUnavailable(f"no free port after {attempts} attempts")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _launch(
    bin_dir: Path, directory: Path, user: str, port: int, run_as: _RunAs, env: dict[str, str]
) -> PostgresServer:
    with (directory / "postgres.log").open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 (PostgreSQL's own server)
            [
                str(bin_dir / "postgres"),
                "-D",
                str(directory / "data"),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"port={port}",
                "-c",
                f"unix_socket_directories={directory}",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                "-c",
                "full_page_writes=on",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=60",
            ],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: run_as.preexec(die_with_parent=True),
        )
    return PostgresServer(directory, port, user, "postgres", process)


def create_database(server_url: str, prefix: str = "test") -> str:
    """A new, empty database on the server of ``server_url``, named uniquely; its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with _connect(server_url) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"
