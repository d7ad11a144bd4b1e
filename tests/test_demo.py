"""`token-broker demo` tells the whole story, says so line by line, and cleans up after itself."""

from __future__ import annotations

import io
import os
import re
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from broker.cli import demo
from broker.cli import main as cli
from tests.otel_support import start_otlp_receiver
from tests.support import REPO

STORY = [
    r" 1 ✓ broker started on 127\.0\.0\.1:\d+ \(demo policy, ",
    r" 2 ✓ test IdP https://idp\.example\.com signed an ID token for alice@example\.com",
    r" 3 ✓ deploy-portal called ExecuteOnBehalfOf with it: run (r-\w+) handed to the executor, "
    r"its run credential bound to the executor's key",
    r" 4 ✓ executor minted a step token with the run credential: aud sample-api, pipelines: read",
    r" 5 ✓ sample API verified it offline → 200: run r-\w+ for alice@example\.com \(idp_verified\)"
    r" via deploy-portal",
    r" 6 ✓ a leaked copy of the step token, without the step's key, is refused → 401 "
    r"PROOF_MISSING",
    r' 7 ✓ executor ended the run with RevokeRun \("pipeline finished"\)',
    r" 8 ✓ the same step token is now rejected by the API → 401 run ended",
    r" 9 ✓ audit trail of run r-\w+: Executed by: alice@example\.com \(verified by "
    r"https://idp\.example\.com\) · Triggered via: deploy-portal",
    r"10 ✓ audit verify: \d+ events, chain intact, 1 of 1 signed checkpoints verified",
]


def assert_the_whole_story(output: str) -> None:
    steps = [line for line in output.splitlines() if re.match(r"^ ?\d+ [✓✗] ", line)]
    assert len(steps) == len(STORY), output
    for line, pattern in zip(steps, STORY, strict=True):
        assert re.match(pattern, line), f"{line!r} does not match {pattern!r}"
    run_id = re.search(STORY[2], output)
    assert run_id is not None
    trail = [line.split() for line in output.splitlines() if line.startswith("      seq ")]
    assert [(t[2], t[4], t[6]) for t in trail] == [
        ("run.executed_on_behalf", "deploy-portal", "alice@example.com"),
        ("token.issued", f"run:{run_id[1]}", "alice@example.com"),
        ("run.ended", f"run:{run_id[1]}", "alice@example.com"),
    ]


def test_the_demo_tells_every_step_of_the_story_and_exits_zero(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    out = io.StringIO()

    code = demo.run(out)

    assert code == 0, out.getvalue()
    assert_the_whole_story(out.getvalue())
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
    assert left == [], "the demo leaves nothing running"


def test_the_demo_runs_as_a_command_with_quiet_logs_and_leaves_nothing_behind() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "broker", "demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert_the_whole_story(finished.stdout)
    assert finished.stderr == ""
    temporary = re.search(r"tb-demo-\w+", finished.stdout)
    assert temporary is None, "the temporary data dir is not worth printing: it is gone"


def test_a_step_that_goes_wrong_is_marked_and_the_demo_exits_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The executor asks for a token the story does not expect: the demo must notice.
    monkeypatch.setattr("tokenbroker.samples.executor.STEP_PERMISSIONS", {"pipelines": "execute"})
    out = io.StringIO()

    code = demo.run(out)

    lines = out.getvalue().splitlines()
    assert code == 1
    assert lines[-1].startswith(" 4 ✗ the step token carries {'pipelines': 'execute'}")
    assert not any(" 5 " in line for line in lines)


def test_the_demo_keeps_its_data_where_asked_so_that_audit_verify_can_check_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "demo-data"

    assert cli.main(["demo", "--data-dir", str(data)]) == 0
    assert f"data in {data}" in capsys.readouterr().out
    assert cli.main(["audit", "verify", "--data-dir", str(data)]) == 0
    assert "chain intact" in capsys.readouterr().out
    assert cli.main(["demo", "--data-dir", str(data)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_the_readme_shows_what_the_demo_prints() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## See it work") :]
    start = section.index("```text\n") + len("```text\n")
    shown = section[start : section.index("\n```", start)]
    assert_the_whole_story(shown)


@pytest.mark.slow
def test_with_otel_set_the_demo_exports_its_story_as_one_trace_and_prints_its_id() -> None:
    receiver = start_otlp_receiver()
    step_trace, step_span = secrets.token_hex(16), secrets.token_hex(8)
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "broker", "demo"],
            cwd=REPO,
            env={
                **os.environ,
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "TRACEPARENT": f"00-{step_trace}-{step_span}-01",  # `make demo` in a CI job
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        spans = receiver.spans()
    finally:
        receiver.stop()
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert_the_whole_story(finished.stdout)
    assert finished.stderr == ""
    printed = re.search(r"trace ([0-9a-f]{32}) exported to (\S+)", finished.stdout)
    assert printed is not None, finished.stdout
    assert printed[1] == step_trace
    assert printed[2] == receiver.endpoint

    in_trace = [(r["service.name"], s) for r, s in spans if s.trace_id.hex() == step_trace]
    by_id = {s.span_id: s for _, s in in_trace}
    (root,) = [s for _, s in in_trace if s.parent_span_id not in by_id]
    assert (root.name, root.parent_span_id.hex()) == (demo.ROOT_SPAN, step_span)
    # Every part of the story, each as its own service, hangs together under the root.
    assert {service for service, _ in in_trace} == {
        "token-broker-demo",
        "token-broker",
        "sample-executor",
        "sample-api",
    }
    names = {(service, s.name) for service, s in in_trace}
    broker = "tokenbroker.v1.TokenBrokerService/"
    assert {
        ("token-broker-demo", broker + "ExecuteOnBehalfOf"),
        ("token-broker", broker + "ExecuteOnBehalfOf"),
        ("token-broker", "tokenbroker.v1.PipelineExecutorService/Execute"),
        ("sample-executor", "tokenbroker.v1.PipelineExecutorService/Execute"),
        ("token-broker", broker + "IssueToken"),
        ("sample-api", "GET /whoami"),
        ("token-broker", broker + "RevokeRun"),
        ("token-broker", broker + "StreamAudit"),  # the auditor reads the run's trail
    } <= names
    # Outside it only the sample API's own background calls: its keys and revocation feed.
    outside = {(r["service.name"], s.name) for r, s in spans if s.trace_id.hex() != step_trace}
    assert outside <= {
        ("token-broker", broker + "GetSigningKeys"),
        ("token-broker", broker + "StreamAudit"),
    }
