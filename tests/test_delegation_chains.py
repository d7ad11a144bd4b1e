"""Delegation chains over real gRPC: a run credential never escapes its delegator's scope.

A chain starts when a delegator (deploy-portal, scoped to acme/web/*) runs a pipeline on a
person's behalf; that run's credential may start child runs, and theirs grandchildren. Each
table row below is one chain, checked end to end: the confinement rules of issue 13 §1 —
the root delegator's scopes as the policy says *now*, the parent's deadline, lease and ceiling,
and the end of a run ending every run below it, online and offline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.context import CallContext
from broker.identity import BROKER
from broker.policy.file import PolicyError, load_policy
from broker.runs.model import PipelineRef
from tests.accounts import Account, Callers, new_account, write_policy
from tests.conftest import make_settings
from tests.support import details, eventually, perms, pipeline, rpc_error
from tokenbroker.credentials import assertion_credentials
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2
from tokenbroker.verification import TokenStatus
from tokenbroker.verifier import JwksCache, RevocationFollower, TokenVerifier, jwks_from_broker

Stub = broker_pb2_grpc.TokenBrokerServiceStub
ALICE = broker_pb2.AssertedPerson(subject="u-alice", email="alice@example.com")
API = "api.example.com"
ENDING = ("run.ended", "run.expired")
DENIED = grpc.StatusCode.PERMISSION_DENIED


class MovableClock:
    """The broker's clock: real time plus whatever the test adds (assertions stay valid for
    the small moves made here, well inside their 30 s skew)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def portal_toml(child_runs: str = "in_scope") -> str:
    return f"""\
[accounts.deploy-portal.delegation]
user_domains = ["example.com"]
asserted_identities = true
asserted_domains = ["example.com"]
max_chain_depth = 4
child_runs = "{child_runs}"
"""


@dataclass
class World:
    server: BrokerServer
    callers: Callers
    clock: MovableClock
    policy_path: Path
    accounts: dict[str, Account]
    portal: Stub
    auditor: Stub
    orchestrator: Stub
    auditor_channel: grpc.Channel
    anonymous: grpc.Channel
    stubs: dict[str, Stub] = field(default_factory=dict)

    def reload_policy(self, **changes: Account | None) -> None:
        """Rewrite the policy (an account replaced, or dropped with None) and reload it."""
        accounts = {**self.accounts, **changes}
        write_policy(self.policy_path, [a for a in accounts.values() if a is not None])
        assert self.server.broker.policy.reload()

    def as_run(self, credential: str) -> Stub:
        if credential not in self.stubs:
            self.stubs[credential] = self.callers.bearer_stub(credential)
        return self.stubs[credential]

    def get_run(self, run_id: str) -> types_pb2.Run:
        return self.auditor.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5).run

    def audit(self, run_id: str) -> list[types_pb2.AuditEvent]:
        request = broker_pb2.StreamAuditRequest(
            filter=broker_pb2.AuditFilter(run_id=run_id, org="acme"), stop_at_head=True
        )
        return [item.event for item in self.auditor.StreamAudit(request, timeout=10)]


def make_world(
    tmp_path: Path,
    child_runs: str = "in_scope",
    scope: str = "acme/web/*",
    reap_interval: float = 0.1,
) -> World:
    accounts = {
        "portal": new_account(
            "deploy-portal", ["delegator"], [scope], extra_toml=portal_toml(child_runs)
        ),
        "auditor": new_account("siem", ["auditor"]),
        "orchestrator": new_account(
            "ci-orchestrator", ["orchestrator"], extra_toml='permissions = { artifacts = "read" }'
        ),
        "builder": new_account("builder", ["orchestrator"]),  # no permissions to inherit
    }
    policy_path = write_policy(tmp_path / "policy.toml", accounts.values())
    settings = make_settings(tmp_path / "data", policy=policy_path, reap_interval=reap_interval)
    clock = MovableClock()
    server = create_server(settings, broker=build_broker(settings, clock=clock))
    server.start()
    callers = Callers(server)
    auditor = accounts["auditor"]
    return World(
        server=server,
        callers=callers,
        clock=clock,
        policy_path=policy_path,
        accounts=accounts,
        portal=callers.stub(accounts["portal"]),
        auditor=callers.stub(auditor),
        orchestrator=callers.stub(accounts["orchestrator"]),
        auditor_channel=callers.channel(_assertion_credentials(auditor, callers.audience)),
        anonymous=grpc.insecure_channel(server.target),
    )


def _assertion_credentials(account: Account, audience: str) -> grpc.CallCredentials:
    return assertion_credentials(account.name, account.private_pem, audience, key_id=account.kid)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = make_world(tmp_path)
    yield made
    made.anonymous.close()
    made.callers.close()
    made.server.stop(grace=0.5)


def execute(
    stub: Stub,
    target: str = "acme/web/deploy",
    *,
    key: str,
    deadline: float = 0,
    lease: float = 0,
    ceiling: dict[str, str] | None = None,
    person: bool = False,
) -> broker_pb2.ExecuteOnBehalfOfResponse:
    org, project, name = target.split("/")
    request = broker_pb2.ExecuteOnBehalfOfRequest(
        pipeline=pipeline(org, project, name),
        permission_ceiling=perms(**(ceiling or {"pipelines": "execute", "artifacts": "read"})),
        idempotency_key=key,
    )
    if person:
        request.asserted.CopyFrom(ALICE)
    if deadline:
        request.deadline.CopyFrom(Duration(seconds=int(deadline)))
    if lease:
        request.lease.CopyFrom(Duration(seconds=int(lease)))
    return stub.ExecuteOnBehalfOf(request, timeout=10)


@dataclass(frozen=True)
class Link:
    run: types_pb2.Run
    credential: str


def start_chain(
    world: World, depth: int, *, deadline: float = 0, lease: float = 0, name: str = "c"
) -> list[Link]:
    """A chain of `depth` runs in acme/web/deploy: the portal's, then child after child."""
    first = execute(world.portal, key=f"{name}-0", deadline=deadline, lease=lease, person=True)
    chain = [Link(first.run, first.run_credential)]
    for level in range(1, depth):
        child = execute(world.as_run(chain[-1].credential), key=f"{name}-{level}")
        chain.append(Link(child.run, child.run_credential))
    return chain


def step_token(world: World, link: Link) -> str:
    request = broker_pb2.IssueTokenRequest(audience=API, permissions=perms(artifacts="read"))
    return world.as_run(link.credential).IssueToken(request, timeout=5).token


def token_status(world: World, token: str) -> int:
    request = broker_pb2.VerifyTokenRequest(token=token, audience=API)
    return world.auditor.VerifyToken(request, timeout=5).status


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll for something another thread does (the reaper); bounded."""
    eventually(condition, within=timeout, interval=0.02)


# --- scope: the root delegator's, as the policy says now --------------------------------------


@dataclass(frozen=True)
class ScopeCase:
    name: str
    depth: int  # links before the child (1: the child of the portal's run)
    target: str
    child_runs: str = "in_scope"
    refusal: str = ""  # "" when the child may start
    scope: str = "acme/web/*"  # the delegator's


SCOPE_CASES = [
    ScopeCase("child in the delegator's scope", 1, "acme/web/build"),
    ScopeCase("grandchild in the delegator's scope", 2, "acme/web/test"),
    ScopeCase("great-grandchild at the depth limit", 3, "acme/web/deploy"),
    ScopeCase("child outside the delegator's scope", 1, "acme/payments/prod", refusal="outside"),
    ScopeCase("grandchild outside the scope", 2, "acme/payments/prod", refusal="outside"),
    ScopeCase("child in another organisation", 1, "globex/web/deploy", refusal="organisation"),
    ScopeCase("beyond the depth limit", 4, "acme/web/deploy", refusal="limit of 4"),
    ScopeCase("same project allowed", 1, "acme/web/build", "same_project"),
    ScopeCase("same pipeline allowed", 2, "acme/web/deploy", "same_pipeline"),
    ScopeCase(
        "same pipeline rule, other pipeline", 1, "acme/web/build", "same_pipeline", "pipeline"
    ),
    ScopeCase(
        "same project rule, other project in scope",
        1,
        "acme/payments/prod",
        "same_project",
        "parent's project",
        scope="acme/*/*",
    ),
]


@pytest.mark.parametrize("case", SCOPE_CASES, ids=lambda c: c.name)
def test_child_run_cannot_leave_delegators_scope(tmp_path: Path, case: ScopeCase) -> None:
    world = make_world(tmp_path, case.child_runs, case.scope)
    try:
        chain = start_chain(world, case.depth)
        parent = world.as_run(chain[-1].credential)
        if not case.refusal:
            child = execute(parent, case.target, key="child").run
            assert child.parent_run_id == chain[-1].run.run_id
            assert child.on_behalf_of.email == "alice@example.com"
            return
        error = rpc_error(lambda: execute(parent, case.target, key="child"))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert case.refusal in details(error)
        # Refused and audited; nothing started, so no token can be minted there.
        store = world.server.broker.store
        actions = [e.draft for e in store.read_events(0, 1000)]
        assert [a.pipeline for a in actions if a.action == "run.refused"] == [
            PipelineRef(*case.target.split("/"))
        ]
        started = [a for a in actions if a.action == "run.executed_on_behalf"]
        assert len(started) == case.depth
    finally:
        world.anonymous.close()
        world.callers.close()
        world.server.stop(grace=0.5)


@dataclass(frozen=True)
class PolicyChange:
    name: str
    change: Callable[[World], None]
    refusal: str


def _drop_portal(world: World) -> None:
    world.reload_policy(portal=None)


def _portal_loses_its_role(world: World) -> None:
    world.reload_policy(portal=new_account("deploy-portal", ["orchestrator"], ["acme/web/*"]))


def _portal_scope_narrowed(world: World) -> None:
    narrowed = new_account(
        "deploy-portal", ["delegator"], ["acme/docs/*"], extra_toml=portal_toml()
    )
    world.reload_policy(portal=narrowed)


POLICY_CHANGES = [
    PolicyChange("root removed from the policy", _drop_portal, "no longer a delegator"),
    PolicyChange("root no longer a delegator", _portal_loses_its_role, "no longer a delegator"),
    PolicyChange("root's scope narrowed", _portal_scope_narrowed, "acme/docs/*"),
]


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("case", POLICY_CHANGES, ids=lambda c: c.name)
def test_child_run_is_confined_by_the_policy_in_force_now(
    world: World, case: PolicyChange, depth: int
) -> None:
    chain = start_chain(world, depth)
    case.change(world)
    error = rpc_error(lambda: execute(world.as_run(chain[-1].credential), key="after-reload"))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert case.refusal in details(error)


# --- time and ceiling: never beyond the parent's ----------------------------------------------


@dataclass(frozen=True)
class TimeCase:
    name: str
    parent_deadline: float
    parent_lease: float
    child_deadline: float
    child_lease: float


TIME_CASES = [
    # The issue's example: a 600 s parent asked for a one-day child.
    TimeCase("day-long child of a 600 s parent", 600, 0, 86400, 0),
    TimeCase("child with the default deadline", 900, 0, 0, 0),
    TimeCase("shorter child keeps its own deadline", 3600, 0, 600, 0),
    TimeCase("child lease longer than the parent's", 3600, 60, 0, 600),
    TimeCase("child lease shorter than the parent's", 3600, 600, 0, 60),
]


@pytest.mark.parametrize("case", TIME_CASES, ids=lambda c: c.name)
def test_child_deadline_and_lease_never_outlive_its_parents(world: World, case: TimeCase) -> None:
    (parent,) = start_chain(world, 1, deadline=case.parent_deadline, lease=case.parent_lease)
    started = execute(
        world.as_run(parent.credential),
        key="child",
        deadline=case.child_deadline,
        lease=case.child_lease,
    )
    child = started.run
    assert child.deadline.ToNanoseconds() <= parent.run.deadline.ToNanoseconds()
    if case.child_deadline and case.child_deadline < case.parent_deadline:
        expected = child.create_time.ToSeconds() + case.child_deadline
        assert abs(child.deadline.ToSeconds() - expected) <= 1
    if case.child_lease:
        parent_lapse = parent.run.deadline.ToNanoseconds()
        if case.parent_lease:
            parent_lapse = parent.run.lease_expire_time.ToNanoseconds()
        assert child.lease_expire_time.ToNanoseconds() <= parent_lapse
        # Renewing the child cannot push it past its parent either.
        world.clock.offset += 5
        again = world.as_run(started.run_credential).RenewRun(
            broker_pb2.RenewRunRequest(run_id=child.run_id), timeout=5
        )
        current_parent = world.get_run(parent.run.run_id)
        limit = current_parent.deadline.ToNanoseconds()
        if case.parent_lease:
            limit = current_parent.lease_expire_time.ToNanoseconds()
        assert again.run.lease_expire_time.ToNanoseconds() <= limit


def test_child_ceiling_never_exceeds_its_parents(world: World) -> None:
    (parent,) = start_chain(world, 1)
    error = rpc_error(
        lambda: execute(world.as_run(parent.credential), key="wide", ceiling={"artifacts": "write"})
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "cannot exceed its parent's ceiling" in details(error)


# --- ending: a run ends with everything below it ---------------------------------------------


@dataclass(frozen=True)
class EndCase:
    name: str
    depth: int
    ended: int  # index in the chain of the run that ends
    how: str  # "revoke", "deadline" or "lease"


END_CASES = [
    EndCase("revoked root of a chain of 2", 2, 0, "revoke"),
    EndCase("revoked root of a chain of 4", 4, 0, "revoke"),
    EndCase("revoked middle of a chain of 4", 4, 1, "revoke"),
    EndCase("revoked by its own credential", 3, 0, "revoke-self"),
    EndCase("root past its deadline", 3, 0, "deadline"),
    EndCase("root's lease lapsed", 3, 0, "lease"),
]


@pytest.mark.parametrize("case", END_CASES, ids=lambda c: c.name)
def test_ending_a_run_ends_all_its_descendants_online_and_offline(
    world: World, case: EndCase
) -> None:
    timed = case.how in ("deadline", "lease")
    chain = start_chain(
        world,
        case.depth,
        deadline=10 if case.how == "deadline" else 0,
        lease=10 if case.how == "lease" else 0,
    )
    tokens = [step_token(world, link) for link in chain]
    assert all(token_status(world, t) == broker_pb2.TOKEN_STATUS_ACTIVE for t in tokens)
    ended_id = chain[case.ended].run.run_id

    if case.how == "revoke":
        world.orchestrator.RevokeRun(
            broker_pb2.RevokeRunRequest(run_id=ended_id, reason="stop"), timeout=5
        )
    elif case.how == "revoke-self":
        world.as_run(chain[case.ended].credential).RevokeRun(
            broker_pb2.RevokeRunRequest(run_id=ended_id, reason="done"), timeout=5
        )
    else:
        world.clock.offset += 11  # past the deadline or lease: the reaper ends it
        # GetRun says EXPIRED at once (Run.as_of); wait for the reaper's record.
        store = world.server.broker.store
        wait_until(lambda: not store.get_run(ended_id).is_active)  # type: ignore[union-attr]

    state = types_pb2.RUN_STATE_EXPIRED if timed else types_pb2.RUN_STATE_ENDED
    status = broker_pb2.TOKEN_STATUS_RUN_EXPIRED if timed else broker_pb2.TOKEN_STATUS_RUN_ENDED
    above, below = chain[: case.ended], chain[case.ended :]
    for link, token in zip(chain, tokens, strict=True):
        run = world.get_run(link.run.run_id)
        if link in above:
            assert run.state == types_pb2.RUN_STATE_ACTIVE
            assert token_status(world, token) == broker_pb2.TOKEN_STATUS_ACTIVE
            continue
        assert run.state == state, link.run.run_id
        assert token_status(world, token) == status
        # Its credential is dead too: no new tokens, no grandchildren.
        error = rpc_error(lambda link=link: step_token(world, link))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        # One audit event per run, in the same transaction as the run that ended.
        ending = [e for e in world.audit(link.run.run_id) if e.action in ENDING]
        assert len(ending) == 1
        if link.run.run_id != ended_id:
            assert ending[0].details["ended_with"] == ended_id
            assert world.get_run(link.run.run_id).end_time == world.get_run(ended_id).end_time
    sequences = sorted(
        e.sequence for link in below for e in world.audit(link.run.run_id) if e.action in ENDING
    )
    assert sequences == list(range(sequences[0], sequences[0] + len(below)))

    # Offline: an API following the audit stream learns each descendant's end from its own event.
    follower = RevocationFollower(world.auditor_channel, org="acme").start()
    try:
        verifier = TokenVerifier(
            issuer=world.server.broker.tokens.issuer,
            audience=API,
            keys=JwksCache(jwks_from_broker(world.anonymous)),
            revocations=follower,
        )
        offline = TokenStatus.RUN_EXPIRED if timed else TokenStatus.RUN_ENDED
        for link, token in zip(chain, tokens, strict=True):
            expected = TokenStatus.ACTIVE if link in above else offline
            assert verifier.check(token).status is expected
    finally:
        follower.stop()


def test_a_child_is_expired_the_moment_its_parent_lapses_before_the_reaper_records_it(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, reap_interval=3600)  # the test runs the reaper's pass itself
    try:
        chain = start_chain(world, 3, lease=10)
        tokens = [step_token(world, link) for link in chain]
        world.clock.offset += 11  # the root's lease has lapsed; nothing is recorded yet
        assert world.server.broker.store.get_run(chain[2].run.run_id).is_active  # type: ignore[union-attr]
        for link, token in zip(chain, tokens, strict=True):
            assert token_status(world, token) == broker_pb2.TOKEN_STATUS_RUN_EXPIRED
            assert rpc_error(lambda link=link: step_token(world, link)).code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        grandchild = world.get_run(chain[2].run.run_id)
        assert grandchild.state == types_pb2.RUN_STATE_EXPIRED
        assert chain[0].run.run_id in grandchild.end_reason

        expired = world.server.broker.runs.expire_due(CallContext(principal=BROKER))
        assert [run.run_id for run in expired] == [chain[0].run.run_id]  # one commit for all
        recorded = [world.server.broker.store.get_run(link.run.run_id) for link in chain]
        assert all(run is not None and not run.is_active for run in recorded)
    finally:
        world.anonymous.close()
        world.callers.close()
        world.server.stop(grace=0.5)


def test_a_child_started_while_its_parent_is_revoked_ends_with_it_or_is_refused(
    world: World,
) -> None:
    (parent,) = start_chain(world, 1)
    as_parent = world.as_run(parent.credential)
    started: list[str] = []
    refused: list[grpc.StatusCode] = []
    lock = threading.Lock()
    go = threading.Barrier(9)

    def start_child(i: int) -> None:
        go.wait()
        try:
            run_id = execute(as_parent, key=f"race-{i}").run.run_id
        except grpc.RpcError as error:
            with lock:
                refused.append(error.code())
            return
        with lock:
            started.append(run_id)

    def revoke() -> None:
        go.wait()
        world.orchestrator.RevokeRun(
            broker_pb2.RevokeRunRequest(run_id=parent.run.run_id), timeout=5
        )

    threads = [threading.Thread(target=start_child, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=revoke))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(started) + len(refused) == 8
    assert set(refused) <= {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED}
    assert all(world.get_run(r).state == types_pb2.RUN_STATE_ENDED for r in started)
    active = [r for r in world.server.broker.registry.active() if r.parent_run_id]
    assert active == []


# --- IssueToken: inheritance and audience ----------------------------------------------------


@dataclass(frozen=True)
class InheritCase:
    name: str
    caller: str  # "orchestrator" or "run"
    inherit_from: str
    code: grpc.StatusCode | None  # None: issued


INHERIT_CASES = [
    InheritCase("the caller itself", "orchestrator", "ci-orchestrator", None),
    InheritCase(
        "another account", "orchestrator", "deploy-portal", grpc.StatusCode.PERMISSION_DENIED
    ),
    InheritCase("an unknown account", "orchestrator", "nobody", DENIED),
    InheritCase("the run's own starter", "run", "ci-orchestrator", None),
    InheritCase("another account, by run", "run", "builder", DENIED),
]


@pytest.mark.parametrize("case", INHERIT_CASES, ids=lambda c: c.name)
def test_inherit_from_service_account_names_only_the_caller_or_the_runs_starter(
    world: World, case: InheritCase
) -> None:
    started = world.orchestrator.StartRun(
        broker_pb2.StartRunRequest(
            pipeline=pipeline("acme", "web", "build"), permission_ceiling=perms(artifacts="write")
        ),
        timeout=5,
    )
    run_id = started.run.run_id
    stub = world.orchestrator
    if case.caller == "run":
        run = world.server.broker.registry.get(run_id)
        assert run is not None
        stub = world.as_run(world.server.broker.tokens.mint_run_credential(run).token)
    request = broker_pb2.IssueTokenRequest(
        run_id=run_id, audience=API, inherit_from_service_account=case.inherit_from
    )
    if case.code is None:
        issued = stub.IssueToken(request, timeout=5)
        assert [(p.resource, p.level) for p in issued.permissions] == [("artifacts", "read")]
        return
    error = rpc_error(lambda: stub.IssueToken(request, timeout=5))
    assert error.code() is case.code
    assert "only the caller itself" in details(error)


def test_inheriting_from_an_account_without_permissions_is_an_error(world: World) -> None:
    builder = world.callers.stub(world.accounts["builder"])
    run_id = builder.StartRun(
        broker_pb2.StartRunRequest(
            pipeline=pipeline("acme", "web", "build"), permission_ceiling=perms(artifacts="write")
        ),
        timeout=5,
    ).run.run_id
    request = broker_pb2.IssueTokenRequest(
        run_id=run_id, audience=API, inherit_from_service_account="builder"
    )
    error = rpc_error(lambda: builder.IssueToken(request, timeout=5))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "no permissions" in details(error)


@pytest.mark.parametrize("variant", ["exact", "trailing slash", "upper case"])
def test_a_token_for_the_brokers_own_issuer_is_refused(world: World, variant: str) -> None:
    (link,) = start_chain(world, 1)
    issuer = world.server.broker.tokens.issuer
    audience = {"exact": issuer, "trailing slash": issuer + "/", "upper case": issuer.upper()}
    request = broker_pb2.IssueTokenRequest(audience=audience[variant])
    error = rpc_error(lambda: world.as_run(link.credential).IssueToken(request, timeout=5))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "own issuer" in details(error)


@pytest.mark.parametrize("value", ["in_scope", "same_project", "same_pipeline", "anywhere", 3])
def test_child_runs_in_the_policy_takes_one_of_three_rules(tmp_path: Path, value: object) -> None:
    toml = portal_toml().replace('child_runs = "in_scope"', f"child_runs = {json.dumps(value)}")
    portal = new_account("deploy-portal", ["delegator"], ["acme/web/*"], extra_toml=toml)
    path = write_policy(tmp_path / "policy.toml", [portal])
    if value in ("in_scope", "same_project", "same_pipeline"):
        account = load_policy(path).account("deploy-portal")
        assert account is not None and account.delegation.child_runs.value == value
        return
    with pytest.raises(PolicyError) as invalid:
        load_policy(path)
    assert "accounts.deploy-portal.delegation.child_runs: must be one of" in str(invalid.value)
