"""The broker's audit log key: Ed25519, signing C2SP signed notes — tree heads (checkpoints)
and export statements.

A dedicated key, not one of the token signing keys: signed-note defines Ed25519 (type 0x01)
and nothing for P-256, and a key that only ever signs notes about the log cannot be turned
into a token signer (its public half is never in the JWKS that token verifiers trust). The
private key is a PEM file (0600) in the data dir, `audit-log-key.pem`, or the file
`--audit-log-key` names (replicas share one, so the log has one identity); beside it,
`<file>.vkey` holds the public verifier key, whose name is the log's origin. The name is
fixed when the key is created, so moving the broker to another address keeps the log's
identity.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.keyfile import write_private_key
from tokenbroker.merkle import SIGNATURE_PREFIX, VerifierKey, note_key_id

LOG_KEY_FILE = "audit-log-key.pem"
VKEY_SUFFIX = ".vkey"


class LogKeyMissing(Exception):
    """There is no log key where one was expected (nothing was created)."""


def origin_for(issuer: str) -> str:
    """A log origin from the broker's issuer URL: schema-less, as C2SP recommends."""
    bare = issuer.split("://", 1)[-1].rstrip("/")
    name = "".join(c for c in bare if not c.isspace() and c != "+") or "token-broker"
    return f"{name}/audit"


class LogKey:
    """An Ed25519 private key and the note name (the log's origin) it signs under."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.verifier = VerifierKey(name, note_key_id(name, raw), raw)

    @property
    def name(self) -> str:
        return self.verifier.name

    @classmethod
    def generate(cls, name: str) -> LogKey:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> LogKey:
        """The key in `path` and its name from `path`.vkey; LogKeyMissing if either is absent."""
        vkey_path = path.with_name(path.name + VKEY_SUFFIX)
        if not path.is_file() or not vkey_path.is_file():
            raise LogKeyMissing(f"no audit log key at {path} (with {vkey_path.name} beside it)")
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path}: the audit log key must be an Ed25519 private key")
        name = VerifierKey.parse(vkey_path.read_text()).name
        key = cls(name, private)
        if key.verifier.text() != vkey_path.read_text().strip():
            raise ValueError(f"{vkey_path} is not the public half of {path}")
        return key

    @classmethod
    def load_or_create(cls, path: Path, name: str) -> LogKey:
        """The key at `path`, created (0600, with its .vkey) under `name` if there is none."""
        try:
            return cls.load(path)
        except LogKeyMissing:
            if path.exists():
                raise
        key = cls.generate(name)
        key.write(path)
        return key

    def write(self, path: Path) -> None:
        write_private_key(path, self._key)
        vkey = path.with_name(path.name + VKEY_SUFFIX)
        fd = os.open(vkey, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.verifier.text() + "\n")

    def sign(self, text: str) -> str:
        """`text` (lines, each ending in a newline) as a signed note signed by this key."""
        if not text.endswith("\n") or "\n\n" in text:
            raise ValueError("a note's text is non-empty lines, each ending with a newline")
        signature = self._key.sign(text.encode())
        encoded = base64.b64encode(self.verifier.key_id + signature).decode()
        return f"{text}\n{SIGNATURE_PREFIX}{self.name} {encoded}\n"
