"""The sync client against a live broker: the README's script, every RPC, errors as types."""

from __future__ import annotations

import ast
import re
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.api.server import BrokerServer
from tests.clientsupport import client_credentials
from tests.support import REPO, UNKNOWN_RUN_ID
from tokenbroker import (
    BrokerClient,
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RunEnvironment,
    RunNotActive,
    StepToken,
    TlsOptions,
    step_token,
)
from tokenbroker.credentials import local_channel
from tokenbroker.v1 import broker_pb2, types_pb2


@pytest.fixture
def client(server: BrokerServer) -> Iterator[BrokerClient]:
    with BrokerClient(server.target, credentials=client_credentials(server)) as broker:
        yield broker


def _start(client: BrokerClient, **options: Any) -> broker_pb2.StartRunResponse:
    ceiling = {"pipelines": "read", "artifacts": "write"}
    return client.start_run("acme", "payments", "deploy", ceiling=ceiling, **options)


def _readme_python_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python client", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the Python client section has no example"
    return match.group(1)


def test_the_readme_python_example_runs_against_a_live_broker_using_only_tokenbroker(
    server: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _readme_python_example()
    imported = {
        (node.module or "" if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported - sys.stdlib_module_names == {"tokenbroker"}
    assert code.count("BrokerClient.local()") == 1
    # The README's broker is `make run`'s; this one listens elsewhere, with test credentials.
    code = code.replace("BrokerClient.local()", "connect()")

    def connect() -> BrokerClient:
        return BrokerClient(server.target, credentials=client_credentials(server))

    exec(compile(code, "README.md", "exec"), {"connect": connect})

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("started r-")
    assert re.fullmatch(r"token \S+ active: True", lines[1])
    assert lines[2] == "after revoke: run ended"
    actions = [line.split()[1] for line in lines[3:]]
    assert actions == ["run.started", "token.issued", "run.ended"]


def test_a_client_on_a_local_channel_reads_what_another_client_wrote(
    server: BrokerServer, client: BrokerClient
) -> None:
    run_id = _start(client, inputs={"commit": "abc123"}).run.run_id
    with local_channel(server.target, client_credentials(server)) as channel:
        reader = BrokerClient(channel=channel)
        run = reader.get_run(run_id).run
        reader.close()  # leaves the channel it was given open
        assert reader.signing_keys().keys
    assert run.state == types_pb2.RUN_STATE_ACTIVE
    assert dict(run.inputs) == {"commit": "abc123"}
    assert {(p.resource, p.level) for p in run.permission_ceiling} == {
        ("pipelines", "read"),
        ("artifacts", "write"),
    }


def test_list_runs_walks_every_page_newest_first(client: BrokerClient) -> None:
    started = [_start(client).run.run_id for _ in range(5)]
    listed = [run.run_id for run in client.list_runs(org="acme", page_size=2)]
    assert listed == started[::-1]
    client.revoke_run(started[0])
    assert [r.run_id for r in client.list_runs(state="ended")] == [started[0]]


def test_deadline_and_lease_are_sent_as_durations(client: BrokerClient) -> None:
    run = _start(client, deadline=timedelta(minutes=30), lease=60).run
    assert run.deadline.ToSeconds() - run.create_time.ToSeconds() == pytest.approx(1800, abs=1)
    assert run.lease.ToSeconds() == 60
    renewed = client.renew_run(run.run_id).run
    assert renewed.lease_expire_time.ToNanoseconds() >= run.lease_expire_time.ToNanoseconds()


def test_invalid_arguments_become_invalid_request_naming_each_field(
    client: BrokerClient,
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        client.start_run("acme", "payments", "deploy", ceiling={}, deadline=timedelta(days=2))
    error = raised.value
    assert set(error.fields) == {"permission_ceiling", "deadline"}
    assert all(v.description for v in error.violations)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(error.__cause__, grpc.RpcError)


def test_an_unknown_run_is_not_found_with_the_request_id_and_the_grpc_error_chained(
    client: BrokerClient,
) -> None:
    with pytest.raises(NotFound) as raised:
        client.get_run(UNKNOWN_RUN_ID)
    assert UNKNOWN_RUN_ID in raised.value.message
    assert raised.value.request_id
    assert raised.value.request_id in str(raised.value)
    assert isinstance(raised.value.__cause__, grpc.RpcError)


def test_an_idempotency_key_returns_the_same_run_and_conflicts_when_reused_differently(
    client: BrokerClient,
) -> None:
    first = _start(client, idempotency_key="deploy-42").run.run_id
    assert _start(client, idempotency_key="deploy-42").run.run_id == first
    with pytest.raises(Conflict):
        _start(client, idempotency_key="deploy-42", inputs={"other": "parameters"})


def test_an_ended_run_mints_nothing_and_its_tokens_verify_as_run_ended(
    client: BrokerClient,
) -> None:
    run_id = _start(client).run.run_id
    token = client.issue_token("api", {"pipelines": "read"}, run_id=run_id, ttl=60).token
    assert client.revoke_run(run_id, "done").run.state == types_pb2.RUN_STATE_ENDED
    assert client.revoke_run(run_id, "again").already_ended
    with pytest.raises(RunNotActive):
        client.issue_token("api", run_id=run_id)
    verdict = client.verify_token(token, "api")
    assert (verdict.active, verdict.reason) == (False, "run ended")


def test_execute_on_behalf_of_is_refused_for_a_person_nobody_may_act_for(
    client: BrokerClient,
) -> None:
    with pytest.raises(PermissionDenied):
        client.execute_on_behalf_of(
            "acme",
            "payments",
            "deploy",
            ceiling={"pipelines": "read"},
            asserted={"subject": "u-1", "email": "mallory@untrusted.invalid"},
        )


def test_arguments_that_cannot_be_translated_fail_before_any_call(client: BrokerClient) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        client.execute_on_behalf_of("acme", "payments", "deploy", ceiling={"pipelines": "read"})
    with pytest.raises(ValueError, match="state"):
        next(client.list_runs(state="paused"))
    with pytest.raises(TypeError):
        client.issue_token("api", ttl="10m")  # type: ignore[arg-type]


def test_rotating_the_signing_key_publishes_the_new_key_before_it_signs(
    client: BrokerClient,
) -> None:
    before = client.signing_keys()
    rotated = client.rotate_signing_key()
    after = client.signing_keys()
    assert [k.kid for k in after.keys] == [before.keys[0].kid, rotated.key_id]
    assert [s.state for s in after.schedule] == [
        broker_pb2.SIGNING_KEY_STATE_SIGNING,
        broker_pb2.SIGNING_KEY_STATE_PREPUBLISHED,
    ]
    assert after.schedule[1].signs_from == rotated.signs_from == after.schedule[0].stops_signing
    assert before.keys[0].kid in rotated.retiring_key_ids
    assert after.issuer == before.issuer


def test_an_emergency_rotation_signs_with_the_new_key_at_once(client: BrokerClient) -> None:
    before = client.signing_keys()
    rotated = client.rotate_signing_key(emergency=True)
    after = client.signing_keys()
    assert rotated.emergency
    assert after.keys[0].kid == rotated.key_id != before.keys[0].kid
    assert after.schedule[0].state == broker_pb2.SIGNING_KEY_STATE_SIGNING


def test_a_following_audit_stream_sees_new_events_and_stops_when_cancelled(
    client: BrokerClient,
) -> None:
    stream = client.stream_audit(actions=["run.started"])
    seen: list[str] = []

    def read() -> None:
        for event in stream:
            seen.append(event.run_id)

    reader = threading.Thread(target=read)
    reader.start()
    run_id = _start(client).run.run_id
    for _ in range(200):
        if seen:
            break
        reader.join(0.01)
    stream.cancel()
    reader.join(5)
    assert not reader.is_alive()
    assert seen == [run_id]
    assert stream.cursor >= 1


def test_a_step_token_comes_from_the_run_credential_in_the_environment(
    server: BrokerServer, client: BrokerClient
) -> None:
    started = _start(client)
    environ = {
        "TOKEN_BROKER_TARGET": server.target,
        "TOKEN_BROKER_RUN_CREDENTIAL": started.run_credential,
    }
    token = step_token("sample-api", {"pipelines": "read"}, step="build", environ=environ)
    # Bound by default: useless alone, valid with a proof by the key made for it.
    assert isinstance(token, StepToken)
    assert client.verify_token(token, "sample-api").reason.startswith("token is bound")
    url = "https://sample-api.example/whoami"
    proof = token.proof("GET", url)
    verdict = client.verify_token(token, "sample-api", proof=proof, method="GET", url=url)
    assert verdict.active
    assert verdict.run_id == started.run.run_id
    assert verdict.claims["step"] == "build"
    with BrokerClient.for_run(environ) as run_client:
        assert run_client.run_id == started.run.run_id
        assert run_client.revoke_run(reason="step done").run.end_reason == "step done"


def test_a_step_token_outside_a_pipeline_step_says_what_is_missing() -> None:
    with pytest.raises(ConfigurationError, match="TOKEN_BROKER_RUN_CREDENTIAL"):
        step_token("api", environ={"TOKEN_BROKER_TARGET": "127.0.0.1:1"})
    with pytest.raises(ConfigurationError, match="not a run credential"):
        environ = {"TOKEN_BROKER_TARGET": "127.0.0.1:1", "TOKEN_BROKER_RUN_CREDENTIAL": "?"}
        step_token("api", environ=environ)


def test_the_local_client_without_a_development_key_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="--policy"):
        BrokerClient.local("127.0.0.1:1", data_dir=tmp_path / "nothing-here")


def test_the_run_environment_may_name_the_run_and_a_private_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n...")
    env = RunEnvironment.from_environ(
        {
            "TOKEN_BROKER_TARGET": "broker.example.com:443",
            "TOKEN_BROKER_RUN_CREDENTIAL": "opaque-to-the-client",
            "TOKEN_BROKER_RUN_ID": "r-42",
            "TOKEN_BROKER_CA_FILE": str(ca),
        }
    )
    assert (env.target, env.run_id) == ("broker.example.com:443", "r-42")
    assert env.tls == TlsOptions(root_certificates=ca.read_bytes())
    assert "opaque-to-the-client" not in repr(env)
