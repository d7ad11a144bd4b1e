"""Helpers for the audit tests: callers, a real checkpoint signer, populated logs, faults.

Every gRPC call of the audit tests goes through `orchestrator()` or `auditor()`, so that
caller credentials (deny-by-default authentication) are plugged in here and only here.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.api.server import BrokerServer
from broker.audit.checkpoints import PrivateKeySigner
from broker.audit.events import AuditDraft, Outcome
from broker.audit.keeper import AuditKeeper, KeeperSettings
from broker.auth.authz import Op
from broker.context import CallContext
from broker.runs.model import PipelineRef, Run
from broker.store import PublishKey, Store, Write
from tests.accounts import standard_accounts
from tests.support import BrokerProcess
from tests.support import FakeClock as FakeClock  # still importable from here
from tokenbroker.credentials import (
    AssertionSigner,
    assertion_credentials,
    dev_admin_credentials,
    signer_credentials,
)
from tokenbroker.defaults import DEV_CLIENT_FILE
from tokenbroker.v1 import broker_pb2_grpc

Stub = broker_pb2_grpc.TokenBrokerServiceStub


Broker = BrokerServer | BrokerProcess


def _credentials(broker: Broker) -> grpc.CallCredentials:
    """Every role on every org: the dev admin a broker without --policy wrote into its data
    dir, or root of the standard test policy. In-process brokers get assertions dated by
    their own clock (tests move it)."""
    if isinstance(broker, BrokerProcess):
        return dev_admin_credentials(broker.data_dir)
    data_dir = broker.broker.settings.data_dir
    if (data_dir / DEV_CLIENT_FILE).exists():
        info = json.loads((data_dir / DEV_CLIENT_FILE).read_text())
        signer = AssertionSigner(
            info["account"],
            (data_dir / info["key_file"]).read_bytes(),
            info["audience"],
            key_id=info.get("key_id", ""),
            clock=broker.broker.clock,
        )
        return signer_credentials(signer)
    root = standard_accounts()["root"]
    audience = broker.broker.authn.audience
    return assertion_credentials(root.name, root.private_pem, audience, key_id=root.kid)


@contextmanager
def _stub(broker: Broker, options: list[tuple[str, int]] | None = None) -> Iterator[Stub]:
    credentials = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP), _credentials(broker)
    )
    with grpc.secure_channel(broker.target, credentials, options=options or []) as channel:
        yield Stub(channel)


@contextmanager
def orchestrator(broker: Broker) -> Iterator[Stub]:
    """A caller that may start and end runs."""
    with _stub(broker) as stub:
        yield stub


@contextmanager
def auditor(broker: Broker, options: list[tuple[str, int]] | None = None) -> Iterator[Stub]:
    """A caller with the `auditor` role (may stream every audit event)."""
    with _stub(broker, options) as stub:
        yield stub


def make_signer(kid: str = "audit-test-1") -> PrivateKeySigner:
    return PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()), kid, "ES256")


def publish(store: Store, signer: PrivateKeySigner, now: float = 1000.0) -> None:
    """Publish the signer's public key as the key ring does (signing_keys)."""
    event = AuditDraft(time=now, action="key.created", outcome=Outcome.SUCCESS)
    store.commit(Write([event], PublishKey(signer.kid, signer.alg, signer.public_jwk(), now)))


def keeper(
    store: Store,
    signer: PrivateKeySigner | None,
    clock: FakeClock,
    *,
    retention_seconds: float = 0.0,
    every_events: int = 10,
    prune_batch: int = 50_000,
) -> AuditKeeper:
    settings = KeeperSettings(
        every_events=every_events,
        interval=3600.0,
        retention_seconds=retention_seconds,
        issuer="http://127.0.0.1:50052",
        prune_batch=prune_batch,
    )
    return AuditKeeper(store, clock, signer, settings)


def draft(action: str = "run.started", run_id: str = "", time: float = 1000.0) -> AuditDraft:
    return AuditDraft(
        time=time,
        action=action,
        outcome=Outcome.SUCCESS,
        principal="orchestrator",
        run_id=run_id,
        pipeline=PipelineRef("acme", "web", "deploy"),
        details={"reason": "test"},
    )


def attacker_connection(db: Path) -> sqlite3.Connection:
    """Open the database as someone with file access would: triggers dropped first."""
    conn = sqlite3.connect(db, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        conn.execute(f'DROP TRIGGER "{name}"')
    return conn


@contextmanager
def writes_refused(data_dir: Path) -> Iterator[None]:
    """Make the filesystem refuse writes to the broker's database, for real.

    As root, permissions do not stop writes; the immutable attribute does (chattr +i on the
    database and its WAL; not on the -shm, which SQLite maps into memory). Skips when the
    filesystem or privileges do not allow it.
    """
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr is not installed; cannot make the database refuse writes")
    files = [data_dir / "broker.db", data_dir / "broker.db-wal"]
    files = [f for f in files if f.exists()]
    done = []
    try:
        for path in files:
            result = subprocess.run(
                [chattr, "+i", str(path)], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                pytest.skip(
                    f"cannot set the immutable attribute here ({result.stderr.strip()}); "
                    "needs root (CAP_LINUX_IMMUTABLE) on a filesystem that supports it"
                )
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run([chattr, "-i", str(path)], check=True)


class AllowAll:
    """An authorizer that allows everything, for feed tests that are not about who may read."""

    def require(
        self,
        ctx: CallContext,
        op: Op,
        *,
        pipeline: PipelineRef | None = None,
        run: Run | None = None,
    ) -> None:
        return None

    def allows(
        self,
        ctx: CallContext,
        op: Op,
        *,
        pipeline: PipelineRef | None = None,
        run: Run | None = None,
    ) -> bool:
        return True
