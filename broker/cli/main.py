"""The `token-broker` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from broker import __version__, settings
from broker.bench import add_command as add_bench_command
from broker.cli import assertion as assertioncmd
from broker.cli import audit as cli_audit
from broker.cli import common as cli_common
from broker.cli import demo
from broker.cli import execute as cli_execute
from broker.cli import keys as cli_keys
from broker.cli import policy as cli_policy
from broker.cli import runs as cli_runs
from broker.cli import token as cli_token
from broker.telemetry import logs

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STORE_REFUSED = 1

EPILOG = f"""\
examples:
  token-broker serve --data-dir ./var
  token-broker runs start acme/web/deploy --ceiling artifacts=write --deadline 1h
  token-broker token issue --from-env --aud api.example.com --perm pipelines=read
  token-broker runs show r-01J9ZX
  token-broker audit verify --data-dir ./var

Commands that call a broker take --target (env TOKEN_BROKER_TARGET, default
127.0.0.1:50051) and sign in as the development admin of a local broker (--data-dir)
unless given --account NAME --key FILE or --cert/--key. Each has --json and --help.

{cli_common.EXIT_CODES_HELP}"""


def _serve(args: argparse.Namespace) -> int:
    from broker.api.server import serve
    from broker.policy.file import PolicyError
    from broker.store import StoreRefused

    try:
        config = settings.from_sources(args, os.environ)
    except settings.SettingsError as exc:
        print(f"token-broker serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(config.log_level, config.log_format)
    try:
        return serve(config)
    except PolicyError as exc:
        print(f"token-broker serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreRefused as exc:  # the store is left as it was; the message says why
        print(f"token-broker serve: {exc}", file=sys.stderr)
        return EXIT_STORE_REFUSED
    except OSError as exc:
        print(f"token-broker serve: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = cli_common.CliParser(
        prog="token-broker",
        description="Short-lived, run-scoped tokens for CI/CD pipelines.",
        epilog=EPILOG,
        formatter_class=cli_common.HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"token-broker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker. Every flag also reads TOKEN_BROKER_<NAME>.",
        epilog="example:\n  token-broker serve --data-dir ./var --listen 127.0.0.1:50051",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    settings.add_arguments(serve, os.environ)
    serve.set_defaults(handler=_serve)
    assertioncmd.add_command(commands)
    cli_audit.add_commands(commands)
    cli_runs.add_commands(commands)
    cli_token.add_commands(commands)
    cli_execute.add_command(commands)
    cli_keys.add_commands(commands)
    cli_policy.add_commands(commands)
    demo.add_command(commands)
    add_bench_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
