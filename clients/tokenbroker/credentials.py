"""Credentials for calling token-broker, as gRPC call credentials.

A service account proves who it is with a short assertion it signs itself (RFC 7523 style);
`assertion_credentials` signs a fresh one and replaces it before it expires, so callers never
craft metadata by hand::

    creds = assertion_credentials("ci-orchestrator", key_pem, audience="https://broker.example")
    channel = tls_channel("broker.example:443", creds)

A run's executor uses the run credential the broker returned: `bearer_credentials(credential)`.
For a broker started locally without --policy, `dev_admin_credentials("var")` picks up the
development admin key the broker wrote into its data dir, and `local_channel` connects to a
loopback address (gRPC sends call credentials only over TLS or a local connection).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenbroker.defaults import DEV_CLIENT_FILE as DEV_CLIENT_FILE  # still importable from here

MAX_LIFETIME = 300.0  # the broker refuses assertions that live longer
DEFAULT_REFRESH_BEFORE = 60.0


def _algorithm(private_key: Any) -> str:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(private_key, rsa.RSAPrivateKey):
        return "RS256"
    raise ValueError("unsupported key type: use an EC P-256, Ed25519 or RSA private key")


class AssertionSigner:
    """Signs the account's assertions and reuses one until it is close to expiry."""

    def __init__(
        self,
        account: str,
        private_key_pem: bytes,
        audience: str,
        *,
        key_id: str = "",
        lifetime: float = MAX_LIFETIME,
        refresh_before: float = DEFAULT_REFRESH_BEFORE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < refresh_before < lifetime <= MAX_LIFETIME:
            raise ValueError("need 0 < refresh_before < lifetime <= 300 seconds")
        self.account = account
        self.audience = audience
        # Any: PyJWT takes only the key types `_algorithm` accepts, checked just below.
        self._key: Any = serialization.load_pem_private_key(private_key_pem, password=None)
        self._alg = _algorithm(self._key)
        self._key_id = key_id
        self._lifetime = lifetime
        self._refresh_before = refresh_before
        self._clock = clock
        self._lock = threading.Lock()
        self._current = ""
        self._expires = 0.0

    def assertion(self) -> str:
        """A valid assertion: the cached one, or a fresh one when it nears expiry."""
        with self._lock:
            now = self._clock()
            if now >= self._expires - self._refresh_before:
                self._current = self._sign(now)
                self._expires = now + self._lifetime
            return self._current

    def _sign(self, now: float) -> str:
        issued = int(now)
        claims = {
            "iss": self.account,
            "sub": self.account,
            "aud": self.audience,
            "iat": issued,
            "exp": issued + int(self._lifetime),
            "jti": secrets.token_urlsafe(16),
        }
        headers = {"typ": "JWT", **({"kid": self._key_id} if self._key_id else {})}
        return jwt.encode(claims, self._key, algorithm=self._alg, headers=headers)


class _BearerPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, credential: Callable[[], str]) -> None:
        self._credential = credential

    def __call__(
        self,
        context: grpc.AuthMetadataContext,
        callback: grpc.AuthMetadataPluginCallback,
    ) -> None:
        try:
            value = f"Bearer {self._credential()}"
        except Exception as exc:  # a failure here must reach the caller, not kill gRPC's thread
            callback((), exc)
            return
        callback((("authorization", value),), None)


def assertion_credentials(
    account: str, private_key_pem: bytes, audience: str, *, key_id: str = ""
) -> grpc.CallCredentials:
    """Call credentials that sign in as `account`; `audience` is the broker's issuer URL."""
    signer = AssertionSigner(account, private_key_pem, audience, key_id=key_id)
    return grpc.metadata_call_credentials(_BearerPlugin(signer.assertion), name=account)


def signer_credentials(signer: AssertionSigner) -> grpc.CallCredentials:
    """Call credentials from an `AssertionSigner` you configured yourself (e.g. its clock)."""
    return grpc.metadata_call_credentials(_BearerPlugin(signer.assertion), name=signer.account)


def bearer_credentials(credential: str) -> grpc.CallCredentials:
    """Call credentials presenting a fixed bearer credential (a run credential)."""
    return grpc.metadata_call_credentials(_BearerPlugin(lambda: credential), name="bearer")


def dev_admin_credentials(data_dir: str | Path = "var") -> grpc.CallCredentials:
    """The development admin of a broker started without --policy on this machine."""
    data_dir = Path(data_dir)
    info = json.loads((data_dir / DEV_CLIENT_FILE).read_text())
    key_pem = (data_dir / info["key_file"]).read_bytes()
    return assertion_credentials(
        info["account"], key_pem, info["audience"], key_id=info.get("key_id", "")
    )


def local_channel(target: str, credentials: grpc.CallCredentials) -> grpc.Channel:
    """A plaintext channel to a loopback broker that still carries call credentials."""
    channel_credentials = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP), credentials
    )
    return grpc.secure_channel(target, channel_credentials)


def tls_channel(
    target: str,
    credentials: grpc.CallCredentials | None = None,
    *,
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A TLS channel; with `private_key` and `certificate_chain` it authenticates by mTLS."""
    channel_credentials = grpc.ssl_channel_credentials(
        root_certificates, private_key, certificate_chain
    )
    if credentials is not None:
        channel_credentials = grpc.composite_channel_credentials(channel_credentials, credentials)
    return grpc.secure_channel(target, channel_credentials, options=options)
