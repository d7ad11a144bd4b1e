"""How the commands print: JSON with stable keys for scripts, readable text for people.

Readable output adapts to where it goes. On a terminal, tables are aligned under a bold
header and states are coloured (unless NO_COLOR is set); piped, a table is tab-separated
values without a header, ready for `cut` and `awk`, and nothing is coloured.

The JSON keys are part of the CLI's contract: `run_json` and friends spell them out rather
than dumping messages, so a field the broker adds later is an addition, never a rename.
Times are RFC 3339 in UTC; absent values are null.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from broker import limits
from tokenbroker.v1 import types_pb2

_COLOURS = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33"}
STATE_COLOURS = {"active": "green", "ended": "yellow", "expired": "red"}


class Output:
    """One command's stdout."""

    def __init__(self, stream: TextIO | None = None, *, as_json: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.as_json = as_json
        self.terminal = self.stream.isatty()
        self.colour = self.terminal and not os.environ.get("NO_COLOR")

    def json(self, value: Any) -> None:
        self.line(json.dumps(value, indent=2, sort_keys=True))

    def line(self, text: str = "") -> None:
        print(text, file=self.stream)

    def paint(self, text: str, colour: str) -> str:
        if not self.colour or not text:
            return text
        return f"\x1b[{_COLOURS[colour]}m{text}\x1b[0m"

    def fields(self, pairs: Sequence[tuple[str, str]]) -> None:
        """`label: value` lines with the values aligned; empty values are left out."""
        # Values come from the broker's records, i.e. from callers: never let one add a line.
        shown = [(label, limits.printable(value)) for label, value in pairs if value]
        width = max((len(label) for label, _ in shown), default=0) + 1
        for label, value in shown:
            self.line(f"{label + ':':<{width}} {value}")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        # A newline or tab inside a cell would forge a row or a column: escaped, like every
        # control character (`limits.printable`).
        rows = [[limits.printable(cell) for cell in row] for row in rows]
        if not self.terminal:
            for row in rows:
                self.line("\t".join(row))
            return
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
        self.line(self.paint(_aligned(headers, widths), "bold"))
        state = headers.index("STATE") if "STATE" in headers else -1
        for row in rows:
            cells = [f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True)]
            if state >= 0:  # padded first: colour codes would upset the alignment
                cells[state] = self.state(row[state]) + cells[state][len(row[state]) :]
            self.line("  ".join(cells).rstrip())

    def state(self, name: str) -> str:
        return self.paint(name, STATE_COLOURS.get(name, "bold"))


def _aligned(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True)).rstrip()


# -- values ------------------------------------------------------------------------------------


def iso_time(stamp: timestamp_pb2.Timestamp) -> str | None:
    """RFC 3339 in UTC to the second; None for an unset timestamp."""
    if not stamp.seconds and not stamp.nanos:
        return None
    return datetime.fromtimestamp(stamp.seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def readable_time(stamp: timestamp_pb2.Timestamp, now: float | None = None) -> str:
    """`2026-03-01 12:00:00Z (in 59m)`; empty for an unset timestamp."""
    if not stamp.seconds and not stamp.nanos:
        return ""
    when = datetime.fromtimestamp(stamp.seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    delta = stamp.seconds - (time.time() if now is None else now)
    relative = f"in {span(delta)}" if delta >= 0 else f"{span(-delta)} ago"
    return f"{when} ({relative})"


def span(total: float) -> str:
    """A duration for people: `45s`, `9m`, `5h59m`, `2d3h`."""
    seconds = int(total)
    if seconds < 60:
        return f"{seconds}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 3600:
        return f"{minutes}m"
    if seconds < 86400:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"


def permissions_text(permissions: Sequence[types_pb2.Permission] | Mapping[str, Any]) -> str:
    pairs = (
        sorted(permissions.items())
        if isinstance(permissions, Mapping)
        else [(p.resource, p.level) for p in permissions]
    )
    return ", ".join(f"{resource}:{level}" for resource, level in pairs) or "none"


def permissions_json(permissions: Sequence[types_pb2.Permission]) -> dict[str, str]:
    return {p.resource: p.level for p in permissions}


def struct_json(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values, whole numbers as integers (protobuf keeps floats)."""
    return _whole_numbers(json_format.MessageToDict(struct))  # type: ignore[no-any-return]


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


# -- runs --------------------------------------------------------------------------------------


def state_name(state: types_pb2.RunState.ValueType) -> str:
    return types_pb2.RunState.Name(state).removeprefix("RUN_STATE_").lower()


def pipeline_text(ref: types_pb2.PipelineRef) -> str:
    return f"{ref.org}/{ref.project}/{ref.pipeline}"


def method_name(method: types_pb2.VerificationMethod.ValueType) -> str:
    return types_pb2.VerificationMethod.Name(method).removeprefix("VERIFICATION_METHOD_").lower()


def person_json(run: types_pb2.Run) -> dict[str, str] | None:
    if not run.HasField("on_behalf_of"):
        return None
    person = run.on_behalf_of
    return {
        "subject": person.subject,
        "issuer": person.issuer,
        "email": person.email,
        "display_name": person.display_name,
        "verification_method": method_name(person.verification_method),
        "evidence_sha256": person.evidence_sha256,
    }


def run_json(run: types_pb2.Run) -> dict[str, Any]:
    """A run for scripts; `attribution` is the line `runs show` prints."""
    return {
        "run_id": run.run_id,
        "pipeline": pipeline_text(run.pipeline),
        "org": run.pipeline.org,
        "project": run.pipeline.project,
        "state": state_name(run.state),
        "attribution": run.attribution.summary,
        "executed_by": run.attribution.executed_by,
        "triggered_via": run.triggered_via,
        "on_behalf_of": person_json(run),
        "actor_chain": list(run.actor_chain),
        "parent_run_id": run.parent_run_id or None,
        "permission_ceiling": permissions_json(run.permission_ceiling),
        "create_time": iso_time(run.create_time),
        "deadline": iso_time(run.deadline),
        "lease_seconds": run.lease.seconds if run.HasField("lease") else None,
        "lease_expire_time": iso_time(run.lease_expire_time),
        "end_time": iso_time(run.end_time),
        "end_reason": run.end_reason or None,
        "ended_by": run.ended_by or None,
        "inputs": dict(run.inputs),
        "pipeline_ids": {k.name: v for k, v in run.pipeline_ids.ListFields()},
        "environment": run.environment or None,
    }


def print_run(out: Output, run: types_pb2.Run) -> None:
    """The readable run: its id, the attribution line, then one field per line."""
    out.line(out.paint(f"Run {run.run_id}", "bold"))
    out.line(run.attribution.summary)
    lease = ""
    if run.HasField("lease"):
        lease = f"{span(run.lease.seconds)}, lapses {readable_time(run.lease_expire_time)}"
    ended = ""
    if run.HasField("end_time"):
        by = f" by {run.ended_by}" if run.ended_by else ""
        ended = f"{readable_time(run.end_time)}{by}: {run.end_reason}"
    out.fields(
        [
            ("state", out.state(state_name(run.state))),
            ("pipeline", pipeline_text(run.pipeline)),
            ("ceiling", permissions_text(run.permission_ceiling)),
            ("created", readable_time(run.create_time)),
            ("deadline", readable_time(run.deadline)),
            ("lease", lease),
            ("ended", ended),
            ("actor chain", " → ".join(run.actor_chain) or "none"),
            ("parent run", run.parent_run_id),
            ("ids", ", ".join(f"{k.name}={v}" for k, v in run.pipeline_ids.ListFields())),
            ("environment", run.environment),
            ("inputs", ", ".join(f"{k}={v}" for k, v in sorted(run.inputs.items()))),
        ]
    )


def run_row(run: types_pb2.Run) -> list[str]:
    return [
        run.run_id,
        state_name(run.state),
        pipeline_text(run.pipeline),
        run.attribution.executed_by,
        run.triggered_via,
        iso_time(run.create_time) or "",
    ]


RUN_HEADERS = ("RUN", "STATE", "PIPELINE", "EXECUTED BY", "TRIGGERED VIA", "CREATED")
