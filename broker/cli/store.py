"""`token-broker store migrate`: copy a store to another backend, chain intact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from broker.audit import verify as auditverify
from broker.audit.checkpoints import PublishedKeys
from broker.cli import common
from broker.store import StoreRefused, StoreUnavailable, all_checkpoints, all_stored_events
from broker.store.factory import OpenOptions, open_store
from broker.store.transfer import copy_store


def add_commands(commands: common.Commands) -> None:
    group = common.add_group(
        commands,
        "store",
        help="move a broker's store to another backend",
        examples=[
            "token-broker store migrate --from sqlite:/var/lib/token-broker/broker.db \\\n"
            "      --to postgresql://broker@db.internal/tokenbroker"
        ],
    )
    migrate = common.add_command(
        group,
        "migrate",
        _migrate,
        help="copy every run, key, checkpoint and audit event to an empty store",
        description="Copy a stopped broker's store, row for row, to an empty store of another "
        "backend (sqlite: or postgresql://): the audit chain, its hashes and checkpoints stay "
        "as they are, and the copy is verified before the command succeeds. Stop the broker "
        "first: events written during the copy would not be in it.",
        examples=[
            "token-broker store migrate --from sqlite:var/broker.db --to postgresql://broker@db/tb",
            "token-broker store migrate --from postgresql://broker@db/tb --to sqlite:copy.db",
        ],
    )
    migrate.add_argument(
        "--from", dest="source", required=True, metavar="URL", help="the store to copy"
    )
    migrate.add_argument("--to", dest="target", required=True, metavar="URL", help="an empty store")
    migrate.add_argument(
        "--data-dir", type=Path, default=Path("var"), help="resolves a bare sqlite: (default var)"
    )
    common.add_json_flag(migrate)


def _migrate(args: argparse.Namespace) -> int:
    options = OpenOptions(data_dir=args.data_dir)
    try:
        source = open_store(args.source, OpenOptions(data_dir=args.data_dir, read_only=True))
    except (StoreRefused, StoreUnavailable) as exc:
        raise common.CliError(f"--from: {exc}", common.EXIT_FAILED) from None
    try:
        try:
            target = open_store(args.target, options)
        except (StoreRefused, StoreUnavailable) as exc:
            raise common.CliError(f"--to: {exc}", common.EXIT_FAILED) from None
        try:
            copied = copy_store(source, target)
            report = auditverify.verify(
                args.target,
                all_stored_events(target),
                all_checkpoints(target),
                PublishedKeys.from_records(target.public_keys()),
                pruned_through=target.pruned_through(),
            )
        except (StoreRefused, StoreUnavailable) as exc:
            raise common.CliError(str(exc), common.EXIT_FAILED) from None
        finally:
            target.close()
    finally:
        source.close()
    if not report.ok:
        where = f" at sequence {report.first_bad_sequence}" if report.first_bad_sequence else ""
        raise common.CliError(
            f"the copy does not verify{where}: {report.problem}", common.EXIT_FAILED
        )
    if args.json:
        print(json.dumps({"rows": copied.rows, "head": copied.head[0]}, sort_keys=True))
    else:
        counts = ", ".join(f"{count} {name}" for name, count in copied.rows.items())
        print(f"copied {counts}; the audit chain verifies on the copy (head {copied.head[0]})")
    return common.EXIT_OK
