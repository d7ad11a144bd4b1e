"""A sample API that pipeline steps call with their step token: it verifies the token
offline (published keys + the broker's revocations, no call to the broker per request).

    GET /whoami   Authorization: DPoP <step token>, DPoP: <proof>   (a bound token)
                  Authorization: Bearer <step token>                  (an unbound one)
    200 {"run_id": ..., "person": ..., "triggered_via": ..., "pipeline": ..., "step": ...}
    401 {"error": "invalid_token", "reason": "run ended", "status": "RUN_ENDED"}
    401 {"error": "invalid_token", ..., "status": "PROOF_MISSING"}   a bound token, leaked
    403 {"error": "insufficient_scope", ...}     the token lacks `pipelines: read`

With a `tracer_provider`, each request is a SERVER span in the caller's trace (W3C
`traceparent`/`baggage` headers); add `tracing.baggage_span_processor()` to that provider and
the span carries the run id and the person the baggage names. Identity for the *answer* comes
from the verified token only, never from baggage.

Not for production: one small stdlib HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import grpc
from opentelemetry import trace

from tokenbroker.bound import StepToken
from tokenbroker.connect import open_channel
from tokenbroker.samples import httptracing
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc
from tokenbroker.verifier import JwksCache, RevocationFollower, TokenVerifier, jwks_from_broker

log = logging.getLogger(__name__)

AUDIENCE = "sample-api"
REQUIRED_RESOURCE = "pipelines"
# Levels of "pipelines" that include reading (none < read < execute < write < admin).
READ_OR_MORE = frozenset({"read", "execute", "write", "admin"})


@dataclass(frozen=True)
class ApiAnswer:
    """What the API answered: HTTP status and JSON body."""

    status: int
    body: Mapping[str, Any]


def call_api(
    url: str,
    token: str,
    timeout: float = 5.0,
    *,
    tracer_provider: trace.TracerProvider | None = None,
) -> ApiAnswer:
    """GET `url` with `token`; the answer, whatever its status. A bound `StepToken` goes
    with a fresh DPoP proof for this very request; a plain string as a bearer token (what
    anyone holding a leaked copy could send).

    The request carries the current trace context and baggage; with a `tracer_provider` it
    is a CLIENT span of its own."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the API is reached over http(s), not {url!r}")
    with httptracing.client_span(tracer_provider, "GET", url) as exchange:
        if isinstance(token, StepToken):
            authorization = token.headers("GET", url)
        else:
            authorization = {"Authorization": f"Bearer {token}"}
        headers = {**exchange.headers, **authorization}
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 (scheme checked)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                answer = ApiAnswer(response.status, json.load(response))
        except urllib.error.HTTPError as error:
            with error:
                answer = ApiAnswer(error.code, json.load(error))
        exchange.answered(answer.status)
        return answer


class SampleApi:
    """The API, its offline verifier and its revocation follower; start, then stop (or `with`).

    `credentials` must let it follow run endings (role verifier), for revocations.
    """

    def __init__(
        self,
        broker_target: str,
        *,
        credentials: grpc.CallCredentials | None = None,
        audience: str = AUDIENCE,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.audience = audience
        self.tracer_provider = tracer_provider
        self._channel = open_channel(broker_target, credentials)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="sample-api")
        self._revocations = RevocationFollower(self._channel)
        self._verifier: TokenVerifier | None = None
        self._following = False

    @property
    def url(self) -> str:
        """Where steps call the API."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/whoami"

    def start(self) -> Self:
        """Fetch the issuer, catch up with revocations, then serve."""
        try:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(self._channel)
            issuer = stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest(), timeout=5).issuer
            self._following = True
            self._revocations.start()
            self._verifier = TokenVerifier(
                issuer=issuer,
                audience=self.audience,
                keys=JwksCache(jwks_from_broker(self._channel)),
                revocations=self._revocations,
            )
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving and following; close the channel."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        if self._following:
            self._revocations.stop()
        self._channel.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def answer(self, authorization: str | None, proof: str | None = None) -> ApiAnswer:
        """The answer to a GET of /whoami with these Authorization and DPoP headers. A bound
        token is accepted only with a proof of this request: method GET, this API's own URL
        (never the client's Host header), and the hash of the token."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() not in ("bearer", "dpop") or not token:
            return ApiAnswer(401, {"error": "invalid_request", "reason": "no bearer token"})
        assert self._verifier is not None, "start() the API first"
        result = self._verifier.check(token.strip(), proof=proof or "", method="GET", url=self.url)
        if not result.active:
            body = {"error": "invalid_token", "reason": result.reason}
            return ApiAnswer(401, {**body, "status": result.status.name})
        claims = result.claims
        level = dict(claims.get("permissions") or {}).get(REQUIRED_RESOURCE, "none")
        if level not in READ_OR_MORE:
            reason = f"needs {REQUIRED_RESOURCE}: read, the token has {REQUIRED_RESOURCE}: {level}"
            return ApiAnswer(403, {"error": "insufficient_scope", "reason": reason})
        person = claims.get("on_behalf_of") or {}
        return ApiAnswer(
            200,
            {
                "run_id": claims["run_id"],
                "person": person.get("email") or person.get("sub"),
                "verification": person.get("verification"),
                "triggered_via": claims.get("triggered_via"),
                "pipeline": f"{claims.get('org')}/{claims.get('project')}/{claims.get('pipeline')}",
                "step": claims.get("step", ""),
            },
        )


def _handler(api: SampleApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            route = "/whoami" if path == "/whoami" else ""
            with httptracing.server_span(
                api.tracer_provider, dict(self.headers.items()), "GET", path,
                route=route, client_address=self.client_address[0],
            ) as exchange:  # fmt: skip
                if route:
                    answer = api.answer(self.headers.get("Authorization"), self.headers.get("DPoP"))
                else:
                    answer = ApiAnswer(404, {"error": "not_found"})
                exchange.answered(answer.status)
                self._send(answer)

        def _send(self, answer: ApiAnswer) -> None:
            data = json.dumps(answer.body).encode()
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if answer.status == 401:
                reason = str(answer.body.get("reason", "")).replace('"', "'")
                error = answer.body.get("error", "invalid_token")
                self.send_header(
                    "WWW-Authenticate", f'Bearer error="{error}", error_description="{reason}"'
                )
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("sample api " + format, *args)  # the request line; never the token

    return Handler
