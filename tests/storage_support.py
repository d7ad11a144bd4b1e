"""Helpers for the storage tests: another process holding the database, a broker started
as an operator would, and file systems that refuse writes even to root."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO


@contextmanager
def holding_write_lock(db: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process (not a broker: a backup tool, an sqlite3 shell) holding a write
    transaction on the database until the block ends."""
    script = (
        "import sqlite3, sys\n"
        f"conn = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "conn.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert process.stdout.readline().strip() == "locked"
        yield process
    finally:
        process.stdin.close()
        process.wait(timeout=10)
        process.stdout.close()


def without_root_override() -> list[str]:
    """A command prefix under which file modes bind: as root, the broker runs without the
    capabilities that override them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file modes cannot refuse root")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]


@dataclass
class Exit:
    code: int
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


def serve(data_dir: Path, *args: str, prefix: Sequence[str] = ()) -> Exit:
    """`token-broker serve` as an operator starts it; for starts that must be refused (a
    broker that does start is stopped and reported as exit 0)."""
    command = [
        *prefix,
        sys.executable,
        "-m",
        "broker",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "",
        "--data-dir",
        str(data_dir),
        *args,
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=REPO, timeout=30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the broker started instead of refusing: {exc.stderr!r}") from None
    return Exit(done.returncode, done.stderr)


def fingerprint(path: Path) -> tuple[str, int, int] | None:
    """What 'left untouched' means: same bytes, same mode (None: no such file)."""
    if not path.exists():
        return None
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode, st.st_size
