"""Identifiers: time-ordered so that lists and indexes sort by creation, random so they
cannot be guessed."""

from __future__ import annotations

import secrets
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def ulid() -> str:
    """A 26-character ULID-style id: 48 bits of milliseconds, 80 random bits."""
    millis = int(time.time() * 1000) & ((1 << 48) - 1)
    return _encode(millis, 10) + _encode(secrets.randbits(80), 16)


def new_run_id() -> str:
    return "r-" + ulid()


def new_token_id() -> str:
    return "t-" + ulid()


def new_request_id() -> str:
    return "req-" + ulid()
