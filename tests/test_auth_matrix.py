"""Who may call what: every RPC x every caller x a target inside or outside its scope.

One table drives two tests: the policy decision itself and real calls over gRPC, for every
cell. The table must list exactly the RPCs of the service descriptor, so a new RPC cannot be
forgotten; "StreamAudit(endings)" is StreamAudit asking for run endings only (what a verifier
may follow, redacted).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pytest

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.auth.authz import Op, decide, roles_granting
from broker.context import CallContext
from broker.identity import ANONYMOUS, RUN_CREDENTIAL_TYP, Principal, PrincipalKind
from broker.policy.file import load_policy
from broker.policy.model import Policy
from broker.runs.lifecycle import RunSpec
from broker.runs.model import PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet
from tests.accounts import Callers, Stub, standard_accounts
from tests.conftest import make_settings, standard_policy
from tests.support import perms, start_run_request
from tokenbroker.v1 import broker_pb2, types_pb2

# A = allowed, - = PERMISSION_DENIED, U = UNAUTHENTICATED; first letter: a target inside
# the caller's scope (for "run": its own run), second: outside it (another org's run).
TABLE = """
rpc                   anonymous  orchestrator  delegator  auditor  verifier  admin  run
StartRun              UU         A-            --         --       --        --     --
ExecuteOnBehalfOf     UU         --            A-         --       --        --     AA
RenewRun              UU         A-            --         --       --        --     A-
IssueToken            UU         A-            --         --       --        --     A-
VerifyToken           UU         AA            AA         AA       AA        AA     AA
RevokeRun             UU         A-            --         --       --        --     A-
GetRun                UU         A-            --         A-       --        --     A-
ListRuns              UU         A-            --         A-       --        --     --
GetSigningKeys        AA         AA            AA         AA       AA        AA     AA
RotateSigningKey      UU         --            --         --       --        AA     --
StreamAudit           UU         --            --         A-       --        --     A-
StreamAudit(endings)  UU         --            --         A-       A-        --     --
GetTreeHead           UU         --            --         AA       --        --     --
ProveInclusion        UU         --            --         A-       --        --     --
ProveConsistency      UU         --            --         AA       --        --     --
"""

RPC_OPS: dict[str, Op | None] = {
    "StartRun": Op.START_RUN,
    "ExecuteOnBehalfOf": Op.EXECUTE_ON_BEHALF,
    "RenewRun": Op.RENEW_RUN,
    "IssueToken": Op.ISSUE_TOKEN,
    "VerifyToken": Op.VERIFY_TOKEN,
    "RevokeRun": Op.REVOKE_RUN,
    "GetRun": Op.READ_RUN,
    "ListRuns": Op.LIST_RUNS,
    "GetSigningKeys": None,  # open: no decision at all
    "RotateSigningKey": Op.ROTATE_KEYS,
    "StreamAudit": Op.READ_AUDIT,
    "StreamAudit(endings)": Op.FOLLOW_RUN_ENDINGS,
    "GetTreeHead": Op.PROVE_AUDIT,
    "ProveInclusion": Op.READ_AUDIT,
    "ProveConsistency": Op.PROVE_AUDIT,
}


def _parse(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    header, *rows = [line.split() for line in table.strip().splitlines()]
    callers = header[1:]
    return callers, {row[0]: dict(zip(callers, row[1:], strict=True)) for row in rows}


CALLERS, EXPECT = _parse(TABLE)
TARGETS = ("in_scope", "out_of_scope")
CELLS = list(itertools.product(EXPECT, CALLERS, TARGETS))
IN_SCOPE = PipelineRef("acme", "payments", "deploy")
OUT_OF_SCOPE = PipelineRef("globex", "web", "deploy")


def rpc_of(row: str) -> str:
    """The RPC a row calls: "StreamAudit(endings)" is a StreamAudit."""
    return row.partition("(")[0]


def expected(rpc: str, caller: str, target: str) -> str:
    return EXPECT[rpc][caller][TARGETS.index(target)]


def service_rpcs() -> list[str]:
    service = broker_pb2.DESCRIPTOR.services_by_name["TokenBrokerService"]
    return [method.name for method in service.methods]


def test_the_table_lists_exactly_the_rpcs_of_the_service() -> None:
    assert list(dict.fromkeys(rpc_of(row) for row in EXPECT)) == service_rpcs()
    assert list(RPC_OPS) == list(EXPECT)


def test_every_operation_the_domain_asks_about_belongs_to_an_rpc() -> None:
    assert {op for op in RPC_OPS.values() if op is not None} == set(Op)


# --- the policy decision, cell by cell ------------------------------------------------


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return load_policy(standard_policy(tmp_path_factory.mktemp("policy")))


def _run(pipeline: PipelineRef, run_id: str, started_by: str = "root") -> Run:
    return Run(
        run_id=run_id,
        pipeline=pipeline,
        state=RunState.ACTIVE,
        create_time=0.0,
        deadline=3600.0,
        triggered_via=started_by,
        permission_ceiling=PermissionSet.of({"artifacts": "read"}),
    )


def _principal(caller: str) -> Principal:
    if caller == "anonymous":
        return ANONYMOUS
    if caller == "run":
        return Principal(PrincipalKind.RUN, "run:r-own", run_id="r-own")
    account = standard_accounts()[caller]
    return Principal(PrincipalKind.SERVICE_ACCOUNT, account.name, frozenset(account.roles))


def _decision_target(rpc: str, caller: str, target: str) -> dict[str, Any]:
    """What the domain passes to the authorizer for this RPC (see lifecycle/auditfeed)."""
    pipeline = IN_SCOPE if target == "in_scope" else OUT_OF_SCOPE
    run_id = "r-own" if target == "in_scope" else "r-other"
    run = _run(pipeline, run_id)
    if rpc in ("StartRun", "ExecuteOnBehalfOf"):
        return {"pipeline": pipeline}
    if rpc == "ListRuns":
        return {"pipeline": PipelineRef(pipeline.org, "*", "*")}
    if rpc == "StreamAudit":
        return {"pipeline": pipeline, "run": run}
    if rpc == "StreamAudit(endings)":
        return {"pipeline": PipelineRef(pipeline.org, "*", "*")}
    if rpc in ("VerifyToken", "RotateSigningKey", "GetTreeHead", "ProveConsistency"):
        return {}
    if rpc == "ProveInclusion":  # the proven event's pipeline
        return {"pipeline": pipeline}
    return {"run": run}


@pytest.mark.parametrize(
    ("rpc", "caller", "target"),
    [c for c in CELLS if RPC_OPS[c[0]] is not None and c[1] != "anonymous"],
)
def test_policy_decision_matches_the_table(
    policy: Policy, rpc: str, caller: str, target: str
) -> None:
    op = RPC_OPS[rpc]
    assert op is not None
    reason = decide(policy, _principal(caller), op, **_decision_target(rpc, caller, target))
    if expected(rpc, caller, target) == "A":
        assert reason is None
    elif caller == "run":
        assert reason is not None and reason.startswith("a run credential")
    elif not {role.value for role in roles_granting(op)} & set(standard_accounts()[caller].roles):
        assert reason is not None and "that needs role" in reason
    elif rpc == "GetRun" and caller == "delegator":  # it may read only the runs it started
        assert reason is not None and "was not started by deploy-portal" in reason
    else:
        assert reason is not None and "outside its scope (acme/*/*)" in reason


# --- real calls over gRPC -------------------------------------------------------------


def fake_run_credential(run_id: str) -> str:
    """Shaped like a run credential (its typ routes it), checked by `fake_run_credentials`."""
    return jwt.encode({"run_id": run_id}, "", algorithm="none", headers={"typ": RUN_CREDENTIAL_TYP})


def fake_run_credentials(token: str) -> Principal:
    run_id = jwt.decode(token, options={"verify_signature": False})["run_id"]
    return Principal(PrincipalKind.RUN, f"run:{run_id}", run_id=run_id, auth_method="test")


@dataclass
class Matrix:
    server: BrokerServer
    callers: Callers
    stubs: dict[str, Stub]

    def new_run(self, pipeline: PipelineRef) -> str:
        """A fresh active run with a lease, started by root, so no cell sees another's."""
        root = standard_accounts()["root"]
        ctx = CallContext(principal=Principal(PrincipalKind.SERVICE_ACCOUNT, root.name))
        spec = RunSpec(pipeline, PermissionSet.of({"artifacts": "write"}), lease_seconds=600)
        return self.server.broker.runs.start(ctx, spec).run.run_id

    def started_event(self, run_id: str) -> int:
        """The sequence of the run's run.started event."""
        store = self.server.broker.store
        events = store.read_events(0, store.head_sequence())
        return next(e.sequence for e in events if e.draft.run_id == run_id)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    tmp = tmp_path_factory.mktemp("matrix")
    settings = make_settings(tmp / "data", store="memory", policy=standard_policy(tmp))
    broker = build_broker(settings, run_credentials=fake_run_credentials)
    server = create_server(settings, broker=broker)
    server.start()
    callers = Callers(server)
    accounts = standard_accounts()
    stubs = {role: callers.stub(accounts[role]) for role in CALLERS if role in accounts}
    anonymous = grpc.insecure_channel(server.target)
    stubs["anonymous"] = Stub(anonymous)
    try:
        yield Matrix(server, callers, stubs)
    finally:
        anonymous.close()
        callers.close()
        server.stop(grace=0.5)


def _pb(ref: PipelineRef) -> types_pb2.PipelineRef:
    return types_pb2.PipelineRef(org=ref.org, project=ref.project, pipeline=ref.pipeline)


REQUESTS: dict[str, Callable[[PipelineRef, str], Any]] = {
    "StartRun": lambda p, r: start_run_request(pipeline=_pb(p)),
    "ExecuteOnBehalfOf": lambda p, r: broker_pb2.ExecuteOnBehalfOfRequest(
        pipeline=_pb(p),
        permission_ceiling=perms(artifacts="read"),
        idempotency_key=f"matrix-{r}",
        asserted=broker_pb2.AssertedPerson(subject="alice", email="alice@example.com"),
    ),
    "RenewRun": lambda p, r: broker_pb2.RenewRunRequest(run_id=r),
    "IssueToken": lambda p, r: broker_pb2.IssueTokenRequest(
        run_id=r, audience="https://api.example.com", permissions=perms(artifacts="read")
    ),
    "VerifyToken": lambda p, r: broker_pb2.VerifyTokenRequest(token="not-a-token"),
    "RevokeRun": lambda p, r: broker_pb2.RevokeRunRequest(run_id=r, reason="matrix"),
    "GetRun": lambda p, r: broker_pb2.GetRunRequest(run_id=r),
    "ListRuns": lambda p, r: broker_pb2.ListRunsRequest(org=p.org),
    "GetSigningKeys": lambda p, r: broker_pb2.GetSigningKeysRequest(),
    "RotateSigningKey": lambda p, r: broker_pb2.RotateSigningKeyRequest(),
    "StreamAudit": lambda p, r: broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(run_id=r), stop_at_head=True
    ),
    "StreamAudit(endings)": lambda p, r: broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(actions=["run.ended", "run.expired"], org=p.org),
        stop_at_head=True,
    ),
    "GetTreeHead": lambda p, r: broker_pb2.GetTreeHeadRequest(),
    # `sequence` is the run's run.started event, filled in by the test (see _request).
    "ProveInclusion": lambda p, r: broker_pb2.ProveInclusionRequest(),
    "ProveConsistency": lambda p, r: broker_pb2.ProveConsistencyRequest(first=1),
}


def _status(stub: Stub, rpc: str, request: Any) -> tuple[grpc.StatusCode, str]:
    method = getattr(stub, rpc_of(rpc))
    try:
        if rpc_of(rpc) == "StreamAudit":
            list(method(request, timeout=5))
        else:
            method(request, timeout=5)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(("rpc", "caller", "target"), CELLS)
def test_grpc_call_answers_as_the_table_says(
    matrix: Matrix, rpc: str, caller: str, target: str
) -> None:
    pipeline = IN_SCOPE if target == "in_scope" else OUT_OF_SCOPE
    run_id = matrix.new_run(pipeline)
    stub = matrix.stubs.get(caller)
    if caller == "run":
        own = run_id if target == "in_scope" else matrix.new_run(IN_SCOPE)
        stub = matrix.callers.bearer_stub(fake_run_credential(own))
    assert stub is not None
    request = REQUESTS[rpc](pipeline, run_id)
    if rpc == "ProveInclusion":
        request.sequence = matrix.started_event(run_id)
    code, message = _status(stub, rpc, request)
    want = expected(rpc, caller, target)
    if want == "U":
        assert code is grpc.StatusCode.UNAUTHENTICATED, message
    elif want == "A":
        # Allowed by policy; the operation itself may still refuse the request (a run
        # without a person cannot start child runs, ...), but never for who is calling.
        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (
            message
        )
        assert code is not grpc.StatusCode.UNIMPLEMENTED, message
    else:
        assert code is grpc.StatusCode.PERMISSION_DENIED, message
        # Unless the caller named the other org itself, it named a run only.
        if rpc not in ("StartRun", "ExecuteOnBehalfOf", "ListRuns", "StreamAudit(endings)"):
            assert "globex" not in message, "a denial never reveals another tenant's run"
