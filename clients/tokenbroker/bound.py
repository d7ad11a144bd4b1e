"""Using bound (sender-constrained) tokens: a proof per request, attached for you.

    token = broker.step_token("api.example.com", {"deploy": "write"})   # bound by default
    requests.get(url, auth=token.auth())          # or httpx.get(url, auth=token.auth())
    urllib.request.Request(url, headers=token.headers("GET", url))      # anything else

`StepToken` is the token string itself (so code that treats it as a `str` keeps working)
plus the in-memory key it is bound to. `DPoPAuth` is an auth object for `requests` and
`httpx` alike — duck-typed, neither is a dependency — that signs a fresh DPoP proof for each
request's method and URL and answers a server's nonce challenge (RFC 9449 §8).
`dpop_credentials` does the same for gRPC calls to the broker with a bound run credential.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import Any

import grpc

from tokenbroker.dpop import GRPC_HTM, DPoPKey, grpc_htu

NONCE_HEADER = "DPoP-Nonce"


class StepToken(str):
    """A step token bound to `key` (cnf.jkt): the token string, and how to prove possession."""

    key: DPoPKey

    def __new__(cls, token: str, key: DPoPKey) -> StepToken:
        made = super().__new__(cls, token)
        made.key = key
        return made

    def proof(self, method: str, url: str, *, nonce: str | None = None) -> str:
        """A fresh DPoP proof for one request with this token."""
        return self.key.proof(method, url, token=str(self), nonce=nonce)

    def headers(self, method: str, url: str, *, nonce: str | None = None) -> dict[str, str]:
        """The two headers of a request with this token: `Authorization: DPoP …`, `DPoP: …`."""
        return {"Authorization": f"DPoP {self}", "DPoP": self.proof(method, url, nonce=nonce)}

    def auth(self) -> DPoPAuth:
        """An auth object for `requests` or `httpx`."""
        return DPoPAuth(str(self), self.key)

    def __repr__(self) -> str:  # never the token itself
        return f"StepToken(<{len(self)} characters>, jkt={self.key.thumbprint})"


class DPoPAuth:
    """Auth for `requests` (`auth=` calls it with each prepared request) and `httpx`
    (`auth_flow`): sets `Authorization: DPoP <token>` and a fresh `DPoP` proof per request.
    A server that asks for a nonce (401 or 400 with a `DPoP-Nonce` header) gets it: httpx
    retries the request once at once; with requests the nonce is used from the next request."""

    requires_request_body = False  # httpx: the proof does not cover the body
    requires_response_body = False

    def __init__(self, token: str, key: DPoPKey) -> None:
        self._token = token
        self._key = key
        self._nonce: str | None = None
        self._lock = threading.Lock()

    def headers(self, method: str, url: str) -> dict[str, str]:
        with self._lock:
            nonce = self._nonce
        proof = self._key.proof(method.upper(), url, token=self._token, nonce=nonce)
        return {"Authorization": f"DPoP {self._token}", "DPoP": proof}

    def _learn_nonce(self, response: Any) -> bool:
        """Remember a nonce the server sent; True when it asked for one (use_dpop_nonce)."""
        nonce = response.headers.get(NONCE_HEADER)
        if not nonce:
            return False
        with self._lock:
            self._nonce = nonce
        return int(getattr(response, "status_code", 0)) in (400, 401)

    # requests: auth(prepared_request) -> prepared_request
    def __call__(self, request: Any) -> Any:
        request.headers.update(self.headers(str(request.method), str(request.url)))
        register: Callable[[str, Callable[..., Any]], None] | None = getattr(
            request, "register_hook", None
        )
        if register is not None:
            register("response", lambda response, *args, **kwargs: self._learn_nonce(response))
        return request

    # httpx: a generator that yields requests and receives responses
    def auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        request.headers.update(self.headers(str(request.method), str(request.url)))
        response = yield request
        if self._learn_nonce(response):
            request.headers.update(self.headers(str(request.method), str(request.url)))
            yield request


class _DPoPPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, credential: str, key: DPoPKey) -> None:
        self._credential = credential
        self._key = key

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        try:
            # service_url is "<scheme>://<authority>/<package>.<Service>" (the scheme may be
            # empty): its last segment and the method name make the method path, the htu.
            service = context.service_url.rstrip("/").rsplit("/", 1)[-1]
            htu = grpc_htu(f"/{service}/{context.method_name}")
            proof = self._key.proof(GRPC_HTM, htu, token=self._credential)
        except Exception as exc:  # a failure here must reach the caller, not kill gRPC's thread
            callback((), exc)
            return
        callback((("authorization", f"DPoP {self._credential}"), ("dpop", proof)), None)


def dpop_credentials(credential: str, key: DPoPKey) -> grpc.CallCredentials:
    """Call credentials presenting a run credential bound to `key`, with a fresh DPoP proof
    per call (and per retry): what the broker requires of a bound run credential."""
    return grpc.metadata_call_credentials(_DPoPPlugin(credential, key), name="dpop")
