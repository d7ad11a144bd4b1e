"""Interoperability: bound tokens and their proofs, checked by an independent DPoP check
written from RFC 9449 §4.3 with PyJWT alone (nothing of `tokenbroker.dpop` is imported),
so that an API in another stack can adopt them; proofs made with PyJWT alone are accepted by
our checkers; and a Node.js API checking with `jose` alone (clients/node/dpop-check.mjs)
accepts our bound tokens and proofs."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.api.server import BrokerServer
from tests.support import perms, start_run_request
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

Stub = broker_pb2_grpc.TokenBrokerServiceStub
AUDIENCE = "deploy.example.com"
URL = "https://deploy.example.com/releases"


class Refused(Exception):
    pass


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rfc7638_thumbprint(jwk: dict[str, Any]) -> str:
    required = {
        "EC": ["crv", "kty", "x", "y"],
        "RSA": ["e", "kty", "n"],
        "OKP": ["crv", "kty", "x"],
    }
    members = {name: jwk[name] for name in required[jwk["kty"]]}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def independent_check(
    proof: str, *, method: str, url: str, access_token: str, jkt: str, now: float
) -> dict[str, Any]:
    """RFC 9449 §4.3, steps 1-12, with PyJWT only; raises Refused saying which step failed."""
    header = jwt.get_unverified_header(proof)
    if header.get("typ") != "dpop+jwt":
        raise Refused("typ")
    if header.get("alg") not in ("ES256", "RS256", "PS256", "EdDSA"):
        raise Refused("alg")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict) or "d" in jwk:
        raise Refused("jwk")
    key = jwt.PyJWK(jwk, algorithm=header["alg"]).key
    try:
        claims: dict[str, Any] = jwt.decode(
            proof,
            key,
            algorithms=[header["alg"]],
            options={"require": ["jti", "htm", "htu", "iat"], "verify_iat": False},
        )
    except jwt.InvalidSignatureError:
        raise Refused("signature") from None
    if claims["htm"] != method:
        raise Refused("htm")
    if claims["htu"].split("?")[0].split("#")[0] != url.split("?")[0].split("#")[0]:
        raise Refused("htu")
    if abs(claims["iat"] - now) > 60:
        raise Refused("iat")
    if claims.get("ath") != _b64url(hashlib.sha256(access_token.encode()).digest()):
        raise Refused("ath")
    if rfc7638_thumbprint(jwk) != jkt:
        raise Refused("jkt")
    return claims


def verify_access_token(token: str, jwks: dict[str, Any], issuer: str) -> dict[str, Any]:
    """The bound step token, verified with PyJWT and the broker's published keys."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["ES256", "RS256"], audience=AUDIENCE, issuer=issuer
    )
    return claims


def _bound_token(stub: Stub, public_jwk: dict[str, Any]) -> str:
    run = stub.StartRun(start_run_request()).run
    return stub.IssueToken(
        broker_pb2.IssueTokenRequest(
            run_id=run.run_id,
            audience=AUDIENCE,
            permissions=perms(artifacts="read"),
            dpop_jwk=json.dumps(public_jwk),
        )
    ).token


def test_our_bound_token_and_proof_verify_with_an_independent_rfc_9449_check(
    server: BrokerServer, stub: Stub
) -> None:
    from tokenbroker.dpop import DPoPKey  # the client under test makes key and proof

    key = DPoPKey.generate()
    token = _bound_token(stub, key.public_jwk)
    keys = stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest())
    claims = verify_access_token(token, json.loads(keys.jwks_json), keys.issuer)
    jkt = claims["cnf"]["jkt"]
    proof = key.proof("POST", URL + "?page=2", token=token)
    checked = independent_check(
        proof, method="POST", url=URL, access_token=token, jkt=jkt, now=time.time()
    )
    assert checked["htu"] == URL
    # The independent check is no rubber stamp: it refuses what it should.
    for wrong, step in (
        ({"method": "GET"}, "htm"),
        ({"url": "https://deploy.example.com/other"}, "htu"),
        ({"access_token": token + "x"}, "ath"),
        ({"jkt": rfc7638_thumbprint(DPoPKey.generate().public_jwk)}, "jkt"),
        ({"now": time.time() + 120}, "iat"),
    ):
        arguments: dict[str, Any] = {
            "method": "POST",
            "url": URL,
            "access_token": token,
            "jkt": jkt,
            "now": time.time(),
        }
        with pytest.raises(Refused, match=step):
            independent_check(proof, **(arguments | wrong))


def _pyjwt_proof(private: ec.EllipticCurvePrivateKey, token: str, htu: str) -> str:
    public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    claims = {
        "jti": secrets.token_urlsafe(12),
        "htm": "POST",
        "htu": htu,
        "iat": int(time.time()),
        "ath": _b64url(hashlib.sha256(token.encode()).digest()),
    }
    return jwt.encode(
        claims, private, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public_jwk}
    )


def test_a_proof_made_with_pyjwt_alone_is_accepted_by_the_broker_and_the_offline_verifier(
    server: BrokerServer, stub: Stub, channel: Any
) -> None:
    from tokenbroker.verifier import JwksCache, TokenVerifier, jwks_from_broker

    private = ec.generate_private_key(ec.SECP256R1())
    public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    token = _bound_token(stub, public_jwk)
    online = stub.VerifyToken(
        broker_pb2.VerifyTokenRequest(
            token=token,
            dpop_proof=_pyjwt_proof(private, token, URL),
            http_method="POST",
            http_url=URL,
        )
    )
    assert online.active, online.reason
    verifier = TokenVerifier(
        issuer=server.broker.tokens.issuer,
        audience=AUDIENCE,
        keys=JwksCache(jwks_from_broker(channel)),
    )
    offline = verifier.check(token, proof=_pyjwt_proof(private, token, URL), method="POST", url=URL)
    assert offline.active, offline.reason


NODE = shutil.which("node")
NODE_CHECK = Path(__file__).resolve().parent.parent / "clients" / "node" / "dpop-check.mjs"


@pytest.mark.skipif(NODE is None, reason="node is not installed: no Node.js API to run")
def test_a_nodejs_api_with_jose_accepts_our_bound_token_and_proof_and_refuses_tampering(
    server: BrokerServer, stub: Stub
) -> None:
    from tokenbroker.dpop import DPoPKey

    key = DPoPKey.generate()
    token = _bound_token(stub, key.public_jwk)
    keys = stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest())

    def node_check(proof: str, **overrides: str) -> dict[str, Any]:
        request = {
            "token": token,
            "proof": proof,
            "jwks": json.loads(keys.jwks_json),
            "issuer": keys.issuer,
            "audience": AUDIENCE,
            "method": "POST",
            "url": URL,
            **overrides,
        }
        assert NODE is not None
        ran = subprocess.run(
            [NODE, str(NODE_CHECK)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        answer: dict[str, Any] = json.loads(ran.stdout)
        return answer

    accepted = node_check(key.proof("POST", URL + "?page=2", token=token))
    assert accepted == {"ok": True, "jkt": key.thumbprint, "run_id": accepted["run_id"]}
    assert node_check(key.proof("GET", URL, token=token))["error"] == "htm"
    assert node_check(key.proof("POST", URL, token=token), url=URL + "/x")["error"] == "htu"
    assert node_check(key.proof("POST", URL, token=token + "x"))["error"] == "ath"
    other = DPoPKey.generate().proof("POST", URL, token=token)
    assert node_check(other)["error"] == "jkt"
    stale = key.proof("POST", URL, token=token, now=time.time() - 300)
    assert node_check(stale)["error"].startswith("proof: ")
