"""A test OpenID Connect identity provider: a real RSA key pair, a JWKS, signed ID tokens."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


class TestIdentityProvider:
    __test__ = False  # not a pytest test class

    def __init__(self, issuer: str = "https://idp.example.com") -> None:
        self.issuer = issuer
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "idp-" + secrets.token_hex(4)

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        jwk.update(kid=self.kid, use="sig")  # no "alg", as many real IdPs publish them
        return {"keys": [jwk]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def id_token(
        self,
        *,
        subject: str,
        email: str,
        audience: str,
        email_verified: bool = True,
        lifetime: float = 300,
        name: str = "",
        **extra: Any,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "exp": now + int(lifetime),
            "email": email,
            "email_verified": email_verified,
        }
        if name:
            claims["name"] = name
        claims.update(extra)
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})
