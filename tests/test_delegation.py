"""ExecuteOnBehalfOf end to end: a portal starts runs for verified people, and every record —
run, tokens, audit — keeps both identities."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest

from broker.api.server import BrokerServer, create_server
from tests.accounts import Account, Callers, callers_of, new_account, write_policy
from tests.conftest import make_settings
from tests.support import as_dict, details, perms, pipeline, rpc_error
from tokenbroker.samples.idp import TestIdentityProvider
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

Stub = broker_pb2_grpc.TokenBrokerServiceStub
AUDIENCE = "token-broker-portal"


@dataclass
class World:
    server: BrokerServer
    callers: Callers
    idp: TestIdentityProvider
    accounts: dict[str, Account]
    portal: Stub
    auditor: Stub
    orchestrator: Stub
    no_role: Stub
    stopped: bool = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.callers.close()
            self.server.stop(grace=0.5)

    def id_token(self, email: str = "alice@example.com", **kw: object) -> str:
        return self.idp.id_token(subject="u-alice", email=email, audience=AUDIENCE, **kw)  # type: ignore[arg-type]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    idp = TestIdentityProvider("https://idp.example.com")
    jwks = idp.write_jwks(tmp_path / "idp-jwks.json")
    delegation = f"""\
[accounts.deploy-portal.delegation]
user_domains = ["example.com", "contractors.example.com"]
asserted_identities = true
asserted_domains = ["contractors.example.com"]
max_chain_depth = 3

[[accounts.deploy-portal.delegation.identity_providers]]
issuer = "{idp.issuer}"
audience = "{AUDIENCE}"
jwks_file = "{jwks}"
"""
    accounts: dict[str, Account] = {
        "portal": new_account("deploy-portal", ["delegator"], extra_toml=delegation),
        "auditor": new_account("siem", ["auditor"]),
        "orchestrator": new_account("ci-orchestrator", ["orchestrator"]),
        "no_role": new_account("intruder", ["auditor"]),
    }
    policy = write_policy(tmp_path / "policy.toml", accounts.values())
    server = create_server(make_settings(tmp_path / "data", policy=policy))
    server.start()
    callers = Callers(server)
    world = World(
        server,
        callers,
        idp,
        accounts,
        portal=callers.stub(accounts["portal"]),
        auditor=callers.stub(accounts["auditor"]),
        orchestrator=callers.stub(accounts["orchestrator"]),
        no_role=callers.stub(accounts["no_role"]),
    )
    yield world
    world.stop()


def execute(stub: Stub, key: str, **person: object) -> broker_pb2.ExecuteOnBehalfOfResponse:
    request = broker_pb2.ExecuteOnBehalfOfRequest(
        pipeline=pipeline(),
        permission_ceiling=perms(pipelines="execute"),
        idempotency_key=key,
        **person,  # type: ignore[arg-type]
    )
    return stub.ExecuteOnBehalfOf(request, timeout=10)


def audit_of(world: World, run_id: str = "", **filters: object) -> list[types_pb2.AuditEvent]:
    request = broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(run_id=run_id, org="acme", **filters),  # type: ignore[arg-type]
        stop_at_head=True,
    )
    return [item.event for item in world.auditor.StreamAudit(request, timeout=10)]


def test_run_for_a_verified_person_keeps_both_identities_everywhere(world: World) -> None:
    executed = execute(world.portal, "deploy-1", id_token=world.id_token(name="Alice"))
    run = executed.run
    assert run.triggered_via == "deploy-portal"
    person = run.on_behalf_of
    assert (person.subject, person.issuer, person.email) == (
        "u-alice",
        "https://idp.example.com",
        "alice@example.com",
    )
    assert person.verification_method == types_pb2.VERIFICATION_METHOD_IDP_VERIFIED
    assert len(person.evidence_sha256) == 64
    assert run.attribution.summary == (
        "Executed by: alice@example.com (verified by https://idp.example.com) · "
        "Triggered via: deploy-portal"
    )
    fetched = world.auditor.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5).run
    assert fetched.attribution == run.attribution

    # The run credential mints tokens that carry the person and an RFC 8693 actor.
    as_run = world.callers.bearer_stub(executed.run_credential)
    token = as_run.IssueToken(
        broker_pb2.IssueTokenRequest(audience="api", permissions=perms(pipelines="read")),
        timeout=5,
    ).token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["on_behalf_of"] == {
        "sub": "u-alice",
        "iss": "https://idp.example.com",
        "email": "alice@example.com",
        "verification": "idp_verified",
    }
    assert claims["act"] == {"sub": "deploy-portal"}
    verified = as_dict(
        world.auditor.VerifyToken(broker_pb2.VerifyTokenRequest(token=token), timeout=5).claims
    )
    assert verified["on_behalf_of"]["email"] == "alice@example.com"

    events = audit_of(world, run.run_id)
    assert [e.action for e in events] == ["run.executed_on_behalf", "token.issued"]
    started, issued = events
    assert started.principal == "deploy-portal"
    assert started.on_behalf_of.email == "alice@example.com"
    assert started.on_behalf_of.verification_method == types_pb2.VERIFICATION_METHOD_IDP_VERIFIED
    assert issued.principal == f"run:{run.run_id}"
    assert issued.on_behalf_of.subject == "u-alice"


def test_asserted_identity_is_recorded_as_asserted_never_as_verified(world: World) -> None:
    asserted = broker_pb2.AssertedPerson(subject="c-7", email="bob@contractors.example.com")
    run = execute(world.portal, "deploy-2", asserted=asserted).run
    assert run.on_behalf_of.verification_method == (
        types_pb2.VERIFICATION_METHOD_ASSERTED_BY_CALLER
    )
    assert run.attribution.summary == (
        "Executed by: bob@contractors.example.com (asserted by deploy-portal, not verified) · "
        "Triggered via: deploy-portal"
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("untrusted issuer", "may not act for people from issuer 'https://evil.example'"),
        ("expired", "ID token has expired"),
        ("wrong audience", "not for this broker's audience"),
        ("unverified email", "has not verified the email address"),
        ("outside the domains", "may not act for users in domain 'elsewhere.org'"),
        ("asserted where not allowed", "may not assert identities in domain 'example.com'"),
        ("pipeline out of scope", "scope"),
        ("no delegator role", "delegator"),
    ],
)
def test_refused_delegations_are_audited_with_both_identities(
    world: World, case: str, reason: str
) -> None:
    stub = world.portal
    person: dict[str, object] = {"id_token": world.id_token()}
    target = pipeline()
    if case == "untrusted issuer":
        evil = TestIdentityProvider("https://evil.example")
        person = {
            "id_token": evil.id_token(subject="u", email="alice@example.com", audience=AUDIENCE)
        }
    elif case == "expired":
        person = {"id_token": world.id_token(lifetime=-300)}
    elif case == "wrong audience":
        person = {
            "id_token": world.idp.id_token(subject="u", email="a@example.com", audience="other")
        }
    elif case == "unverified email":
        person = {"id_token": world.id_token(email_verified=False)}
    elif case == "outside the domains":
        person = {"id_token": world.id_token(email="eve@elsewhere.org")}
    elif case == "asserted where not allowed":
        person = {"asserted": broker_pb2.AssertedPerson(subject="u", email="al@example.com")}
    elif case == "pipeline out of scope":
        target = pipeline(org="globex")
    elif case == "no delegator role":
        stub = world.no_role
    request = broker_pb2.ExecuteOnBehalfOfRequest(
        pipeline=target,
        permission_ceiling=perms(pipelines="execute"),
        idempotency_key=f"refused-{case}",
        **person,  # type: ignore[arg-type]
    )
    error = rpc_error(lambda: stub.ExecuteOnBehalfOf(request, timeout=10))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert reason in details(error)
    # The durable record (read from the store: the refusal may name another tenant's org).
    refusals = [
        e.draft for e in world.server.broker.store.read_events(0, 1000)
        if e.draft.action == "run.refused"
    ]  # fmt: skip
    assert len(refusals) == 1
    refused = refusals[0]
    assert refused.principal == ("intruder" if case == "no delegator role" else "deploy-portal")
    assert reason in refused.details["reason"]
    # And the person: verified where the broker got that far, else as claimed (unverified).
    if refused.on_behalf_of is not None:
        assert refused.on_behalf_of.email.endswith(("example.com", "elsewhere.org"))
    else:
        assert refused.details["claimed_person"]["verified"] == "no"
        assert refused.details["claimed_person"]["email"]


def test_same_idempotency_key_returns_the_same_run_and_a_changed_request_conflicts(
    world: World,
) -> None:
    first = execute(world.portal, "deploy-3", id_token=world.id_token())
    again = execute(world.portal, "deploy-3", id_token=world.id_token())
    assert again.run.run_id == first.run.run_id and again.replayed
    other_person = world.idp.id_token(
        subject="u-carol", email="carol@example.com", audience=AUDIENCE
    )
    error = rpc_error(lambda: execute(world.portal, "deploy-3", id_token=other_person))
    assert error.code() is grpc.StatusCode.ALREADY_EXISTS
    assert "different parameters" in details(error)


def test_twenty_concurrent_duplicates_start_one_run(world: World) -> None:
    token = world.id_token()
    run_ids: list[str] = []
    lock = threading.Lock()

    def call() -> None:
        run_id = execute(world.portal, "deploy-burst", id_token=token).run.run_id
        with lock:
            run_ids.append(run_id)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(run_ids) == 20 and len(set(run_ids)) == 1
    started = audit_of(world, actions=["run.executed_on_behalf"])
    assert len(started) == 1


def test_a_chain_keeps_the_person_nests_act_and_stops_at_its_depth_limit(world: World) -> None:
    run_a = execute(world.portal, "chain-a", id_token=world.id_token())
    as_a = world.callers.bearer_stub(run_a.run_credential)
    run_b = execute(as_a, "chain-b")  # a child run: no person sent, the parent's is kept
    assert run_b.run.on_behalf_of == run_a.run.on_behalf_of
    assert run_b.run.parent_run_id == run_a.run.run_id
    assert list(run_b.run.actor_chain) == ["deploy-portal", f"run:{run_a.run.run_id}"]
    as_b = world.callers.bearer_stub(run_b.run_credential)
    token = as_b.IssueToken(broker_pb2.IssueTokenRequest(audience="api"), timeout=5).token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["on_behalf_of"]["email"] == "alice@example.com"
    assert claims["act"] == {"sub": f"run:{run_a.run.run_id}", "act": {"sub": "deploy-portal"}}

    run_c = execute(as_b, "chain-c")  # depth 3: the policy's limit
    as_c = world.callers.bearer_stub(run_c.run_credential)
    error = rpc_error(lambda: execute(as_c, "chain-d"))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "exceed the limit of 3" in details(error)


def test_a_child_run_cannot_widen_its_parents_ceiling(world: World) -> None:
    run_a = execute(world.portal, "narrow-a", id_token=world.id_token())
    as_a = world.callers.bearer_stub(run_a.run_credential)
    request = broker_pb2.ExecuteOnBehalfOfRequest(
        pipeline=pipeline(),
        permission_ceiling=perms(pipelines="admin"),
        idempotency_key="narrow-b",
    )
    error = rpc_error(lambda: as_a.ExecuteOnBehalfOf(request, timeout=10))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "cannot exceed its parent's ceiling" in details(error)


def test_attributions_read_back_identically_after_a_restart(world: World) -> None:
    verified = execute(world.portal, "keep-1", id_token=world.id_token()).run
    asserted = execute(
        world.portal,
        "keep-2",
        asserted=broker_pb2.AssertedPerson(subject="c-9", email="dan@contractors.example.com"),
    ).run
    settings = world.server.broker.settings
    world.stop()
    restarted = create_server(settings)
    restarted.start()
    try:
        with callers_of(restarted) as callers:
            auditor = callers.stub(world.accounts["auditor"])
            for before in (verified, asserted):
                request = broker_pb2.GetRunRequest(run_id=before.run_id)
                after = auditor.GetRun(request, timeout=5).run
                assert after.on_behalf_of == before.on_behalf_of
                assert after.attribution == before.attribution
                assert after.triggered_via == before.triggered_via
                assert list(after.actor_chain) == list(before.actor_chain)
    finally:
        restarted.stop(grace=0.5)
