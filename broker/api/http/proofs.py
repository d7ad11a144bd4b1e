"""Merkle proofs of the audit log over HTTP, without a credential:
`/audit/proof/consistency?first=N&second=M` and `/audit/proof/inclusion?sequence=N&tree_size=M`.

A proof holds only hashes and sizes, like the public tiles, so a witness or mirror checks that
the log only grows without being an auditor. The event itself (which holds people's emails)
stays behind ProveInclusion and StreamAudit (role auditor) over gRPC. Each answer carries the
signed checkpoint for the tree it proves against, so it is checked with the log key alone.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from broker.api.http.routes import Request, Response, Routes
from broker.errors import BrokerError, InvalidArgument

if TYPE_CHECKING:
    from broker.app import Broker
    from broker.audit.treehead import TreeHead

CONSISTENCY_PATH = "/audit/proof/consistency"
INCLUSION_PATH = "/audit/proof/inclusion"
_NUMBER = re.compile(r"^(0|[1-9][0-9]{0,18})$")  # at most 19 digits: fits a tree size
_NO_STORE = (("Cache-Control", "no-store"),)


def _count(query: Mapping[str, list[str]], name: str, required: bool) -> int:
    values = query.get(name, [])
    if not values and not required:
        return 0
    if len(values) != 1 or not _NUMBER.match(values[0]):
        raise InvalidArgument.field(name, "must be given once, as a decimal count")
    return int(values[0])


def _hashes(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


def _head(head: TreeHead) -> dict[str, object]:
    return {
        "tree_size": head.size,
        "root_hash": base64.b64encode(head.root).decode(),
        "checkpoint": head.note,
    }


def _refusal(error: BrokerError) -> Response:
    # A proof for a size the log has not reached or no longer stores: the caller's request.
    return Response.json(400, {"error": "invalid_request", "message": error.message}, _NO_STORE)


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    heads = broker.tree_heads

    def consistency(request: Request) -> Response:
        try:
            first = _count(request.query, "first", required=True)
            second = _count(request.query, "second", required=False)
            proof = heads.consistency(first, second)
        except BrokerError as error:
            return _refusal(error)
        document = {"first": proof.first, "second": proof.second, "hashes": _hashes(proof.hashes)}
        return Response.json(200, {**document, **_head(proof.head)}, _NO_STORE)

    def inclusion(request: Request) -> Response:
        try:
            sequence = _count(request.query, "sequence", required=True)
            tree_size = _count(request.query, "tree_size", required=False)
            index, hashes, head = heads.inclusion_path(sequence, tree_size)
        except BrokerError as error:
            return _refusal(error)
        document = {"sequence": sequence, "leaf_index": index, "hashes": _hashes(hashes)}
        return Response.json(200, {**document, **_head(head)}, _NO_STORE)

    routes.add("GET", CONSISTENCY_PATH, consistency)
    routes.add("GET", INCLUSION_PATH, inclusion)
