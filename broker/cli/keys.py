"""`token-broker keys list | rotate`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from broker.cli import common
from broker.cli.output import Output


def add_commands(commands: common.Commands) -> None:
    """Register the `keys` command group."""
    keys = common.add_group(
        commands,
        "keys",
        help="list and rotate the broker's token signing keys",
        examples=["token-broker keys list", "token-broker keys rotate"],
    )
    listing = common.add_command(
        keys,
        "list",
        _list,
        help="show the published verification keys and the issuer (no credential needed)",
        description="Show the public keys that verify broker tokens (GetSigningKeys), the "
        "active one first, and the tokens' issuer. --json includes the JWKS document.",
        examples=[
            "token-broker keys list",
            "token-broker keys list --json | jq .jwks > jwks.json",
        ],
    )
    common.add_json_flag(listing)
    common.add_connection_flags(listing, credentials=False)
    rotate = common.add_command(
        keys,
        "rotate",
        _rotate,
        help="make a new signing key active (role admin)",
        description="Make a new signing key active (RotateSigningKey). Old public keys stay "
        "published until every token they signed has expired. Never retried: each call "
        "rotates again.",
        examples=[
            "token-broker keys rotate",
            "token-broker keys rotate --account ops --key ops.pem --target broker:443",
        ],
    )
    common.add_json_flag(rotate)
    common.add_connection_flags(rotate)


def _list(args: argparse.Namespace) -> int:
    with common.connect(args, anonymous=True) as client:
        published = client.signing_keys()
    out = Output(as_json=args.json)
    keys: list[dict[str, Any]] = [
        {
            "kid": key.kid,
            "alg": key.alg,
            "kty": key.kty,
            "crv": key.crv or None,
            "use": key.use,
            "active": index == 0,
        }
        for index, key in enumerate(published.keys)
    ]
    if out.as_json:
        out.json(
            {"issuer": published.issuer, "keys": keys, "jwks": json.loads(published.jwks_json)}
        )
        return common.EXIT_OK
    if out.terminal:
        out.line(f"issuer: {published.issuer}")
    out.table(
        ("KID", "ALG", "STATUS"),
        [[k["kid"], k["alg"], "active" if k["active"] else "published"] for k in keys],
    )
    return common.EXIT_OK


def _rotate(args: argparse.Namespace) -> int:
    with common.connect(args) as client:
        rotated = client.rotate_signing_key()
    out = Output(as_json=args.json)
    if out.as_json:
        out.json({"key_id": rotated.key_id, "retiring_key_ids": list(rotated.retiring_key_ids)})
    else:
        out.line(f"new signing key {rotated.key_id} is active")
        if rotated.retiring_key_ids:
            still = ", ".join(rotated.retiring_key_ids)
            out.line(f"still published until their tokens expire: {still}")
    return common.EXIT_OK
