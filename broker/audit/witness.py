"""A witness: follows a log's signed tree heads, accepts each only if it is consistent with
the last one it accepted, and cosigns it; a fork, a rewrite or a rollback raises an alarm.

Whoever holds the log key can sign a head for any history; what they cannot do is make a
rewritten history consistent with a head someone else kept from before. The witness is that
someone: it keeps the last head it accepted (trust on first use, in its state directory) and
checks every newer one against it with a consistency proof (RFC 9162 §2.1.4).

Cosignatures follow C2SP tlog-cosignature (https://c2sp.org/tlog-cosignature): an Ed25519
signature, key type 0x04, over `cosignature/v1\\ntime <unix seconds>\\n` and the checkpoint
text, added to the note as a signature line `— <witness> <base64(key id || time (8 bytes,
big-endian) || signature)>`.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.clock import Clock
from tokenbroker.merkle import (
    SIGNATURE_PREFIX,
    Checkpoint,
    ProofError,
    VerifierKey,
    note_key_id,
    verifier_key_text,
    verify_checkpoint,
    verify_consistency,
)

COSIGNATURE_TYPE = 0x04
LATEST = "latest.checkpoint"
HISTORY = "accepted.jsonl"

# prove(first, second) -> the consistency proof between those sizes, from the log.
Prover = Callable[[int, int], Sequence[bytes]]


class Alarm(Exception):
    """The log showed two histories: a fork, a rewrite, a rollback, or a bad signature."""


@dataclass(frozen=True)
class Accepted:
    checkpoint: Checkpoint
    cosigned: str  # the note with the witness's cosignature line added
    first_seen: bool


class WitnessKey:
    """The witness's own Ed25519 key, which cosigns the heads it accepted."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self.name = name
        self._key = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = raw
        self.key_id = note_key_id(name, raw, COSIGNATURE_TYPE)

    def verifier_text(self) -> str:
        return verifier_key_text(self.name, COSIGNATURE_TYPE, self.public_key)

    def cosign(self, checkpoint_text: str, now: int) -> str:
        """The cosignature line for a checkpoint's text (its lines before the blank line)."""
        signature = self._key.sign(cosignature_message(checkpoint_text, now))
        blob = self.key_id + struct.pack(">Q", now) + signature
        return f"{SIGNATURE_PREFIX}{self.name} {base64.b64encode(blob).decode()}"


def cosignature_message(checkpoint_text: str, when: int) -> bytes:
    """What a witness signs (C2SP tlog-cosignature v1): the checkpoint's text with a time."""
    return f"cosignature/v1\ntime {when}\n{checkpoint_text}".encode()


def verify_cosignature(note: str, name: str, public_key: bytes) -> int:
    """The time of a valid cosignature by (name, key) on `note`; ProofError if none."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key_id = note_key_id(name, public_key, COSIGNATURE_TYPE)
    text, _, signatures = note.partition("\n\n")
    text += "\n"
    for line in signatures.splitlines():
        signer, _, encoded = line.removeprefix(SIGNATURE_PREFIX).partition(" ")
        blob = base64.b64decode(encoded)
        if signer != name or blob[:4] != key_id or len(blob) != 76:
            continue
        (when,) = struct.unpack(">Q", blob[4:12])
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(
                blob[12:], cosignature_message(text, when)
            )
        except InvalidSignature:
            raise ProofError(f"the cosignature by {name} does not verify") from None
        return int(when)
    raise ProofError(f"no cosignature by {name}")


class Witness:
    """Checks heads of one log (`log_key`) against what it accepted before (`state`)."""

    def __init__(self, log_key: VerifierKey, key: WitnessKey, state: Path, clock: Clock) -> None:
        self._log_key = log_key
        self._key = key
        self._state = state
        self._clock = clock
        state.mkdir(parents=True, exist_ok=True, mode=0o700)

    def latest(self) -> Checkpoint | None:
        path = self._state / LATEST
        if not path.exists():
            return None
        return verify_checkpoint(path.read_text(), self._log_key)

    def observe(self, note: str, prove: Prover) -> Accepted:
        """Accept and cosign the head in `note`, or raise Alarm saying what the log did."""
        try:
            new = verify_checkpoint(note, self._log_key)
        except ProofError as exc:
            raise Alarm(f"a head that does not verify with the log's key: {exc}") from None
        old = self.latest()
        if old is not None:
            self._check_extends(old, new, prove)
        text = note.partition("\n\n")[0] + "\n"
        cosigned = note.rstrip("\n") + "\n" + self._key.cosign(text, int(self._clock())) + "\n"
        self._keep(new, cosigned)
        return Accepted(new, cosigned, first_seen=old is None)

    def _check_extends(self, old: Checkpoint, new: Checkpoint, prove: Prover) -> None:
        if new.size < old.size:
            raise Alarm(
                f"rollback: the log shrank from {old.size} to {new.size} events (a restored "
                "older copy, or a rewritten history)"
            )
        if new.size == old.size:
            if new.root != old.root:
                raise Alarm(f"fork: two different heads for the log of {new.size} events")
            return
        try:
            proof = prove(old.size, new.size)
            verify_consistency(old.size, new.size, list(proof), old.root, new.root)
        except ProofError as exc:
            raise Alarm(
                f"rewrite: the log of {new.size} events does not extend the log of {old.size} "
                f"this witness accepted: {exc}"
            ) from None

    def _keep(self, head: Checkpoint, cosigned: str) -> None:
        latest = self._state / LATEST
        temporary = latest.with_suffix(".tmp")
        temporary.write_text(cosigned)
        os.replace(temporary, latest)
        entry = {"size": head.size, "root": base64.b64encode(head.root).decode()}
        with (self._state / HISTORY).open("a") as history:
            history.write(json.dumps({**entry, "time": int(self._clock())}) + "\n")
