"""The contract as other languages see it: `buf breaking` guards it against the released
baseline, and `buf.gen.yaml` gives Go and Java stubs sensible packages (checked offline, with a
stand-in for the remote plugins that reports what buf hands them)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

BUF = Path(sys.executable).parent / "buf"
BASELINE = REPO / "protos" / "baseline.binpb"

# A protoc plugin that generates one JSON file: the options of every file it was asked for.
REPORTING_PLUGIN = """\
import json, sys
from google.protobuf.compiler import plugin_pb2

request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
files = {f.name: f for f in request.proto_file}
report = {
    "parameter": request.parameter,
    "files": {
        name: {
            "go_package": files[name].options.go_package,
            "java_package": files[name].options.java_package,
        }
        for name in request.file_to_generate
    },
}
response = plugin_pb2.CodeGeneratorResponse()
out = response.file.add()
out.name = sys.argv[1].replace("/", "_") + ".json"
out.content = json.dumps(report)
sys.stdout.buffer.write(response.SerializeToString())
"""


def buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def contract_copy(tmp_path: Path) -> Path:
    """This repository's buf workspace (buf.yaml and protos/), to edit freely."""
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "protos" / "tokenbroker", tmp_path / "protos" / "tokenbroker")
    return tmp_path / "protos" / "tokenbroker" / "v1" / "broker.proto"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        (
            "string audience = 2;",
            "string audience = 7;",
            'Previously present field "2" with name "audience" on message "IssueTokenRequest"',
        ),
        (
            "string reason = 2;",
            "string why = 2;",
            'Field "2" on message "RevokeRunRequest" changed name from "reason" to "why"',
        ),
        (
            "uint64 after_sequence = 1;",
            "int64 after_sequence = 1;",
            'Field "1" with name "after_sequence" on message "StreamAuditRequest" changed type',
        ),
    ],
)
def test_buf_breaking_fails_a_change_that_breaks_the_released_contract(
    tmp_path: Path, old: str, new: str, complaint: str
) -> None:
    broker_proto = contract_copy(tmp_path)
    edit(broker_proto, old, new)

    checked = buf("breaking", "--against", str(BASELINE), cwd=tmp_path)

    assert checked.returncode != 0
    assert complaint in checked.stdout + checked.stderr


def test_buf_breaking_passes_the_contract_as_it_is_and_with_a_new_field(tmp_path: Path) -> None:
    broker_proto = contract_copy(tmp_path)
    assert buf("breaking", "--against", str(BASELINE), cwd=tmp_path).returncode == 0
    edit(broker_proto, "string step = 6;", "string step = 6;\n  // A new field.\n  string x = 7;")
    checked = buf("breaking", "--against", str(BASELINE), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_buf_gen_yaml_makes_go_and_java_stubs_in_their_own_packages(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(REPORTING_PLUGIN)
    template = (REPO / "buf.gen.yaml").read_text()
    remote = re.findall(r"remote: (\S+)", template)
    offline = re.sub(
        r"remote: (\S+)",
        lambda m: f"local: {json.dumps([sys.executable, str(plugin), m[1]])}",
        template,
    )
    (tmp_path / "buf.gen.yaml").write_text(offline)

    generated = buf(
        "generate", "--template", str(tmp_path / "buf.gen.yaml"), "-o", str(tmp_path), cwd=REPO
    )

    assert generated.returncode == 0, generated.stderr
    assert remote == [
        "buf.build/protocolbuffers/go",
        "buf.build/grpc/go",
        "buf.build/protocolbuffers/java",
        "buf.build/grpc/java",
    ]
    reports = {
        name: json.loads((tmp_path / out / (name.replace("/", "_") + ".json")).read_text())
        for name, out in zip(remote, ["gen/go", "gen/go", "gen/java", "gen/java"], strict=True)
    }
    go = reports["buf.build/grpc/go"]
    assert go["parameter"] == "paths=source_relative"
    assert set(go["files"]) == {
        "tokenbroker/v1/broker.proto",
        "tokenbroker/v1/executor.proto",
        "tokenbroker/v1/types.proto",
    }
    for options in go["files"].values():
        assert options == {
            "go_package": "example.com/yourteam/tokenbroker/gen/go/tokenbroker/v1;tokenbrokerv1",
            "java_package": "com.example.tokenbroker.v1",
        }
