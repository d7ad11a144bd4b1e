"""Checking token-broker's audit log proofs offline: RFC 9162 Merkle hashing, inclusion and
consistency proofs, and C2SP signed notes (checkpoints), with nothing but the log's public key.

This module is the whole verifier: it imports only the standard library and `cryptography`
(for Ed25519), so an auditor can copy it next to a bundle and check it without the broker.

Hashing (RFC 9162 §2.1.1), SHA-256 throughout:

    leaf hash  = SHA-256(0x00 || leaf data)        leaf data: the event's canonical JSON
    node hash  = SHA-256(0x01 || left || right)    the bytes the chain hash covers
    empty tree = SHA-256("")

A tree of n leaves is split at k, the largest power of two below n: MTH(D[n]) =
node(MTH(D[0:k]), MTH(D[k:n])). Leaf i is the event with sequence `base + i + 1`.

Signed notes (https://c2sp.org/signed-note): a text of lines, a blank line, then signature
lines `— <name> <base64(key id (4 bytes) || Ed25519 signature of the text)>`; the key id is
the first 4 bytes of SHA-256(name || "\\n" || 0x01 || public key). A verifier key is written
`<name>+<hex key id>+<base64(0x01 || public key)>`. A checkpoint
(https://c2sp.org/tlog-checkpoint) is a note whose text is `origin`, the tree size in decimal
and the base64 root hash, one per line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
ED25519_TYPE = 0x01
SIGNATURE_PREFIX = "\u2014 "  # an em dash and a space
# Bounds on hostile input: a note is a few hundred bytes, a proof at most 64 hashes
# (2^64 leaves), a tree size fits 63 bits.
MAX_NOTE_BYTES = 16 * 1024
MAX_PROOF_HASHES = 64
MAX_TREE_SIZE = (1 << 63) - 1


class ProofError(Exception):
    """A proof, a note or a signature does not verify; the message says which and why."""


# -- hashing ------------------------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of a whole list of leaf hashes, as RFC 9162 §2.1.1 defines it (recursively)."""
    if not leaf_hashes:
        return EMPTY_ROOT
    if len(leaf_hashes) == 1:
        return leaf_hashes[0]
    k = split_point(len(leaf_hashes))
    return node_hash(root_of_leaves(leaf_hashes[:k]), root_of_leaves(leaf_hashes[k:]))


# -- compact ranges: the tree's right edge ----------------------------------------------------


def frontier_append(frontier: list[bytes], size: int, leaf: bytes) -> list[bytes]:
    """Append one leaf hash to the frontier of a tree of `size` leaves (the roots of its
    full subtrees, largest first: one per set bit of size); the new frontier."""
    frontier = list(frontier)
    carry, index = leaf, size
    while index & 1:
        carry = node_hash(frontier.pop(), carry)
        index >>= 1
    frontier.append(carry)
    return frontier


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """The root of the tree whose frontier this is."""
    if not frontier:
        return EMPTY_ROOT
    root = frontier[-1]
    for left in reversed(frontier[:-1]):
        root = node_hash(left, root)
    return root


# -- proofs (RFC 9162 §2.1.3.2 and §2.1.4.2) ------------------------------------------------


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ProofError unless `proof` shows leaf hash `leaf` at `index` in the tree of `size`
    leaves whose root is `root`."""
    _check_hashes([leaf, root, *proof])
    if not 0 <= index < size <= MAX_TREE_SIZE:
        raise ProofError(f"leaf index {index} is not inside a tree of {size} leaves")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofError(f"leaf {index} is not in the tree of size {size} with this root")


def verify_consistency(
    first: int, second: int, proof: Sequence[bytes], first_root: bytes, second_root: bytes
) -> None:
    """Raise ProofError unless `proof` shows the tree of `second` leaves (root `second_root`)
    extends the tree of `first` leaves (root `first_root`): same first `first` leaves."""
    _check_hashes([first_root, second_root, *proof])
    if not 0 <= first <= second <= MAX_TREE_SIZE:
        raise ProofError(f"sizes {first} and {second} are not an old and a new tree size")
    if first == second:
        if proof:
            raise ProofError("a consistency proof between equal sizes is empty")
        if first_root != second_root:
            raise ProofError(f"two different roots for the same tree size {first}")
        return
    if first == 0:
        if proof:
            raise ProofError("a consistency proof from the empty tree is empty")
        return
    if not proof:
        raise ProofError("the consistency proof is empty")
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than the trees are deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency proof is shorter than the trees are deep")
    if fr != first_root:
        raise ProofError(f"the proof does not reproduce the root of the tree of size {first}")
    if sr != second_root:
        raise ProofError(f"the proof does not reproduce the root of the tree of size {second}")


def _check_hashes(hashes: Iterable[bytes]) -> None:
    hashes = list(hashes)
    if len(hashes) > MAX_PROOF_HASHES + 2:
        raise ProofError(f"a proof has at most {MAX_PROOF_HASHES} hashes")
    if any(not isinstance(h, bytes) or len(h) != HASH_SIZE for h in hashes):
        raise ProofError(f"every hash is {HASH_SIZE} bytes")


# -- signed notes and checkpoints --------------------------------------------------------------


@dataclass(frozen=True)
class VerifierKey:
    """An Ed25519 note verifier key: `<name>+<hex key id>+<base64(0x01 || public key)>`."""

    name: str
    key_id: bytes
    public_key: bytes

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        return cls(*parse_verifier_key(text, ED25519_TYPE, "verifier key"))

    def text(self) -> str:
        return verifier_key_text(self.name, ED25519_TYPE, self.public_key)


def note_key_id(name: str, public_key: bytes, key_type: int = ED25519_TYPE) -> bytes:
    """The 4-byte key id of a signed-note key: SHA-256(name ‖ "\n" ‖ type ‖ key)[:4]."""
    data = name.encode() + b"\n" + bytes([key_type]) + public_key
    return hashlib.sha256(data).digest()[:4]


def verifier_key_text(name: str, key_type: int, public_key: bytes) -> str:
    """`<name>+<hex key id>+<base64(type ‖ public key)>`, as signed-note verifier keys are
    written (type 0x01 a log's Ed25519 key, 0x04 a witness's cosignature key)."""
    encoded = base64.b64encode(bytes([key_type]) + public_key).decode()
    return f"{name}+{note_key_id(name, public_key, key_type).hex()}+{encoded}"


def parse_verifier_key(text: str, key_type: int, what: str) -> tuple[str, bytes, bytes]:
    """(name, key id, 32-byte Ed25519 public key) of a verifier key of `key_type`; ProofError,
    naming `what` it should be, for anything else."""
    parts = text.strip().split("+", 2)  # the base64 key may hold "+" itself
    if len(parts) != 3 or not _valid_name(parts[0]):
        raise ProofError(f"a {what} is <name>+<hex key id>+<base64 key>")
    name, hex_id, encoded = parts
    try:
        key_id, raw = bytes.fromhex(hex_id), base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise ProofError(f"the {what}'s id or key is not hex / base64") from None
    if len(key_id) != 4 or len(raw) != 33 or raw[0] != key_type:
        raise ProofError(f"only Ed25519 {what}s (type 0x{key_type:02x}, 32 bytes) are accepted")
    if note_key_id(name, raw[1:], key_type) != key_id:
        raise ProofError(f"the {what}'s id does not match its name and key")
    return name, key_id, raw[1:]


def _valid_name(name: str) -> bool:
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def verify_note(note: str, key: VerifierKey) -> str:
    """The text of a signed note that carries a valid signature by `key`; ProofError if not.

    Signature lines by other keys (a witness's cosignature) are allowed and ignored.
    """
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise ProofError(f"a signed note is at most {MAX_NOTE_BYTES} bytes")
    text, sep, signatures = note.partition("\n\n")
    if not sep or not text or not note.endswith("\n"):
        raise ProofError("not a signed note: text, a blank line, then signature lines")
    text += "\n"
    for line in signatures.removesuffix("\n").split("\n"):
        if not line.startswith(SIGNATURE_PREFIX):
            raise ProofError("a signature line starts with an em dash and a space")
        name, _, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
        if name != key.name:
            continue
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (ValueError, binascii.Error):
            raise ProofError("a signature is not base64") from None
        if signature[:4] != key.key_id:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(key.public_key).verify(signature[4:], text.encode())
        except InvalidSignature:
            raise ProofError(f"the signature by {key.name} does not verify") from None
        return text
    raise ProofError(f"no signature by {key.name} (key id {key.key_id.hex()})")


@dataclass(frozen=True)
class Checkpoint:
    """A verified C2SP checkpoint: the log's origin, its size and root hash."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()


def verify_checkpoint(note: str, key: VerifierKey) -> Checkpoint:
    """A checkpoint signed by `key`; ProofError if the signature or the body is wrong."""
    lines = verify_note(note, key).removesuffix("\n").split("\n")
    if len(lines) < 3:
        raise ProofError("a checkpoint has an origin, a tree size and a root hash")
    origin, size_text, root_text = lines[:3]
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise ProofError("the checkpoint's tree size is not a decimal number")
    size = int(size_text)
    try:
        root = base64.b64decode(root_text, validate=True)
    except (ValueError, binascii.Error):
        raise ProofError("the checkpoint's root hash is not base64") from None
    if len(root) != HASH_SIZE or size > MAX_TREE_SIZE:
        raise ProofError("the checkpoint's root hash or size is out of range")
    if origin != key.name:
        raise ProofError(f"the checkpoint is for log {origin!r}, the key for {key.name!r}")
    return Checkpoint(origin, size, root, tuple(lines[3:]))


def checkpoint_text(origin: str, size: int, root: bytes) -> str:
    """The body a checkpoint signs (before its signature lines)."""
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


# -- bundles: what `token-broker audit prove` writes and `audit check` reads ------------------

INCLUSION_BUNDLE = "tokenbroker-audit-inclusion/v1"
CONSISTENCY_BUNDLE = "tokenbroker-audit-consistency/v1"


def _proof_of(bundle: dict[str, object]) -> list[bytes]:
    hashes = bundle.get("proof")
    if not isinstance(hashes, list) or len(hashes) > MAX_PROOF_HASHES:
        raise ProofError(f"the bundle's proof is a list of at most {MAX_PROOF_HASHES} hashes")
    try:
        return [base64.b64decode(str(h), validate=True) for h in hashes]
    except (ValueError, binascii.Error):
        raise ProofError("the bundle's proof hashes are not base64") from None


def _count(bundle: dict[str, object], name: str) -> int:
    value = bundle.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TREE_SIZE:
        raise ProofError(f"the bundle's {name} is not a count")
    return value


def _note(bundle: dict[str, object], name: str) -> str:
    value = bundle.get(name)
    if not isinstance(value, str):
        raise ProofError(f"the bundle has no {name}")
    return value


def check_inclusion_bundle(bundle: dict[str, object], key: VerifierKey) -> Checkpoint:
    """Check an inclusion bundle offline: its checkpoint is signed by `key`, and the event
    (`record`, the exact bytes hashed) is leaf `leaf_index` of that tree. Returns the
    checkpoint; ProofError says what failed."""
    if bundle.get("type") != INCLUSION_BUNDLE:
        raise ProofError(f"not a {INCLUSION_BUNDLE} bundle")
    head = verify_checkpoint(_note(bundle, "checkpoint"), key)
    record = _note(bundle, "record")
    index = _count(bundle, "leaf_index")
    if _count(bundle, "tree_size") != head.size:
        raise ProofError("the bundle's tree size is not its checkpoint's")
    verify_inclusion(leaf_hash(record.encode()), index, head.size, _proof_of(bundle), head.root)
    return head


def check_consistency_bundle(
    bundle: dict[str, object], key: VerifierKey, old_checkpoint: str | None = None
) -> tuple[Checkpoint, Checkpoint]:
    """Check a consistency bundle offline: both checkpoints signed by `key` (the old one may
    be one the auditor kept, given as `old_checkpoint`), and the newer tree extends the
    older. Returns (old, new); ProofError says what failed."""
    if bundle.get("type") != CONSISTENCY_BUNDLE:
        raise ProofError(f"not a {CONSISTENCY_BUNDLE} bundle")
    old = verify_checkpoint(old_checkpoint or _note(bundle, "old_checkpoint"), key)
    new = verify_checkpoint(_note(bundle, "checkpoint"), key)
    if (_count(bundle, "first"), _count(bundle, "second")) != (old.size, new.size):
        raise ProofError("the bundle's sizes are not its checkpoints'")
    verify_consistency(old.size, new.size, _proof_of(bundle), old.root, new.root)
    return old, new
