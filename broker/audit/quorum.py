"""Witness cosignatures that reach the broker, and the quorum that makes a tree head final.

A witness (`token-broker witness --submit`) posts the note it cosigned: the checkpoint text,
the log's signature and its own C2SP tlog-cosignature line (type 0x04, see
broker.audit.witness). The broker keeps a cosignature only if the log key signed that
checkpoint, its root is the broker's own tree at that size, and the signature verifies with a
configured witness key (`--witness-key`): the signature is the authentication, so posting needs
no credential. A head cosigned by at least `--witness-quorum` distinct configured witnesses is
final: that many independent parties saw it and checked it extends what they saw before.

The served checkpoint carries the kept cosignature lines as extra signature lines (C2SP
signed-note), so a client verifies the quorum itself with the witnesses' keys.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import merkle
from broker.audit.events import Action, AuditDraft, Outcome
from broker.audit.refusals import RefusalLedger
from broker.audit.treehead import TreeHead, TreeHeads
from broker.audit.witness import COSIGNATURE_TYPE, cosignature_message
from broker.clock import Clock
from broker.errors import InvalidArgument
from broker.store import CosignatureRecord, RecordCosignature, Store, Write
from tokenbroker.merkle import (
    SIGNATURE_PREFIX,
    ProofError,
    VerifierKey,
    parse_verifier_key,
    verifier_key_text,
    verify_checkpoint,
)

MAX_SUBMISSION_BYTES = 8 * 1024  # a checkpoint and a few signature lines
_COSIGNATURE_BLOB = 4 + 8 + 64  # key id, time, Ed25519 signature

# Called with "accepted" or "refused" for each submission (the broker's metrics).
ResultCounter = Callable[[str], None]


class WitnessKeyError(ValueError):
    """A configured witness key is not a C2SP cosignature verifier key."""


@dataclass(frozen=True)
class WitnessVerifier:
    """A witness's cosignature verifier key: `<name>+<hex key id>+<base64(0x04 || key)>`, as
    `token-broker witness` writes it to witness.vkey."""

    name: str
    key_id: bytes
    public_key: bytes

    @classmethod
    def parse(cls, text: str) -> WitnessVerifier:
        try:
            return cls(*parse_verifier_key(text, COSIGNATURE_TYPE, "witness key"))
        except ProofError as exc:
            raise WitnessKeyError(str(exc)) from None

    @classmethod
    def load(cls, path: Path) -> WitnessVerifier:
        try:
            return cls.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise WitnessKeyError(f"cannot read {path}: {exc}") from None

    def text(self) -> str:
        return verifier_key_text(self.name, COSIGNATURE_TYPE, self.public_key)

    def verifies(self, blob: bytes, checkpoint_text: str) -> bool:
        (when,) = struct.unpack(">Q", blob[4:12])
        message = cosignature_message(checkpoint_text, when)
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(blob[12:], message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class CosignedHead:
    """A signed tree head as served: its note with the kept cosignature lines appended."""

    head: TreeHead
    note: str
    cosignatures: int  # distinct configured witnesses that cosigned it
    final: bool  # the quorum is on and reached


class WitnessQuorum:
    def __init__(
        self,
        store: Store,
        heads: TreeHeads,
        log_key: VerifierKey,
        witnesses: Sequence[WitnessVerifier],
        quorum: int,
        count: ResultCounter | None = None,
        refusals: RefusalLedger | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._heads = heads
        self._log_key = log_key
        self._witnesses = {(w.name, w.key_id): w for w in witnesses}
        self._quorum = quorum
        self._count = count or (lambda result: None)
        self._refusals = refusals
        self._clock = clock

    def cosigned(self, head: TreeHead) -> CosignedHead:
        """`head` with the cosignatures kept for it (for its size and root)."""
        known = {w.text() for w in self._witnesses.values()}
        kept = [
            c
            for c in self._store.cosignatures(head.size)
            if c.root == head.root and c.witness in known
        ]
        note = head.note.rstrip("\n") + "\n" + "".join(c.line + "\n" for c in kept)
        final = self._quorum > 0 and len(kept) >= self._quorum
        return CosignedHead(head, note, len(kept), final)

    def latest(self) -> CosignedHead:
        return self.cosigned(self._heads.latest())

    def submit(self, body: bytes, peer: str = "") -> list[str]:
        """Keep the configured witnesses' valid cosignatures in `body` (a cosigned checkpoint
        note); the names of the witnesses kept. InvalidArgument when nothing can be kept
        (audited as a refusal: repeats from one peer for one reason become one counted event).
        """
        try:
            kept = self._submit(body)
        except InvalidArgument as error:
            self._count("refused")
            self._audit_refusal(error, peer)
            raise
        self._count("accepted")
        return kept

    def _audit_refusal(self, error: InvalidArgument, peer: str) -> None:
        if self._refusals is None or self._clock is None:
            return
        reason = error.violations[0].rule if error.violations else error.message
        event = AuditDraft(
            time=self._clock(),
            action=Action.COSIGNATURE_REFUSED,
            outcome=Outcome.DENIED,
            details={"reason": reason, "peer": peer[:128]},
        )
        # The HTTP peer is an address without a port: one source per client host.
        self._refusals.record(event, source=peer[:128], reason=reason)

    def _submit(self, body: bytes) -> list[str]:
        if len(body) > MAX_SUBMISSION_BYTES:
            raise _refused(f"a cosigned checkpoint is at most {MAX_SUBMISSION_BYTES} bytes")
        try:
            note = body.decode("utf-8")
            checkpoint = verify_checkpoint(note, self._log_key)
        except (UnicodeDecodeError, ProofError):
            raise _refused("not a checkpoint signed by this log") from None
        if not self._is_own_tree(checkpoint.size, checkpoint.root):
            raise _refused("not a checkpoint of this log's tree")
        text = note.partition("\n\n")[0] + "\n"
        records: list[CosignatureRecord] = []
        kept: list[str] = []
        for line in note.partition("\n\n")[2].splitlines():
            witness, blob = self._cosignature(line)
            if witness is None:
                continue  # the log's own signature, or a witness not configured here
            if not witness.verifies(blob, text):
                raise _refused(f"the cosignature by {witness.name} does not verify")
            records.append(
                CosignatureRecord(checkpoint.size, checkpoint.root, witness.text(), line)
            )
            kept.append(witness.name)
        if not records:
            raise _refused("no cosignature by a witness this broker is configured with")
        # Only a submission that is valid throughout is kept, all of it.
        for record in records:
            self._store.commit(Write([], RecordCosignature(record)))
        return kept

    def _cosignature(self, line: str) -> tuple[WitnessVerifier | None, bytes]:
        if not line.startswith(SIGNATURE_PREFIX):
            raise _refused("every line after the checkpoint must be a signature line")
        name, _, encoded = line.removeprefix(SIGNATURE_PREFIX).partition(" ")
        try:
            blob = base64.b64decode(encoded, validate=True)
        except (ValueError, binascii.Error):
            raise _refused("a signature line is not base64") from None
        witness = self._witnesses.get((name, blob[:4]))
        if witness is not None and len(blob) != _COSIGNATURE_BLOB:
            raise _refused(f"the cosignature by {name} is not a type 0x04 cosignature")
        return witness, blob

    def _is_own_tree(self, size: int, root: bytes) -> bool:
        if not 0 < size <= self._heads.latest().size:
            return False
        try:
            return merkle.root_at(size, self._store.tree_nodes) == root
        except merkle.MissingNodes:
            return False


def _refused(reason: str) -> InvalidArgument:
    return InvalidArgument.field("cosignature", reason)
