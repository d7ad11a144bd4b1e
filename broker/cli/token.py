"""`token-broker token issue | verify`."""

from __future__ import annotations

import argparse

from broker.cli import common
from broker.cli.output import Output, iso_time, permissions_json, permissions_text, readable_time
from broker.cli.output import struct_json as claims_json
from tokenbroker.connect import ENV_RUN_CREDENTIAL, ENV_TARGET
from tokenbroker.v1 import broker_pb2


def add_commands(commands: common.Commands) -> None:
    """Register the `token` command group."""
    token = common.add_group(
        commands,
        "token",
        help="issue step tokens and check tokens",
        examples=[
            'curl -H "Authorization: Bearer $(token-broker token issue --from-env --aud api)" …',
            'token-broker token verify "$TOKEN" --aud api',
        ],
    )
    _add_issue(token)
    _add_verify(token)


def _add_issue(token: common.Commands) -> None:
    parser = common.add_command(
        token,
        "issue",
        _issue,
        help="mint a step token of a run (prints only the token)",
        description="Mint a signed, short-lived step token of a run for one audience "
        "(IssueToken), with permissions no wider than the run's ceiling. Prints only the "
        "token, so `$(…)` captures it; --json prints it with its id, expiry and permissions.\n\n"
        f"In a pipeline step, --from-env uses the broker address and run credential its "
        f"executor put in the environment ({ENV_TARGET}, {ENV_RUN_CREDENTIAL}), like "
        "GITHUB_TOKEN. Otherwise an orchestrator names the run with --run.",
        examples=[
            'TOKEN="$(token-broker token issue --from-env --aud api.example.com '
            '--perm pipelines=read)"',
            "token-broker token issue --run r-01J9ZX --aud artifacts.example.com "
            "--perm artifacts=write --ttl 5m --step build --json",
        ],
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", default="", metavar="RUN_ID", help="the run (orchestrator)")
    source.add_argument(
        "--from-env",
        action="store_true",
        help=f"the step's own run, from {ENV_TARGET} and {ENV_RUN_CREDENTIAL}",
    )
    parser.add_argument(
        "--aud", required=True, metavar="AUDIENCE", help="the API the token is for (its `aud`)"
    )
    parser.add_argument(
        "--perm",
        type=common.assignment,
        action="append",
        default=[],
        metavar="RESOURCE=LEVEL",
        help="a permission the token carries, within the run's ceiling (repeat)",
    )
    parser.add_argument(
        "--ttl",
        type=common.positive_seconds,
        metavar="DURATION",
        help="lifetime, 30s to 1h (broker default 10m; never past the run's deadline)",
    )
    parser.add_argument("--step", default="", help="the pipeline step (its `step` claim)")
    parser.add_argument(
        "--inherit-from",
        default="",
        metavar="ACCOUNT",
        help="grant this service account's policy permissions, intersected with the ceiling",
    )
    common.add_json_flag(parser)
    common.add_connection_flags(parser)


def _add_verify(token: common.Commands) -> None:
    parser = common.add_command(
        token,
        "verify",
        _verify,
        help="check a token online: exit 0 active, 1 inactive",
        description="Check a token with the broker (VerifyToken): signature, time, issuer, "
        "audience and whether its run is still active. Exit status 0 when the token is "
        "active, 1 when it is not (the reason is printed).",
        examples=[
            'token-broker token verify "$TOKEN" --aud api.example.com',
            "token-broker token verify - --json < token.txt",
        ],
    )
    parser.add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin")
    parser.add_argument("--aud", default="", metavar="AUDIENCE", help="the expected audience")
    common.add_json_flag(parser)
    common.add_connection_flags(parser)


def _issue(args: argparse.Namespace) -> int:
    if not args.from_env and not args.run:
        raise common.CliError("give --run RUN_ID (orchestrator) or --from-env (in a pipeline step)")
    client = common.connect_for_run(args) if args.from_env else common.connect(args)
    with client:
        issued = client.issue_token(
            args.aud,
            dict(args.perm),
            run_id=args.run,
            ttl=args.ttl,
            step=args.step,
            inherit_from=args.inherit_from,
        )
        run_id = args.run or client.run_id
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(
            {
                "token": issued.token,
                "token_id": issued.token_id,
                "run_id": run_id,
                "audience": args.aud,
                "expire_time": iso_time(issued.expire_time),
                "permissions": permissions_json(issued.permissions),
                "key_id": issued.key_id,
            }
        )
    else:
        out.line(issued.token)
    return common.EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    token = common.read_secret("-", "TOKEN") if args.token == "-" else args.token
    with common.connect(args) as client:
        verdict = client.verify_token(token, args.aud)
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(
            {
                "active": verdict.active,
                "status": broker_pb2.TokenStatus.Name(verdict.status)
                .removeprefix("TOKEN_STATUS_")
                .lower(),
                "reason": verdict.reason or None,
                "run_id": verdict.run_id or None,
                "expire_time": iso_time(verdict.expire_time),
                "claims": claims_json(verdict.claims),
            }
        )
    else:
        _print_verdict(out, verdict)
    return common.EXIT_OK if verdict.active else common.EXIT_FAILED


def _print_verdict(out: Output, verdict: broker_pb2.VerifyTokenResponse) -> None:
    claims = claims_json(verdict.claims)
    person = claims.get("on_behalf_of") or {}
    out.fields(
        [
            ("active", out.paint("yes", "green") if verdict.active else out.paint("no", "red")),
            ("reason", "" if verdict.active else verdict.reason),
            ("run", verdict.run_id),
            ("subject", str(claims.get("sub", ""))),
            ("audience", str(claims.get("aud", ""))),
            ("step", str(claims.get("step", ""))),
            (
                "permissions",
                permissions_text(claims["permissions"]) if "permissions" in claims else "",
            ),
            ("on behalf of", str(person.get("email") or person.get("sub") or "")),
            ("triggered via", str(claims.get("triggered_via", ""))),
            ("expires", readable_time(verdict.expire_time)),
        ]
    )
