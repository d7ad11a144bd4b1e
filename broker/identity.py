"""Who is acting: the authenticated principal that called, and the person it acts for."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class VerificationMethod(enum.Enum):
    """How the broker established a person's identity. Values are stored; never renumber."""

    IDP_VERIFIED = "idp_verified"
    ASSERTED_BY_CALLER = "asserted_by_caller"


class PrincipalKind(enum.Enum):
    SERVICE_ACCOUNT = "service_account"
    RUN = "run"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Person:
    """A human on whose behalf a run executes. Identity is subject + issuer; the rest is display."""

    subject: str
    issuer: str
    method: VerificationMethod
    evidence_sha256: str
    email: str = ""
    display_name: str = ""

    def label(self) -> str:
        return self.email or self.subject

    def as_record(self) -> dict[str, str]:
        """The person as stored: in audit records (whose hash covers these exact keys and
        values) and in the runs table. The one serialiser; keys are stored, never rename."""
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "email": self.email,
            "display_name": self.display_name,
            "method": self.method.value,
            "evidence_sha256": self.evidence_sha256,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Person:
        """The inverse of `as_record`."""
        return cls(
            subject=record["subject"],
            issuer=record["issuer"],
            email=record["email"],
            display_name=record["display_name"],
            method=VerificationMethod(record["method"]),
            evidence_sha256=record["evidence_sha256"],
        )


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of an RPC.

    For service accounts `name` is the account name from the policy. For a run credential it
    is "run:<run_id>", and `run_id` is set, so that the caller may act on that run only.
    """

    kind: PrincipalKind
    name: str
    roles: frozenset[str] = frozenset()
    run_id: str = ""
    auth_method: str = ""
    # Sender constraint (RFC 9449/8705): the key a run credential is bound to (its cnf.jkt),
    # the key of the DPoP proof this call carried (verified), and the thumbprint of the
    # client certificate the TLS layer verified for this call.
    bound_jkt: str = ""
    proof_jkt: str = ""
    certificate_x5t: str = ""

    @property
    def is_anonymous(self) -> bool:
        return self.kind is PrincipalKind.ANONYMOUS


ANONYMOUS = Principal(PrincipalKind.ANONYMOUS, "")
BROKER = Principal(PrincipalKind.SERVICE_ACCOUNT, "token-broker", auth_method="internal")

# JWT header `typ` values (RFC 8725 §3.11: explicit typing keeps one kind of token from being
# accepted as another).
RUN_CREDENTIAL_TYP = "tokenbroker-run+jwt"
STEP_TOKEN_TYP = "at+jwt"
