"""What must hold before a SQLite file is served from, and the files around it.

Opening the wrong file is worse than not starting: an older broker writing to a newer
schema, the broker's tables added to another application's database, a lost database
silently replaced by an empty one (a new audit chain at sequence 1 that verifies), or two
brokers interleaving one chain. Each is refused here with one line, before anything is
written to the file.

Beside the database `NAME.db` live `NAME.lock` (held by the broker that serves it, with its
pid) and `NAME.created` (written when the store was created: it is what shows later that a
missing or empty database lost a history). Every file made here is 0600 and every directory
0700, whatever the umask: the database holds people's emails and the audit trail.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from broker.store import (
    CorruptStore,
    ForeignStore,
    HistoryMissing,
    NewerSchema,
    ReadOnlyStore,
    StoreInUse,
    StoreRefused,
)

# PRAGMA application_id of a token-broker store ("TkBr"), set when the store is created.
APPLICATION_ID = 0x546B4272
# The tables by which a store created before the application id existed is recognised.
LEGACY_TABLES = frozenset({"schema_migrations", "runs", "audit_events", "signing_keys"})

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def lock_path(database: Path) -> Path:
    return database.with_suffix(".lock")


def created_mark(database: Path) -> Path:
    return database.with_suffix(".created")


def sidecars(database: Path) -> list[Path]:
    """SQLite's own files next to the database (write-ahead log and shared memory)."""
    return [Path(f"{database}-wal"), Path(f"{database}-shm")]


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and missing parents, each 0700 (existing ones are left alone)."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            path.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ReadOnlyStore(f"{path}: cannot create the directory: {exc.strerror}") from None
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode is filtered by the umask


def create_private_file(path: Path) -> None:
    """Create `path` empty and 0600, so that SQLite's -wal and -shm inherit the mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    except OSError as exc:
        raise ReadOnlyStore(f"{path}: cannot create the database: {exc.strerror}") from None
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)


def tighten(paths: Iterable[Path]) -> None:
    """Make files from before this rule owner-only (best effort: they may be someone else's)."""
    for path in paths:
        with contextlib.suppress(OSError):
            if path.stat().st_mode & 0o077:
                os.chmod(path, PRIVATE_FILE)


class StoreLock:
    """An exclusive lock on NAME.lock for as long as the store is open.

    flock(2) locks belong to the open file: a second opener (another broker, or the same
    process opening the store twice) is refused, and the kernel releases the lock when the
    holder exits, even on kill -9, so a stale lock file never blocks a restart.
    """

    def __init__(self, database: Path) -> None:
        self.path = lock_path(database)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        except OSError as exc:
            raise ReadOnlyStore(
                f"{self.path}: cannot create the store's lock file: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ReadOnlyStore(f"{self.path}: cannot lock: {exc.strerror}") from None
            raise StoreInUse(
                f"{database}: in use by another broker (pid {holder}, holding {self.path}); "
                "stop it, or give this broker its own --data-dir"
            ) from None
        with contextlib.suppress(OSError):
            os.fchmod(self._fd, PRIVATE_FILE)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    @classmethod
    def adopt(cls, database: Path, fd: int) -> StoreLock:
        """The lock a supervisor took for its worker processes, inherited as `fd`: this
        process serves the store beside its siblings, and any other broker is still refused.

        Checked, not trusted: `fd` must be the lock file of this very database and hold its
        lock (flock on the inherited open file succeeds only for the group that holds it)."""
        path = lock_path(database)
        try:
            held, expected = os.fstat(fd), os.stat(path)
        except OSError as exc:
            raise StoreInUse(f"{path}: the inherited store lock is unusable: {exc}") from None
        if (held.st_dev, held.st_ino) != (expected.st_dev, expected.st_ino):
            raise StoreInUse(f"{database}: the inherited lock is not this store's ({path})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreInUse(
                f"{database}: in use by another broker (holding {path}); the inherited lock "
                "is not the one held"
            ) from None
        lock = cls.__new__(cls)
        lock.path = path
        lock._fd = fd
        return lock

    def fileno(self) -> int:
        return self._fd

    def release(self) -> None:
        if self._fd >= 0:
            # Closing releases the lock; the file stays (removing it would race a new opener).
            os.close(self._fd)
            self._fd = -1


class WriterTurns:
    """Whose turn it is to write, among the worker processes of one `serve --workers`.

    SQLite makes a writer that finds the file locked sleep and retry (1, 2, 5, ... 100 ms), so
    a worker whose group commit keeps the lock busy starves its siblings (IssueToken p99 went
    from 36 to 217 ms with two workers). A writer first takes this lock instead, waiting in the
    kernel, which wakes it the moment the other releases. It is a POSIX record lock on the
    store's lock file: per process, and on Linux independent of the flock(2) the supervisor
    holds on the same file. POSIX locks drop when the process closes *any* descriptor of the
    file, so the inherited StoreLock descriptor is closed only after this one, at close."""

    def __init__(self, database: Path) -> None:
        path = lock_path(database)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            reason = exc.strerror
            raise ReadOnlyStore(f"{path}: cannot open the store's lock file: {reason}") from None

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def check_writable(database: Path) -> None:
    """The broker must be able to write the database, its directory and SQLite's files."""
    directory = database.parent
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        raise ReadOnlyStore(
            f"{directory}: the store's directory is read-only (SQLite writes its journal "
            "there); make it writable by the broker's user"
        )
    for path in (database, *sidecars(database)):
        if path.exists() and not os.access(path, os.W_OK, effective_ids=True):
            raise ReadOnlyStore(
                f"{path}: the database file is read-only; make it writable by the broker's "
                "user (for reading only, use `token-broker audit verify`)"
            )


def is_empty(database: Path) -> bool:
    """True when there is no database yet: no file, or a zero-length one."""
    try:
        return database.stat().st_size == 0
    except (FileNotFoundError, NotADirectoryError):
        return True


def check_no_history(database: Path, history: Iterable[Path]) -> None:
    """Refuse to create an empty store where a broker kept one before."""
    marks = [created_mark(database), sidecars(database)[0], *history]
    found = next((path for path in marks if path.exists()), None)
    if found is None:
        return
    state = "is empty" if database.exists() else "is missing"
    raise HistoryMissing(
        f"{database} {state}, but this data dir held a broker before ({found} exists): "
        "restore the database from a backup, or start with --init-store to begin a new, "
        "empty history"
    )


def mark_created(database: Path) -> None:
    mark = created_mark(database)
    if mark.exists():
        return
    text = (
        f"token-broker keeps its store in {database.name} here (created or first opened "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}).\n"
        "If that database is missing or empty, the broker refuses to start rather than begin "
        "a new history: restore it, or start with --init-store.\n"
    )
    tmp = mark.with_name(f".{mark.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), PRIVATE_FILE)
        handle.write(text)
    os.replace(tmp, mark)


def identify(conn: sqlite3.Connection, database: Path, latest: int) -> int:
    """The schema version of a token-broker store (0: a database with nothing in it yet).

    Reads only: raises ForeignStore for another application's database and NewerSchema for
    a store written by a newer broker, before anything has been written to the file.
    """
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    tables = {
        str(row[0])
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        if not str(row[0]).startswith("sqlite_")
    }
    if app_id not in (0, APPLICATION_ID):
        raise ForeignStore(
            f"{database}: not a token-broker store (SQLite application id 0x{app_id:08x}, "
            f"ours is 0x{APPLICATION_ID:08x}); point --store at the broker's own database"
        )
    if app_id == 0 and tables and not tables >= LEGACY_TABLES:
        shown = ", ".join(sorted(tables)[:5]) + (", …" if len(tables) > 5 else "")
        raise ForeignStore(
            f"{database}: not a token-broker store (it holds other tables: {shown}); "
            "point --store at the broker's own database"
        )
    if "schema_migrations" not in tables:
        if app_id == APPLICATION_ID:
            raise CorruptStore(f"{database}: a token-broker store without its schema table")
        return 0
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    version = int(row[0])
    check_version(database, version, latest)
    return version


def check_version(database: object, version: int, latest: int) -> None:
    if version > latest:
        raise NewerSchema(
            f"{database}: schema version {version} is newer than this broker knows "
            f"({latest}); it was written by a newer token-broker: run that version"
        )


def refusal(database: Path, exc: sqlite3.Error) -> StoreRefused:
    """The one translation of an SQLite error while opening into why the store is refused."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreInUse(
            f"{database}: locked by another process ({exc}); stop whatever holds it open"
        )
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return ReadOnlyStore(f"{database}: cannot write the database ({exc})")
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
        return StoreRefused(f"{database}: cannot open the store ({exc})")
    return CorruptStore(
        f"{database}: not a readable SQLite database ({exc}): corrupt or not a store; "
        "restore it from a backup"
    )
