"""Identifiers: time-ordered so that lists and indexes sort by creation, random so they
cannot be guessed."""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
# Every pair of digits (10 bits): 13 lookups make the 26 digits of 130 bits, instead of a
# Python step per digit (an id is made for every call, two for every token).
_PAIRS = [high + low for high in _CROCKFORD for low in _CROCKFORD]


def ulid() -> str:
    """A 26-character ULID-style id: 48 bits of milliseconds, 80 random bits."""
    millis = int(time.time() * 1000) & ((1 << 48) - 1)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(120, -10, -10)])


def new_run_id() -> str:
    return "r-" + ulid()


def new_token_id() -> str:
    return "t-" + ulid()


def new_request_id() -> str:
    return "req-" + ulid()
