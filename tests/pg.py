"""A throw-away PostgreSQL server for tests: Debian's ``postgresql`` package (initdb, pg_ctl)
run in a temporary folder, on a free port of 127.0.0.1 and a Unix socket in that folder.

PostgreSQL refuses to run as root; when the tests run as root the server runs as the
``postgres`` user (``runuser``), in a folder owned by it. scripts/system_deps.sh installs the
package. Use it through the ``postgres_server`` fixture (tests/conftest.py), or::

    server = PostgresServer.start()
    url = server.create_database("jobs_1")   # postgresql://cmamba@127.0.0.1:<port>/jobs_1
    ...
    server.stop()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port

SUPERUSER = "cmamba"
"""The server's superuser (trusted from loopback and the socket: no password)."""


def postgres_bin() -> Path:
    """The folder of initdb and pg_ctl: on PATH, else Debian's newest under /usr/lib."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not versions:
        raise RuntimeError(
            "PostgreSQL is not installed (initdb, pg_ctl): run scripts/system_deps.sh as root "
            "or apt-get install postgresql"
        )
    return Path(versions[-1]).parent


@dataclass
class PostgresServer:
    base: Path
    port: int
    bin_dir: Path
    run_as: str | None

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        return self.base / "server.log"

    @classmethod
    def start(cls, timeout: float = 60.0) -> PostgresServer:
        """initdb a fresh cluster and start it; returns once it accepts connections."""
        bin_dir = postgres_bin()
        run_as = "postgres" if os.geteuid() == 0 else None
        # Under /tmp (not pytest's 0700 folder) so the postgres user can reach it; short, as a
        # Unix socket path must be.
        base = Path(tempfile.mkdtemp(prefix="cmamba-pg-"))
        if run_as is not None:
            user = pwd.getpwnam(run_as)
            os.chown(base, user.pw_uid, user.pw_gid)
        server = cls(base=base, port=free_port(), bin_dir=bin_dir, run_as=run_as)
        try:
            server._run(
                "initdb",
                "-D",
                str(server.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                timeout=timeout,
            )
            options = " ".join(
                [
                    f"-p {server.port}",
                    "-c listen_addresses=127.0.0.1",
                    f"-c unix_socket_directories={base}",
                    "-c fsync=off",  # a test database: speed over crash safety
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                    "-c shared_buffers=32MB",
                ]
            )
            server._run(
                "pg_ctl",
                "start",
                "-D",
                str(server.data_dir),
                "-l",
                str(server.log_file),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                timeout=timeout + 10,
            )
        except BaseException:
            server.stop()
            raise
        return server

    def _run(self, tool: str, *args: str, timeout: float) -> str:
        command = [str(self.bin_dir / tool), *args]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            log = self.log_file.read_text()[-3000:] if self.log_file.exists() else ""
            raise RuntimeError(
                f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{log}"
            )
        return result.stdout

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]

    def restart(self, timeout: float = 60.0) -> None:
        """Stop the server (fast shutdown: open connections are cut) and start it again."""
        self._run(
            "pg_ctl", "restart", "-D", str(self.data_dir), "-l", str(self.log_file),
            "-m", "fast", "-w", "-t", str(int(timeout)), timeout=timeout + 10,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder."""
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", timeout=30)
        deadline = time.monotonic() + 10
        while (self.data_dir / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.base, ignore_errors=True)
