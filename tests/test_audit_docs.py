"""docs/audit.md's auditor snippet is real: extracted from the page, it checks a bundle the
broker produced, and refuses the same bundle with one byte changed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from broker.api.server import BrokerServer
from broker.audit.lognote import LOG_KEY_FILE
from tests.cli_support import run_cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "audit.md"


def _snippet() -> Any:
    text = DOC.read_text()
    block = re.search(r"<!-- auditor-snippet[^>]*-->\n```python\n(.*?)```", text, re.DOTALL)
    assert block is not None, "docs/audit.md lost its auditor snippet"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), str(DOC), "exec"), namespace)
    return namespace["check_inclusion_bundle"]


def test_the_documented_auditor_snippet_checks_a_real_bundle_and_refuses_a_changed_one(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for _ in range(6):
        run_cli(capsys, "runs", "start", "acme/web/deploy", "--ceiling", "artifacts=read")
    out = tmp_path / "b.json"
    assert run_cli(capsys, "audit", "prove", "--sequence", "5", "--out", str(out)).code == 0
    vkey = (broker.broker.settings.data_dir / (LOG_KEY_FILE + ".vkey")).read_text()
    check = _snippet()
    assert check(out.read_text(), vkey).startswith("event 5 is in ")
    bundle = json.loads(out.read_text())
    bundle["record"] = bundle["record"].replace('"sequence":5', '"sequence":6')
    with pytest.raises((AssertionError, ValueError)):
        check(json.dumps(bundle), vkey)
