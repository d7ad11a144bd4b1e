"""`token-broker assertion`: print a fresh service-account assertion (valid 5 minutes).

For tools that take raw metadata, such as grpcurl:

    grpcurl -plaintext -H "authorization: Bearer $(token-broker assertion)" ...

Without --account it signs as the development admin of the broker whose data dir is
--data-dir (TOKEN_BROKER_DATA_DIR, default ./var). With --account NAME --key FILE it signs as
that service account, for the audience --audience names or, without it, the issuer the broker
at --target (TOKEN_BROKER_TARGET) publishes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from broker.cli import common
from tokenbroker.credentials import AssertionSigner
from tokenbroker.defaults import DEV_CLIENT_FILE


def add_command(commands: common.Commands) -> None:
    parser = common.add_command(
        commands,
        "assertion",
        run,
        help="print a signed service-account assertion (for grpcurl -H)",
        description="Print a fresh signed assertion (valid 5 minutes) to send as "
        "`authorization: Bearer <assertion>`. Without --account it signs as the development "
        "admin of the local broker (--data-dir); with --account NAME --key FILE as that "
        "service account, for the broker's issuer (read from --target unless --audience "
        "names it).",
        examples=[
            'grpcurl -plaintext -H "authorization: Bearer $(token-broker assertion)" ...',
            "token-broker assertion --account ci --key ci.pem --audience https://broker.example",
            "token-broker assertion --account ci --key ci.pem --target broker.example:443",
        ],
    )
    parser.add_argument(
        "--audience",
        metavar="ISSUER",
        help="the broker's issuer URL (default: asked from the broker at --target)",
    )
    common.add_connection_flags(parser)


def run(args: argparse.Namespace) -> int:
    if args.cert is not None:
        raise common.CliError("an assertion is signed with --account and --key; --cert is mTLS")
    if args.account:
        if args.key is None:
            raise common.CliError("--account needs --key, the account's private key (PEM)")
        audience = args.audience or common.broker_issuer(
            common.target_of(args), common.tls_options(args), args.timeout
        )
        signer = AssertionSigner(args.account, args.key.read_bytes(), audience, key_id=args.key_id)
    elif args.key is not None or args.audience:
        raise common.CliError("--key and --audience go with --account")
    else:
        signer = _dev_admin_signer(
            args.data_dir or Path(os.environ.get(common.ENV_DATA_DIR) or "var")
        )
    print(signer.assertion())
    return common.EXIT_OK


def _dev_admin_signer(data_dir: Path) -> AssertionSigner:
    """The development admin of a broker started without --policy, from its data dir."""
    try:
        hints = json.loads((data_dir / DEV_CLIENT_FILE).read_text())
        key_pem = (data_dir / hints["key_file"]).read_bytes()
        return AssertionSigner(
            hints["account"], key_pem, hints["audience"], key_id=hints.get("key_id", "")
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise common.CliError(
            f"no development admin key in {data_dir}/ ({type(exc).__name__}): is a broker "
            "serving from that data dir without --policy? Otherwise pass --account and --key."
        ) from None
