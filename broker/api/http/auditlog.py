"""The audit log's signed tree head over HTTP, for witnesses and auditors without a
credential: `/audit/checkpoint` (a C2SP checkpoint of the log as it stands, signed with the
log key, followed by the witnesses' cosignatures kept for it), `/audit/log-key` (the note
verifier key that checks it) and `POST /audit/cosignature`, where a witness hands back the
checkpoint it cosigned (broker.audit.quorum: the signature is the authentication).

A tree head names only the log's size and root hash, never an event; the events and their
proofs stay behind the auditor role over gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api.http.routes import Request, Response, Routes
from broker.errors import InvalidArgument

if TYPE_CHECKING:
    from broker.app import Broker

CHECKPOINT_PATH = "/audit/checkpoint"
LOG_KEY_PATH = "/audit/log-key"
COSIGNATURE_PATH = "/audit/cosignature"
QUORUM_HEADER = "Tokenbroker-Witness-Quorum"
_NO_STORE = (("Cache-Control", "no-store"),)


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    heads = broker.tree_heads
    quorum = broker.quorum

    def checkpoint(request: Request) -> Response:
        # Always the head as it stands: a cached one would hide how far the log has grown.
        served = quorum.latest()
        status = f"{served.cosignatures} cosignatures; {'final' if served.final else 'not final'}"
        return Response.text(200, served.note, headers=(*_NO_STORE, (QUORUM_HEADER, status)))

    def cosignature(request: Request) -> Response:
        try:
            kept = quorum.submit(request.body, request.peer)
        except InvalidArgument as error:
            return Response.json(400, {"error": "invalid_request", "message": error.message})
        return Response.json(200, {"accepted": kept}, _NO_STORE)

    def log_key(request: Request) -> Response:
        return Response.text(
            200, heads.verifier_key + "\n", headers=(("Cache-Control", "public, max-age=3600"),)
        )

    routes.add("GET", CHECKPOINT_PATH, checkpoint)
    routes.add("GET", LOG_KEY_PATH, log_key)
    routes.add("POST", COSIGNATURE_PATH, cosignature)
