"""What every broker-calling command shares: flags, connecting, exit codes and the one place
where a failure becomes a message.

Connecting: `--target` (env TOKEN_BROKER_TARGET, default 127.0.0.1:50051), TLS with
`--ca-file` (a private CA) and `--cert`/`--key` (mTLS), and one way to sign in:

- `--account NAME --key FILE`: a service account's signed assertions; their audience is the
  broker's issuer, read from GetSigningKeys (which needs no credential);
- `--cert FILE --key FILE` alone: the client certificate names the account (mTLS);
- otherwise the development admin of a local broker started without --policy, whose key
  that broker wrote into `--data-dir` (env TOKEN_BROKER_DATA_DIR, default ./var).

Failures print one line on stderr, `token-broker <command>: <message>`, and exit with
EXIT_FAILED (refused or failed), EXIT_USAGE (bad arguments or configuration) or
EXIT_UNREACHABLE (no broker answered). Handlers raise; `main` turns what they raise into
that line with `report` (the one mapping, `failure`), and ends quietly on a closed pipe.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeAlias

import grpc
from opentelemetry.trace import TracerProvider

from broker import errors as domain
from broker.policy.file import PolicyError
from tokenbroker.client import DEFAULT_TIMEOUT, BrokerClient, local_credentials
from tokenbroker.connect import ENV_TARGET, RunEnvironment, Tls, TlsOptions
from tokenbroker.credentials import assertion_credentials, bearer_credentials
from tokenbroker.defaults import DEFAULT_TARGET
from tokenbroker.errors import (
    BrokerError,
    ConfigurationError,
    DeadlineExceeded,
    Unavailable,
    broker_answered,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

ENV_DATA_DIR = "TOKEN_BROKER_DATA_DIR"

EXIT_CODES_HELP = """\
exit status:
  0    ok
  1    the operation failed or was refused; for `token verify`: the token is not active
  2    usage or configuration error (bad flags, missing credentials, invalid policy file)
  3    the broker is unreachable or unavailable (nothing was done; try again)
  130  interrupted (Ctrl-C)
  141  the reader of the output went away (`| head -1`); nothing more is printed"""

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

# A string: _SubParsersAction is generic only to type checkers.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler = Callable[[argparse.Namespace], int]


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        # argparse swallows a failed write; a closed pipe must reach main like everywhere else.
        (file or sys.stdout).write(self.format_help())


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps indented ones (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if any(line.startswith(" ") for line in paragraph.splitlines()):
                paragraphs.append(paragraph)
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


class CliError(Exception):
    """A failure the command explains itself, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_command(
    commands: Commands,
    name: str,
    handler: Handler,
    *,
    help: str,
    description: str,
    examples: Sequence[str],
) -> argparse.ArgumentParser:
    """A subcommand with its examples in --help; `main` reports what its handler raises."""
    lines = "\n".join(f"  {example}" for example in examples)
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"examples:\n{lines}",
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def add_group(commands: Commands, name: str, *, help: str, examples: Sequence[str]) -> Commands:
    """A command group (`runs`, `token`, ...) whose own --help shows examples too."""
    lines = "\n".join(f"  {example}" for example in examples)
    group = commands.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=f"examples:\n{lines}",
        formatter_class=HelpFormatter,
    )
    return group.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", required=True)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print machine-readable JSON (stable keys)"
    )


def add_connection_flags(parser: argparse.ArgumentParser, *, credentials: bool = True) -> None:
    """--target, --timeout, TLS flags and (unless the RPC is open to all) credentials."""
    connection = parser.add_argument_group("connection")
    connection.add_argument(
        "--target",
        metavar="HOST:PORT",
        help=f"the broker [env {ENV_TARGET}; default {DEFAULT_TARGET}]",
    )
    connection.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of each call, retries included (default {DEFAULT_TIMEOUT:g})",
    )
    connection.add_argument(
        "--ca-file", type=Path, metavar="PEM", help="CA certificates to verify the broker by"
    )
    connection.add_argument(
        "--cert", type=Path, metavar="PEM", help="client certificate for mTLS (with --key)"
    )
    connection.add_argument(
        "--key",
        type=Path,
        metavar="PEM",
        help="private key: signs --account's assertions, and is --cert's key for mTLS",
    )
    if not credentials:
        return
    signin = parser.add_argument_group(
        "credentials (default: the development admin of a local broker)"
    )
    signin.add_argument(
        "--account", metavar="NAME", help="sign in as this service account (with --key)"
    )
    signin.add_argument("--key-id", default="", metavar="KID", help="--key's kid in the policy")
    signin.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=f"data dir of a local broker run without --policy [env {ENV_DATA_DIR}; default var]",
    )


def target_of(args: argparse.Namespace) -> str:
    target = getattr(args, "target", None)
    return str(target or os.environ.get(ENV_TARGET) or DEFAULT_TARGET)


def connect(args: argparse.Namespace, *, anonymous: bool = False) -> BrokerClient:
    """A client for the broker and credentials the flags name; close it after use."""
    tls = tls_options(args)
    target = target_of(args)
    credentials = None if anonymous else call_credentials(args, target, tls)
    return BrokerClient(
        target,
        credentials=credentials,
        tls=tls,
        timeout=args.timeout,
        tracer_provider=tracer_provider_of(args),
    )


def connect_for_run(args: argparse.Namespace) -> BrokerClient:
    """A client acting for the step's own run, with the run credential in the environment
    (TOKEN_BROKER_RUN_CREDENTIAL); --target and TLS flags override the environment's."""
    env = RunEnvironment.from_environ()
    return BrokerClient(
        args.target or env.target,
        credentials=bearer_credentials(env.run_credential),
        tls=tls_options(args) or env.tls,
        run_id=env.run_id,
        timeout=args.timeout,
        tracer_provider=tracer_provider_of(args),
    )


def tracer_provider_of(args: argparse.Namespace) -> TracerProvider | None:
    """The provider of the command's span (`broker.cli.traced`), when it exports spans."""
    provider = getattr(args, "tracer_provider", None)
    return provider if isinstance(provider, TracerProvider) else None


def tls_options(args: argparse.Namespace) -> Tls:
    """None (TLS unless the target is loopback) without TLS flags; else TLS as they say."""
    if args.cert is None and args.ca_file is None:
        return None
    if args.cert is not None and args.key is None:
        raise CliError("--cert needs --key, the certificate's private key")
    return TlsOptions(
        root_certificates=args.ca_file.read_bytes() if args.ca_file else None,
        private_key=args.key.read_bytes() if args.cert else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None,
    )


def call_credentials(
    args: argparse.Namespace, target: str, tls: Tls
) -> grpc.CallCredentials | None:
    if args.account:
        if args.key is None:
            raise CliError("--account needs --key, the account's private key (PEM)")
        key_pem = args.key.read_bytes()
        audience = broker_issuer(target, tls, args.timeout, tracer_provider_of(args))
        return assertion_credentials(args.account, key_pem, audience, key_id=args.key_id)
    if args.cert is not None:
        return None  # mTLS: the client certificate names the account
    if args.key is not None:
        raise CliError("--key goes with --account (assertions) or --cert (mTLS)")
    return local_credentials(args.data_dir or os.environ.get(ENV_DATA_DIR) or "var")


def broker_issuer(
    target: str, tls: Tls, timeout: float, tracer_provider: TracerProvider | None = None
) -> str:
    """The broker's issuer URL: the audience its callers' assertions must name."""
    with BrokerClient(
        target, tls=tls, timeout=timeout, tracer_provider=tracer_provider
    ) as anonymous:
        return anonymous.signing_keys().issuer


@contextmanager
def reader_watch(cancel: Callable[[], None]) -> Iterator[threading.Event]:
    """While a command waits for something to print (`audit tail --follow`), notice that the
    reader of stdout went away (`| head -1`) and `cancel` the wait, as `tail -f` does,
    instead of finding out only when the next line comes. The event says it happened."""
    gone = threading.Event()
    try:
        poller = select.poll()
        # No events asked for: POLLERR (a pipe without reader) and POLLHUP come regardless.
        poller.register(sys.stdout.fileno(), 0)
    except (AttributeError, OSError, ValueError):  # no poll(), or stdout is not a file
        yield gone
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if poller.poll(200):
                gone.set()
                cancel()
                return

    watcher = threading.Thread(target=watch, name="stdout-reader-watch", daemon=True)
    watcher.start()
    try:
        yield gone
    finally:
        done.set()
        watcher.join()


def report(command: str, exc: Exception, target: str) -> int:
    """Print what went wrong as `COMMAND: MESSAGE` on stderr (one line; an invalid policy
    gets one line per problem) and return the exit code."""
    code, message = failure(exc, target)
    for line in message.split("\n"):
        print(f"{command}: {line}", file=sys.stderr)
    return code


def failure(exc: Exception, target: str) -> tuple[int, str]:
    """The exit code and message for an exception: the one mapping of client errors."""
    if isinstance(exc, PolicyError):
        return EXIT_USAGE, "\n".join(f"{exc.source}: {_one_line(p)}" for p in exc.problems)
    code, message = _classify(exc, target)
    return code, _one_line(message)


def _classify(exc: Exception, target: str) -> tuple[int, str]:
    if isinstance(exc, CliError):
        return exc.exit_code, str(exc)
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE, exc.message
    if isinstance(exc, Unavailable):
        cause = exc.__cause__
        if isinstance(cause, grpc.RpcError) and not broker_answered(cause):
            return EXIT_UNREACHABLE, f"cannot reach the broker at {target}: {exc.message}"
        return EXIT_UNREACHABLE, f"the broker at {target} is unavailable: {exc}"
    if isinstance(exc, DeadlineExceeded):
        return EXIT_UNREACHABLE, f"no answer from the broker at {target} in time ({exc})"
    if isinstance(exc, BrokerError | domain.BrokerError):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return EXIT_USAGE, f"{where}{exc.strerror or exc}"
    if isinstance(exc, ValueError | TypeError):
        return EXIT_USAGE, str(exc)
    return EXIT_FAILED, f"unexpected error ({type(exc).__name__}): {exc}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- argument types ----------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    """A duration: `90` (seconds), `30s`, `10m`, `6h`, `1h30m`."""
    value = text.strip().lower()
    if value.replace(".", "", 1).isdigit():
        return float(value)
    total, number = 0.0, ""
    for char in value:
        if char.isdigit() or char == ".":
            number += char
        elif char in _UNITS and number:
            total += float(number) * _UNITS[char]
            number = ""
        else:
            number = "invalid"
            break
    if number or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90, 30s, 10m, 1h30m")
    return total


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def assignment(text: str) -> tuple[str, str]:
    """`NAME=VALUE` (also `NAME:VALUE`)."""
    for separator in ("=", ":"):
        name, found, value = text.partition(separator)
        if found and name.strip() and value.strip():
            return name.strip(), value.strip()
    raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. artifacts=write)")


def pipeline_path(text: str) -> tuple[str, str, str]:
    """`ORG/PROJECT/PIPELINE`."""
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ORG/PROJECT/PIPELINE (e.g. acme/web/deploy)"
        )
    return parts[0], parts[1], parts[2]


def read_secret(source: str, what: str) -> str:
    """A token or credential from a file, or from stdin for `-` (never from argv, which
    other users can see in the process list)."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    value = text.strip()
    if not value:
        raise CliError(f"{what}: {'stdin' if source == '-' else source} is empty")
    return value
