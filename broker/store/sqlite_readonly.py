"""The audit tables of a broker's SQLite file, opened read-only, for offline tools.

`token-broker audit verify` and `export` must never write to the file they inspect (no
migration, no WAL checkpoint by us), and must read one consistent snapshot even while a
broker is writing: everything is read inside one read transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from broker.store import CheckpointRecord, PublicKeyRecord, StoredEvent
from broker.store.sqlite import CHECKPOINT_COLUMNS, DB_FILENAME

PAGE = 2000


class NotADatabase(Exception):
    """The path is not a readable broker database."""


def database_path(data_dir_or_file: Path) -> Path:
    """The database file inside a data dir, or the path itself when it is a file."""
    return data_dir_or_file / DB_FILENAME if data_dir_or_file.is_dir() else data_dir_or_file


class ReadOnlyAuditLog:
    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise NotADatabase(f"{path}: no such database file")
        self.path = path
        try:
            self._conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
            )
            self._conn.execute("BEGIN")  # one snapshot for every read below
            self._tables = {
                row[0]
                for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.Error as exc:
            raise NotADatabase(f"{path}: cannot read: {exc}") from None
        if "audit_events" not in self._tables:
            self.close()
            raise NotADatabase(f"{path}: not a token-broker database (no audit_events table)")

    def __enter__(self) -> ReadOnlyAuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def pruned_through(self) -> int:
        if "audit_retention" not in self._tables:
            return 0
        row = self._conn.execute("SELECT pruned_through FROM audit_retention WHERE id=1").fetchone()
        return 0 if row is None else int(row[0])

    def count(self, after: int = 0) -> int:
        return int(
            self._conn.execute(
                "SELECT COUNT(*) FROM audit_events WHERE sequence>?", (after,)
            ).fetchone()[0]
        )

    def oldest_sequence(self) -> int | None:
        row = self._conn.execute("SELECT MIN(sequence) FROM audit_events").fetchone()
        return None if row[0] is None else int(row[0])

    def events(self, after: int = 0) -> Iterator[StoredEvent]:
        """Rows in sequence order, as stored (an unreadable record is passed on as {})."""
        cursor = after
        while True:
            rows = self._conn.execute(
                "SELECT sequence, record, prev_hash, hash FROM audit_events WHERE sequence>? "
                "ORDER BY sequence LIMIT ?",
                (cursor, PAGE),
            ).fetchall()
            for sequence, record, prev_hash, stored_hash in rows:
                yield StoredEvent(sequence, _json_object(record), str(prev_hash), str(stored_hash))
            if len(rows) < PAGE:
                return
            cursor = rows[-1][0]

    def checkpoints(self, after: int = -1) -> list[CheckpointRecord]:
        if "audit_checkpoints" not in self._tables:
            return []
        rows = self._conn.execute(
            f"SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE sequence>? "  # noqa: S608
            "ORDER BY sequence",
            (after,),
        ).fetchall()
        return [CheckpointRecord(*row) for row in rows]

    def public_keys(self) -> list[PublicKeyRecord]:
        if "signing_keys" not in self._tables:
            return []
        rows = self._conn.execute(
            "SELECT kid, alg, public_jwk, create_time, retire_time FROM signing_keys "
            "ORDER BY create_time"
        ).fetchall()
        return [PublicKeyRecord(*row) for row in rows]


def _json_object(text: object) -> dict[str, object]:
    # A tampered row may hold anything; the verifier reports it, rather than crashing here.
    try:
        value = json.loads(str(text))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
