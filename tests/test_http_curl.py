"""The README's `curl` lines work as written: bash runs the marked block with the real `curl`
and `jq` against a real `token-broker serve` process started as `make run` starts it (no
--policy), its addresses put in place of `make run`'s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from tests.support import REPO, BrokerProcess, start_broker_process

MARK = "<!-- curl-exchange:"
README_HTTP = "http://127.0.0.1:50052"  # where `make run` serves HTTP; the test's broker stands in

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("jq") is None,
    reason="needs the curl and jq binaries",
)


def readme_block() -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    mark = next(i for i, line in enumerate(lines) if line.startswith(MARK))
    start = next(i for i in range(mark, len(lines)) if lines[i].startswith("```")) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[start:end]) + "\n"


@pytest.fixture(scope="module")
def process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    running = start_broker_process(tmp_path_factory.mktemp("curl") / "data")
    yield running
    assert running.terminate_and_wait() == 0


def bash(script: str, process: BrokerProcess) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TOKEN_BROKER_TARGET": process.target,
        "TOKEN_BROKER_DATA_DIR": str(process.data_dir),
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )


def test_the_readme_curl_block_exchanges_a_run_credential_and_introspects_the_token(
    process: BrokerProcess,
) -> None:
    block = readme_block()
    assert README_HTTP in block
    script = block.replace(README_HTTP, process.http_url) + 'echo; echo "STEP_TOKEN=$STEP_TOKEN"\n'
    result = bash(script, process)
    assert result.returncode == 0, result.stderr
    introspected, step_line = result.stdout.strip().splitlines()[-2:]
    answer = json.loads(introspected)
    assert answer["active"] is True
    assert answer["aud"] == "api.example.com"
    assert answer["scope"] == "pipelines:read"
    assert answer["pipeline"] == "deploy"
    token = step_line.removeprefix("STEP_TOKEN=")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["jti"] == answer["jti"]
    assert claims["iss"] == process.http_url


def test_curl_sees_an_oauth_error_with_its_status_for_a_refused_exchange(
    process: BrokerProcess,
) -> None:
    script = (
        f"curl -s -w '\\n%{{http_code}}' {process.http_url}/oauth2/token "
        "-d grant_type=client_credentials -d client_id=ci"
    )
    result = bash(script, process)
    assert result.returncode == 0, result.stderr
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "400"
    assert json.loads(body)["error"] == "unsupported_grant_type"
