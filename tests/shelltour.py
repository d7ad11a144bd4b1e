"""Just enough of a shell to run the README's grpcurl tour as written.

The tour is a fenced ```sh block after a `<!-- grpcurl-tour: ... -->` comment. It is split
into commands as bash would (quotes, `$(...)`, `\\` continuations, `# comments`); each command
is expanded as bash would (`$VAR` and `$(...)` outside single quotes, nothing inside them) and
run stage by stage through `|`, with the programs the caller supplies (a grpcurl stand-in,
`token-broker`, a small `jq -r .PATH`). A comment line of the form `#   "key": value` right
under a command promises that line in its output.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

MARK = "<!-- grpcurl-tour:"
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")

Program = Callable[[list[str], str], str]  # argv (without the program name), stdin -> stdout


@dataclass
class Command:
    line: int  # where it starts in the README
    text: str  # continuations joined, comments removed
    expected: list[str] = field(default_factory=list)


def tour_commands(readme: str) -> list[Command]:
    """The commands of the marked block, each with the answer lines promised under it."""
    lines = readme.splitlines()
    mark = next(i for i, line in enumerate(lines) if line.startswith(MARK))
    start = next(i for i in range(mark, len(lines)) if lines[i].startswith("```")) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    commands: list[Command] = []
    pending: list[str] = []
    for number in range(start, end):
        line = lines[number]
        promise = line.lstrip("#").strip()
        if not pending and line.startswith("#") and promise.startswith('"') and commands:
            commands[-1].expected.append(promise.rstrip(","))
            continue
        if not pending and (not line.strip() or line.startswith("#")):
            continue
        pending.append(line)
        text, complete = _logical("\n".join(pending))
        if complete:
            commands.append(Command(number - len(pending) + 2, text.strip()))
            pending = []
    assert not pending, f"unterminated command in the tour: {pending}"
    return commands


def _logical(text: str) -> tuple[str, bool]:
    """`text` without comments and `\\`-newlines; whether it is a whole command yet."""
    out: list[str] = []
    stack: list[str] = []  # open quotes and $( ... )
    i = 0
    while i < len(text):
        char, rest = text[i], text[i:]
        top = stack[-1] if stack else ""
        if top == "'":
            if char == "'":
                stack.pop()
        elif rest.startswith("\\\n"):
            i += 2
            continue
        elif char == "\\":
            out.append(text[i : i + 2])
            i += 2
            continue
        elif rest.startswith("$("):
            stack.append("$(")
            out.append("$(")
            i += 2
            continue
        elif char == ")" and top == "$(":
            stack.pop()
        elif char == '"':
            if top == '"':
                stack.pop()
            else:
                stack.append('"')
        elif char == "'" and top != '"':
            stack.append("'")
        elif char == "#" and top != '"' and (not out or out[-1][-1:].isspace()):
            i = text.find("\n", i) if "\n" in rest else len(text)
            continue
        out.append(char)
        i += 1
    joined = "".join(out)
    return joined, not stack and not joined.endswith("\\")


class Shell:
    """Runs commands with `programs` (by name: the last part of argv[0])."""

    def __init__(self, programs: Mapping[str, Program]) -> None:
        self.programs = dict(programs)
        self.variables: dict[str, str] = {}

    def run(self, text: str) -> str:
        """Run one command (an assignment or a pipeline); its output."""
        assignment = ASSIGNMENT.fullmatch(text)
        if assignment:
            words = shlex.split(self.expand(assignment[2]))
            assert len(words) == 1, f"{assignment[1]}= expands to {words}"
            self.variables[assignment[1]] = words[0]
            return ""
        output = ""
        for stage in _split(text, "|"):
            argv = shlex.split(self.expand(stage))
            program = self.programs[PurePosixPath(argv[0]).name]
            output = program(argv[1:], output)
        return output

    def expand(self, text: str) -> str:
        """`$VAR`, `${VAR}` and `$(command)` outside single quotes, as bash expands them.
        The quotes stay, for shlex to remove."""
        out: list[str] = []
        quote = ""  # the open quote, if any
        i = 0
        while i < len(text):
            char = text[i]
            if quote == "'":
                quote = "" if char == "'" else quote
            elif char == "'" and not quote:
                quote = "'"
            elif char == '"':
                quote = "" if quote else '"'
            elif text.startswith("$(", i):
                inner, i = _substitution(text, i)
                out.append(self.run(inner).rstrip("\n"))
                continue
            elif variable := VARIABLE.match(text, i):
                name = variable[1] or variable[2]
                if name not in self.variables:
                    raise KeyError(f"${name} is used before it is set")
                out.append(self.variables[name])
                i = variable.end()
                continue
            out.append(char)
            i += 1
        return "".join(out)


def _substitution(text: str, start: int) -> tuple[str, int]:
    """The command inside the `$(` at `start`, and where it ends."""
    depth, quote = 0, ""
    for i in range(start + 2, len(text)):
        char = text[i]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif text.startswith("$(", i):
            depth += 1
        elif char == ")":
            if depth == 0:
                return text[start + 2 : i], i + 1
            depth -= 1
    raise ValueError(f"unterminated $( in {text!r}")


def _split(text: str, separator: str) -> Iterator[str]:
    """Split at `separator` outside quotes and `$(...)`."""
    start, depth, quote = 0, 0, ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif text.startswith("$(", i):
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == separator and not depth:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def jq(argv: list[str], stdin: str) -> str:
    """`jq -r .a.b` on one JSON document, as jq prints it (a missing field is `null`)."""
    assert len(argv) == 2 and argv[0] == "-r" and argv[1].startswith("."), argv
    value: Any = json.loads(stdin)
    for key in argv[1].strip(".").split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return "null\n"
    return (value if isinstance(value, str) else json.dumps(value)) + "\n"
