"""Identifiers: time-ordered so that lists and indexes sort by creation, random so they
cannot be guessed."""

from __future__ import annotations

import base64
import os
import time

# Crockford's base32 (lower case), by translating the RFC 4648 alphabet base64 writes.
_CROCKFORD = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789abcdefghjkmnpqrstvwxyz"
)


def ulid() -> str:
    """A 26-character ULID-style id: 48 bits of milliseconds, 80 random bits."""
    millis = int(time.time() * 1000) & ((1 << 48) - 1)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    # 160 bits are 32 base32 digits; the first 6 encode the 30 zero bits above the 130 that
    # 26 digits hold (one call into C instead of a Python loop per digit).
    return base64.b32encode(value.to_bytes(20, "big"))[6:].translate(_CROCKFORD).decode()


def new_run_id() -> str:
    return "r-" + ulid()


def new_token_id() -> str:
    return "t-" + ulid()


def new_request_id() -> str:
    return "req-" + ulid()
