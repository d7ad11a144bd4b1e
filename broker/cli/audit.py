"""`token-broker audit verify | export | tail`.

verify and export open the broker's store read-only through the store factory (safe while
the broker runs: no lock, no write, one snapshot); tail follows a running broker through the
client library (StreamAudit), with the target, credentials, timeout, exit codes and error
wording every broker-calling command shares.

Exit codes of `audit verify`: 0 the log verifies, 1 it was tampered with (the first bad
sequence is reported), 2 usage (bad arguments, missing or unreadable input).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format

from broker import limits
from broker.audit import events as audit
from broker.audit import export as auditlog
from broker.audit import merkle
from broker.audit import verify as auditverify
from broker.audit.checkpoints import PublishedKeys
from broker.audit.lognote import LOG_KEY_FILE, LogKey, LogKeyMissing
from broker.cli import common, console
from broker.settings import ENV_PREFIX
from broker.store import (
    Store,
    StoreRefused,
    StoreUnavailable,
    all_checkpoints,
    all_stored_events,
)
from broker.store.factory import OpenOptions, open_store
from tokenbroker.merkle import (
    CONSISTENCY_BUNDLE,
    INCLUSION_BUNDLE,
    ProofError,
    VerifierKey,
    check_consistency_bundle,
    check_inclusion_bundle,
    verify_note,
)
from tokenbroker.v1 import types_pb2

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


def add_commands(commands: common.Commands) -> None:
    """Register the `audit` command group on the top-level parser's subcommands."""
    group = commands.add_parser(
        "audit",
        help="verify, export and follow the audit log",
        description="Verify, export and follow the tamper-evident audit log.",
        epilog="examples:\n  token-broker audit verify --data-dir ./var\n"
        "  token-broker audit tail --follow",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = group.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    _add_verify(sub)
    _add_export(sub)
    _add_tail(sub)
    _add_prove(sub)
    _add_check(sub)
    console.add_command(sub)


def _raw(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _add_source(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data-dir",
        type=Path,
        help=f"the broker's data directory [env {ENV_PREFIX}DATA_DIR; default var]",
    )
    source.add_argument("--db", type=Path, help="the SQLite database file itself")
    source.add_argument(
        "--store",
        metavar="URL",
        help=f"the store, as `serve --store` names it [env {ENV_PREFIX}STORE; default sqlite:]",
    )
    return source


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verify = sub.add_parser(
        "verify",
        help="re-walk the hash chain and check the signed checkpoints (offline)",
        description="Re-walk the audit chain and check its signed checkpoints, offline and "
        "read-only; report the first bad sequence if any event was edited, deleted, inserted "
        "or reordered.",
        epilog="exit status: 0 intact, 1 tampered, 2 usage error\n"
        "examples:\n"
        "  token-broker audit verify --data-dir /var/lib/token-broker\n"
        "  token-broker audit verify --file audit.jsonl --checkpoints cp.jsonl --jwks jwks.json "
        "--log-key log.vkey",
    )
    _raw(verify)
    source = _add_source(verify)
    source.add_argument("--file", type=Path, help="an exported JSON Lines file")
    verify.add_argument(
        "--checkpoints", type=Path, help="with --file: the exported checkpoints (JSON Lines)"
    )
    verify.add_argument(
        "--jwks",
        type=Path,
        help="public keys (JWKS) to check checkpoints with; required with --checkpoints, and "
        "for a database it replaces the keys stored in it (pin keys you obtained elsewhere)",
    )
    verify.add_argument(
        "--log-key",
        metavar="VKEY",
        help="with --file: the log's verifier key (a file, or the key itself), which signed "
        "the export's statement of its range; `audit export --log-key` writes it, the broker "
        "serves it at /audit/log-key",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(handler=_verify)


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = sub.add_parser(
        "export",
        help="write audit events as JSON Lines (for a SIEM)",
        description="Write audit events after a sequence as JSON Lines: each line is the "
        "event's canonical record plus prev_hash and hash, after a first line stating the "
        "range, signed with the audit log key, so the file can be verified with "
        "`audit verify --file --log-key` and a missing start, end or middle shows.",
        epilog="example:\n"
        "  token-broker audit export --after 1200 --output audit.jsonl \\\n"
        "      --checkpoints checkpoints.jsonl --jwks jwks.json --log-key log.vkey",
    )
    _raw(export)
    _add_source(export)
    export.add_argument(
        "--after",
        type=int,
        default=0,
        metavar="N",
        help="export events with sequence > N (0: from the oldest retained)",
    )
    export.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    export.add_argument(
        "--checkpoints", type=Path, help="also write the signed checkpoints for this range here"
    )
    export.add_argument("--jwks", type=Path, help="also write the public keys (JWKS) here")
    export.add_argument(
        "--log-key", type=Path, metavar="FILE", help="also write the log's verifier key here"
    )
    export.add_argument(
        "--log-private-key",
        type=Path,
        metavar="PEM",
        help="the audit log key that signs the export's statement of its range "
        f"[env {ENV_PREFIX}AUDIT_LOG_KEY; default {LOG_KEY_FILE} beside the database]",
    )
    export.set_defaults(handler=_export)


def _add_tail(sub: common.Commands) -> None:
    tail = common.add_command(
        sub,
        "tail",
        _tail,
        help="show audit events from a running broker, readably",
        description="Show audit events from a running broker (StreamAudit), one line each: "
        "those stored after --after up to the newest, then, with --follow, new ones as they "
        "are written (resuming by itself after a disconnect). Needs role auditor, in scope of "
        "what it asks for (an auditor of acme/*/* gives --org acme).",
        examples=[
            "token-broker audit tail --follow",
            "token-broker audit tail --run r-123 --after 4000",
            "token-broker audit tail --org acme --account siem --key siem.pem --target broker:443",
        ],
    )
    tail.add_argument("--follow", "-f", action="store_true", help="keep following live events")
    tail.add_argument(
        "--after", type=_sequence, default=0, metavar="N", help="events after sequence N"
    )
    tail.add_argument("--run", default="", metavar="ID", help="only events of this run")
    tail.add_argument("--action", action="append", default=[], help="only this action (repeat)")
    tail.add_argument("--principal", default="", help="only events caused by this principal")
    tail.add_argument("--person", default="", help="only events on behalf of this person")
    tail.add_argument("--org", default="", help="only events of this organisation")
    tail.add_argument("--project", default="", help="only events of this project")
    tail.add_argument("--json", action="store_true", help="one JSON object per event (JSON Lines)")
    common.add_connection_flags(tail)


def _add_prove(sub: common.Commands) -> None:
    prove = common.add_command(
        sub,
        "prove",
        _prove,
        help="fetch a self-contained proof bundle from a running broker",
        description="Ask a running broker for a proof and write it as a self-contained JSON "
        "bundle that `audit check` verifies offline with only the log's public key: "
        "--sequence N: the event, its leaf index, its inclusion proof and a signed tree head; "
        "--consistency-from FILE: the proof that today's tree extends the one in a signed "
        "checkpoint you kept (both heads included). Needs role auditor (for an event, in "
        "scope of its pipeline).",
        examples=[
            "token-broker audit prove --sequence 1234 --out event-1234.json",
            "token-broker audit prove --consistency-from yesterday.checkpoint --out grew.json",
            "curl -s http://127.0.0.1:50052/audit/checkpoint > yesterday.checkpoint",
        ],
    )
    what = prove.add_mutually_exclusive_group(required=True)
    what.add_argument("--sequence", type=_positive, metavar="N", help="the event to prove")
    what.add_argument(
        "--consistency-from",
        type=Path,
        metavar="FILE",
        help="a signed checkpoint (as /audit/checkpoint serves it) the log must extend",
    )
    prove.add_argument(
        "--tree-size", type=_sequence, default=0, metavar="N", help="prove in this tree (0: now)"
    )
    prove.add_argument("--out", "-o", type=Path, help="file to write (default: stdout)")
    common.add_connection_flags(prove)


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser(
        "check",
        help="verify a proof bundle offline, with only the log's public key",
        description="Verify a bundle written by `audit prove`, offline: the signed tree "
        "head(s) against the log's verifier key, then the inclusion proof of the event or the "
        "consistency proof between the two heads. Nothing else is trusted.",
        epilog="exit status: 0 verified, 1 the proof or a signature does not verify, 2 usage\n"
        "examples:\n"
        "  token-broker audit check event-1234.json --key log.vkey\n"
        "  token-broker audit check --consistency grew.json --old yesterday.checkpoint "
        "--key log.vkey",
    )
    _raw(check)
    check.add_argument("bundle", type=Path, help="the bundle `audit prove` wrote")
    check.add_argument(
        "--key",
        required=True,
        metavar="VKEY",
        help="the log's verifier key (a file, or the key itself), as /audit/log-key serves it",
    )
    check.add_argument(
        "--consistency", action="store_true", help="the bundle is a consistency proof"
    )
    check.add_argument(
        "--old",
        type=Path,
        metavar="CHECKPOINT",
        help="with --consistency: the older signed checkpoint you kept (instead of the copy "
        "in the bundle)",
    )
    check.set_defaults(handler=_check)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a sequence number (1 or more)")
    return int(text)


def _sequence(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a sequence number (0 or more)")
    return int(text)


# -- verify ----------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    try:
        report = _run_verify(args)
    except (UsageError, StoreRefused, StoreUnavailable, auditlog.MalformedLine, OSError) as exc:
        print(f"token-broker audit verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(_describe(report))
    return EXIT_OK if report.ok else EXIT_TAMPERED


def _run_verify(args: argparse.Namespace) -> auditverify.Report:
    pinned = _read_jwks(args.jwks) if args.jwks else None
    progress = _Progress(sys.stderr)
    try:
        if args.file is not None:
            if args.checkpoints is not None and pinned is None:
                raise UsageError("--checkpoints needs --jwks, the keys that signed them")
            checkpoints = auditlog.read_checkpoints(args.checkpoints) if args.checkpoints else []
            statement = _statement_of(args.file, args.log_key)
            if isinstance(statement, str):
                return auditverify.Report(str(args.file), ok=False, problem=statement)
            return auditverify.verify(
                str(args.file),
                auditlog.read_events(args.file),
                checkpoints,
                pinned or PublishedKeys([]),
                pruned_through=None,
                progress=progress.update,
                statement=statement,
            )
        if args.checkpoints is not None or args.log_key is not None:
            raise UsageError("--checkpoints and --log-key go with --file; a database holds its own")
        with _opened(args) as (store, source):
            progress.total = store.head_sequence() - store.oldest_sequence() + 1
            keys = pinned or PublishedKeys.from_records(store.public_keys())
            return auditverify.verify(
                source,
                all_stored_events(store),
                all_checkpoints(store),
                keys,
                pruned_through=store.pruned_through(),
                progress=progress.update,
                tree=_stored_tree(store),
            )
    finally:
        progress.done()


def _statement_of(path: Path, log_key: str | None) -> auditlog.ExportStatement | str:
    """The export's verified statement of its range, or why there is none to trust."""
    note = auditlog.read_statement(path)
    if note is None:
        return (
            "the export has no signed statement of its range (its first line was removed, or "
            "an older broker wrote it): events missing at its start or end cannot be ruled out"
        )
    if log_key is None:
        raise UsageError(
            "--file needs --log-key, the log's verifier key (`audit export --log-key FILE` "
            "writes it; the broker serves it at /audit/log-key)"
        )
    key = _verifier_key(log_key)
    try:
        statement = auditlog.ExportStatement.parse(verify_note(note, key))
    except ProofError as exc:
        return f"the export's statement of its range does not verify: {exc}"
    except ValueError as exc:
        return f"the export's statement of its range is malformed: {exc}"
    if statement.origin != key.name:
        return f"the export is of log {statement.origin!r}, the key is {key.name!r}'s"
    return statement


def _verifier_key(text: str) -> VerifierKey:
    path = Path(text)
    try:
        value = path.read_text() if path.is_file() else text
    except OSError as exc:
        raise UsageError(f"{path}: {exc}") from None
    try:
        return VerifierKey.parse(value)
    except ProofError as exc:
        raise UsageError(f"--log-key: {exc}") from None


def _stored_tree(store: Store) -> auditverify.TreeCheck | None:
    """The stored tree to re-build while walking a database: its frontier where the
    retained events start and its root at the head (None for a store without a tree)."""
    base = store.tree_base()
    head = store.head_sequence()
    try:
        start = merkle.Frontier.read(store.pruned_through() - base, store.tree_nodes)
        root = merkle.root_at(head - base, store.tree_nodes) if head > base else merkle.EMPTY_ROOT
    except merkle.MissingNodes:
        return None
    return auditverify.TreeCheck(base, start, root, stored=store.tree_nodes)


def _read_jwks(path: Path) -> PublishedKeys:
    try:
        document = json.loads(path.read_text())
    except ValueError:
        raise UsageError(f"{path}: not JSON") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path}: not a JWKS document")
    try:
        return PublishedKeys.from_jwks(document)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _describe(report: auditverify.Report) -> str:
    span = (
        "no events"
        if report.first_sequence is None
        else f"{report.events} events ({report.first_sequence}..{report.last_sequence})"
    )
    lines = []
    if report.ok:
        lines.append(f"OK: {report.source}: {span}, chain intact")
    else:
        lines.append(
            f"TAMPERED: {report.source}: first bad sequence {report.first_bad_sequence}: "
            f"{report.problem}"
        )
    if report.pruned_through:
        lines.append(
            f"retention: events through {report.pruned_through} were pruned; the chain is "
            "verified from the signed checkpoint there"
        )
    if report.signed_range:
        lines.append(f"range: the export's signed statement covers {report.signed_range}")
    lines.append(
        f"checkpoints: {report.checkpoints_verified} of {report.checkpoints} verified"
        + (f"; anchored through {report.anchored_through}" if report.anchored_through else "")
        + (
            f"; Merkle roots reproduced: {report.tree_roots_verified}"
            if report.tree_roots_verified
            else ""
        )
    )
    last = report.last_sequence or 0
    if report.ok and last > report.anchored_through:
        lines.append(
            f"note: {last - max(report.anchored_through, (report.first_sequence or 1) - 1)} "
            "newest events are covered by the chain only, not yet by a signed checkpoint"
        )
    return "\n".join(lines)


class _Progress:
    """A one-line progress indicator on stderr, only when a person is watching."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._shown = stream.isatty()
        self.total: int | None = None
        self._last = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self._shown or now - self._last < 0.2:
            return
        self._last = now
        of = f"/{self.total} ({100 * done // self.total}%)" if self.total else ""
        self._stream.write(f"\rverifying audit log: {done}{of} events")
        self._stream.flush()

    def done(self) -> None:
        if self._shown and self._last:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


# -- export ----------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    if args.after < 0:
        print("token-broker audit export: --after must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _opened(args) as (store, _):
            pruned = store.pruned_through()
            if 0 < args.after < pruned:
                raise UsageError(
                    f"events after {args.after} are no longer retained; the oldest available "
                    f"sequence is {store.oldest_sequence()} (export with --after {pruned})"
                )
            key = _export_key(args)
            statement = _export_statement(store, args.after, key.name)
            count = _write_export(store, key.sign(statement.text()), statement, args.output)
            if args.log_key is not None:
                args.log_key.write_text(key.verifier.text() + "\n")
            if args.checkpoints is not None:
                since = max(args.after, pruned) - 1
                lines = (auditlog.checkpoint_line(c) for c in all_checkpoints(store, since))
                with args.checkpoints.open("w", encoding="utf-8") as out:
                    auditlog.write_lines(lines, out)
            if args.jwks is not None:
                keys = PublishedKeys.from_records(store.public_keys())
                args.jwks.write_text(json.dumps(keys.jwks(), indent=2, sort_keys=True) + "\n")
    except BrokenPipeError:
        raise  # the reader went away (`| head`): main ends quietly
    except (UsageError, StoreRefused, StoreUnavailable, OSError, LogKeyMissing, ValueError) as exc:
        print(f"token-broker audit export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"exported {count} events after sequence {args.after}", file=sys.stderr)
    return EXIT_OK


def _export_key(args: argparse.Namespace) -> LogKey:
    path = args.log_private_key or os.environ.get(ENV_PREFIX + "AUDIT_LOG_KEY")
    if path is None:
        folder = args.db.parent if args.db is not None else _data_dir(args)
        path = folder / LOG_KEY_FILE
    try:
        return LogKey.load(Path(path))
    except LogKeyMissing as exc:
        raise UsageError(
            f"{exc}: an export is signed with the broker's audit log key, so that events "
            "missing at its start or end show; name the key with --log-private-key"
        ) from None


def _export_statement(store: Store, after: int, origin: str) -> auditlog.ExportStatement:
    """What the export will hold: the events after `after` (or the oldest retained) up to
    the head as it is now, with the hashes and the tree that pin that range."""
    start = max(after, store.pruned_through())
    last = store.head_sequence()
    if start > last:
        raise UsageError(f"nothing to export after {after}: the log ends at {last}")
    statement = auditlog.ExportStatement(
        origin, start + 1, last, _chain_hash_at(store, start), _chain_hash_at(store, last)
    )
    base = store.tree_base()
    try:
        left = merkle.Frontier.read(start - base, store.tree_nodes).hashes
        root = merkle.root_at(last - base, store.tree_nodes)
    except merkle.MissingNodes:
        return statement  # a store from before the tree (read-only, not yet migrated)
    return replace(statement, tree_base=base, tree_size=last - base, tree_root=root, left=left)


def _chain_hash_at(store: Store, sequence: int) -> str:
    if sequence == 0:
        return audit.GENESIS_HASH
    found = store.stored_events(sequence - 1, 1)
    if found and found[0].sequence == sequence:
        return found[0].hash
    checkpoint = store.latest_checkpoint(at_most=sequence)
    if checkpoint is not None and checkpoint.sequence == sequence:
        return checkpoint.hash  # the retention boundary
    raise UsageError(f"event {sequence} is not retained; cannot state where the export starts")


def _write_export(
    store: Store, note: str, statement: auditlog.ExportStatement, output: Path | None
) -> int:
    events = all_stored_events(store, statement.first - 1)
    lines = itertools.chain(
        [auditlog.statement_line(note)],
        (auditlog.event_line(e) for e in events if e.sequence <= statement.last),
    )
    if output is None:
        count = auditlog.write_lines(lines, sys.stdout)
        sys.stdout.flush()
        return count - 1
    with output.open("w", encoding="utf-8") as out:
        return auditlog.write_lines(lines, out) - 1


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or os.environ.get(ENV_PREFIX + "DATA_DIR") or "var")


@contextmanager
def _opened(args: argparse.Namespace) -> Iterator[tuple[Store, str]]:
    """The store the arguments name, opened read-only, and how to name it in a report."""
    data_dir = _data_dir(args)
    if args.db is not None:
        url = f"sqlite:{args.db}"
    else:
        url = args.store or os.environ.get(ENV_PREFIX + "STORE") or "sqlite:"
    store = open_store(url, OpenOptions(data_dir=data_dir, read_only=True))
    try:
        yield store, str(getattr(store, "path", url))
    finally:
        store.close()


# -- prove and check --------------------------------------------------------------------------


def _prove(args: argparse.Namespace) -> int:
    with common.connect(args) as client:
        if args.sequence is not None:
            proved = client.prove_inclusion(args.sequence, args.tree_size)
            bundle: dict[str, Any] = {
                "type": INCLUSION_BUNDLE,
                "sequence": args.sequence,
                "record": proved.record,
                "prev_hash": proved.prev_hash,
                "hash": proved.hash,
                "leaf_index": proved.leaf_index,
                "tree_size": proved.tree_head.tree_size,
                "tree_base": proved.tree_head.tree_base,
                "proof": [base64.b64encode(h).decode() for h in proved.proof],
                "checkpoint": proved.tree_head.checkpoint,
            }
        else:
            old = _read_text(args.consistency_from)
            first = _checkpoint_size(old)
            grown = client.prove_consistency(first, args.tree_size)
            bundle = {
                "type": CONSISTENCY_BUNDLE,
                "first": grown.first,
                "second": grown.second,
                "proof": [base64.b64encode(h).decode() for h in grown.proof],
                "old_checkpoint": old,
                "checkpoint": grown.tree_head.checkpoint,
            }
    text = json.dumps(bundle, indent=2, sort_keys=True) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"token-broker audit prove: wrote {args.out}", file=sys.stderr)
    return EXIT_OK


def _checkpoint_size(note: str) -> int:
    """The tree size a checkpoint states (its signature is checked by `audit check`)."""
    lines = note.split("\n")
    if len(lines) < 3 or not lines[1].isdigit() or int(lines[1]) < 1:
        raise common.CliError("--consistency-from: not a signed checkpoint of a non-empty tree")
    return int(lines[1])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise common.CliError(f"{path}: {exc}") from None


def _check(args: argparse.Namespace) -> int:
    try:
        key = _verifier_key(args.key)
        bundle = json.loads(_read_text(args.bundle))
        if not isinstance(bundle, dict):
            raise UsageError(f"{args.bundle}: not a bundle (a JSON object)")
        old = _read_text(args.old) if args.old is not None else None
    except (UsageError, common.CliError, ValueError) as exc:
        print(f"token-broker audit check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.consistency:
            before, after = check_consistency_bundle(bundle, key, old)
            print(
                f"OK: the log {after.origin} of {after.size} events extends its tree of "
                f"{before.size} (both heads signed by {key.name})"
            )
        else:
            head = check_inclusion_bundle(bundle, key)
            print(
                f"OK: event {limits.shown(str(bundle.get('sequence')))} is leaf "
                f"{bundle['leaf_index']} of the log {head.origin} of {head.size} events "
                f"(head signed by {key.name})"
            )
    except ProofError as exc:
        print(f"FAILED: {args.bundle}: {exc}")
        return EXIT_TAMPERED
    return EXIT_OK


# -- tail ------------------------------------------------------------------------------------


def _tail(args: argparse.Namespace) -> int:
    with (
        common.connect(args) as client,
        client.stream_audit(
            args.after,
            run_id=args.run,
            principal=args.principal,
            person=args.person,
            actions=args.action,
            org=args.org,
            project=args.project,
            follow=args.follow,
        ) as events,
        common.reader_watch(events.cancel) as reader_gone,
    ):
        for event in events:
            # Following, each line goes out as it comes (`tail -f | grep` sees it at once).
            print(_json_line(event) if args.json else render(event), flush=args.follow)
    if reader_gone.is_set():
        raise BrokenPipeError  # main ends quietly, as for any closed pipe
    return EXIT_OK


def _json_line(event: types_pb2.AuditEvent) -> str:
    fields = json_format.MessageToDict(event, preserving_proto_field_name=True)
    return json.dumps(fields, sort_keys=True)


_ALIASES = {"audience": "aud", "permissions": "perms", "permission_ceiling": "ceiling"}


def render(event: types_pb2.AuditEvent) -> str:
    """One readable line: `12:04:05 token.issued run r-1 by portal for alice@… aud=api …`."""
    parts = [time.strftime("%H:%M:%S", time.localtime(event.time.seconds)), event.action]
    if event.outcome not in (types_pb2.AUDIT_OUTCOME_SUCCESS, types_pb2.AUDIT_OUTCOME_UNSPECIFIED):
        parts.append(types_pb2.AuditOutcome.Name(event.outcome).removeprefix("AUDIT_OUTCOME_"))
    if event.run_id:
        parts += ["run", event.run_id]
    if event.principal:
        parts += ["by", event.principal]
    if event.HasField("on_behalf_of"):
        parts += ["for", event.on_behalf_of.email or event.on_behalf_of.subject]
    details = json_format.MessageToDict(event.details)
    for key in sorted(details):
        text = _value_text(key, details[key])
        if text:
            name = _ALIASES.get(key, key.removesuffix("_us"))
            parts.append(f"{name}={text}")
    parts.append(f"seq={event.sequence}")
    return limits.printable(" ".join(parts))  # one event, one line, whatever its fields hold


def _value_text(key: str, value: Any) -> str:
    if value is None or value in ("", [], {}):
        return ""
    if isinstance(value, dict):
        return ",".join(f"{k}:{_value_text(k, v)}" for k, v in sorted(value.items()))
    if isinstance(value, list):
        return ",".join(_value_text(key, v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if key.endswith("_us"):  # a time in microseconds: show it like the line's own time
            return time.strftime("%H:%M:%S", time.localtime(value / 1_000_000))
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


# For other commands that read the store offline (`keys export-jwks`): the same flags.
add_store_source = _add_source
opened_store = _opened
