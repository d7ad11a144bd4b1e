"""Offline verification of broker tokens, for the APIs that pipeline steps call.

`TokenVerifier` checks signatures locally against cached published keys (refetched, at a
limited rate, when a token names an unknown key) and — with a `RevocationFollower` —
rejects tokens of ended runs within moments, by following the broker's audit stream
instead of calling the broker per check. In one call, with a credential of role verifier:

    verifier = TokenVerifier.for_broker(target, credentials, audience="api.example.com")
    claims = verifier.verify(token)          # raises TokenRejected with a precise status
    verifier.close()                         # (or use it as a context manager)

Or assembled from its parts (e.g. keys from the broker's HTTP JWKS):

    verifier = TokenVerifier(
        issuer=issuer,
        audience="api.example.com",
        keys=JwksCache(jwks_from_url(issuer + "/.well-known/jwks.json")),
        revocations=RevocationFollower(channel).start(),
    )
    claims = verifier.verify(token)          # raises TokenRejected with a precise status

A token bound to a key (`cnf.jkt`, RFC 9449) is accepted only with a valid DPoP proof of the
request it came with — `verifier.verify(token, proof=request.headers["DPoP"], method="GET",
url="https://api.example.com/deploy")` — and one bound to a certificate (RFC 8705) only with
that certificate's thumbprint (`certificate_thumbprint=`). Proofs are remembered in a replay
cache (`MemoryReplayCache` by default: one API instance; pass a shared one for several).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
import jwt

from tokenbroker import dpop, messages
from tokenbroker.connect import Tls, open_channel
from tokenbroker.errors import from_rpc_error
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc
from tokenbroker.verification import (
    DEFAULT_LEEWAY,
    CheckResult,
    PublicKey,
    TokenStatus,
    check_token,
)

log = logging.getLogger(__name__)

STEP_TOKEN_TYP = "at+jwt"
RUN_ENDING_ACTIONS = ("run.ended", "run.expired")
PERMANENT = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# A step token lives at most an hour: an ended run need not be remembered longer than that.
REMEMBER_ENDED_RUNS = 3600.0 + 2 * DEFAULT_LEEWAY

JwksFetcher = Callable[[], Mapping[str, Any]]

# For JWKs that omit "alg" (many IdPs do): the one algorithm each key type is used with.
_DEFAULT_ALG = {("RSA", None): "RS256", ("EC", "P-256"): "ES256", ("OKP", "Ed25519"): "EdDSA"}


class TokenRejected(Exception):
    """The token is not valid now; `status` says precisely why."""

    def __init__(self, result: CheckResult) -> None:
        super().__init__(result.reason)
        self.status = result.status
        self.reason = result.reason
        self.claims = result.claims


def jwks_from_url(url: str, timeout: float = 5.0) -> JwksFetcher:
    """Fetch a JWKS document over HTTP(S), e.g. the broker's /.well-known/jwks.json."""

    def fetch() -> Mapping[str, Any]:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            document: Mapping[str, Any] = json.load(response)
            return document

    return fetch


def jwks_from_file(path: str | Path) -> JwksFetcher:
    """Read a JWKS document from a file (re-read on each refresh)."""

    def fetch() -> Mapping[str, Any]:
        document: Mapping[str, Any] = json.loads(Path(path).read_text())
        return document

    return fetch


def jwks_from_broker(channel: grpc.Channel, timeout: float = 5.0) -> JwksFetcher:
    """Fetch the JWKS with the GetSigningKeys RPC (open to every caller)."""
    stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)

    def fetch() -> Mapping[str, Any]:
        response = stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest(), timeout=timeout)
        document: Mapping[str, Any] = json.loads(response.jwks_json)
        return document

    return fetch


class JwksCache:
    """Published keys, cached; refetched on an unknown `kid` at most every `min_refresh` s."""

    def __init__(self, fetch: JwksFetcher, *, min_refresh: float = 10.0, max_age: float = 300.0):
        self._fetch = fetch
        self._min_refresh = min_refresh
        self._max_age = max_age
        self._keys: dict[str, PublicKey] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    def find(self, kid: str) -> PublicKey | None:
        """The published key with id `kid`, refetching the JWKS when due; None if unknown."""
        key = self._keys.get(kid)
        age = time.monotonic() - self._fetched_at
        if (key is None and age >= self._min_refresh) or age >= self._max_age:
            self._refresh()
            key = self._keys.get(kid)
        return key

    def prime(self, document: Mapping[str, Any]) -> None:
        """Take `document` as if just fetched (a caller that has the JWKS already)."""
        with self._lock:
            self._store(document)

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._fetched_at < self._min_refresh:
                return  # another thread just did
            try:
                document = self._fetch()
            except Exception as exc:  # keep serving the cached keys
                log.warning("could not fetch signing keys: %s", exc)
                self._fetched_at = time.monotonic()
                return
            self._store(document)

    def _store(self, document: Mapping[str, Any]) -> None:
        keys = {}
        for jwk in document.get("keys", []):
            alg = jwk.get("alg") or _DEFAULT_ALG.get((jwk.get("kty"), jwk.get("crv")))
            if jwk.get("use", "sig") == "sig" and isinstance(jwk.get("kid"), str) and alg:
                keys[jwk["kid"]] = PublicKey(
                    jwk["kid"], alg, jwt.PyJWK.from_dict(dict(jwk), algorithm=alg).key
                )
        self._keys = keys
        self._fetched_at = time.monotonic()


class RevocationFollower:
    """Knows which runs have ended, by following `run.ended`/`run.expired` audit events.

    It first replays the log to the head (`ready` is set then), then follows it live; on a
    disconnect it resumes after the last sequence it saw, so no revocation is missed.
    The channel must carry a credential that may follow run endings: role verifier (the
    least privilege; it receives the endings without people or inputs) or auditor.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        org: str = "",
        retry_delay: float = 0.5,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """`org` limits following to one organisation (a verifier scoped to it may follow)."""
        self._stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
        self._org = org
        self._retry_delay = retry_delay
        self._metadata = metadata
        self._ended: dict[str, tuple[TokenStatus, float]] = {}
        self._cursor = 0
        self.ready = threading.Event()
        self.failure: grpc.RpcError | None = None  # a refusal that retrying cannot fix
        self._settled = threading.Event()  # ready, or failed for good
        self._stopped = threading.Event()
        self._call: Any = None
        self._call_lock = threading.Lock()  # so stop() cancels the call actually running
        self._thread = threading.Thread(target=self._run, name="revocations", daemon=True)

    def start(self, wait: float | None = 10.0) -> RevocationFollower:
        """Start following; by default wait until the replay reached the head.

        Raises the broker's refusal at once when retrying cannot help (a credential that
        may not follow run endings, say), instead of waiting out `wait`."""
        self._thread.start()
        if wait is not None:
            self._settled.wait(wait)
            if self.failure is not None:
                raise self.failure
            if not self.ready.is_set():
                raise TimeoutError("could not catch up with the broker's revocations in time")
        return self

    def status_of(self, run_id: str) -> TokenStatus | None:
        """RUN_ENDED or RUN_EXPIRED for runs known to have ended; None otherwise."""
        found = self._ended.get(run_id)
        return None if found is None else found[0]

    @property
    def cursor(self) -> int:
        """The last audit sequence considered; a restart may resume after it."""
        return self._cursor

    def stop(self) -> None:
        """Stop following (cancels the open stream) and wait for the thread to end."""
        with self._call_lock:
            self._stopped.set()
            if self._call is not None:
                self._call.cancel()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._stream(stop_at_head=not self.ready.is_set())
                self.ready.set()
                self._settled.set()
            except grpc.RpcError as error:
                if self._stopped.is_set():
                    return
                if error.code() in PERMANENT:
                    # Retrying cannot help: say so instead of looping (start() raises it).
                    log.error("revocation stream refused (%s): %s", error.code(), error.details())
                    self.failure = error
                    self._settled.set()
                    return
                log.warning("revocation stream interrupted (%s); resuming", error.code())
                self._stopped.wait(self._retry_delay)

    def _stream(self, *, stop_at_head: bool) -> None:
        request = broker_pb2.StreamAuditRequest(
            after_sequence=self._cursor,
            filter=broker_pb2.AuditFilter(actions=list(RUN_ENDING_ACTIONS), org=self._org),
            stop_at_head=stop_at_head,
            max_events_per_message=messages.EVENTS_PER_MESSAGE,
        )
        with self._call_lock:
            if self._stopped.is_set():
                return
            self._call = call = self._stub.StreamAudit(request, metadata=self._metadata)
        for item in call:
            if item.HasField("heartbeat"):
                self._cursor = max(self._cursor, item.heartbeat.scanned_through)
                continue
            for event in messages.events_of(item):
                ended = event.action == "run.ended"
                status = TokenStatus.RUN_ENDED if ended else TokenStatus.RUN_EXPIRED
                self._ended[event.run_id] = (status, event.time.ToSeconds())
                self._cursor = event.sequence
                self._forget_old(now=time.time())

    def _forget_old(self, now: float) -> None:
        # Every token of a run ended this long ago has expired by itself.
        if len(self._ended) % 1024 == 0:
            cutoff = now - REMEMBER_ENDED_RUNS
            self._ended = {k: v for k, v in self._ended.items() if v[1] >= cutoff}


class TokenVerifier:
    """Verifies broker step tokens without calling the broker per token."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        keys: JwksCache,
        revocations: RevocationFollower | None = None,
        leeway: float = DEFAULT_LEEWAY,
        clock: Callable[[], float] = time.time,
        replay: dpop.ReplayCache | None = None,
        proof_window: float = dpop.DEFAULT_WINDOW,
    ) -> None:
        """`leeway`: seconds of clock skew tolerated on the time claims. `clock`: the time
        tokens are judged at (POSIX seconds), the wall clock unless a test passes its own.
        `replay`: where DPoP proofs seen are remembered (default: in this process);
        `proof_window`: seconds a proof's `iat` may differ from `clock()`."""
        self._replay: dpop.ReplayCache = replay if replay is not None else dpop.MemoryReplayCache()
        self._proof_window = proof_window
        self._issuer = issuer
        self._audience = audience
        self._keys = keys
        self._revocations = revocations
        self._leeway = leeway
        self._clock = clock
        self._channel: grpc.Channel | None = None  # set when for_broker opened it

    @classmethod
    def for_broker(
        cls,
        target: str,
        credentials: grpc.CallCredentials | None,
        *,
        audience: str,
        org: str = "",
        tls: Tls = None,
        follow_revocations: bool = True,
        wait: float | None = 10.0,
        timeout: float = 10.0,
        leeway: float = DEFAULT_LEEWAY,
        replay: dpop.ReplayCache | None = None,
    ) -> Self:
        """A verifier for the tokens that the broker at `target` issues for `audience`, set
        up in one call: the issuer and the signing keys from GetSigningKeys (the keys cached,
        refetched when a token names a new one), and a `RevocationFollower` on run endings.

        `credentials` need role verifier (or auditor) in scope of `org` — "" follows every
        org, which needs scope "*/*/*". `follow_revocations=False` verifies signatures and
        claims only (no credential needed then). `replay`: where the DPoP proofs of bound
        tokens are remembered (default: in this process). By default waits up to `wait` seconds for
        the follower to catch up with the log. Raises a `BrokerError` (PermissionDenied,
        Unavailable, ...) when the broker refuses or cannot be reached.
        Close the verifier (or use `with`) to stop following and close the channel."""
        channel = open_channel(target, credentials, tls)
        follower: RevocationFollower | None = None
        try:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            published = stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest(), timeout=timeout)
            keys = JwksCache(jwks_from_broker(channel, timeout=timeout))
            keys.prime(json.loads(published.jwks_json))
            if follow_revocations:
                follower = RevocationFollower(channel, org=org)
                follower.start(wait=wait)
        except BaseException as failure:
            if follower is not None:
                follower.stop()
            channel.close()
            if isinstance(failure, grpc.RpcError):
                raise from_rpc_error(failure) from failure
            raise
        verifier = cls(
            issuer=published.issuer,
            audience=audience,
            keys=keys,
            revocations=follower,
            leeway=leeway,
            replay=replay,
        )
        verifier._channel = channel
        return verifier

    @property
    def issuer(self) -> str:
        """The `iss` tokens must carry."""
        return self._issuer

    def close(self) -> None:
        """Stop following revocations and close the channel, when `for_broker` opened them."""
        if self._channel is None:
            return
        if self._revocations is not None:
            self._revocations.stop()
        self._channel.close()
        self._channel = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def check(
        self,
        token: str,
        *,
        proof: str = "",
        method: str = "",
        url: str = "",
        certificate_thumbprint: str = "",
        nonce: str | Callable[[str], bool] | None = None,
    ) -> CheckResult:
        """The verdict, as a value (never raises for a bad token). For a bound token pass
        what came with it: the `DPoP` header (`proof`), the request's `method` and `url`, the
        client certificate's x5t#S256, and the nonce this API requires, if it does."""
        now = self._clock()
        result = check_token(
            token,
            find_key=self._keys.find,
            issuer=self._issuer,
            audience=self._audience,
            expected_typ=STEP_TOKEN_TYP,
            leeway=self._leeway,
            now=now,
        )
        if result.active and self._revocations is not None:
            ended = self._revocations.status_of(str(result.claims["run_id"]))
            if ended is not None:
                return CheckResult(ended, ended.value, result.claims, result.header)
        presented = dpop.Presentation(proof, method, url, certificate_thumbprint, nonce)
        return dpop.check_binding(
            result, token, presented, now=now, replay=self._replay, window=self._proof_window
        )

    def verify(
        self,
        token: str,
        *,
        proof: str = "",
        method: str = "",
        url: str = "",
        certificate_thumbprint: str = "",
        nonce: str | Callable[[str], bool] | None = None,
    ) -> Mapping[str, Any]:
        """The verified claims; raises `TokenRejected` saying why the token is not valid
        (arguments as for `check`)."""
        result = self.check(
            token,
            proof=proof,
            method=method,
            url=url,
            certificate_thumbprint=certificate_thumbprint,
            nonce=nonce,
        )
        if not result.active:
            raise TokenRejected(result)
        return result.claims
