"""`token-broker audit verify` and `export`: offline, read-only, and they catch tampering."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.audit import checkpoints
from broker.audit import events as audit
from broker.audit.lognote import LOG_KEY_FILE, LogKey
from broker.cli import main as cli
from broker.store import Write
from broker.store.sqlite import SqliteStore
from tests.audit_support import (
    attacker_connection,
    draft,
    keeper,
    make_signer,
    publish,
)
from tests.support import FakeClock


@dataclass
class Log:
    data_dir: Path

    @property
    def db(self) -> Path:
        return self.data_dir / "broker.db"


def build_log(data_dir: Path, *, retention_seconds: float = 0.0, prune: bool = False) -> None:
    """30 events (the key's publication, then 29 more), checkpointed at 10, 20 and 30."""
    store = SqliteStore(data_dir)
    LogKey.load_or_create(data_dir / LOG_KEY_FILE, "audit.test.example/audit")
    signer = make_signer()
    clock = FakeClock(1000.0)
    keep = keeper(store, signer, clock, retention_seconds=retention_seconds)
    publish(store, signer)
    for batch in (9, 10, 10):
        for i in range(batch):
            action = "run.started" if i % 2 else "run.ended"
            store.commit(Write([draft(action, f"r-{store.head_sequence() + 1}")]))
        keep.checkpoint()
    if prune:
        clock.advance(retention_seconds + 1)
        keep.prune()
    store.close()


@pytest.fixture
def log(tmp_path: Path) -> Log:
    build_log(tmp_path / "data")
    return Log(tmp_path / "data")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def verify_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code, out, err = run(capsys, "verify", "--json", *args)
    assert out, err
    report: dict[str, object] = json.loads(out)
    return code, report


@pytest.fixture
def attacker(log: Log) -> Iterator[sqlite3.Connection]:
    conn = attacker_connection(log.db)
    yield conn
    conn.close()


def test_an_intact_log_verifies_with_exit_zero_and_says_how_far_it_is_anchored(
    log: Log, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = verify_json(capsys, "--data-dir", str(log.data_dir))
    assert code == 0
    assert report["ok"] is True
    assert (report["first_sequence"], report["last_sequence"], report["events"]) == (1, 30, 30)
    assert (report["checkpoints"], report["checkpoints_verified"]) == (3, 3)
    assert report["anchored_through"] == 30
    code, out, _ = run(capsys, "verify", "--db", str(log.db))
    assert code == 0
    assert out.startswith(f"OK: {log.db}: 30 events (1..30), chain intact")


def test_verify_reads_the_database_without_changing_it(
    log: Log, capsys: pytest.CaptureFixture[str]
) -> None:
    before = hashlib.sha256(log.db.read_bytes()).hexdigest()
    assert run(capsys, "verify", "--data-dir", str(log.data_dir))[0] == 0
    assert hashlib.sha256(log.db.read_bytes()).hexdigest() == before


def _swap(conn: sqlite3.Connection, a: int, b: int) -> None:
    rows = {
        seq: conn.execute(
            "SELECT record, prev_hash, hash FROM audit_events WHERE sequence=?", (seq,)
        ).fetchone()
        for seq in (a, b)
    }
    for seq, other in ((a, b), (b, a)):
        conn.execute(
            "UPDATE audit_events SET record=?, prev_hash=?, hash=? WHERE sequence=?",
            (*rows[other], seq),
        )


def _insert_after(conn: sqlite3.Connection, sequence: int) -> None:
    """Renumber everything after `sequence` and insert a well-formed forged event there."""
    conn.execute("UPDATE audit_events SET sequence=sequence+1000 WHERE sequence>?", (sequence,))
    conn.execute("UPDATE audit_events SET sequence=sequence-999 WHERE sequence>1000")
    prev = conn.execute("SELECT hash FROM audit_events WHERE sequence=?", (sequence,)).fetchone()
    record = audit.to_record(sequence + 1, draft("run.ended", "r-forged"))
    conn.execute(
        "INSERT INTO audit_events (sequence, record, prev_hash, hash, action, run_id, principal, "
        "time_us) VALUES (?, ?, ?, ?, 'run.ended', 'r-forged', 'x', 0)",
        (
            sequence + 1,
            audit.canonical_bytes(record).decode(),
            prev[0],
            audit.chain_hash(prev[0], record),
        ),
    )


@pytest.mark.parametrize(
    ("tamper", "first_bad", "problem"),
    [
        (
            lambda c: c.execute(
                "UPDATE audit_events SET record=replace(record, '\"test\"', '\"edited\"') "
                "WHERE sequence=13"
            ),
            13,
            "content does not match its hash",
        ),
        (lambda c: c.execute("DELETE FROM audit_events WHERE sequence=13"), 13, "missing"),
        (lambda c: _swap(c, 13, 14), 13, "differs from the sealed sequence"),
        # The forged event itself is well-formed; the event it displaced no longer fits.
        (lambda c: _insert_after(c, 12), 14, "differs from the sealed sequence"),
        (lambda c: c.execute("DELETE FROM audit_events WHERE sequence=1"), 1, "missing"),
    ],
    ids=["edited", "deleted", "swapped", "inserted", "first-deleted"],
)
def test_an_edited_deleted_swapped_or_inserted_row_fails_at_its_sequence(
    log: Log,
    attacker: sqlite3.Connection,
    capsys: pytest.CaptureFixture[str],
    tamper: object,
    first_bad: int,
    problem: str,
) -> None:
    assert callable(tamper)
    tamper(attacker)
    code, report = verify_json(capsys, "--data-dir", str(log.data_dir))
    assert code == 1
    assert report["ok"] is False
    assert report["first_bad_sequence"] == first_bad
    assert problem in str(report["problem"])
    code, out, _ = run(capsys, "verify", "--data-dir", str(log.data_dir))
    assert code == 1
    assert f"TAMPERED: {log.db}: first bad sequence {first_bad}:" in out


def test_a_rewritten_chain_with_recomputed_hashes_is_caught_by_the_signed_checkpoint(
    log: Log, attacker: sqlite3.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = attacker.execute(
        "SELECT sequence, record, prev_hash FROM audit_events WHERE sequence>=13 ORDER BY sequence"
    ).fetchall()
    prev = rows[0][2]
    for sequence, text, _ in rows:
        record = json.loads(text)
        if sequence == 13:
            record["details"]["reason"] = "rewritten"
        new_hash = audit.chain_hash(prev, record)
        attacker.execute(
            "UPDATE audit_events SET record=?, prev_hash=?, hash=? WHERE sequence=?",
            (audit.canonical_bytes(record).decode(), prev, new_hash, sequence),
        )
        prev = new_hash
    code, report = verify_json(capsys, "--data-dir", str(log.data_dir))
    assert code == 1
    assert report["first_bad_sequence"] == 11
    assert "events 11..20 were rewritten" in str(report["problem"])


def test_deleting_the_newest_events_is_caught_by_a_checkpoint_beyond_the_end(
    log: Log, attacker: sqlite3.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    attacker.execute("DELETE FROM audit_events WHERE sequence>=25")
    code, report = verify_json(capsys, "--data-dir", str(log.data_dir))
    assert code == 1
    assert report["first_bad_sequence"] == 25
    assert "events 25..30 are missing" in str(report["problem"])


def test_a_deleted_or_altered_checkpoint_fails_verification(
    log: Log, attacker: sqlite3.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    attacker.execute("DELETE FROM audit_checkpoints WHERE sequence=20")
    code, report = verify_json(capsys, "--data-dir", str(log.data_dir))
    assert (code, report["first_bad_sequence"]) == (1, 30)
    assert "which is missing" in str(report["problem"])
    jws = attacker.execute("SELECT jws FROM audit_checkpoints WHERE sequence=30").fetchone()[0]
    attacker.execute("UPDATE audit_checkpoints SET jws=? WHERE sequence=10", (jws,))
    code, report = verify_json(capsys, "--data-dir", str(log.data_dir))
    assert (code, report["first_bad_sequence"]) == (1, 10)


def test_a_checkpoint_resigned_with_a_planted_key_fails_against_pinned_keys(
    log: Log, attacker: sqlite3.Connection, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    jwks = tmp_path / "jwks.json"
    assert run(capsys, "export", "--data-dir", str(log.data_dir), "--jwks", str(jwks))[0] == 0
    attacker.execute("DELETE FROM audit_events WHERE sequence>=25")
    attacker.execute("DELETE FROM audit_checkpoints WHERE sequence=30")
    planted = make_signer("planted")
    attacker.execute(
        "INSERT INTO signing_keys (kid, alg, public_jwk, create_time) VALUES (?, ?, ?, 0)",
        (planted.kid, planted.alg, planted.public_jwk()),
    )
    head = attacker.execute("SELECT hash FROM audit_events WHERE sequence=24").fetchone()[0]
    claims = checkpoints.claims_for(24, head, 20, 2000.0, "forged")
    attacker.execute(
        "INSERT INTO audit_checkpoints VALUES (24, ?, 2000.0, 'planted', ?, 20)",
        (head, planted.sign(claims, typ=checkpoints.CHECKPOINT_TYP)),
    )
    # Against the keys stored in the same database, a planted key passes...
    assert run(capsys, "verify", "--data-dir", str(log.data_dir))[0] == 0
    # ...which is why keys obtained elsewhere (the JWKS endpoint, an earlier export) are pinned.
    code, report = verify_json(capsys, "--data-dir", str(log.data_dir), "--jwks", str(jwks))
    assert (code, report["first_bad_sequence"]) == (1, 24)
    assert "unknown key 'planted'" in str(report["problem"])


def test_a_pruned_log_verifies_from_the_signed_checkpoint_at_its_boundary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    build_log(data, retention_seconds=60.0, prune=True)
    code, report = verify_json(capsys, "--data-dir", str(data))
    assert code == 0, report
    assert (report["pruned_through"], report["first_sequence"], report["last_sequence"]) == (
        30,
        31,
        31,
    )
    conn = attacker_connection(data / "broker.db")
    conn.execute("DELETE FROM audit_checkpoints WHERE sequence=30")
    conn.close()
    code, report = verify_json(capsys, "--data-dir", str(data))
    assert (code, report["first_bad_sequence"]) == (1, 31)
    assert "no valid signed checkpoint at 30" in str(report["problem"])


def export(
    capsys: pytest.CaptureFixture[str], log: Log, out: Path, *extra: str
) -> tuple[Path, Path, Path]:
    """Export with the checkpoints, the JWKS and the log key (written beside `out`, the
    log key as `out`.vkey); verify args are `files(out)`."""
    cps, jwks = out.with_suffix(".cp.jsonl"), out.with_suffix(".jwks.json")
    code, _, err = run(
        capsys,
        "export",
        "--data-dir",
        str(log.data_dir),
        "--output",
        str(out),
        "--checkpoints",
        str(cps),
        "--jwks",
        str(jwks),
        "--log-key",
        str(out.with_suffix(".vkey")),
        *extra,
    )
    assert code == 0, err
    return out, cps, jwks


def files(out: Path) -> tuple[str, ...]:
    """The verify arguments for an export written by `export`."""
    cps, jwks, vkey = (out.with_suffix(s) for s in (".cp.jsonl", ".jwks.json", ".vkey"))
    return (
        "--file",
        str(out),
        "--checkpoints",
        str(cps),
        "--jwks",
        str(jwks),
        "--log-key",
        str(vkey),
    )


def test_an_export_is_json_lines_of_records_with_their_hashes_and_verifies_offline(
    log: Log, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, _, _ = export(capsys, log, tmp_path / "audit.jsonl", "--after", "15")
    statement, *lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(statement) == ["export_statement"]
    assert statement["export_statement"].startswith("tokenbroker-audit-export/v1\n")
    assert [line["sequence"] for line in lines] == list(range(16, 31))
    first = dict(lines[0])
    prev_hash, stored = first.pop("prev_hash"), first.pop("hash")
    assert audit.chain_hash(prev_hash, first) == stored
    args = files(out)
    code, report = verify_json(capsys, *args)
    assert code == 0, report
    assert (report["first_sequence"], report["anchored_through"]) == (16, 30)
    assert report["signed_range"] == "16..30"
    assert report["tree_roots_verified"] == 3  # the checkpoints at 20 and 30, the statement's


def test_an_edited_or_reordered_export_fails_at_that_sequence(
    log: Log, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, _, _ = export(capsys, log, tmp_path / "audit.jsonl")
    statement, *lines = out.read_text().splitlines()
    args = files(out)
    out.write_text(
        "\n".join([statement, *lines[:21], lines[21].replace('"test"', '"x"'), *lines[22:]])
    )
    code, report = verify_json(capsys, *args)
    assert (code, report["first_bad_sequence"]) == (1, 22)
    out.write_text("\n".join([statement, *lines[:5], lines[6], lines[5], *lines[7:]]))
    code, report = verify_json(capsys, *args)
    assert (code, report["first_bad_sequence"]) == (1, 6)
    out.write_text("\n".join([statement, *lines[:7], "not json", *lines[8:]]))
    code, report = verify_json(capsys, *args)
    assert (code, report["first_bad_sequence"]) == (1, 8)


def test_exporting_from_before_the_retained_start_is_refused_naming_the_oldest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    build_log(data, retention_seconds=60.0, prune=True)
    code, out, err = run(capsys, "export", "--data-dir", str(data), "--after", "5")
    assert code == 2 and not out
    assert "the oldest available sequence is 31" in err


def test_usage_errors_exit_with_two(
    log: Log, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nothing"
    assert run(capsys, "verify", "--data-dir", str(missing))[0] == 2
    assert run(capsys, "verify", "--file", str(missing))[0] == 2
    out, cps, _ = export(capsys, log, tmp_path / "a.jsonl")
    code, _, err = run(capsys, "verify", "--file", str(out), "--checkpoints", str(cps))
    assert code == 2 and "--jwks" in err
    not_a_db = tmp_path / "plain.txt"
    not_a_db.write_text("hello")
    assert run(capsys, "verify", "--db", str(not_a_db))[0] == 2
    with pytest.raises(SystemExit) as exited:
        cli.main(["audit", "verify", "--db", str(log.db), "--file", str(out)])
    assert exited.value.code == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_shown_on_a_terminal_and_cleared_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SqliteStore(tmp_path)
    store.commit(Write([draft() for _ in range(5000)]))
    store.close()
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert cli.main(["audit", "verify", "--data-dir", str(tmp_path)]) == 0
    shown = terminal.getvalue()
    assert "verifying audit log: 5000/5000 (100%) events" in shown
    assert shown.endswith("\r\x1b[K")
    assert "OK:" in capsys.readouterr().out


def _rewrite(out: Path, keep: Callable[[list[str]], list[str]]) -> None:
    """Rewrite an export's event lines (the statement stays first)."""
    statement, *lines = out.read_text().splitlines()
    out.write_text("\n".join([statement, *keep(lines)]) + "\n")


@pytest.mark.parametrize("after", ["0", "10"])
@pytest.mark.parametrize(
    ("cut", "first_bad", "problem"),
    [
        (lambda lines: lines[1:], "first", "event {first} is missing from the start"),
        (lambda lines: lines[3:], "first", "events {first}..{first+2} are missing from the start"),
        (lambda lines: lines[:-1], "30", "event 30 is missing from the end"),
        (lambda lines: lines[:-4], "27", "events 27..30 are missing from the end"),
        (lambda lines: [*lines[:4], *lines[7:]], "first+4", "{first+4}..{first+6} missing"),
        (lambda lines: [], "first", "events {first}..30 are missing from the end"),
    ],
    ids=["first-line", "first-lines", "last-line", "last-lines", "middle", "all"],
)
def test_an_export_missing_its_first_last_or_middle_events_fails_naming_them(
    log: Log,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    after: str,
    cut: Callable[[list[str]], list[str]],
    first_bad: str,
    problem: str,
) -> None:
    out, _, _ = export(capsys, log, tmp_path / "audit.jsonl", "--after", after)
    first = int(after) + 1
    _rewrite(out, cut)
    code, report = verify_json(capsys, *files(out))
    assert code == 1 and report["ok"] is False
    names = {"first": first, "first+2": first + 2, "first+4": first + 4, "first+6": first + 6}
    assert report["first_bad_sequence"] == eval(first_bad, {}, names)
    expected = problem.format_map(_Sums(names))
    assert expected in str(report["problem"]), report["problem"]
    assert f"signed for {first}..30" in str(report["problem"]) or "missing (found" in str(
        report["problem"]
    )


class _Sums(dict[str, int]):
    """`{first+2}` in a format string: a name plus a number."""

    def __missing__(self, key: str) -> int:
        name, _, extra = key.partition("+")
        return self[name] + int(extra or 0)


def test_an_export_without_its_signed_statement_fails(
    log: Log, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, _, _ = export(capsys, log, tmp_path / "audit.jsonl")
    out.write_text("\n".join(out.read_text().splitlines()[1:]) + "\n")
    code, report = verify_json(capsys, *files(out))
    assert code == 1
    assert "no signed statement of its range" in str(report["problem"])


def test_an_export_statement_edited_or_signed_by_another_key_fails(
    log: Log, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, _, _ = export(capsys, log, tmp_path / "audit.jsonl", "--after", "10")
    statement, *lines = out.read_text().splitlines()
    note = json.loads(statement)["export_statement"]
    # Claim the export starts later, as someone who cut its first lines would.
    forged = json.dumps({"export_statement": note.replace("first 11\n", "first 14\n")})
    out.write_text("\n".join([forged, *lines[3:]]) + "\n")
    code, report = verify_json(capsys, *files(out))
    assert code == 1 and "does not verify" in str(report["problem"])
    # Re-signed with another key under the same name: the real verifier key refuses it.
    other = LogKey.generate("audit.test.example/audit")
    text = note.split("\n\n")[0].replace("first 11\n", "first 14\n") + "\n"
    resigned = json.dumps({"export_statement": other.sign(text)})
    out.write_text("\n".join([resigned, *lines[3:]]) + "\n")
    code, report = verify_json(capsys, *files(out))
    assert code == 1 and "no signature by audit.test.example/audit" in str(report["problem"])


def test_verifying_an_export_needs_the_log_key(
    log: Log, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, cps, jwks = export(capsys, log, tmp_path / "audit.jsonl")
    code, _, err = run(
        capsys, "verify", "--file", str(out), "--checkpoints", str(cps), "--jwks", str(jwks)
    )
    assert code == 2 and "--log-key" in err


def test_an_export_is_refused_without_the_log_key_that_signs_it(
    log: Log, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (log.data_dir / LOG_KEY_FILE).unlink()
    code, out, err = run(capsys, "export", "--data-dir", str(log.data_dir))
    assert code == 2 and not out
    assert "no audit log key at" in err and "--log-private-key" in err


def test_the_database_walk_rebuilds_the_merkle_tree_and_catches_a_forged_node(
    log: Log, attacker: sqlite3.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = verify_json(capsys, "--data-dir", str(log.data_dir))
    assert code == 0 and report["tree_roots_verified"] == 4  # three checkpoints, the head
    attacker.execute("UPDATE audit_tree SET hash=zeroblob(32) WHERE level=0 AND idx=29")
    code, report = verify_json(capsys, "--data-dir", str(log.data_dir))
    assert code == 1 and "Merkle tree" in str(report["problem"])
