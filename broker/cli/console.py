"""`token-broker audit console`: a read-only web page for reviewers, on loopback.

It calls the broker with the reviewer's own credentials (role auditor): nothing new is
exposed on the broker. Runs are found by person (StreamAudit's person filter), by pipeline
(ListRuns) and by time; a run shows its attribution line, its events, the tokens issued to it
and when they died. Every event comes with its inclusion proof in one signed tree head, and
the page itself checks them (WebCrypto: SHA-256 and Ed25519) before it shows the
**Verified in your browser** mark — the console process is not trusted for that.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from google.protobuf import json_format

from broker.api.http import HttpServer, Request, Response, Routes
from broker.cli import common
from broker.cli.console_page import PAGE
from tokenbroker.client import BrokerClient
from tokenbroker.errors import BrokerError
from tokenbroker.merkle import ProofError, VerifierKey
from tokenbroker.v1 import types_pb2

MAX_RUNS = 100
MAX_EVENTS = 500


def add_command(sub: common.Commands) -> None:
    console = common.add_command(
        sub,
        "console",
        _console,
        help="a read-only web page for reviewers, on loopback",
        description="Serve a local, read-only web page that finds runs by person, pipeline or "
        "time and shows who executed them, who triggered them, their tokens and when those "
        "died, with each event's inclusion proof checked in the browser against the log's "
        "signed tree head. It calls the broker with your own credentials (role auditor).",
        examples=[
            "token-broker audit console --log-key log.vkey",
            "token-broker audit console --listen 127.0.0.1:8765 --account siem --key siem.pem",
        ],
    )
    console.add_argument(
        "--listen", default="127.0.0.1:8765", metavar="HOST:PORT", help="loopback address"
    )
    console.add_argument(
        "--log-key",
        metavar="VKEY",
        help="pin the log's verifier key (file or text); default: the one the broker names",
    )
    common.add_connection_flags(console)


def _console(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        raise common.CliError("--listen: the console serves on loopback only")
    pinned = _pinned(args.log_key) if args.log_key else None
    with common.connect(args) as client, serving(client, pinned, host, int(port)) as url:
        print(f"token-broker audit console: {url}", file=sys.stderr, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            return 0
    return 0


def _pinned(text: str) -> str:
    from pathlib import Path

    path = Path(text)
    value = path.read_text() if path.is_file() else text
    try:
        return VerifierKey.parse(value).text()
    except ProofError as exc:
        raise common.CliError(f"--log-key: {exc}") from None


@contextmanager
def serving(
    client: BrokerClient, pinned_key: str | None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """The console's page and API on `host:port` (0: any free port); yields its URL."""
    server = HttpServer(host, port)
    server.mount(routes(client, pinned_key))
    server.start()
    try:
        yield f"http://{host}:{server.port}/"
    finally:
        server.stop()


def routes(client: BrokerClient, pinned_key: str | None) -> Routes:
    table = Routes()
    table.add("GET", "/", lambda request: Response.text(200, PAGE, "text/html; charset=utf-8"))
    table.add("GET", "/api/runs", _guarded(lambda request: _runs(client, request)))
    table.add("GET", "/api/run", _guarded(lambda request: _run(client, request, pinned_key)))
    return table


def _guarded(handler: Callable[[Request], dict[str, Any]]) -> Callable[[Request], Response]:
    def answer(request: Request) -> Response:
        try:
            return Response.json(200, handler(request), (("Cache-Control", "no-store"),))
        except BrokerError as exc:
            return Response.json(502, {"error": str(exc)})
        except ValueError as exc:
            return Response.json(400, {"error": str(exc)})

    return answer


def _one(request: Request, name: str) -> str:
    values = request.query.get(name) or [""]
    return values[0].strip()[:256]


def _day(text: str, end: bool) -> float | None:
    if not text:
        return None
    day = datetime.date.fromisoformat(text)
    moment = datetime.datetime.combine(day, datetime.time.max if end else datetime.time.min)
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def _runs(client: BrokerClient, request: Request) -> dict[str, Any]:
    person, org = _one(request, "person"), _one(request, "org")
    project, pipeline = _one(request, "project"), _one(request, "pipeline")
    since, until = _day(_one(request, "from"), False), _day(_one(request, "to"), True)
    if person:
        ids: list[str] = []
        stream = client.stream_audit(person=person, org=org, project=project, follow=False)
        with stream as events:
            for event in events:
                if event.run_id and event.run_id not in ids:
                    ids.append(event.run_id)
                if len(ids) >= MAX_RUNS:
                    break
        found = [client.get_run(run_id).run for run_id in ids]
    else:
        found = []
        for run in client.list_runs(org=org, project=project, pipeline=pipeline):
            found.append(run)
            if len(found) >= MAX_RUNS:
                break
    shown = [
        _run_dict(run)
        for run in found
        if (not pipeline or run.pipeline.pipeline == pipeline)
        and (since is None or run.create_time.seconds >= since)
        and (until is None or run.create_time.seconds <= until)
    ]
    return {"runs": shown}


def _run_dict(run: types_pb2.Run) -> dict[str, Any]:
    fields = json_format.MessageToDict(run, preserving_proto_field_name=True)
    return {
        "run_id": run.run_id,
        "pipeline": f"{run.pipeline.org}/{run.pipeline.project}/{run.pipeline.pipeline}",
        "state": types_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_").lower(),
        "summary": run.attribution.summary,
        "created": fields.get("create_time", ""),
        "ended": fields.get("end_time", ""),
        "end_reason": run.end_reason,
    }


def _run(client: BrokerClient, request: Request, pinned_key: str | None) -> dict[str, Any]:
    run_id = _one(request, "id")
    if not run_id:
        raise ValueError("?id=RUN_ID is required")
    run = client.get_run(run_id).run
    head = client.tree_head()
    size = head.tree_head.tree_size
    events: list[dict[str, Any]] = []
    tokens: list[dict[str, Any]] = []
    with client.stream_audit(run_id=run_id, follow=False) as stream:
        for event in stream:
            if event.sequence > head.tree_head.tree_base + size or len(events) >= MAX_EVENTS:
                break  # newer than the head all proofs are against
            proved = client.prove_inclusion(event.sequence, size)
            details = json_format.MessageToDict(event.details)
            events.append(
                {
                    "sequence": event.sequence,
                    "action": event.action,
                    "principal": event.principal,
                    "time": json_format.MessageToDict(event)["time"],
                    "record": proved.record,
                    "leaf_index": proved.leaf_index,
                    "proof": [base64.b64encode(h).decode() for h in proved.proof],
                }
            )
            if event.action == "token.issued":
                tokens.append(_token(details, run))
    return {
        "run": _run_dict(run),
        "events": events,
        "tokens": tokens,
        "checkpoint": head.tree_head.checkpoint,
        "log_key": pinned_key or head.verifier_key,
        "key_pinned": pinned_key is not None,
    }


def _token(details: dict[str, Any], run: types_pb2.Run) -> dict[str, Any]:
    expires = float(details.get("exp_us", 0)) / 1e6
    ended = run.end_time.seconds + run.end_time.nanos / 1e9 if run.HasField("end_time") else None
    died = expires if ended is None else min(expires, ended)
    cause = "expired" if ended is None or expires <= ended else "run ended"
    if cause == "run ended" and run.end_reason:
        cause += f": {run.end_reason}"
    return {
        "token_id": str(details.get("jti", "")),
        "audience": str(details.get("aud", "")),
        "permissions": json.dumps(details.get("permissions", {}), sort_keys=True),
        "step": str(details.get("step", "")),
        "died": datetime.datetime.fromtimestamp(died, datetime.UTC).isoformat(),
        "died_because": cause,
    }
