# ruff: noqa: E501  (the attack table reads best one row per line)
"""Token attacks (RFC 8725 classes), from one table, against everything that checks a token.

Each row forges a token from a valid one. It is tried against four checkers:

- `verify`:  the VerifyToken RPC, given a step token        → its precise TokenStatus
- `offline`: the offline TokenVerifier, given a step token   → the same TokenStatus
- `run`:     a run credential as the bearer of a call        → UNAUTHENTICATED, audited
- `assertion`: a service-account assertion as the bearer     → UNAUTHENTICATED, audited

The bearer calls go to GetSigningKeys, the one method that needs no credential: a credential
that is presented must still be valid, and a malformed one must never be INTERNAL. Rows that
name a URL (jku, x5u) point it at a loopback listener that must never see a connection.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.auth.authn import Presented
from broker.context import CallContext
from broker.errors import BrokerError, Unauthenticated
from broker.identity import BROKER, RUN_CREDENTIAL_TYP, STEP_TOKEN_TYP
from broker.runs.delegation import DelegationRules, TrustedIdp, verify_id_token
from broker.runs.keys import load_private_key
from tests.accounts import Account, bearer, new_account, sign_assertion, write_policy
from tests.conftest import make_settings
from tests.forge import b64, flip_bit, forge, segment, sign
from tests.support import perms, pipeline
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc
from tokenbroker.verification import PublicKey, TokenStatus, check_token
from tokenbroker.verifier import JwksCache, TokenVerifier, jwks_from_broker

Stub = broker_pb2_grpc.TokenBrokerServiceStub
API = "api.example.com"
HOUR = 3600
TARGETS = ("verify", "offline", "run", "assertion")


class MovableClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Listener:
    """A loopback TCP listener that counts connections (none may come)."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}/keys.json"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._socket.close()


@dataclass
class Env:
    """What the rows forge from: the valid token of each kind, keys, the listener."""

    server: BrokerServer
    account: Account
    issuer: str
    run_id: str
    broker_key: Any
    broker_kid: str
    retired_key: Any
    retired_kid: str
    anonymous: grpc.Channel
    attacker: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    listener: Listener = field(default_factory=Listener)
    verifier: TokenVerifier | None = None

    def base(self, target: str) -> Base:
        now = int(time.time())
        if target == "assertion":
            claims = {
                "iss": self.account.name,
                "sub": self.account.name,
                "aud": self.issuer,
                "iat": now,
                "exp": now + 240,
                "jti": "a" + secrets.token_hex(8),
            }
            header = {"alg": "ES256", "typ": "JWT", "kid": self.account.kid}
            return Base(target, header, claims, self.account.key, self.account.kid)
        run_credential = target == "run"
        claims = {
            "iss": self.issuer,
            "sub": f"run:acme/web/deploy:{self.run_id}",
            "aud": self.issuer if run_credential else API,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": "a" + secrets.token_hex(8),
            "run_id": self.run_id,
        }
        typ = RUN_CREDENTIAL_TYP if run_credential else STEP_TOKEN_TYP
        header = {"alg": "ES256", "typ": typ, "kid": self.broker_kid}
        return Base(target, header, claims, self.broker_key, self.broker_kid)


@dataclass(frozen=True)
class Base:
    target: str
    header: dict[str, Any]
    claims: dict[str, Any]
    key: Any
    kid: str

    def token(self, header: dict[str, Any] | None = None, **claims: Any) -> str:
        """The valid token, with header entries and claims changed (None drops one)."""
        merged_header = {
            k: v for k, v in {**self.header, **(header or {})}.items() if v is not None
        }
        merged = {k: v for k, v in {**self.claims, **claims}.items() if v is not None}
        return forge(merged_header, merged, self.key, "ES256")

    @property
    def public_pem(self) -> bytes:
        pem: bytes = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    @property
    def is_assertion(self) -> bool:
        return self.target == "assertion"


Build = Callable[[Base, Env], str]


@dataclass(frozen=True)
class Attack:
    name: str
    build: Build
    status: TokenStatus  # VerifyToken and the offline verifier
    says: str  # in the UNAUTHENTICATED message of both bearer kinds
    says_assertion: str = ""  # when an assertion's message differs
    verify_code: grpc.StatusCode = grpc.StatusCode.OK  # the VerifyToken RPC's own status
    targets: tuple[str, ...] = TARGETS


def _header_bytes(raw: bytes) -> Build:
    return lambda base, env: f"{b64(raw)}.{segment(base.claims)}.{b64(b'sig')}"


def _hmac_with_public_key(base: Base, env: Env) -> str:
    return forge({**base.header, "alg": "HS256"}, base.claims, base.public_pem, "HS256")


def _other_curve(base: Base, env: Env) -> str:
    key = ec.generate_private_key(ec.SECP521R1())
    return forge({**base.header, "alg": "ES512"}, base.claims, key, "ES512")


def _rsa_pss(base: Base, env: Env) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return forge({**base.header, "alg": "PS256"}, base.claims, key, "PS256")


def _rsa_header_on_ec_key(base: Base, env: Env) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return forge({**base.header, "alg": "RS256"}, base.claims, key, "RS256")


def _attacker_signed(header: dict[str, Any]) -> Build:
    return lambda base, env: forge({**base.header, **header}, base.claims, env.attacker, "ES256")


def _jwk_of_attacker(base: Base, env: Env) -> str:
    numbers = env.attacker.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }
    return forge({**base.header, "jwk": jwk}, base.claims, env.attacker, "ES256")


def _x5c_of_attacker(base: Base, env: Env) -> str:
    der = env.attacker.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    x5c = [base64.b64encode(der).decode()]
    return forge({**base.header, "x5c": x5c}, base.claims, env.attacker, "ES256")


def _retired_key(base: Base, env: Env) -> str:
    if base.is_assertion:  # an account key the policy no longer lists
        return forge({**base.header, "kid": "retired-1"}, base.claims, env.attacker, "ES256")
    return forge({**base.header, "kid": env.retired_kid}, base.claims, env.retired_key, "ES256")


def _expired(base: Base, env: Env) -> str:
    now = int(time.time())
    issued = now - 400
    return base.token(iat=issued, nbf=None if base.is_assertion else issued, exp=now - 200)


def _not_yet_valid(base: Base, env: Env) -> str:
    later = int(time.time()) + HOUR
    return base.token(iat=later, nbf=None if base.is_assertion else later, exp=later + 200)


def _wrong_typ(base: Base, env: Env) -> str:
    other = RUN_CREDENTIAL_TYP if base.target in ("verify", "offline") else STEP_TOKEN_TYP
    return base.token({"typ": other})


def _flip_in(part: int, value_of: Callable[[Base], str]) -> Build:
    """One bit of a JSON string value flipped ('a' → '`'), so the token still parses."""

    def build(base: Base, env: Env) -> str:
        token = base.token()
        raw = base64.urlsafe_b64decode(token.split(".")[part] + "==")
        offset = raw.index(json.dumps(value_of(base)).encode()) + 1  # the value's first char
        return flip_bit(token, part, offset * 8)

    return build


def _nested(base: Base, env: Env) -> str:
    inner = base.token()
    return forge({**base.header, "cty": "JWT"}, inner, base.key, "ES256")


def _deep(part: int) -> Build:
    nested = "[" * 1100 + "]" * 1100

    def build(base: Base, env: Env) -> str:
        header = f'{{"alg":"ES256","typ":{json.dumps(base.header["typ"])},"x":{nested}}}'
        claims = json.dumps(base.claims)[:-1] + f',"x":{nested}}}'
        parts = [segment(base.header), segment(base.claims)]
        parts[part] = b64((header if part == 0 else claims).encode())
        signing_input = ".".join(parts)  # signed: the parse after the signature check is hit
        return f"{signing_input}.{b64(sign(signing_input.encode(), base.key, 'ES256'))}"

    return build


def _raw_claims(text: str) -> Build:
    """Claims whose JSON Python reads but no strict parser would (NaN, huge numbers)."""

    def build(base: Base, env: Env) -> str:
        body = json.dumps(base.claims)[:-1] + f",{text}}}"
        signing_input = f"{segment(base.header)}.{b64(body.encode())}"
        return f"{signing_input}.{b64(sign(signing_input.encode(), base.key, 'ES256'))}"

    return build


def _oversized(base: Base, env: Env) -> str:
    return base.token(padding="x" * 20_000)


def _just_too_long_for_a_credential(base: Base, env: Env) -> str:
    return base.token(padding="x" * 4_000)


MALFORMED = TokenStatus.MALFORMED
DISALLOWED = TokenStatus.DISALLOWED_ALGORITHM
UNKNOWN_KEY = TokenStatus.UNKNOWN_KEY

ATTACKS = [
    # alg: RFC 8725 §2.1, §3.1
    Attack("alg none", lambda b, e: forge({**b.header, "alg": "none"}, b.claims), DISALLOWED, "algorithm"),
    Attack("alg NONE", lambda b, e: forge({**b.header, "alg": "NONE"}, b.claims), DISALLOWED, "algorithm"),
    Attack("alg HS256 keyed with the public key", _hmac_with_public_key, DISALLOWED, "algorithm"),
    Attack("alg ES512 (unlisted)", _other_curve, DISALLOWED, "algorithm"),
    Attack("alg PS256 (unlisted)", _rsa_pss, DISALLOWED, "algorithm"),
    Attack("alg RS256 on an ES256 key id", _rsa_header_on_ec_key, DISALLOWED, "RS256"),
    Attack("alg not a string", lambda b, e: b.token({"alg": ["ES256"]}), DISALLOWED, "algorithm"),
    Attack("alg missing", lambda b, e: b.token({"alg": None}), DISALLOWED, "algorithm"),
    # crit: RFC 7515 §4.1.11
    Attack("crit unknown extension", lambda b, e: b.token({"crit": ["x"], "x": 1}), MALFORMED, "crit"),
    Attack("crit b64 false", lambda b, e: b.token({"crit": ["b64"], "b64": False}), MALFORMED, "crit"),
    Attack("crit not a list", lambda b, e: b.token({"crit": 7}), MALFORMED, "crit"),
    # kid tricks
    Attack("kid not a string", lambda b, e: b.token({"kid": 5}), UNKNOWN_KEY, "kid"),
    Attack("kid an object", lambda b, e: b.token({"kid": {"$ne": ""}}), UNKNOWN_KEY, "kid"),
    Attack("kid empty", lambda b, e: b.token({"kid": ""}), UNKNOWN_KEY, "k", "unknown key id"),
    Attack("kid path traversal", lambda b, e: b.token({"kid": "../../keys/x.pem"}), UNKNOWN_KEY, "key"),
    Attack("kid SQL", lambda b, e: b.token({"kid": "' OR '1'='1"}), UNKNOWN_KEY, "key"),
    Attack("kid unknown", lambda b, e: b.token({"kid": "k-" + "f" * 40}), UNKNOWN_KEY, "key"),
    Attack("kid of a retired key", _retired_key, UNKNOWN_KEY, "key"),
    # keys and key locations in the header: never fetched, never trusted (RFC 8725 §3.10)
    Attack("jku at a listener", lambda b, e: _attacker_signed({"jku": e.listener.url})(b, e), MALFORMED, "jku"),
    Attack("x5u at a listener", lambda b, e: _attacker_signed({"x5u": e.listener.url})(b, e), MALFORMED, "x5u"),
    Attack("jwk of the attacker", _jwk_of_attacker, MALFORMED, "jwk"),
    Attack("x5c of the attacker", _x5c_of_attacker, MALFORMED, "x5c"),
    Attack("signed by another key under our kid", _attacker_signed({}), TokenStatus.BAD_SIGNATURE, "signature"),
    # time, audience, issuer, type
    Attack("expired", _expired, TokenStatus.EXPIRED, "expired"),
    Attack("not yet valid", _not_yet_valid, TokenStatus.NOT_YET_VALID, "not", "not valid yet"),
    Attack("wrong aud", lambda b, e: b.token(aud="https://elsewhere.example"), TokenStatus.WRONG_AUDIENCE, "audience"),
    Attack("aud not a string", lambda b, e: b.token(aud=[1, 2]), TokenStatus.WRONG_AUDIENCE, "audience"),
    Attack("wrong iss", lambda b, e: b.token(iss="https://evil.example"), TokenStatus.WRONG_ISSUER, "issuer", "unknown service account"),
    Attack("iss not a string", lambda b, e: b.token(iss=["x"]), TokenStatus.WRONG_ISSUER, "issuer", "iss"),
    Attack("typ of the other kind", _wrong_typ, TokenStatus.WRONG_TYPE, "step token", "step token"),
    Attack("typ not a string", lambda b, e: b.token({"typ": ["JWT"]}), TokenStatus.WRONG_TYPE, "type"),
    Attack("exp NaN", _raw_claims('"exp":NaN'), MALFORMED, "exp"),
    Attack("exp 1e400", _raw_claims('"exp":1e400'), MALFORMED, "exp"),
    Attack("exp a huge integer", _raw_claims('"exp":' + "9" * 400), MALFORMED, "exp"),
    # one-bit tampering
    Attack("one bit of the signature", lambda b, e: flip_bit(b.token(), 2, 9), TokenStatus.BAD_SIGNATURE, "signature"),
    Attack("one bit of a claim", _flip_in(1, lambda b: b.claims["jti"]), TokenStatus.BAD_SIGNATURE, "signature"),
    Attack("one bit of the header's brace", lambda b, e: flip_bit(b.token(), 0, 0), MALFORMED, "not a JWT"),
    # shapes
    Attack("garbage base64", lambda b, e: "@@@.###.$$$", MALFORMED, "not a JWT"),
    Attack("header not JSON", _header_bytes(b"not json"), MALFORMED, "not a JWT"),
    Attack("header not UTF-8", _header_bytes(b"\xff\xfe{}"), MALFORMED, "not a JWT"),
    Attack("header a JSON array", _header_bytes(b'["ES256"]'), MALFORMED, "not a JWT"),
    Attack("two segments", lambda b, e: ".".join(b.token().split(".")[:2]), MALFORMED, "not a JWT"),
    Attack("five segments (JWE-shaped)", lambda b, e: b.token() + ".x.y", MALFORMED, "not a JWT"),
    Attack("header nested 1100 deep", _deep(0), MALFORMED, "not a JWT"),
    Attack("claims nested 1100 deep", _deep(1), MALFORMED, "not a JWT"),
    Attack("nested JWT as the payload", _nested, MALFORMED, "not a JWT"),
    Attack("claims a JSON string", lambda b, e: forge(b.header, "claims", b.key, "ES256"), MALFORMED, "not a JWT"),
    Attack("longer than a credential may be", _just_too_long_for_a_credential, TokenStatus.ACTIVE, "longer than", targets=("run", "assertion")),
    Attack("oversized (20 KB)", _oversized, MALFORMED, "longer than", verify_code=grpc.StatusCode.INVALID_ARGUMENT, targets=("verify", "offline")),
]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("attacks")
    account = new_account("ci-orchestrator", ["orchestrator", "auditor"])
    policy = write_policy(tmp / "policy.toml", [account])
    # Hundreds of refused calls from one loopback peer in seconds: each attack must be
    # answered on its own merits, not throttled (0 = no per-peer limit).
    settings = make_settings(tmp / "data", policy=policy, peer_rate=0.0)
    clock = MovableClock()
    broker = build_broker(settings, clock=clock)
    retired = broker.keys.active
    # Rotate "a day ago": the old key's unpublish time has passed by now, so it is retired.
    clock.offset = -2 * 24 * HOUR
    broker.keys.rotate(CallContext(principal=BROKER))
    clock.offset = 0.0
    broker.keys.refresh()
    assert broker.keys.find(retired.kid) is None
    server = create_server(settings, broker=broker)
    server.start()
    audience = broker.authn.audience
    anonymous = grpc.insecure_channel(server.target)
    stub = Stub(anonymous)
    metadata = bearer(sign_assertion(account, audience))
    run = stub.StartRun(
        broker_pb2.StartRunRequest(
            pipeline=pipeline("acme", "web", "deploy"), permission_ceiling=perms(artifacts="read")
        ),
        metadata=metadata,
        timeout=5,
    ).run
    active = broker.keys.active
    made = Env(
        server=server,
        account=account,
        issuer=broker.tokens.issuer,
        run_id=run.run_id,
        broker_key=active.private_key,
        broker_kid=active.kid,
        retired_key=load_private_key(settings.data_dir / "keys" / f"{retired.kid}.pem"),
        retired_kid=retired.kid,
        anonymous=anonymous,
    )
    made.verifier = TokenVerifier(
        issuer=made.issuer, audience=API, keys=JwksCache(jwks_from_broker(anonymous))
    )
    yield made
    assert made.listener.connections == 0
    made.listener.close()
    anonymous.close()
    server.stop(grace=0.5)


def _verify(env: Env, token: str) -> tuple[grpc.StatusCode, TokenStatus | None]:
    stub = Stub(env.anonymous)
    metadata = bearer(sign_assertion(env.account, env.server.broker.authn.audience))
    try:
        reply = stub.VerifyToken(
            broker_pb2.VerifyTokenRequest(token=token, audience=API), metadata=metadata, timeout=5
        )
    except grpc.RpcError as error:
        return error.code(), None
    name = broker_pb2.TokenStatus.Name(reply.status).removeprefix("TOKEN_STATUS_")
    return grpc.StatusCode.OK, TokenStatus[name]


def _present(env: Env, token: str) -> tuple[grpc.StatusCode, str]:
    stub = Stub(env.anonymous)
    try:
        stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest(), metadata=bearer(token), timeout=5)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _denied_reasons(env: Env) -> set[str]:
    """The reasons of every `authn.denied` event: a refusal is audited when its reason is
    there (the first refusal of a reason is written at once, even where repeated refusals of
    one source for one reason are later counted into one event)."""
    return {
        str(e.draft.details.get("reason"))
        for e in env.server.broker.store.read_events(0, 100_000)
        if e.draft.action == "authn.denied"
    }


CASES = [(attack, target) for attack in ATTACKS for target in TARGETS if target in attack.targets]


@pytest.mark.parametrize(("attack", "target"), CASES, ids=[f"{a.name} → {t}" for a, t in CASES])
def test_forged_token_is_rejected_with_its_precise_status(
    env: Env, attack: Attack, target: str
) -> None:
    token = attack.build(env.base(target), env)
    if target == "verify":
        code, status = _verify(env, token)
        assert code is attack.verify_code
        if code is grpc.StatusCode.OK:
            assert status is attack.status
    elif target == "offline":
        assert env.verifier is not None
        assert env.verifier.check(token).status is attack.status
    else:
        code, message = _present(env, token)
        assert code is grpc.StatusCode.UNAUTHENTICATED, message
        expected = (
            attack.says_assertion
            if target == "assertion" and attack.says_assertion
            else attack.says
        )
        assert expected in message
        assert message in _denied_reasons(env)  # audited, with the reason the caller got
    assert env.listener.connections == 0


@pytest.mark.parametrize("target", TARGETS)
def test_the_untampered_token_of_each_kind_is_accepted(env: Env, target: str) -> None:
    """The control row: every attack above starts from a token that passes."""
    token = env.base(target).token()
    if target == "verify":
        assert _verify(env, token) == (grpc.StatusCode.OK, TokenStatus.ACTIVE)
    elif target == "offline":
        assert env.verifier is not None and env.verifier.check(token).active
    else:
        assert _present(env, token) == (grpc.StatusCode.OK, "")


def test_no_single_bit_flip_anywhere_in_a_step_token_is_accepted(env: Env) -> None:
    """Every bit of every segment, offline: rejected, and never an exception."""
    assert env.verifier is not None
    token = env.base("offline").token()
    statuses: dict[TokenStatus, int] = {}
    for part, text in enumerate(token.split(".")):
        size = len(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        for bit in range(size * 8):
            status = env.verifier.check(flip_bit(token, part, bit)).status
            assert status is not TokenStatus.ACTIVE, (part, bit)
            statuses[status] = statuses.get(status, 0) + 1
    assert sum(statuses.values()) > 2000


def test_a_credential_crashing_the_parser_on_every_rpc_is_now_unauthenticated(env: Env) -> None:
    """The issue's examples: `crit` and a non-string `kid` answered INTERNAL on every RPC."""
    base = env.base("assertion")
    stub = Stub(env.anonymous)
    calls = [
        (stub.GetSigningKeys, broker_pb2.GetSigningKeysRequest()),
        (stub.ListRuns, broker_pb2.ListRunsRequest(org="acme")),
        (stub.VerifyToken, broker_pb2.VerifyTokenRequest(token="x")),
    ]
    for header in ({"crit": ["x"]}, {"kid": 5}, {"kid": [1]}, {"typ": {"a": 1}}):
        metadata = bearer(base.token(header))
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as refused:
                method(request, metadata=metadata, timeout=5)  # type: ignore[operator]
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_attack_figures_for_the_security_document() -> None:
    """Keeps docs/security.md honest: the table's size is what the document reports."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    assert f"{len(ATTACKS)} attack rows" in text
    assert f"{len(CASES)} attack checks" in text


def test_a_bearer_beyond_the_transport_limit_is_refused_by_grpc_before_the_broker(
    env: Env,
) -> None:
    """Metadata over gRPC's 16 KiB hard limit never reaches the broker: RESOURCE_EXHAUSTED
    from the transport (no audit event; nothing was parsed), never INTERNAL."""
    stub = Stub(env.anonymous)
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetSigningKeys(
            broker_pb2.GetSigningKeysRequest(), metadata=bearer("a" * 100_000), timeout=5
        )
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(
    [
        "alg",
        "typ",
        "kid",
        "crit",
        "jku",
        "iss",
        "sub",
        "aud",
        "iat",
        "exp",
        "nbf",
        "jti",
        "run_id",
        "x",
    ]
)


@settings(
    max_examples=int(os.environ.get("TOKEN_ATTACK_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    target=st.sampled_from(["step", "run", "assertion"]),
    changes=st.dictionaries(FIELDS, JSON, min_size=1, max_size=3),
)
def test_any_header_or_claim_of_any_json_type_is_refused_never_raised(
    env: Env, target: str, changes: dict[str, Any]
) -> None:
    """The class behind the issue's two examples: any value of any JSON type in any header
    field or claim, validly signed, gives a verdict or UNAUTHENTICATED — never an exception."""
    base = env.base({"step": "verify", "run": "run", "assertion": "assertion"}[target])
    header = {k: v for k, v in changes.items() if k in ("alg", "typ", "kid", "crit", "jku")}
    claims = {k: v for k, v in changes.items() if k not in header}
    token = forge({**base.header, **header}, {**base.claims, **claims}, base.key, "ES256")
    if target == "step":
        broker = env.server.broker
        verdict = check_token(
            token,
            find_key=broker.keys.find,
            issuer=env.issuer,
            audience=API,
            expected_typ=STEP_TOKEN_TYP,
        )
        assert isinstance(verdict.status, TokenStatus)
        return
    try:
        env.server.broker.authn.authenticate(
            Presented((f"Bearer {token}",)), CallContext(), "GetSigningKeys", required=True
        )
    except Unauthenticated as refused:
        # A precise reason, not the backstop's catch-all: every case is handled on purpose.
        assert refused.message != "malformed credential"


def _id_token_rules(key: Any) -> DelegationRules:
    public = PublicKey("idp-1", "ES256", key.public_key())
    idp = TrustedIdp(
        "https://idp.example", "portal", lambda kid: public if kid == "idp-1" else None
    )
    return DelegationRules(idps={idp.issuer: idp}, user_domains=frozenset({"example.com"}))


ID_TOKEN_CLAIMS = {
    "iss": "https://idp.example",
    "sub": "u-1",
    "aud": "portal",
    "email": "alice@example.com",
    "email_verified": True,
}


@pytest.mark.parametrize(
    ("case", "header", "claims_text"),
    [
        ("crit", {"crit": ["x"]}, ""),
        ("kid not a string", {"kid": 5}, ""),
        ("jku", {"jku": "http://127.0.0.1:9/keys"}, ""),
        ("exp 1e400", {}, '"exp":1e400'),
        ("exp NaN", {}, '"exp":NaN'),
        ("claims nested 1100 deep", {}, '"x":' + "[" * 1100 + "]" * 1100),
        ("header nested 1100 deep", {"x": "DEEP"}, ""),
    ],
)
def test_a_malformed_id_token_is_refused_never_raised(
    case: str, header: dict[str, Any], claims_text: str
) -> None:
    """The person's ID token in ExecuteOnBehalfOf is hostile input too (domain-level check)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    full_header = {"alg": "ES256", "typ": "JWT", "kid": "idp-1", **header}
    claims = json.dumps({**ID_TOKEN_CLAIMS, "iat": now, "exp": now + 300})
    if claims_text:
        claims = claims[:-1] + "," + claims_text + "}"
    header_json = json.dumps(full_header).replace('"DEEP"', "[" * 1100 + "]" * 1100)
    signing_input = f"{b64(header_json.encode())}.{b64(claims.encode())}"
    token = f"{signing_input}.{b64(sign(signing_input.encode(), key, 'ES256'))}"
    with pytest.raises(BrokerError) as refused:
        verify_id_token(token, _id_token_rules(key))
    assert refused.value.message
