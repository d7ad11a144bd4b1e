"""`token-broker execute --on-behalf-of`: start a run for a person (ExecuteOnBehalfOf)."""

from __future__ import annotations

import argparse

from broker.cli import common
from broker.cli.output import Output
from broker.cli.runs import add_run_options, pipeline_ids, print_started


def add_command(commands: common.Commands) -> None:
    """Register the `execute` command."""
    parser = common.add_command(
        commands,
        "execute",
        _execute,
        help="start a run on behalf of a person (role delegator)",
        description="Start a run for a person the calling service account has authenticated "
        "(ExecuteOnBehalfOf). The run records both identities: the person (from an ID token "
        "the broker verifies, or asserted by the caller where the policy allows it) and the "
        "service account that triggered it. With an executor configured the broker hands the "
        "run over; otherwise the run credential is printed as by `runs start`.",
        examples=[
            "token-broker execute --on-behalf-of --id-token alice.jwt acme/web/deploy "
            "--ceiling pipelines=read --account deploy-portal --key portal.pem",
            "token-broker execute --on-behalf-of --asserted-email bob@example.com "
            "--asserted-subject u-42 acme/web/deploy --ceiling pipelines=read "
            "--idempotency-key change-1234",
        ],
    )
    parser.add_argument(
        "--on-behalf-of",
        action="store_true",
        help="start the run for the person given by --id-token or --asserted-* (required)",
    )
    person = parser.add_argument_group("the person (one of)")
    person.add_argument(
        "--id-token",
        metavar="FILE",
        help="the person's OIDC ID token, from a file or - for stdin (verified by the broker)",
    )
    person.add_argument("--asserted-email", metavar="EMAIL", help="an identity you vouch for")
    person.add_argument("--asserted-subject", metavar="ID", help="its subject at your side")
    person.add_argument("--asserted-name", default="", metavar="NAME", help="a display name")
    add_run_options(parser)


def _execute(args: argparse.Namespace) -> int:
    if not args.on_behalf_of:
        raise common.CliError(
            "execute needs --on-behalf-of (runs for nobody in particular: `runs start`)"
        )
    asserted = args.asserted_email or args.asserted_subject
    if bool(args.id_token) == bool(asserted):
        raise common.CliError("give --id-token FILE, or --asserted-email and --asserted-subject")
    if asserted and not (args.asserted_email and args.asserted_subject):
        raise common.CliError("give --asserted-email and --asserted-subject together")
    id_token = common.read_secret(args.id_token, "--id-token") if args.id_token else None
    person = None
    if asserted:
        person = {
            "subject": args.asserted_subject,
            "email": args.asserted_email,
            "display_name": args.asserted_name,
        }
    org, project, pipeline = args.pipeline
    with common.connect(args) as client:
        started = client.execute_on_behalf_of(
            org,
            project,
            pipeline,
            ceiling=dict(args.ceiling),
            id_token=id_token,
            asserted=person,
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
        handed_off=started.handed_off,
        replayed=started.replayed,
    )
    return common.EXIT_OK
