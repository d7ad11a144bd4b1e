"""The audit log as C2SP tlog-tiles (https://c2sp.org/tlog-tiles), so auditors mirror and
verify it with generic tooling: `/checkpoint` (the signed tree head) and the hash tiles
`/tile/<L>/<N>` (256 hashes) and `/tile/<L>/<N>.p/<W>` (the first W of them, while the tile
is not yet full), N written in three-digit path elements (`x001/x234/067`).

Entry bundles (`/tile/entries/...`) are not served here: the events hold people's emails and
this port has no authentication. Auditors read the events with StreamAudit (role auditor)
and check them against the tiles: leaf hash = SHA-256(0x00 || canonical record).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from broker.api.http.routes import Request, Response, Routes

if TYPE_CHECKING:
    from broker.app import Broker

CHECKPOINT_PATH = "/checkpoint"
TILE_PREFIX = "/tile/"
_LEVEL = re.compile(r"^(0|[1-9][0-9]?)$")
_ELEMENT = re.compile(r"^x[0-9]{3}$")
_LAST = re.compile(r"^[0-9]{3}$")
_WIDTH = re.compile(r"^[1-9][0-9]{0,2}$")
_MAX_ELEMENTS = 8  # 10^24 tiles: beyond any log
# A full tile never changes; a partial one is replaced by a wider one as the log grows.
_FOREVER = (("Cache-Control", "public, max-age=31536000, immutable"),)
_BRIEFLY = (("Cache-Control", "public, max-age=60"),)


def parse_tile_path(rest: str) -> tuple[int, int, int] | None:
    """(level, index, width) from what follows `/tile/`, or None if it is not a tile path."""
    parts = rest.split("/")
    width = 256
    if len(parts) >= 3 and parts[-2].endswith(".p"):
        if not _WIDTH.match(parts[-1]) or int(parts[-1]) >= 256:
            return None
        width = int(parts[-1])
        parts = [*parts[:-2], parts[-2].removesuffix(".p")]
    if len(parts) < 2 or len(parts) > _MAX_ELEMENTS + 1 or not _LEVEL.match(parts[0]):
        return None
    *elements, last = parts[1:]
    if not _LAST.match(last) or not all(_ELEMENT.match(e) for e in elements):
        return None
    index = int("".join(e[1:] for e in elements) + last)
    return int(parts[0]), index, width


def tile_path(level: int, index: int, width: int = 256) -> str:
    """The path of a tile, as a client asks for it."""
    digits = f"{index:03d}"
    digits = digits.zfill(-(-len(digits) // 3) * 3)
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    path = "/".join([*(f"x{g}" for g in groups[:-1]), groups[-1]])
    suffix = "" if width == 256 else f".p/{width}"
    return f"{TILE_PREFIX}{level}/{path}{suffix}"


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    heads = broker.tree_heads

    def checkpoint(request: Request) -> Response:
        return Response.text(200, heads.latest().note, headers=(("Cache-Control", "no-store"),))

    def tile(request: Request) -> Response:
        rest = request.path[len(TILE_PREFIX) :]
        if rest.startswith("entries/"):
            return Response.text(
                404,
                "entry bundles are not served: events hold personal data and this port has no "
                "authentication; read them with StreamAudit (role auditor)\n",
            )
        parsed = parse_tile_path(rest)
        if parsed is None:
            return Response.text(400, "not a tile path: /tile/<L>/<N>[.p/<W>]\n")
        data = heads.tile(*parsed)
        if data is None:
            return Response.text(404, "no such tile in the log yet\n")
        cache = _FOREVER if parsed[2] == 256 else _BRIEFLY
        return Response(200, data, "application/octet-stream", cache)

    routes.add("GET", CHECKPOINT_PATH, checkpoint)
    routes.add_prefix("GET", TILE_PREFIX, tile)
