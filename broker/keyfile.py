"""Private keys on disk: one way to write them, readable by the owner only.

Signing keys (runs.keys), the audit log key (audit.lognote) and a witness's key (cli.witness)
are all written here: created 0600 in a 0700 directory and never widened, refused if the file
already exists (a key is never silently replaced), and flushed to disk before anything is
signed with it. A pure helper: no gRPC, nothing above the domain.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


def write_private_key(path: Path, key: PrivateKeyTypes) -> None:
    """Write `key` as unencrypted PKCS#8 PEM to the new file `path` (FileExistsError if it
    exists), created 0600, fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
