"""`token-broker bench`: the broker's hot path measured against a no-op RPC on the same server.

Nothing in the server imports this package; `add_command` only declares the sub-command,
and the harness (gRPC clients, worker processes) is imported when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_command(commands: Any) -> None:
    """Register `bench` on the CLI's sub-parsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "bench",
        help="measure the hot path against a no-op RPC (a benchmark, not a test)",
        description="Start a real broker on the SQLite default and measure IssueToken, "
        "VerifyToken, ExecuteOnBehalfOf, RevokeRun, offline verification, revocation latency, "
        "audit streaming and growth, each beside a no-op RPC served by the same server.",
        epilog="examples:\n  token-broker bench --quick\n  token-broker bench --out bench.json\n"
        "  token-broker bench --only workers --baseline 4f2572c",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="short rounds and 10^5 instead of 10^6 stored events"
    )
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per figure")
    parser.add_argument("--seconds", type=float, default=None, help="length of one round")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="calls in flight per load process"
    )
    parser.add_argument("--clients", type=int, default=1, help="load-generating processes")
    parser.add_argument(
        "--large", type=int, default=None, help="stored events for the growth figure"
    )
    parser.add_argument("--out", default="bench-results", help="directory for the JSON result")
    parser.add_argument("--work-dir", default=None, help="keep data dirs and logs here")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated sections: unary,offline,revocation,audit,replicas,workers,merkle",
    )
    parser.add_argument(
        "--fanout-seconds",
        type=float,
        default=None,
        help="how long the live fan-out figure writes (default 60 s; 10 s with --quick)",
    )
    parser.add_argument(
        "--fanout-subscribers",
        type=int,
        default=64,
        help="live subscribers of the fan-out figure (default 64, the target's; fewer shows "
        "what the subscribers cost)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="the N of `serve --workers N` in the workers section (default: the CPUs, at least 2)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="REF",
        help="also run the broker of commit REF (git archive of this repository) beside this "
        "one in the workers section, and judge CPU per call against it (e.g. 4f2572c)",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="FLAGS",
        help="also run a single-process broker with these serve flags in the workers section "
        "(an A/B of a setting in one run, e.g. --compare='--max-workers 8')",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from broker.bench.runner import run_from_args

    return run_from_args(args)
