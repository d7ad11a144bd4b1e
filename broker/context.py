"""What the domain knows about the call it is serving: who, and how to correlate it."""

from __future__ import annotations

from dataclasses import dataclass

from broker.identity import ANONYMOUS, Principal


@dataclass(frozen=True)
class CallContext:
    principal: Principal = ANONYMOUS
    request_id: str = ""
    trace_id: str = ""
