"""The log as C2SP tlog-tiles over HTTP: a mirror that knows only the tiles format and RFC
9162 rebuilds the signed root from them, and every tile path is parsed as the spec writes it."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.api.http.tiles import parse_tile_path, tile_path
from broker.api.server import BrokerServer, create_server
from broker.audit import events as audit
from broker.audit.events import AuditDraft, Outcome
from broker.store import Write, all_stored_events
from tests.conftest import make_settings, standard_policy
from tokenbroker.merkle import VerifierKey, leaf_hash, root_of_leaves, verify_checkpoint


@pytest.fixture
def served(tmp_path: Path) -> Iterator[BrokerServer]:
    settings = make_settings(
        tmp_path / "data", http_listen="127.0.0.1:0", policy=standard_policy(tmp_path)
    )
    running = create_server(settings)
    running.start()
    yield running
    running.stop(grace=0.5)


def _get(server: BrokerServer, path: str) -> tuple[int, dict[str, str], bytes]:
    assert server.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("path", "parsed"),
    [
        ("0/000", (0, 0, 256)),
        ("0/x001/x234/067", (0, 1234067, 256)),
        ("1/x001/000.p/5", (1, 1000, 5)),
        ("7/255.p/255", (7, 255, 255)),
    ],
)
def test_tile_paths_are_read_and_written_as_c2sp_writes_them(
    path: str, parsed: tuple[int, int, int]
) -> None:
    assert parse_tile_path(path) == parsed
    assert tile_path(*parsed) == "/tile/" + path


@pytest.mark.parametrize(
    "path", ["0/1", "0/0000", "01/000", "0/x01/000", "0/000.p/256", "0/000.p/0", "0", "a/000"]
)
def test_malformed_tile_paths_are_refused(path: str) -> None:
    assert parse_tile_path(path) is None


def test_a_mirror_rebuilds_the_signed_root_from_the_hash_tiles_alone(
    served: BrokerServer,
) -> None:
    drafts = [AuditDraft(time=1000.0, action="token.issued", outcome=Outcome.SUCCESS)] * 600
    served.broker.store.commit(Write(drafts))
    _, _, vkey = _get(served, "/audit/log-key")
    status, _, note = _get(served, "/checkpoint")
    assert status == 200
    head = verify_checkpoint(note.decode(), VerifierKey.parse(vkey.decode()))
    size = head.size
    assert size > 512

    leaves = b""
    for index in range(size // 256):
        status, headers, tile = _get(served, tile_path(0, index))
        assert status == 200 and len(tile) == 256 * 32
        assert "immutable" in headers["Cache-Control"]
        leaves += tile
    status, _, tile = _get(served, tile_path(0, size // 256, size % 256))
    assert status == 200
    leaves += tile
    hashes = [leaves[i : i + 32] for i in range(0, len(leaves), 32)]
    assert root_of_leaves(hashes) == head.root
    # The leaves are the events: SHA-256(0x00 || canonical record).
    events = list(all_stored_events(served.broker.store))
    assert [leaf_hash(audit.canonical_bytes(e.record)) for e in events[:size]] == hashes
    # One level up: each hash is the root of 256 leaves.
    status, _, upper = _get(served, tile_path(1, 0, size // 256))
    assert status == 200
    for i in range(size // 256):
        assert upper[i * 32 : (i + 1) * 32] == root_of_leaves(hashes[i * 256 : (i + 1) * 256])


def test_tiles_the_log_does_not_hold_yet_and_entries_are_not_served(
    served: BrokerServer,
) -> None:
    size = served.broker.store.head_sequence()
    assert _get(served, tile_path(0, 0, size + 1))[0] == 404
    assert _get(served, tile_path(0, 0))[0] == 404  # not full yet
    assert _get(served, tile_path(1, 0, 1))[0] == 404
    assert _get(served, "/tile/0/1")[0] == 400
    status, _, body = _get(served, "/tile/entries/000")
    assert status == 404 and b"StreamAudit" in body
