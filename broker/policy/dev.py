"""First start without `--policy`: a development policy and admin key in the data dir.

The broker writes, each readable by its owner only (0600):

    dev-policy.toml      one account, "dev-admin", with every role and scope "*/*/*"
    dev-admin-key.pem    its EC P-256 private key (the policy holds only the public half)
    dev-admin.json       what a local client needs: account, key file and id, audience

and uses them from then on. `tokenbroker.credentials.dev_admin_credentials(data_dir)` picks
them up, so a local broker works with no set-up. Never for production: use --policy FILE.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tokenbroker.defaults import DEV_CLIENT_FILE

log = logging.getLogger(__name__)

POLICY_FILE = "dev-policy.toml"
KEY_FILE = "dev-admin-key.pem"
ACCOUNT = "dev-admin"
KEY_ID = "dev-admin-1"

_POLICY_TEMPLATE = """\
# Development policy, written by token-broker because it was started without --policy.
# The account below may do everything, everywhere. Do not use this file in production:
# write a policy for your callers and start the broker with --policy FILE.
# Its private key is {key_file} next to this file (never copy it anywhere).
version = 1

[accounts.{account}]
roles = ["admin", "orchestrator", "delegator", "auditor", "verifier"]
scopes = ["*/*/*"]
keys = [{{ kid = "{key_id}", pem = \"\"\"
{public_pem}\"\"\" }}]

[accounts.{account}.delegation]
user_domains = ["*"]
asserted_identities = true
asserted_domains = ["*"]
"""


def ensure(data_dir: Path, audience: str) -> Path:
    """The development policy's path, writing it and its admin key on first use."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # owner-only, like its files
    policy_path = data_dir / POLICY_FILE
    key_path = data_dir / KEY_FILE
    if policy_path.exists() and key_path.exists():
        log.warning(
            "no --policy given: using the DEVELOPMENT policy (account dev-admin may do "
            "everything); use --policy FILE in production",
            extra={"policy": str(policy_path)},
        )
    else:
        _create(policy_path, key_path)
        log.warning(
            "no --policy given: created a DEVELOPMENT policy and admin key in the data dir "
            "(account dev-admin may do everything); use --policy FILE in production",
            extra={"policy": str(policy_path), "key_file": str(key_path)},
        )
    _update_client_file(data_dir / DEV_CLIENT_FILE, audience)
    return policy_path


def _update_client_file(path: Path, audience: str) -> None:
    """Keep dev-admin.json's audience in step with the broker's issuer setting.

    Written only when it changes, and a failure to write it does not stop the broker: after
    a crash on a full disk the broker must still start and serve reads and verification."""
    client = {"account": ACCOUNT, "key_file": KEY_FILE, "key_id": KEY_ID, "audience": audience}
    text = json.dumps(client, indent=2) + "\n"
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass  # missing or unreadable: write it
    try:
        _write_private(path, text)
    except OSError as exc:
        log.error(
            "could not update the development client file; local clients may use a stale "
            "audience until it is written",
            extra={"path": str(path), "error": str(exc)},
        )


def _create(policy_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    policy = _POLICY_TEMPLATE.format(
        account=ACCOUNT, key_file=KEY_FILE, key_id=KEY_ID, public_pem=public_pem
    )
    # Key first: a policy naming a key that was never written would lock everyone out.
    _write_private(key_path, private_pem)
    _write_private(policy_path, policy)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a 0600 file atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind
        raise
