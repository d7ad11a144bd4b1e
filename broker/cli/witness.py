"""`token-broker witness`: follow a broker's signed tree heads, cosign each that extends the
last one accepted, and fail loudly on a fork, a rewrite or a rollback.

Exit codes: 0 (with --once: the head was accepted), 1 an alarm (the log showed two
histories; the line on stderr says which), 2 usage. The broker is reached as every
broker-calling command reaches it; the witness needs role auditor (any scope).

With --submit URL (the broker's HTTP address) each cosigned checkpoint is posted back to
`URL/audit/cosignature`, where a broker configured with this witness's key keeps it toward its
--witness-quorum. A failed submission is reported on stderr and is not an alarm.

With OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT set, the witness also counts what it saw for the
operator's dashboards: `tokenbroker.witness.heads` (accepted heads) and
`tokenbroker.witness.alarms` (with `tokenbroker.witness.alarm`: fork, rewrite, rollback, …),
exported before it exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opentelemetry import metrics

from broker.audit.witness import Alarm, Prover, Witness, WitnessKey
from broker.cli import common
from broker.keyfile import write_private_key
from broker.telemetry import setup
from tokenbroker.client import BrokerClient
from tokenbroker.merkle import ProofError, VerifierKey

EXIT_ALARM = 1
WITNESS_SERVICE = "token-broker-witness"


def add_command(commands: common.Commands) -> None:
    witness = common.add_command(
        commands,
        "witness",
        _witness,
        help="follow a broker's signed tree heads; cosign each one consistent with the last",
        description="Follow the audit log's signed tree heads (GetTreeHead). Each new head "
        "must verify with the log's key and be consistent with the last head this witness "
        "accepted (ProveConsistency, checked here); then it is cosigned (C2SP "
        "tlog-cosignature) and kept in --state. A head that shrinks the log, a second head for "
        "the same size, or a history that does not extend the accepted one is an alarm: one "
        "line on stderr and exit 1. Needs role auditor (any scope).",
        examples=[
            "token-broker witness --log-key log.vkey --state ./witness --once",
            "token-broker witness --log-key log.vkey --state ./witness --interval 30 "
            "--target broker:50051 --account witness-1 --key witness-1.pem",
        ],
    )
    witness.add_argument(
        "--log-key", required=True, metavar="VKEY", help="the log's verifier key (file or text)"
    )
    witness.add_argument(
        "--state", required=True, type=Path, metavar="DIR", help="where accepted heads are kept"
    )
    witness.add_argument(
        "--witness-key",
        type=Path,
        metavar="PEM",
        help="the witness's Ed25519 key (default: witness-key.pem in --state, created)",
    )
    witness.add_argument("--name", default="witness", help="the witness's name in cosignatures")
    witness.add_argument(
        "--interval", type=common.positive_seconds, default=30.0, metavar="SECONDS"
    )
    witness.add_argument("--once", action="store_true", help="check one head, then exit")
    witness.add_argument(
        "--submit",
        metavar="URL",
        help="the broker's HTTP address: post each cosignature to URL/audit/cosignature",
    )
    common.add_connection_flags(witness)


def _witness(args: argparse.Namespace) -> int:
    log_key = _log_key(args.log_key)
    key = _witness_key(args.witness_key or args.state / "witness-key.pem", args.name)
    witness = Witness(log_key, key, args.state, time.time)
    vkey = args.state / "witness.vkey"  # what a log's operator configures to count this witness
    if not vkey.exists():
        vkey.write_text(key.verifier_text() + "\n")
    stop = threading.Event()
    meters = setup.meter_provider_from_env(os.environ, WITNESS_SERVICE)
    meter = (meters or metrics.NoOpMeterProvider()).get_meter("broker.cli.witness")
    accepted_heads = meter.create_counter("tokenbroker.witness.heads", "{head}")
    alarms = meter.create_counter("tokenbroker.witness.alarms", "{alarm}")
    try:
        with common.connect(args) as client:
            while True:
                try:
                    checkpoint = client.tree_head().tree_head.checkpoint
                    accepted = witness.observe(checkpoint, _prover(client))
                except Alarm as alarm:
                    alarms.add(1, {"tokenbroker.witness.alarm": _kind(alarm)})
                    print(f"token-broker witness: ALARM: {alarm}", file=sys.stderr, flush=True)
                    return EXIT_ALARM
                accepted_heads.add(1)
                head = accepted.checkpoint
                print(f"accepted {head.origin} size {head.size}", flush=True)
                if args.submit:
                    _submit(args.submit, accepted.cosigned)
                if args.once or stop.wait(args.interval):
                    return 0
    finally:
        if meters is not None:
            meters.shutdown()  # exports what was counted, the alarm above all


def _kind(alarm: Alarm) -> str:
    """The alarm's kind as its message names it first ("rewrite: …" → "rewrite")."""
    kind = str(alarm).split(":", 1)[0]
    return kind if kind.isidentifier() else "other"


def _submit(base_url: str, cosigned: str) -> None:
    url = base_url.rstrip("/") + "/audit/cosignature"
    if not url.startswith(("http://", "https://")):
        raise common.CliError(f"--submit: {base_url!r} is not an http:// or https:// URL")
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked above)
        url, data=cosigned.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            answer.read()
        print(f"submitted the cosignature to {url}", flush=True)
    except (urllib.error.URLError, OSError) as exc:
        detail = (
            exc.read(512).decode(errors="replace")
            if isinstance(exc, urllib.error.HTTPError)
            else exc
        )
        print(
            f"token-broker witness: cosignature not submitted to {url}: {detail}",
            file=sys.stderr,
            flush=True,
        )


def _prover(client: BrokerClient) -> Prover:
    def prove(first: int, second: int) -> list[bytes]:
        answer = client.prove_consistency(first, second)
        if (answer.first, answer.second) != (first, second):
            raise ProofError(f"asked for {first}..{second}, got {answer.first}..{answer.second}")
        return list(answer.proof)

    return prove


def _log_key(text: str) -> VerifierKey:
    path = Path(text)
    try:
        return VerifierKey.parse(path.read_text() if path.is_file() else text)
    except (ProofError, OSError) as exc:
        raise common.CliError(f"--log-key: {exc}") from None


def _witness_key(path: Path, name: str) -> WitnessKey:
    if path.exists():
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise common.CliError(f"{path}: the witness key must be an Ed25519 private key")
        return WitnessKey(name, private)
    private = Ed25519PrivateKey.generate()
    write_private_key(path, private)
    return WitnessKey(name, private)
