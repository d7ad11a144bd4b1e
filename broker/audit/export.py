"""The exported audit log: JSON Lines that a SIEM ingests and `audit verify` re-checks.

Events: one object per line, the event's canonical record (the exact fields its hash covers)
plus `prev_hash` and `hash`, keys sorted. Removing those two keys gives back the record, so
anyone can recompute `hash = SHA-256(prev_hash || canonical JSON of the record)`.

Checkpoints (optional, a separate file): one object per line with `jws` (the evidence) and,
for reading, the sequence, hash, time, kid and prev_sequence it claims.
Keys: a JWKS document with the public keys that signed them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from broker.audit import events as audit
from broker.store import CheckpointRecord, StoredEvent


class MalformedLine(Exception):
    """A line of an exported file is not an exported audit event or checkpoint."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.line = line
        self.problem = problem


def event_line(event: StoredEvent) -> str:
    entry = {**event.record, "prev_hash": event.prev_hash, "hash": event.hash}
    return audit.canonical_bytes(entry).decode()


def checkpoint_line(checkpoint: CheckpointRecord) -> str:
    return json.dumps(
        {
            "sequence": checkpoint.sequence,
            "hash": checkpoint.hash,
            "time": checkpoint.time,
            "kid": checkpoint.kid,
            "prev_sequence": checkpoint.prev_sequence,
            "jws": checkpoint.jws,
        },
        sort_keys=True,
    )


def write_lines(lines: Iterator[str], out: TextIO) -> int:
    count = 0
    for line in lines:
        out.write(line)
        out.write("\n")
        count += 1
    return count


def read_events(path: Path) -> Iterator[StoredEvent]:
    """Events of an exported file, in file order. Raises MalformedLine at a bad line."""
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            entry = _object(path, number, text)
            prev_hash, stored_hash = entry.pop("prev_hash", None), entry.pop("hash", None)
            sequence = entry.get("sequence")
            if not isinstance(prev_hash, str) or not isinstance(stored_hash, str):
                raise MalformedLine(path, number, "no prev_hash and hash")
            if not isinstance(sequence, int):
                raise MalformedLine(path, number, "no integer sequence")
            yield StoredEvent(sequence, entry, prev_hash, stored_hash)


def read_checkpoints(path: Path) -> list[CheckpointRecord]:
    found = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            entry = _object(path, number, text)
            try:
                found.append(
                    CheckpointRecord(
                        sequence=int(entry["sequence"]),
                        hash=str(entry["hash"]),
                        time=float(entry["time"]),
                        kid=str(entry["kid"]),
                        jws=str(entry["jws"]),
                        prev_sequence=int(entry["prev_sequence"]),
                    )
                )
            except (KeyError, TypeError, ValueError):
                raise MalformedLine(path, number, "not an exported checkpoint") from None
    return found


def _object(path: Path, number: int, text: str) -> dict[str, Any]:
    try:
        entry = json.loads(text)
    except ValueError:
        raise MalformedLine(path, number, "not JSON") from None
    if not isinstance(entry, dict):
        raise MalformedLine(path, number, "not a JSON object")
    return entry
