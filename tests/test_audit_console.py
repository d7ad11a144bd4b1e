"""`token-broker audit console`: its API answers with the reviewer's own credentials, and in a
real headless Chromium the page verifies every proof itself (WebCrypto) before it shows the
mark — and shows that it failed when the console hands it a proof that does not hold."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.api.server import BrokerServer
from broker.cli import console
from tokenbroker.client import BrokerClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def reviewed(broker: BrokerServer) -> Iterator[tuple[BrokerClient, str]]:
    """A delegated run with a token, ended; and a client of the dev admin (every role)."""
    data_dir = broker.broker.settings.data_dir
    with BrokerClient.local(broker.target, data_dir) as client:
        started = client.execute_on_behalf_of(
            "acme",
            "web",
            "deploy",
            ceiling={"artifacts": "read"},
            asserted={"subject": "u-1001", "email": "alice@example.com"},
        )
        run_id = started.run.run_id
        client.issue_token("api.example.com", {"artifacts": "read"}, run_id=run_id, step="build")
        client.revoke_run(run_id, "pipeline finished")
        yield client, run_id


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_the_console_finds_a_persons_runs_and_shows_who_tokens_and_proofs(
    reviewed: tuple[BrokerClient, str],
) -> None:
    client, run_id = reviewed
    with console.serving(client, None) as url:
        runs = _get(url + "api/runs?person=alice@example.com")["runs"]
        assert [r["run_id"] for r in runs] == [run_id]
        assert runs[0]["summary"].startswith("Executed by: alice@example.com")
        assert "Triggered via: dev-admin" in runs[0]["summary"]
        assert [r["run_id"] for r in _get(url + "api/runs?org=acme&pipeline=deploy")["runs"]]
        run = _get(url + "api/run?id=" + run_id)
    assert [e["action"] for e in run["events"]] == [
        "run.executed_on_behalf",
        "token.issued",
        "run.ended",
    ]
    token = run["tokens"][0]
    assert (token["audience"], token["step"]) == ("api.example.com", "build")
    assert token["died_because"] == "run ended: pipeline finished"
    assert run["checkpoint"].split("\n")[0] == run["log_key"].split("+")[0]


def _dom(url: str, tmp_path: Path) -> str:
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_the_page_verifies_the_proofs_in_the_browser_and_refuses_a_forged_one(
    reviewed: tuple[BrokerClient, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, run_id = reviewed
    with console.serving(client, None) as url:
        page = _dom(f"{url}#run={run_id}", tmp_path)
    assert 'data-verified="yes"' in page, page[-2000:]
    assert "✓ Verified in your browser: 3 events are in the log" in page
    assert "Executed by: alice@example.com (asserted by dev-admin, not verified)" in page

    real = client.prove_inclusion

    def forged(sequence: int, tree_size: int = 0, **kwargs: Any) -> Any:
        answer = real(sequence, tree_size, **kwargs)
        answer.record = answer.record.replace("pipeline finished", "nothing happened")
        return answer

    monkeypatch.setattr(client, "prove_inclusion", forged)
    with console.serving(client, None) as url:
        page = _dom(f"{url}#run={run_id}", tmp_path)
    assert 'data-verified="no"' in page, page[-2000:]
    assert "✗ NOT verified: an event's inclusion proof does not verify" in page
