"""No credential, key or token ever reaches the logs, whatever goes right or wrong."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from broker.api.server import create_server
from broker.policy import dev
from broker.telemetry.logs import JsonFormatter
from tests.accounts import bearer, policy_toml, sign_assertion, standard_accounts
from tests.conftest import make_settings
from tests.support import UNKNOWN_RUN_ID, rpc_error, start_run_request
from tokenbroker.credentials import AssertionSigner, dev_admin_credentials, local_channel
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc


@contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every log record, with its extra fields, as the broker writes them (JSON lines)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def secrets_of(pem: bytes) -> list[str]:
    """The base64 lines of a PEM private key: any one of them in a log is a leak."""
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


def test_no_credential_key_or_token_appears_in_the_logs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    orchestrator = standard_accounts()["orchestrator"]
    used: list[str] = []
    with captured_logs() as logs:
        server = create_server(make_settings(data))  # the development policy and key
        server.start()
        try:
            audience = server.broker.authn.audience
            with local_channel(server.target, dev_admin_credentials(data)) as channel:
                stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
                stub.StartRun(start_run_request(), timeout=5)
                error = rpc_error(
                    lambda: stub.GetRun(broker_pb2.GetRunRequest(run_id=UNKNOWN_RUN_ID))
                )
                assert error.code() is grpc.StatusCode.NOT_FOUND
            with grpc.insecure_channel(server.target) as channel:
                anonymous = broker_pb2_grpc.TokenBrokerServiceStub(channel)
                refused = [
                    sign_assertion(orchestrator, audience),  # account unknown to this policy
                    sign_assertion(orchestrator, audience, now=time.time() - 900),
                    sign_assertion(orchestrator, "https://elsewhere.example"),
                    "Zm9yZ2VkLWFwaS1rZXktdGhhdC1pcy1ub3QtYS1qd3Q",
                ]
                dev_key = (data / dev.KEY_FILE).read_bytes()
                accepted = AssertionSigner(dev.ACCOUNT, dev_key, audience).assertion()
                anonymous.StartRun(start_run_request(), metadata=bearer(accepted), timeout=5)
                used.append(accepted)
                for token in refused:
                    used.append(token)
                    rpc_error(
                        lambda t=token: anonymous.StartRun(
                            start_run_request(), metadata=bearer(t), timeout=5
                        )
                    )
            policy = server.broker.policy
            policy.path.write_text(
                policy_toml([orchestrator]) + f"\n# {orchestrator.private_pem.decode()}\n["
            )
            assert not policy.reload()
        finally:
            server.stop(grace=0.5)
    text = logs.getvalue()
    assert "created a DEVELOPMENT policy" in text and "policy reload failed" in text
    assert "call refused" in text, "refusals were logged, so the scan means something"
    leaks = [*used, *(t.split(".")[-1] for t in used if t.count(".") == 2)]
    leaks += secrets_of((data / dev.KEY_FILE).read_bytes())
    leaks += secrets_of(orchestrator.private_pem)
    for secret in leaks:
        assert secret not in text
