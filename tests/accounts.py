"""Service accounts for tests: real keys, a real policy file, and stubs that call as them."""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.api.server import BrokerServer
from tokenbroker.credentials import assertion_credentials, bearer_credentials, local_channel
from tokenbroker.v1 import broker_pb2_grpc

Stub = broker_pb2_grpc.TokenBrokerServiceStub


def private_pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def public_pem(key: Any) -> str:
    data: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode()


@dataclass(frozen=True)
class Account:
    name: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    key: Any = field(repr=False)
    kid: str = "k1"
    certificate_sans: tuple[str, ...] = ()
    extra_toml: str = ""  # more lines for the [accounts.NAME] table

    @property
    def private_pem(self) -> bytes:
        return private_pem(self.key)

    def toml(self) -> str:
        lines = [
            f"[accounts.{self.name}]",
            f"roles = {json.dumps(list(self.roles))}",
            f"scopes = {json.dumps(list(self.scopes))}",
            f"certificate_sans = {json.dumps(list(self.certificate_sans))}",
            f'keys = [{{ kid = "{self.kid}", pem = """\n{public_pem(self.key)}""" }}]',
            self.extra_toml,
        ]
        return "\n".join(lines) + "\n"


def new_account(
    name: str,
    roles: Iterable[str],
    scopes: Iterable[str] = ("acme/*/*",),
    **more: Any,
) -> Account:
    return Account(
        name, tuple(roles), tuple(scopes), ec.generate_private_key(ec.SECP256R1()), **more
    )


DELEGATION_TOML = """\
[accounts.deploy-portal.delegation]
user_domains = ["example.com"]
asserted_identities = true
asserted_domains = ["example.com"]
"""


@functools.cache
def standard_accounts() -> dict[str, Account]:
    """The callers the shared `server` fixture knows, by role (keys made once per session)."""
    return {
        "orchestrator": new_account("ci-orchestrator", ["orchestrator"]),
        "delegator": new_account("deploy-portal", ["delegator"], extra_toml=DELEGATION_TOML),
        "auditor": new_account("siem", ["auditor"]),
        "verifier": new_account("orders-api", ["verifier"]),
        "admin": new_account("ops-admin", ["admin"], []),
        "root": new_account("root", ["orchestrator", "delegator", "auditor", "admin"], ["*/*/*"]),
    }


def policy_toml(accounts: Iterable[Account]) -> str:
    return "version = 1\n\n" + "\n".join(a.toml() for a in accounts)


def write_policy(path: Path, accounts: Iterable[Account]) -> Path:
    path.write_text(policy_toml(accounts))
    return path


def sign_assertion(
    account: Account,
    audience: str,
    *,
    now: float | None = None,
    lifetime: int = 300,
    key: Any = None,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """An assertion as a client signs it; keyword arguments override, add or (None) drop
    claims; `headers` likewise for the JOSE header."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": account.name,
        "sub": account.name,
        "aud": audience,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": secrets.token_urlsafe(8),
    }
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    header = {"typ": "JWT", "kid": account.kid, **(headers or {})}
    header = {name: value for name, value in header.items() if value is not None}
    return jwt.encode(payload, key or account.key, algorithm="ES256", headers=header)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Callers:
    """Stubs calling a server as given accounts; closes their channels at the end."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server
        self._channels: list[grpc.Channel] = []

    @property
    def audience(self) -> str:
        return self.server.broker.authn.audience

    def channel(self, credentials: grpc.CallCredentials) -> grpc.Channel:
        channel = local_channel(self.server.target, credentials)
        self._channels.append(channel)
        return channel

    def stub(self, account: Account) -> Stub:
        creds = assertion_credentials(
            account.name, account.private_pem, self.audience, key_id=account.kid
        )
        return Stub(self.channel(creds))

    def bearer_stub(self, credential: str) -> Stub:
        return Stub(self.channel(bearer_credentials(credential)))

    def metadata(self, account: Account) -> tuple[tuple[str, str], ...]:
        """Hand-made `authorization` metadata, for clients that take raw metadata."""
        return bearer(sign_assertion(account, self.audience))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


@contextmanager
def callers_of(server: BrokerServer) -> Iterator[Callers]:
    callers = Callers(server)
    try:
        yield callers
    finally:
        callers.close()


def root_channel(server: BrokerServer) -> grpc.Channel:
    """A channel to `server` calling as root (every role, every org). Close it after use."""
    root = standard_accounts()["root"]
    creds = assertion_credentials(
        root.name, root.private_pem, server.broker.authn.audience, key_id=root.kid
    )
    return local_channel(server.target, creds)
