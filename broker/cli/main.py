"""The `token-broker` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from broker import __version__, bench, settings
from broker.cli import (
    assertion,
    audit,
    common,
    demo,
    execute,
    keys,
    policy,
    runs,
    store,
    token,
    traced,
    witness,
)
from broker.telemetry import logs
from tokenbroker.defaults import DEFAULT_TARGET, SERVICE_NAME

EPILOG = f"""\
examples:
  token-broker serve --data-dir ./var
  token-broker runs start acme/web/deploy --ceiling artifacts=write --deadline 1h
  token-broker token issue --from-env --aud api.example.com --perm pipelines=read
  token-broker runs show r-01J9ZX
  token-broker audit verify --data-dir ./var

Commands that call a broker take --target (env TOKEN_BROKER_TARGET, default
{DEFAULT_TARGET}) and sign in as the development admin of a local broker (--data-dir)
unless given --account NAME --key FILE or --cert/--key. Each has --json and --help.

{common.EXIT_CODES_HELP}"""


SERVE_EPILOG = f"""\
environment:
  Every flag also reads TOKEN_BROKER_<FLAG>, its name in capitals with _ for -:
  --data-dir is TOKEN_BROKER_DATA_DIR, --insecure is TOKEN_BROKER_INSECURE=true.
  A flag wins over its variable; both win over the default.

telemetry (OpenTelemetry's standard variables; without them nothing is exported):
  OTEL_EXPORTER_OTLP_ENDPOINT           export spans and metrics over OTLP, e.g.
                                        http://127.0.0.1:4317 (https:// for TLS)
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT    ...spans only, or to another collector
  OTEL_EXPORTER_OTLP_METRICS_ENDPOINT   ...metrics only, or to another collector
  OTEL_EXPORTER_OTLP_PROTOCOL           grpc (default) or http/protobuf (then the
                                        endpoint is the base URL: .../v1/traces, ...);
                                        OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL per signal
  OTEL_LOGS_EXPORTER=otlp               export the log lines too (..._LOGS_ENDPOINT)
  OTEL_EXPORTER_OTLP_HEADERS            headers for the collector (key=value,...)
  OTEL_EXPORTER_OTLP_INSECURE           true: plaintext to an endpoint without a scheme
  OTEL_SERVICE_NAME                     service.name (default {SERVICE_NAME})
  OTEL_RESOURCE_ATTRIBUTES              more resource attributes (key=value,...)
  OTEL_TRACES_EXPORTER=none             no spans
  OTEL_METRICS_EXPORTER=none            no metrics
  OTEL_SDK_DISABLED=true                no telemetry at all
  OTEL_METRIC_EXPORT_INTERVAL           milliseconds between metric exports (60000)
  OTEL_BSP_*, OTEL_TRACES_SAMPLER       batching and sampling, read by the SDK

examples:
  token-broker serve --data-dir ./var --listen {DEFAULT_TARGET}
  TOKEN_BROKER_LISTEN=127.0.0.1:7000 token-broker serve
  token-broker serve --check --policy policy.toml --store postgresql://broker@db/tokenbroker
  make run ARGS="--listen 127.0.0.1:7000 --http-listen 127.0.0.1:7001"

exit status:
  0  stopped on SIGTERM or SIGINT, cleanly (--check: the configuration is valid)
  1  could not start: an address is taken, the store refuses to open, ...
  2  usage or configuration error: a bad flag or setting, an invalid policy file,
     a missing TLS file"""


def _serve(args: argparse.Namespace) -> int:
    from broker.api.server import ListenError, serve
    from broker.store import StoreRefused

    config = settings.from_sources(args, os.environ)
    if args.check:
        from broker.cli import servecheck

        print(servecheck.check(config).text())
        print("token-broker serve --check: the configuration is valid; serve would start")
        return common.EXIT_OK
    logs.configure(config.log_level, config.log_format)
    try:
        return serve(config)
    except ListenError as exc:  # not a usage error: the same flags work once it is free
        raise common.CliError(str(exc), common.EXIT_FAILED) from None
    except StoreRefused as exc:  # the store is left as it was; the message says why
        raise common.CliError(str(exc), common.EXIT_FAILED) from None


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = common.CliParser(
        prog="token-broker",
        description="Short-lived, run-scoped tokens for CI/CD pipelines.",
        epilog=EPILOG,
        formatter_class=common.HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"token-broker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker until SIGTERM or SIGINT (SIGHUP reloads --policy). Every "
        "flag also reads TOKEN_BROKER_<FLAG>. Before it writes anything into the data dir, it "
        "checks the settings, the policy file and the TLS files and binds both addresses.",
        epilog=SERVE_EPILOG,
        formatter_class=common.HelpFormatter,
    )
    settings.add_arguments(serve, os.environ)
    serve.add_argument(
        "--check",
        action="store_true",
        help="validate the settings, policy, TLS files, signing keys and the store (opened "
        "read-only), print what would be served, and exit: 0 valid, 2 a configuration "
        "problem, 1 the store cannot be reached or opened (like nginx -t)",
    )
    serve.set_defaults(handler=_serve)
    assertion.add_command(commands)
    audit.add_commands(commands)
    runs.add_commands(commands)
    token.add_commands(commands)
    execute.add_command(commands)
    keys.add_commands(commands)
    policy.add_commands(commands)
    store.add_commands(commands)
    witness.add_command(commands)
    demo.add_command(commands)
    bench.add_command(commands)
    _name_commands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Whatever it raises is reported as one line and an exit code, here and
    only here; a closed stdout (`token-broker ... | head -1`) ends it quietly."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:  # --help or a usage error: what argparse wrote must get out too
            sys.stdout.flush()
            raise
        code = _run(args)
        sys.stdout.flush()  # a reader that went away shows here at the latest
        return code
    except BrokenPipeError:
        _discard_stdout()
        return common.EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return common.EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    with traced.command_span(args, os.environ) as span:
        code = _handle(args)
        if span is not None:
            span.set_attribute(traced.EXIT_CODE, code)
        return code


def _handle(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args))
    except BrokenPipeError:
        raise
    except Exception as exc:
        return common.report(args.command, exc, common.target_of(args))


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that Python's own flush at exit finds no closed pipe to
    complain about, as a process killed by SIGPIPE would say nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (captured by a test)
        pass


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Each command's parser records its own name (`token-broker runs show`) for reports."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(command=sub.prog)
                _name_commands(sub)


if __name__ == "__main__":
    sys.exit(main())
