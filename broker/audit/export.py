"""The exported audit log: JSON Lines that a SIEM ingests and `audit verify` re-checks.

Events: one object per line, the event's canonical record (the exact fields its hash covers)
plus `prev_hash` and `hash`, keys sorted. Removing those two keys gives back the record, so
anyone can recompute `hash = SHA-256(prev_hash || canonical JSON of the record)`.

The first line is the export's signed statement, `{"export_statement": NOTE}`: a C2SP signed
note, signed with the broker's audit log key, that states the range the file holds (first and
last sequence), the chain hash before the first event and after the last, and the Merkle
tree at the last event (its size, root, and the frontier before the first event). A file
missing events at its start, end or anywhere in between therefore no longer matches what was
signed, and `audit verify` names the missing sequences.

Checkpoints (optional, a separate file): one object per line with `jws` (the evidence) and,
for reading, the sequence, hash, time, kid and prev_sequence it claims.
Keys: a JWKS document with the public keys that signed them.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
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


STATEMENT_TYPE = "tokenbroker-audit-export/v1"
STATEMENT_KEY = "export_statement"


@dataclass(frozen=True)
class ExportStatement:
    """What an export holds, as its signed statement says: events `first`..`last` (none when
    last < first), linked to `prev_hash` before them and ending at `head_hash`, and the
    Merkle tree at `last` (leaf i = event tree_base + i + 1; `left` is the frontier of the tree
    before `first`)."""

    origin: str
    first: int
    last: int
    prev_hash: str
    head_hash: str
    tree_base: int | None = None
    tree_size: int = 0
    tree_root: bytes = b""
    left: list[bytes] = field(default_factory=list)

    def text(self) -> str:
        lines = [
            STATEMENT_TYPE,
            f"origin {self.origin}",
            f"first {self.first}",
            f"last {self.last}",
            f"prev {self.prev_hash}",
            f"head {self.head_hash}",
        ]
        if self.tree_base is not None:
            lines.append(f"tree {self.tree_base} {self.tree_size} {_b64(self.tree_root)}")
            lines.extend(f"left {_b64(h)}" for h in self.left)
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> ExportStatement:
        """From the verified text of a statement; ValueError when it is not one."""
        lines = text.removesuffix("\n").split("\n")
        if len(lines) < 6 or lines[0] != STATEMENT_TYPE:
            raise ValueError(f"not a {STATEMENT_TYPE} statement")
        fields = dict(line.split(" ", 1) for line in lines[1:6] if " " in line)
        try:
            statement = cls(
                origin=fields["origin"],
                first=_count(fields["first"]),
                last=_count(fields["last"]),
                prev_hash=_hex(fields["prev"]),
                head_hash=_hex(fields["head"]),
            )
        except KeyError as exc:
            raise ValueError(f"the statement has no {exc.args[0]!r} line") from None
        if statement.last < statement.first - 1 or statement.first < 1:
            raise ValueError("the statement's range is not first..last")
        if len(lines) == 6:
            return statement
        kind, _, value = lines[6].partition(" ")
        parts = value.split(" ")
        if kind != "tree" or len(parts) != 3:
            raise ValueError("the statement's tree line is `tree BASE SIZE ROOT`")
        left = []
        for line in lines[7:]:
            kind, _, value = line.partition(" ")
            if kind != "left":
                raise ValueError(f"unexpected statement line {kind!r}")
            left.append(_digest(value))
        return cls(
            statement.origin,
            statement.first,
            statement.last,
            statement.prev_hash,
            statement.head_hash,
            _count(parts[0]),
            _count(parts[1]),
            _digest(parts[2]),
            left,
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _count(text: str) -> int:
    if not text.isdigit() or len(text) > 19:
        raise ValueError(f"{text[:20]!r} is not a count")
    return int(text)


def _hex(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError("a chain hash is 64 lowercase hex digits")
    return text


def _digest(text: str) -> bytes:
    try:
        digest = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("a tree hash is base64") from None
    if len(digest) != 32:
        raise ValueError("a tree hash is 32 bytes")
    return digest


def statement_line(note: str) -> str:
    return json.dumps({STATEMENT_KEY: note}, sort_keys=True)


def read_statement(path: Path) -> str | None:
    """The signed statement on the first line of an exported file (None if there is none)."""
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            entry = _object(path, number, text)
            note = entry.get(STATEMENT_KEY)
            if note is None:
                return None
            if not isinstance(note, str) or len(entry) != 1:
                raise MalformedLine(path, number, "the export statement is not a signed note")
            return note
    return None


def read_events(path: Path) -> Iterator[StoredEvent]:
    """Events of an exported file, in file order. Raises MalformedLine at a bad line."""
    with path.open(encoding="utf-8") as lines:
        first = True
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            entry = _object(path, number, text)
            if first and STATEMENT_KEY in entry:
                first = False
                continue  # the statement, read by read_statement
            first = False
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
