"""The audit log's signed tree head over HTTP, for witnesses and auditors without a
credential: `/audit/checkpoint` (a C2SP checkpoint of the log as it stands, signed with the
log key) and `/audit/log-key` (the note verifier key that checks it).

A tree head names only the log's size and root hash, never an event; the events and their
proofs stay behind the auditor role over gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api.http.routes import Request, Response, Routes

if TYPE_CHECKING:
    from broker.app import Broker

CHECKPOINT_PATH = "/audit/checkpoint"
LOG_KEY_PATH = "/audit/log-key"


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    heads = broker.tree_heads

    def checkpoint(request: Request) -> Response:
        # Always the head as it stands: a cached one would hide how far the log has grown.
        return Response.text(200, heads.latest().note, headers=(("Cache-Control", "no-store"),))

    def log_key(request: Request) -> Response:
        return Response.text(
            200, heads.verifier_key + "\n", headers=(("Cache-Control", "public, max-age=3600"),)
        )

    routes.add("GET", CHECKPOINT_PATH, checkpoint)
    routes.add("GET", LOG_KEY_PATH, log_key)
