"""`token-broker --help` everywhere: examples, exit codes, one-line usage errors."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from collections.abc import Iterator

import pytest

from broker.cli import main as cli
from broker.cli.common import assignment, pipeline_path, seconds
from broker.settings import Settings, shown_default
from tests.cli_support import run_cli
from tests.support import REPO


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


ALL_COMMANDS = list(_commands(cli.build_parser()))


def test_the_command_tree_has_every_documented_command() -> None:
    names = {" ".join(path) for path in ALL_COMMANDS}
    assert {
        "runs start",
        "runs show",
        "runs list",
        "runs revoke",
        "runs renew",
        "token issue",
        "token verify",
        "keys list",
        "keys rotate",
        "execute",
        "policy check",
        "audit tail",
        "serve",
    } <= names


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "token-broker")
def test_every_command_help_shows_at_least_one_example(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, *path, "--help")
    assert result.code == 0
    assert re.search(r"^examples?:", result.out, re.MULTILINE), result.out
    assert re.search(r"^  token-broker \S+", result.out, re.MULTILINE), result.out


def test_the_top_level_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_cli(capsys, "--help").out
    for code, meaning in (
        (0, "ok"),
        (1, "the operation failed"),
        (2, "usage or configuration"),
        (3, "the broker is"),
        (130, "interrupted"),
        (141, "the reader of the output went away"),
    ):
        assert re.search(rf"^  {code} +{meaning}", out, re.MULTILINE), (code, out)


def test_a_usage_error_is_one_line_naming_the_command_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = run_cli(capsys, "runs", "start", "acme/web", "--ceiling", "artifacts=write")
    assert result.code == 2
    assert result.err.startswith("token-broker runs start: argument ORG/PROJECT/PIPELINE: ")
    assert "see 'token-broker runs start --help'" in result.err
    assert run_cli(capsys, "token", "issue", "--from-env").code == 2  # --aud is required
    assert run_cli(capsys, "runs", "list", "--state", "paused").code == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90", 90), ("30s", 30), ("10m", 600), ("6h", 21600), ("1h30m", 5400), ("1.5m", 90)],
)
def test_durations_read_like_people_write_them(text: str, expected: float) -> None:
    assert seconds(text) == expected


@pytest.mark.parametrize("text", ["", "m", "10x", "1h-5m", "ten"])
def test_a_duration_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration"):
        seconds(text)


def test_permissions_and_pipelines_are_parsed_from_their_short_forms() -> None:
    assert assignment("artifacts=write") == ("artifacts", "write")
    assert assignment("pipelines:execute") == ("pipelines", "execute")
    assert pipeline_path("acme/web/deploy") == ("acme", "web", "deploy")
    for bad in ("artifacts", "=write", "artifacts="):
        with pytest.raises(argparse.ArgumentTypeError):
            assignment(bad)
    for bad in ("acme/web", "acme//deploy", "a/b/c/d"):
        with pytest.raises(argparse.ArgumentTypeError):
            pipeline_path(bad)


def _readme_commands() -> list[list[str]]:
    section = (REPO / "README.md").read_text().split("## Command line", 1)[1].split("\n## ")[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.splitlines():
            found = re.findall(r"\$\((token-broker [^)]*)\)", line)
            found += [line] if line.startswith("token-broker ") else []
            for command in found:
                words = shlex.split(command, comments=True)
                cut = next((i for i, w in enumerate(words) if w in ("|", "<", ">")), len(words))
                commands.append(words[1:cut])
    return commands


def test_every_command_in_the_readme_parses_with_the_real_parser() -> None:
    commands = _readme_commands()
    assert len(commands) >= 15
    parser = cli.build_parser()
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit:  # pragma: no cover - the message is on stderr
            pytest.fail(f"README command does not parse: token-broker {' '.join(words)}")


# -- serve --help and the README's configuration table ------------------------------------------


def test_serve_help_shows_defaults_only_where_there_is_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = " ".join(run_cli(capsys, "serve", "--help").out.split())
    assert "default None" not in out
    assert "default ]" not in out
    assert "[env TOKEN_BROKER_POLICY]" in out
    assert "[env TOKEN_BROKER_LISTEN; default 127.0.0.1:50051]" in out
    assert "[env TOKEN_BROKER_AUDIT_CHECKPOINT_INTERVAL; default 60]" in out


def test_serve_help_names_every_otel_variable_the_broker_reads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run_cli(capsys, "serve", "--help").out
    source = (REPO / "broker" / "telemetry" / "setup.py").read_text()
    read = set(re.findall(r"\bOTEL_[A-Z_]*[A-Z]\b", source))
    read |= {f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT" for signal in ("TRACES", "METRICS")}
    assert len(read) >= 12
    assert sorted(name for name in read if name not in out) == []
    assert "TOKEN_BROKER_<FLAG>" in out


def _configuration_table() -> dict[str, str]:
    """The README's configuration table: each flag with the text of its default column."""
    section = (REPO / "README.md").read_text().split("\n## Configuration\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) != 3 or not cells[0].startswith("`--"):
            continue
        for flag in re.findall(r"`(--[a-z-]+)`", cells[0]):
            rows[flag] = cells[1]
    return rows


def test_the_readme_configuration_table_has_every_setting_with_its_default() -> None:
    table = _configuration_table()
    fields = {"--" + f.name.replace("_", "-"): f for f in dataclasses.fields(Settings)}
    assert sorted(table) == sorted(fields)
    for flag, f in fields.items():
        shown = shown_default(f.default)
        if shown:
            assert table[flag] == f"`{shown}`", flag
        elif f.type == "bool":
            assert table[flag] == "off", flag
        else:  # no value: a dash, or prose saying what is used instead
            assert not table[flag].startswith("`"), flag


def test_nothing_in_the_readme_looks_like_a_configuration_row_outside_the_table() -> None:
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `--[a-z-]+`.*\|$", readme, re.MULTILINE)
    table = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    assert all(row in table for row in rows), [row for row in rows if row not in table]
