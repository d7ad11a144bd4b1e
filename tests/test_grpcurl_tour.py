"""The README's grpcurl tour works as written: every command of it runs, in order, against a
broker started without --policy (as `make run` starts it), with a reflection-only client in
grpcurl's place — no generated stubs, only what the server's reflection tells."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from broker.cli import main as cli
from tests.conftest import make_settings
from tests.grpcurl_like import ReflectionClient
from tests.shelltour import Shell, jq, tour_commands
from tests.support import REPO

README_TARGET = "127.0.0.1:50051"  # where `make run` listens; the test's broker stands in
SERVICE = "tokenbroker.v1.TokenBrokerService"


class Grpcurl:
    """`grpcurl -plaintext [-H HEADER]... [-d JSON] ADDRESS (list [SVC] | describe SYM | METHOD)`,
    printing answers as grpcurl does: indented JSON with the .proto's field names."""

    def __init__(self, client: ReflectionClient) -> None:
        self.client = client
        self.called: list[str] = []

    def __call__(self, argv: list[str], stdin: str) -> str:
        headers: list[tuple[str, str]] = []
        data, plaintext, words = "{}", False, []
        arguments = iter(argv)
        for argument in arguments:
            if argument == "-plaintext":
                plaintext = True
            elif argument == "-H":
                name, _, value = next(arguments).partition(":")
                headers.append((name.strip().lower(), value.strip()))
            elif argument == "-d":
                data = next(arguments)
            else:
                assert not argument.startswith("-"), f"grpcurl {argument} is not emulated"
                words.append(argument)
        address, verb, *symbols = words
        assert plaintext and address == README_TARGET, argv
        if verb == "list":
            names = self.client.methods(symbols[0]) if symbols else self.client.list_services()
            return "\n".join(names) + "\n"
        if verb == "describe":
            (symbol,) = symbols
            return f"{symbol} is a {type(self.client.describe(symbol)).__name__}\n"
        service, _, method = verb.replace("/", ".").rpartition(".")
        self.called.append(f"{service}/{method}")
        answer = self.client.call(verb, data, tuple(headers), proto_field_names=True)
        answers = answer if isinstance(answer, list) else [answer]
        return "".join(json.dumps(one, indent=2) + "\n" for one in answers)


def token_broker(argv: list[str], stdin: str) -> str:
    """`token-broker ...`, run in this process: its standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


@pytest.fixture
def make_run_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerServer]:
    """A broker without --policy, its data in ./var of the current directory, as `make run`."""
    monkeypatch.chdir(tmp_path)
    settings = make_settings(tmp_path / "var", http_listen="127.0.0.1:0")
    running = create_server(settings)
    running.start()
    yield running
    running.stop(grace=0.5)


def test_every_command_of_the_readme_grpcurl_tour_does_what_it_says(
    make_run_broker: BrokerServer,
) -> None:
    commands = tour_commands((REPO / "README.md").read_text())
    with grpc.insecure_channel(make_run_broker.target) as channel:
        client = ReflectionClient(channel)
        grpcurl = Grpcurl(client)
        shell = Shell({"grpcurl": grpcurl, "token-broker": token_broker, "jq": jq})
        for command in commands:
            try:
                output = shell.run(command.text)
            except Exception as exc:  # any failure: say which README line
                pytest.fail(f"README line {command.line}: {command.text}\nfailed: {exc!r}")
            for promised in command.expected:
                assert promised in output, f"README line {command.line}: no {promised} in\n{output}"
        every_rpc = {m.replace(f"{SERVICE}.", f"{SERVICE}/") for m in client.methods(SERVICE)}
    assert every_rpc <= set(grpcurl.called), f"not in the tour: {every_rpc - set(grpcurl.called)}"
    assert "grpc.health.v1.Health/Check" in grpcurl.called
    assert any(c.expected for c in commands), "the tour promises answers"


def test_the_tour_shell_expands_variables_and_commands_like_bash() -> None:
    shell = Shell({"echo": lambda argv, stdin: " ".join(argv) + "\n", "jq": jq})
    shell.run('A="x $(echo y)"')
    assert shell.variables["A"] == "x y"
    assert shell.expand("'$A' \"$A\" ${A}") == "'$A' \"x y\" x y"
    assert shell.run("echo '{\"k\": \"'$A'\"}' | jq -r .k") == "x y\n"
    assert shell.run('echo \'{"k": {"v": 1}}\'') == '{"k": {"v": 1}}\n'
    with pytest.raises(KeyError, match=r"\$B is used before it is set"):
        shell.expand("$B")


def test_the_tour_is_split_into_commands_as_bash_would() -> None:
    readme = (
        "<!-- grpcurl-tour: -->\n```sh\n"
        "A=1   # a comment\n"
        "# prose\n"
        'echo \'{"a": 1,\n'
        '  "b": "#not a comment"}\' \\\n'
        "  | jq -r .b\n"
        '#   "b": 2,\n'
        "```\n"
    )
    first, second = tour_commands(readme)
    assert (first.line, first.text, first.expected) == (3, "A=1", [])
    assert second.line == 5
    assert second.text == 'echo \'{"a": 1,\n  "b": "#not a comment"}\'   | jq -r .b'
    assert second.expected == ['"b": 2']
