"""`token-broker keys list | rotate | export-jwks`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from broker.cli import audit, common
from broker.cli.output import Output, iso_time, readable_time
from broker.runs.keys import export_jwks
from broker.store import StoreRefused, StoreUnavailable
from tokenbroker.v1 import broker_pb2


def add_commands(commands: common.Commands) -> None:
    """Register the `keys` command group."""
    keys = common.add_group(
        commands,
        "keys",
        help="list, rotate and export the broker's token signing keys",
        examples=[
            "token-broker keys list",
            "token-broker keys rotate",
            "token-broker keys export-jwks --out jwks.json",
        ],
    )
    listing = common.add_command(
        keys,
        "list",
        _list,
        help="show the published verification keys and the issuer (no credential needed)",
        description="Show the public keys that verify broker tokens (GetSigningKeys) and "
        "the tokens' issuer: each key's state (signing, prepublished: published but signing "
        "only from SIGNS FROM, retiring: published for the tokens it signed) and times, the "
        "keys that sign first. --json includes the JWKS document.",
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
        help="publish new signing keys, which sign after the pre-publication window (role admin)",
        description="Publish a new signing key per algorithm (RotateSigningKey). It signs once "
        "the broker's --key-prepublish window has passed (default 1 h), so that relying "
        "parties' cached JWKS hold it first; the old keys sign until then and stay published "
        "until every token they signed has expired. --emergency skips the window: the new "
        "keys sign now and the old ones stop now (audited as key.rotated_emergency); "
        "verifiers must refetch the JWKS. Never retried: each call rotates again.",
        examples=[
            "token-broker keys rotate",
            "token-broker keys rotate --emergency",
            "token-broker keys rotate --account ops --key ops.pem --target broker:443",
        ],
    )
    rotate.add_argument(
        "--emergency",
        action="store_true",
        help="sign with the new keys now and stop the old ones now (a compromised key)",
    )
    common.add_json_flag(rotate)
    common.add_connection_flags(rotate)
    export = common.add_command(
        keys,
        "export-jwks",
        _export_jwks,
        help="write the published keys as a JWKS file, offline, from the store (read-only)",
        description="Write the JWKS the broker publishes — signing, pre-published and retiring "
        "keys — read from the store without a running broker and without changing it, for "
        "relying parties that cannot reach the broker's HTTP endpoint (upload it where they "
        "read it). Export again after every rotation, before its pre-publication window ends: "
        "a key absent from the copy cannot verify tokens once it signs.",
        examples=[
            "token-broker keys export-jwks --out jwks.json",
            "token-broker keys export-jwks --store postgresql://broker@db/broker > jwks.json",
        ],
    )
    export.add_argument(
        "--out", metavar="FILE", type=Path, help="write here instead of standard output"
    )
    audit.add_store_source(export)


_STATES = {
    broker_pb2.SIGNING_KEY_STATE_SIGNING: "signing",
    broker_pb2.SIGNING_KEY_STATE_PREPUBLISHED: "prepublished",
    broker_pb2.SIGNING_KEY_STATE_RETIRING: "retiring",
}


def _list(args: argparse.Namespace) -> int:
    with common.connect(args, anonymous=True) as client:
        published = client.signing_keys()
    out = Output(as_json=args.json)
    schedule = {status.kid: status for status in published.schedule}
    keys: list[dict[str, Any]] = []
    for index, key in enumerate(published.keys):
        status = schedule.get(key.kid)
        # A broker without schedules lists its one signing key first.
        state = _STATES.get(status.state, "") if status else ("signing" if index == 0 else "")
        keys.append(
            {
                "kid": key.kid,
                "alg": key.alg,
                "kty": key.kty,
                "crv": key.crv or None,
                "use": key.use,
                "active": state == "signing",
                "state": state or "published",
                "signs_from": iso_time(status.signs_from) if status else None,
                "stops_signing": iso_time(status.stops_signing) if status else None,
                "unpublish_at": iso_time(status.unpublish_time) if status else None,
            }
        )
    if out.as_json:
        out.json(
            {"issuer": published.issuer, "keys": keys, "jwks": json.loads(published.jwks_json)}
        )
        return common.EXIT_OK
    if out.terminal:
        out.line(f"issuer: {published.issuer}")
    out.table(
        ("KID", "ALG", "STATE", "SIGNS FROM", "STOPS SIGNING"),
        [
            [k["kid"], k["alg"], k["state"], k["signs_from"] or "", k["stops_signing"] or ""]
            for k in keys
        ],
    )
    return common.EXIT_OK


def _rotate(args: argparse.Namespace) -> int:
    with common.connect(args) as client:
        rotated = client.rotate_signing_key(emergency=args.emergency)
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(
            {
                "key_id": rotated.key_id,
                "new_key_ids": list(rotated.new_key_ids) or [rotated.key_id],
                "retiring_key_ids": list(rotated.retiring_key_ids),
                "signs_from": iso_time(rotated.signs_from),
                "emergency": rotated.emergency,
            }
        )
        return common.EXIT_OK
    new = ", ".join(rotated.new_key_ids or [rotated.key_id])
    still = ", ".join(rotated.retiring_key_ids)
    if rotated.emergency:
        out.line(f"emergency rotation: new signing keys sign now: {new}")
        if still:
            out.line(f"stopped signing, published until their tokens expire: {still}")
        return common.EXIT_OK
    out.line(f"new signing keys published: {new}")
    out.line(f"they sign from {readable_time(rotated.signs_from)}")
    if still:
        out.line(f"signing until then, published until their tokens expire: {still}")
    return common.EXIT_OK


def _export_jwks(args: argparse.Namespace) -> int:
    try:
        with audit.opened_store(args) as (store, _):
            document = export_jwks(store.public_keys(), time.time())
        text = json.dumps(document, indent=2) + "\n"
        if args.out is None:
            sys.stdout.write(text)
            return common.EXIT_OK
        args.out.write_text(text)
    except BrokenPipeError:
        raise  # the reader went away (`| head`): main ends quietly
    except (StoreRefused, StoreUnavailable, OSError) as exc:
        print(f"token-broker keys export-jwks: {exc}", file=sys.stderr)
        return common.EXIT_USAGE
    count = len(document["keys"])
    print(f"token-broker keys export-jwks: wrote {count} keys to {args.out}", file=sys.stderr)
    return common.EXIT_OK
