"""Fail closed: a write the store refuses fails the call as UNAVAILABLE, saying what did
not happen — the one place the domain turns a storage failure into a caller's answer."""

from __future__ import annotations

from broker.errors import Unavailable
from broker.store import Committed, Store, StoreUnavailable, Write


def commit(store: Store, write: Write, consequence: str) -> Committed:
    """Commit `write`, or raise Unavailable("<why>; <consequence>, retry later")."""
    try:
        return store.commit(write)
    except StoreUnavailable as exc:
        raise Unavailable(f"{exc}; {consequence}, retry later") from exc
