"""Identifiers keep their form: 26 Crockford base32 digits, the first 10 the milliseconds."""

from __future__ import annotations

import pytest

from broker import ids

_DIGITS = "0123456789abcdefghjkmnpqrstvwxyz"


def _digits(value: int, length: int) -> str:
    """The ULID spec, digit by digit: 5 bits each, most significant first."""
    return "".join(_DIGITS[(value >> (5 * i)) & 31] for i in reversed(range(length)))


@pytest.mark.parametrize(
    ("millis", "random"),
    [
        (0, b"\x00" * 10),
        ((1 << 48) - 1, b"\xff" * 10),
        (1_796_102_084_640, bytes(range(10))),
        (1_700_000_000_123, bytes.fromhex("8000000000000000001f")),
    ],
)
def test_a_ulid_is_the_milliseconds_then_the_random_bits_in_crockford_base32(
    monkeypatch: pytest.MonkeyPatch, millis: int, random: bytes
) -> None:
    monkeypatch.setattr("broker.ids.time.time", lambda: millis / 1000 + 0.0001)
    monkeypatch.setattr("broker.ids.os.urandom", lambda n: random[:n])
    expected = _digits(millis, 10) + _digits(int.from_bytes(random, "big"), 16)
    assert ids.ulid() == expected


def test_ids_sort_by_creation_and_differ() -> None:
    made = [ids.new_request_id() for _ in range(1000)]
    assert len(set(made)) == 1000
    assert all(len(i) == len("req-") + 26 and set(i[4:]) <= set(_DIGITS) for i in made)
    assert [i[4:14] for i in made] == sorted(i[4:14] for i in made)
