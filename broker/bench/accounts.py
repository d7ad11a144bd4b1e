"""The benchmark's callers: a policy file with one account per role, and their keys.

The broker is started with this policy (not the development one) so that every call is
authorized as in production: an orchestrator scoped to the bench org, a delegator that may
assert people's identities, an auditor following the log, and an API that only verifies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ORG = "bench"
KEY_ID = "bench-1"
PERSON_DOMAIN = "example.com"


@dataclass(frozen=True)
class BenchAccount:
    name: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    extra_toml: str = ""


ORCHESTRATOR = BenchAccount("bench-orchestrator", ("orchestrator",), (f"{ORG}/*/*",))
DELEGATOR = BenchAccount(
    "bench-portal",
    ("delegator",),
    (f"{ORG}/*/*",),
    # ExecuteOnBehalfOf with an identity the portal asserts (no IdP round trip in the bench).
    f"[accounts.bench-portal.delegation]\n"
    f'user_domains = ["{PERSON_DOMAIN}"]\n'
    f"asserted_identities = true\n"
    f'asserted_domains = ["{PERSON_DOMAIN}"]\n',
)
AUDITOR = BenchAccount("bench-auditor", ("auditor",), ("*/*/*",))
API = BenchAccount("bench-api", ("verifier",), (f"{ORG}/*/*",))
ACCOUNTS = (ORCHESTRATOR, DELEGATOR, AUDITOR, API)


def _account_toml(account: BenchAccount, public_pem: str) -> str:
    return (
        f"[accounts.{account.name}]\n"
        f"roles = {json.dumps(list(account.roles))}\n"
        f"scopes = {json.dumps(list(account.scopes))}\n"
        f'keys = [{{ kid = "{KEY_ID}", pem = """\n{public_pem}""" }}]\n'
        f"{account.extra_toml}"
    )


def write_policy(directory: Path) -> Path:
    """Write `policy.toml` and each account's private key (`<name>.pem`, 0600) into
    `directory`; return the policy's path."""
    directory.mkdir(parents=True, exist_ok=True)
    tables = []
    for account in ACCOUNTS:
        key = ec.generate_private_key(ec.SECP256R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key_path = directory / f"{account.name}.pem"
        key_path.write_bytes(private)
        key_path.chmod(0o600)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        tables.append(_account_toml(account, public.decode()))
    policy = directory / "policy.toml"
    policy.write_text("# token-broker bench policy\nversion = 1\n\n" + "\n".join(tables))
    return policy


def private_key_pem(directory: Path, account: BenchAccount) -> bytes:
    return (directory / f"{account.name}.pem").read_bytes()
