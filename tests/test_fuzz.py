"""Fuzz every RPC (issue 13): arbitrary field values, built from the message descriptors, and
raw bytes, against a real server. Never INTERNAL or UNKNOWN; afterwards the server still
serves and the audit chain verifies.

About 20 s in `make test`; FUZZ_EXAMPLES=N runs N examples per RPC and case instead
(the default is 60).
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.api.server import BrokerServer, create_server
from broker.audit import verify as auditverify
from broker.audit.checkpoints import PublishedKeys
from broker.store import all_checkpoints, all_stored_events
from broker.store.factory import OpenOptions, open_store
from tests.accounts import bearer, root_channel
from tests.conftest import make_settings, standard_policy
from tests.support import UNKNOWN_RUN_ID, start_run_request
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
SERVICE = broker_pb2.DESCRIPTOR.services_by_name["TokenBrokerService"]
METHODS = [method.name for method in SERVICE.methods]
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# A long run (FUZZ_EXAMPLES) gets the time it needs; about a tenth of a second per example.
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 5))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)

# Values that get past the first checks, so that the fuzzer reaches the domain too.
PLAUSIBLE = [
    "",
    "acme",
    "web",
    "deploy",
    "*",
    "pipelines",
    "artifacts",
    "read",
    "write",
    "execute",
    "admin",
    "none",
    "alice@example.com",
    "ALICE@EXAMPLE.COM",
    "u-1001",
    "ci-orchestrator",
    "deploy-portal",
    "run.ended",
    "api.example.com",
    UNKNOWN_RUN_ID,
    "mallory@evil.com\nExecuted by: ceo@example.com\n@example.com",
    "mallory@evil.com@example.com",
    "a\x00b",
    "\u202eevil",
    "e30.e30.",
    "eyJhbGciOiJub25lIn0.e30.",
]


class World:
    """Known good values filled in after the server starts (a real run, a real token)."""

    strings: ClassVar[list[str]] = list(PLAUSIBLE)


def text_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(World.strings),
        st.text(max_size=40),
        st.text(alphabet=string.printable, max_size=300),
        # Long values, cheaply: one character repeated, up to past the request size limit.
        st.builds(lambda c, n: c * n, st.sampled_from("xé\n\x00山"), st.integers(100, 300_000)),
    )


INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return text_values()
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        defined = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(defined), st.integers(-(2**31), 2**31 - 1))
    if field.type in INT_RANGES:
        low, high = INT_RANGES[field.type]
        return st.one_of(
            st.integers(-2, 600).filter(lambda v: low <= v <= high), st.integers(low, high)
        )
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    raise AssertionError(f"no strategy for {field.full_name}")


def values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    entry = field.message_type
    if field.is_repeated and entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.dictionaries(scalar(key), values(value, depth), max_size=70)
    if field.is_repeated:
        one = messages(entry, depth + 1) if entry is not None else scalar(field)
        return st.lists(one, max_size=40)
    if entry is not None:
        return messages(entry, depth + 1)
    return scalar(field)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    optional = {field.name: values(field, depth) for field in descriptor.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda parts: build(cls, parts))


def build(cls: Any, parts: dict[str, Any]) -> Message:
    message: Message = cls()
    for name, value in parts.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.is_repeated and isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            target.extend(value)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


@dataclass
class Fuzzed:
    server: BrokerServer
    root: grpc.Channel  # calls as root: every role, every org
    plain: grpc.Channel  # no call credentials: anonymous, or a run credential as metadata
    run_credential: str

    def caller(self, who: str) -> tuple[grpc.Channel, Any]:
        if who == "root":
            return self.root, None
        if who == "run":
            return self.plain, bearer(self.run_credential)
        return self.plain, None


CALLERS = st.sampled_from(["root", "root", "run", "anonymous"])


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    server = create_server(make_settings(tmp / "data", policy=standard_policy(tmp)))
    server.start()
    root = root_channel(server)
    stub = broker_pb2_grpc.TokenBrokerServiceStub(root)
    request = start_run_request()
    request.lease.FromSeconds(600)
    started = stub.StartRun(request, timeout=10)
    token = stub.IssueToken(
        broker_pb2.IssueTokenRequest(run_id=started.run.run_id, audience="api.example.com"),
        timeout=10,
    ).token
    World.strings = [*PLAUSIBLE, started.run.run_id, token, started.run_credential]
    with grpc.insecure_channel(server.target) as plain:
        yield Fuzzed(server, root, plain, started.run_credential)
    root.close()
    server.stop(grace=0.5)
    _assert_chain_verifies(server.broker.settings.data_dir)


def _assert_chain_verifies(data_dir: Path) -> None:
    """As `token-broker audit verify` does: the database opened read-only, every event and
    checkpoint re-walked against the published keys."""
    store = open_store("sqlite:", OpenOptions(data_dir=data_dir, read_only=True))
    try:
        report = auditverify.verify(
            str(data_dir),
            all_stored_events(store),
            all_checkpoints(store),
            PublishedKeys.from_records(store.public_keys()),
            pruned_through=store.pruned_through(),
        )
    finally:
        store.close()
    assert report.ok, report
    assert report.events > 0


def _call(channel: grpc.Channel, method: str, body: bytes, metadata: Any) -> None:
    """Send `body` to `method`; fail on INTERNAL or UNKNOWN, whatever else it answers."""
    path = f"/{SERVICE.full_name}/{method}"
    try:
        if SERVICE.methods_by_name[method].server_streaming:
            # A live stream waits for events: a short deadline ends it (DEADLINE_EXCEEDED).
            streaming: Any = channel.unary_stream(path)
            stream = streaming(body, timeout=0.3, metadata=metadata)
            for _, _ in zip(range(3), stream, strict=False):
                pass
            stream.cancel()
        else:
            unary: Any = channel.unary_unary(path)
            unary(body, timeout=5, metadata=metadata)
    except grpc.RpcError as error:
        assert error.code() not in NEVER, (method, error.code(), error.details())


@pytest.mark.parametrize("method", METHODS)
def test_arbitrary_field_values_never_answer_internal_or_unknown(
    fuzzed: Fuzzed, method: str
) -> None:
    descriptor = SERVICE.methods_by_name[method].input_type

    @FUZZ_SETTINGS
    @given(request=messages(descriptor), who=CALLERS)
    def one(request: Message, who: str) -> None:
        channel, metadata = fuzzed.caller(who)
        _call(channel, method, request.SerializeToString(), metadata)

    one()


@pytest.mark.parametrize("method", METHODS)
def test_random_bytes_never_answer_internal_or_unknown(fuzzed: Fuzzed, method: str) -> None:
    @FUZZ_SETTINGS
    @given(body=st.binary(max_size=512), who=CALLERS)
    def one(body: bytes, who: str) -> None:
        channel, metadata = fuzzed.caller(who)
        _call(channel, method, body, metadata)

    one()


def test_after_the_fuzzing_the_server_still_serves(fuzzed: Fuzzed) -> None:
    server = fuzzed.server
    with grpc.insecure_channel(server.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
