"""`token-broker assertion`: print a fresh service-account assertion (valid 5 minutes).

For tools that take raw metadata, such as grpcurl:

    grpcurl -plaintext -H "authorization: Bearer $(token-broker assertion)" ...

Without --account/--key/--audience it signs as the development admin of the broker whose
data dir is --data-dir (TOKEN_BROKER_DATA_DIR, default ./var).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tokenbroker.credentials import DEV_CLIENT_FILE, AssertionSigner

EXIT_USAGE = 2


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "assertion",
        help="print a signed service-account assertion (for grpcurl -H)",
        description=__doc__,
        epilog="examples:\n"
        '  grpcurl -plaintext -H "authorization: Bearer $(token-broker assertion)" ...\n'
        "  token-broker assertion --account ci --key ci.pem --audience https://broker.example",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("TOKEN_BROKER_DATA_DIR", "var"),
        help="data dir of a broker running the development policy",
    )
    parser.add_argument("--account", help="service account name (with --key and --audience)")
    parser.add_argument("--key", type=Path, help="the account's PEM private key")
    parser.add_argument("--key-id", default="", help="the key's kid in the policy, if any")
    parser.add_argument("--audience", help="the broker's issuer URL")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    explicit = (args.account, args.key, args.audience)
    if any(explicit) and not all(explicit):
        print(
            "token-broker assertion: give --account, --key and --audience together", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        if all(explicit):
            account, key_path, audience, key_id = (*explicit, args.key_id)
        else:
            data_dir = Path(args.data_dir)
            hints = json.loads((data_dir / DEV_CLIENT_FILE).read_text())
            account, audience = hints["account"], hints["audience"]
            key_path, key_id = data_dir / hints["key_file"], hints.get("key_id", "")
        signer = AssertionSigner(account, key_path.read_bytes(), audience, key_id=key_id)
    except (OSError, ValueError, KeyError) as exc:
        print(f"token-broker assertion: {exc}", file=sys.stderr)
        return 1
    print(signer.assertion())
    return 0
