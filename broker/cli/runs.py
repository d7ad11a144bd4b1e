"""`token-broker runs start | show | list | revoke | renew`."""

from __future__ import annotations

import argparse
import itertools
import shlex

from google.protobuf import timestamp_pb2

from broker.cli import common
from broker.cli.output import (
    RUN_HEADERS,
    Output,
    iso_time,
    print_run,
    readable_time,
    run_json,
    run_row,
    state_name,
)
from tokenbroker.client import BrokerClient
from tokenbroker.connect import ENV_RUN_CREDENTIAL, ENV_RUN_ID, ENV_TARGET
from tokenbroker.messages import RUN_STATES
from tokenbroker.v1 import types_pb2


def add_commands(commands: common.Commands) -> None:
    """Register the `runs` command group."""
    runs = common.add_group(
        commands,
        "runs",
        help="start, inspect, list, end and renew pipeline runs",
        examples=[
            "token-broker runs start acme/web/deploy --ceiling artifacts=write --deadline 1h",
            "token-broker runs show r-01J9ZX",
        ],
    )
    _add_start(runs)
    _add_show(runs)
    _add_list(runs)
    _add_revoke(runs)
    _add_renew(runs)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options a new run takes (shared with `execute`)."""
    parser.add_argument(
        "pipeline",
        type=common.pipeline_path,
        metavar="ORG/PROJECT/PIPELINE",
        help="the pipeline the run belongs to",
    )
    parser.add_argument(
        "--ceiling",
        type=common.assignment,
        action="append",
        default=[],
        metavar="RESOURCE=LEVEL",
        help="the widest permission any token of the run may carry (repeat)",
    )
    parser.add_argument(
        "--deadline",
        type=common.positive_seconds,
        metavar="DURATION",
        help="the run expires after this (e.g. 1h; broker default 6h, at most 24h)",
    )
    parser.add_argument(
        "--lease",
        type=common.positive_seconds,
        metavar="DURATION",
        help="the run also expires unless renewed within this (e.g. 5m)",
    )
    parser.add_argument(
        "--input",
        type=common.assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input recorded with the run (repeat)",
    )
    parser.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="the same key again returns the same run instead of starting another",
    )
    for part in ("org", "project", "pipeline"):
        parser.add_argument(
            f"--{part}-id",
            default="",
            metavar="ID",
            help=f"the {part}'s immutable id, put into the run's tokens (docs/federation.md)",
        )
    parser.add_argument(
        "--environment",
        default="",
        metavar="NAME",
        help="the deployment environment, put into the run's tokens (e.g. production)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON (stable keys)")
    output.add_argument(
        "--env",
        action="store_true",
        help=f"print `export {ENV_TARGET}=… {ENV_RUN_CREDENTIAL}=…` lines for a step's environment",
    )
    common.add_connection_flags(parser)


def _add_start(runs: common.Commands) -> None:
    parser = common.add_command(
        runs,
        "start",
        _start,
        help="register a run and get its run credential (role orchestrator)",
        description="Register a pipeline run with a permission ceiling and a deadline "
        "(StartRun). Prints the run and its run credential, which its executor uses to mint "
        "step tokens; --env prints them as environment variables for the step.",
        examples=[
            "token-broker runs start acme/web/deploy --ceiling artifacts=write "
            "--ceiling pipelines=read --deadline 1h --lease 5m",
            'eval "$(token-broker runs start acme/web/deploy --ceiling artifacts=write --env)"',
        ],
    )
    add_run_options(parser)


def _add_show(runs: common.Commands) -> None:
    parser = common.add_command(
        runs,
        "show",
        _show,
        help="show one run: who is behind it, its state, ceiling and deadline",
        description="Show one run (GetRun): the attribution line (who executed it, how that "
        "was verified, which service triggered it), state, pipeline, permission ceiling, "
        "deadline, lease and actor chain.",
        examples=["token-broker runs show r-01J9ZX", "token-broker runs show r-01J9ZX --json"],
    )
    parser.add_argument("run_id", metavar="RUN_ID")
    common.add_json_flag(parser)
    common.add_connection_flags(parser)


def _add_list(runs: common.Commands) -> None:
    parser = common.add_command(
        runs,
        "list",
        _list,
        help="list runs, newest first",
        description="List runs, newest first (ListRuns, every page up to --limit).",
        examples=[
            "token-broker runs list --org acme --state active",
            "token-broker runs list --json | jq -r '.runs[].run_id'",
        ],
    )
    parser.add_argument("--org", default="", help="only runs of this organisation")
    parser.add_argument("--project", default="", help="only runs of this project")
    parser.add_argument("--pipeline", default="", help="only runs of this pipeline")
    parser.add_argument("--state", choices=sorted(RUN_STATES), help="only runs in this state")
    parser.add_argument(
        "--limit", type=_count, default=100, metavar="N", help="at most N runs (default 100)"
    )
    common.add_json_flag(parser)
    common.add_connection_flags(parser)


def _add_revoke(runs: common.Commands) -> None:
    parser = common.add_command(
        runs,
        "revoke",
        _revoke,
        help="end a run: every token of it stops verifying now",
        description="End a run (RevokeRun). Every token of the run fails verification from "
        "the moment this returns. Ending an ended run is not an error: it says so.",
        examples=[
            'token-broker runs revoke r-01J9ZX --reason "pipeline finished"',
            "token-broker runs revoke --from-env   # in a step: end the step's own run",
        ],
    )
    _add_run_reference(parser)
    parser.add_argument("--reason", default="", help="why, for the record")
    common.add_json_flag(parser)
    common.add_connection_flags(parser)


def _add_renew(runs: common.Commands) -> None:
    parser = common.add_command(
        runs,
        "renew",
        _renew,
        help="extend the lease of a run started with --lease",
        description="Extend a run's lease (RenewRun), so that it does not expire while its "
        "executor is alive.",
        examples=[
            "token-broker runs renew r-01J9ZX",
            "token-broker runs renew --from-env   # in a step: renew the step's own run",
        ],
    )
    _add_run_reference(parser)
    common.add_json_flag(parser)
    common.add_connection_flags(parser)


def _add_run_reference(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", nargs="?", default="", metavar="RUN_ID")
    parser.add_argument(
        "--from-env",
        action="store_true",
        help=f"act for the step's own run, with {ENV_TARGET} and {ENV_RUN_CREDENTIAL}",
    )


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


# -- handlers ----------------------------------------------------------------------------------


def _start(args: argparse.Namespace) -> int:
    org, project, pipeline = args.pipeline
    with common.connect(args) as client:
        started = client.start_run(
            org,
            project,
            pipeline,
            ceiling=dict(args.ceiling),
            deadline=args.deadline,
            lease=args.lease,
            inputs=dict(args.input),
            idempotency_key=args.idempotency_key,
            pipeline_ids=pipeline_ids(args),
            environment=args.environment,
        )
    print_started(
        Output(as_json=args.json),
        args,
        started.run,
        started.run_credential,
        started.run_credential_expire_time,
    )
    return common.EXIT_OK


def pipeline_ids(args: argparse.Namespace) -> dict[str, str]:
    """The immutable ids given with --org-id, --project-id and --pipeline-id."""
    given = {"org_id": args.org_id, "project_id": args.project_id, "pipeline_id": args.pipeline_id}
    return {name: value for name, value in given.items() if value}


def print_started(
    out: Output,
    args: argparse.Namespace,
    run: types_pb2.Run,
    credential: str,
    credential_expires: timestamp_pb2.Timestamp,
    **more: bool,
) -> None:
    """A new run with its credential, as JSON, `export` lines or readably."""
    if args.env:
        if not credential:
            raise common.CliError("the run was handed to an executor: no credential to print", 1)
        for name, value in (
            (ENV_TARGET, common.target_of(args)),
            (ENV_RUN_ID, run.run_id),
            (ENV_RUN_CREDENTIAL, credential),
        ):
            out.line(f"export {name}={shlex.quote(value)}")
    elif out.as_json:
        out.json(
            {
                "run": run_json(run),
                "run_credential": credential or None,
                "run_credential_expire_time": iso_time(credential_expires),
                **more,
            }
        )
    else:
        print_run(out, run)
        out.fields([(name.replace("_", " "), "yes") for name, value in more.items() if value])
        if credential:
            out.fields(
                [
                    ("credential expires", readable_time(credential_expires)),
                    ("run credential", credential),
                ]
            )


def _show(args: argparse.Namespace) -> int:
    with common.connect(args) as client:
        run = client.get_run(args.run_id).run
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(run_json(run))
    else:
        print_run(out, run)
    return common.EXIT_OK


def _list(args: argparse.Namespace) -> int:
    with common.connect(args) as client:
        found = client.list_runs(
            org=args.org,
            project=args.project,
            pipeline=args.pipeline,
            state=args.state,
            page_size=min(args.limit, 100),
        )
        runs = list(itertools.islice(found, args.limit))
    out = Output(as_json=args.json)
    if out.as_json:
        out.json({"runs": [run_json(run) for run in runs]})
    elif runs:
        out.table(RUN_HEADERS, [run_row(run) for run in runs])
    elif out.terminal:
        out.line("no runs")
    return common.EXIT_OK


def _client_for_run(args: argparse.Namespace) -> BrokerClient:
    if args.from_env == bool(args.run_id):
        raise common.CliError("give a RUN_ID, or --from-env in a pipeline step (one of them)")
    return common.connect_for_run(args) if args.from_env else common.connect(args)


def _revoke(args: argparse.Namespace) -> int:
    with _client_for_run(args) as client:
        revoked = client.revoke_run(args.run_id, args.reason)
    out = Output(as_json=args.json)
    if out.as_json:
        out.json({"run": run_json(revoked.run), "already_ended": revoked.already_ended})
    elif revoked.already_ended:
        out.line(f"run {revoked.run.run_id} had already ended ({_end_text(revoked.run)})")
    else:
        out.line(f"run {revoked.run.run_id} ended: its tokens no longer verify")
    return common.EXIT_OK


def _end_text(run: types_pb2.Run) -> str:
    state = state_name(run.state)
    return f"{state}: {run.end_reason}" if run.end_reason else state


def _renew(args: argparse.Namespace) -> int:
    with _client_for_run(args) as client:
        run = client.renew_run(args.run_id).run
    out = Output(as_json=args.json)
    if out.as_json:
        out.json({"run": run_json(run)})
    elif run.HasField("lease_expire_time"):
        out.line(f"run {run.run_id} renewed: lease lapses {readable_time(run.lease_expire_time)}")
    else:
        out.line(f"run {run.run_id} has no lease; it runs until its deadline")
    return common.EXIT_OK
