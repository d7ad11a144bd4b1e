"""A throw-away PostgreSQL cluster for the tests and `token-broker bench`: a temporary
directory, a loopback port, no password (trust on 127.0.0.1 only), stopped and deleted when
the session ends.

PostgreSQL refuses to run as root, so as root (CI) the cluster runs as the `postgres` user
through `runuser`. The server binaries are found through `pg_config --bindir` or Debian's
`/usr/lib/postgresql/<version>/bin`. If PostgreSQL cannot start, the fixture fails loudly:
PostgreSQL tests are never skipped silently.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 60.0


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Cluster:
    port: int
    data_dir: Path

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


def server_bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(subprocess.check_output([pg_config, "--bindir"], text=True).strip())  # noqa: S603
        if (bindir / "initdb").exists():
            return bindir
    raise ClusterError(
        "PostgreSQL server binaries not found (install Debian's postgresql package; "
        "`make test` does this through .ci/run)"
    )


def _as_cluster_owner(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ClusterError("running as root and there is no 'postgres' user") from exc
    return ["runuser", "-u", "postgres", "--", *argv]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(argv: list[str]) -> None:
    # Our own argv: the server binaries found above, a temporary directory and a port.
    done = subprocess.run(_as_cluster_owner(argv), capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise ClusterError(f"{Path(argv[0]).name} failed: {done.stderr.strip() or done.stdout}")


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    bindir = server_bindir()
    base = Path(tempfile.mkdtemp(prefix="tb-pg-"))
    data_dir = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    port = _free_port()
    try:
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )
        _run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data_dir),
                "-l",
                str(base / "server.log"),
                "-w",
                "-t",
                str(int(START_TIMEOUT)),
                "start",
                "-o",
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base}"
                " -c max_connections=200 -c fsync=on",
            ]
        )
        yield Cluster(port, data_dir)
    except ClusterError as exc:
        log = base / "server.log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        raise ClusterError(f"{exc}\n{detail}") from exc
    finally:
        with contextlib.suppress(ClusterError):
            _run([str(bindir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def create_database(cluster: Cluster, name: str) -> str:
    """A fresh, empty database on the cluster; returns its DSN."""
    import psycopg

    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return cluster.dsn(name)
